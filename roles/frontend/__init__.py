"""The frontend role."""

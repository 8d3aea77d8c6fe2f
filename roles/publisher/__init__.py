"""The publisher role."""

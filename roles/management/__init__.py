"""The management role."""

"""The fileserver role."""

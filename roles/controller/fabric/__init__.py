"""Fabric providers: where role hosts come from."""

"""Jinja2 templates of the portals (a package only so that packaging ships the files)."""

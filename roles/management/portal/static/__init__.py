"""The portals' stylesheet (a package only so that packaging ships the files)."""

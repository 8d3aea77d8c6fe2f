"""The sitecloud roles, one OS process each: controller, management, frontend, worker, fileserver, publisher."""

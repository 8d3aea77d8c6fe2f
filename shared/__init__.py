"""Code that two or more sitecloud roles need: config, errors, PKI and mTLS, the internal API, storage helpers."""

"""Benchmarks: sitecloud side by side with an anchor (nginx) in the same run. `make bench`."""

"""sterling.launch — the `sterling` command line."""

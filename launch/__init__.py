"""sterling.launch — the `sterling` command line (DESIGN.md §1)."""

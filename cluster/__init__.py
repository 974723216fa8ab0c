"""sterling.cluster — see DESIGN.md §1."""

"""sterling.sharding — see DESIGN.md §1."""

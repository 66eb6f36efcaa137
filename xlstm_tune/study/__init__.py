"""study layer (see DESIGN.md §2)."""

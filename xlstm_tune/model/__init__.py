"""model layer (see DESIGN.md §2)."""

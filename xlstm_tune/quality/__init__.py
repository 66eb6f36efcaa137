"""quality layer (see DESIGN.md §2)."""

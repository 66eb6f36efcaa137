"""quality layer (see docs/DESIGN.md §2)."""

"""study layer (see docs/DESIGN.md §2)."""

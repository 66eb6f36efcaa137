"""bench layer (see docs/DESIGN.md §2)."""

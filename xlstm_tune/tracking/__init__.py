"""tracking layer (see DESIGN.md §2)."""

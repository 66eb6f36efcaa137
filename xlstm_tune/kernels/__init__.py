"""kernels layer (see DESIGN.md §2)."""

"""kernels layer (see docs/DESIGN.md §2)."""

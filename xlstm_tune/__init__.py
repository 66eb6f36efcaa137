"""xlstm_tune: make xLSTM inference fast on your accelerator without changing the model's answers."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Never run an op on the CPU behind the user's back: an MPS op without a kernel must fail, not fall back.
# (An explicit PYTORCH_ENABLE_MPS_FALLBACK=1 from the user is respected.)
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "0")

__version__ = "0.1.0"
__all__ = ["load_model", "RuntimeOptions", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from xlstm_tune.model.loading import load_model
    from xlstm_tune.runtime.options import RuntimeOptions


def __getattr__(name: str) -> Any:
    # Lazy: `import xlstm_tune` stays cheap for the CLI's error paths (no torch import needed).
    if name == "load_model":
        from xlstm_tune.model.loading import load_model

        return load_model
    if name == "RuntimeOptions":
        from xlstm_tune.runtime.options import RuntimeOptions

        return RuntimeOptions
    raise AttributeError(name)

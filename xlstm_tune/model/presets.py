"""Built-in models: `tiny` (CPU tests), `xlstm-350m` and `xlstm-7b` (real shapes, random weights)."""
from __future__ import annotations

from xlstm_tune.model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Small enough for CPU tests, with an sLSTM block among its mLSTM blocks so every path runs.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_heads=4, slstm_block_indices=(1,),
        slstm_num_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ),
    # ~20M parameters: the CPU speed comparison against the transformers reference.
    "xlstm-20m": ModelConfig(vocab_size=4096, hidden_size=384, num_hidden_layers=8, num_heads=4),
    # xLSTM-Large shapes at 350M scale (embedding 1024, 24 blocks, 4 heads, GPT-NeoX vocabulary).
    "xlstm-350m": ModelConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_heads=4),
    # The public xLSTM-7B architecture.
    "xlstm-7b": ModelConfig(vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8),
}

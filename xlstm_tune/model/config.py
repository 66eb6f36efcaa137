"""Model configuration: every field of transformers' xLSTMConfig (legacy names included) plus sLSTM placement.

A checkpoint's config.json is read strictly: unknown fields are an error (a typo must not silently
change the model), and the shape fields are required.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from xlstm_tune.errors import CheckpointError

# Fields of transformers' xLSTMConfig that select the *reference's* kernels or training behaviour.
# We accept them (so real checkpoints load) but they do not change our math: our runtime chooses kernels.
_REFERENCE_ONLY_FIELDS = {
    "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "chunk_size", "return_last_states",
    "autocast_kernel_dtype", "inference_state_dtype", "max_inference_chunksize", "use_cache",
}
# Generic Hugging Face config keys that may appear in any config.json.
_GENERIC_HF_FIELDS = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "force_bos_token_insert",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "tokenizer_class",
    "add_cross_attention", "is_decoder", "pruned_heads", "torchscript", "use_return_dict",
    "_attn_implementation_autoset", "task_specific_params", "finetuning_task", "prefix",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "tf_legacy_loss",
    "use_bfloat16", "auto_map",
}
# Legacy name -> canonical name.
_LEGACY = {"embedding_dim": "hidden_size", "num_blocks": "num_hidden_layers"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads")


def round_up(x: float, multiple: int) -> int:
    """The reference's rounding, kept bit-for-bit: floor((x + m - 1) / m) * m (not a true ceil for
    fractional x: 96 * 2.667 = 256.03 rounds to 256), so checkpoint shapes agree."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an xLSTM-Large model (HF `xLSTMForCausalLM` layout) with optional sLSTM blocks."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    use_bias: bool = False
    norm_eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True  # accepted; the HF layout always carries backbone.out_norm
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    weight_mode: str = "single"
    eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1
    # sLSTM extension: block indices that are sLSTM blocks, and their layer shape.
    slstm_block_indices: tuple[int, ...] = ()
    slstm_num_heads: int = 4
    slstm_conv1d_kernel_size: int = 4
    # What the source config said about the reference's kernels (kept for provenance only).
    reference_fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in _REQUIRED:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"config field {name} must be a positive integer, got {value!r}")
        if self.weight_mode not in ("single", "fused"):
            raise CheckpointError(f"config field weight_mode must be 'single' or 'fused', got {self.weight_mode!r}")
        if self.qk_dim % self.num_heads or self.v_dim % self.num_heads:
            raise CheckpointError(
                f"qk_dim={self.qk_dim} and v_dim={self.v_dim} must be divisible by num_heads={self.num_heads}"
            )
        object.__setattr__(self, "slstm_block_indices", tuple(sorted(set(int(i) for i in self.slstm_block_indices))))
        for idx in self.slstm_block_indices:
            if not 0 <= idx < self.num_hidden_layers:
                raise CheckpointError(f"slstm_block_indices has {idx}, outside 0..{self.num_hidden_layers - 1}")
        if self.slstm_block_indices and self.hidden_size % self.slstm_num_heads:
            raise CheckpointError(
                f"hidden_size={self.hidden_size} must be divisible by slstm_num_heads={self.slstm_num_heads}"
            )

    # derived shapes (exactly as the reference layer computes them)
    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    def is_slstm(self, block: int) -> bool:
        return block in self.slstm_block_indices

    # ---- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face xLSTM config.json dict; unknown or missing fields are a CheckpointError."""
        if raw.get("model_type", "xlstm") != "xlstm":
            raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, expected 'xlstm'")
        own = {f.name for f in dataclasses.fields(cls)} - {"reference_fields"}
        unknown = sorted(set(raw) - own - set(_LEGACY) - _REFERENCE_ONLY_FIELDS - _GENERIC_HF_FIELDS)
        if unknown:
            raise CheckpointError(f"{source}: unknown config field(s) {unknown}; remove them or fix their spelling")
        values: dict[str, Any] = {}
        for legacy, canonical in _LEGACY.items():
            a, b = raw.get(legacy), raw.get(canonical)
            if a is not None and b is not None and a != b:
                raise CheckpointError(f"{source}: {legacy}={a} disagrees with {canonical}={b}")
            if a is not None or b is not None:
                values[canonical] = b if b is not None else a
        missing = [name for name in _REQUIRED if values.get(name, raw.get(name)) is None]
        if missing:
            raise CheckpointError(f"{source}: missing required config field(s) {missing}")
        for name in own:
            if name in raw and name not in values and raw[name] is not None:
                values[name] = raw[name]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        if "slstm_block_indices" in values:
            values["slstm_block_indices"] = tuple(values["slstm_block_indices"])
        values["reference_fields"] = {k: raw[k] for k in _REFERENCE_ONLY_FIELDS if k in raw}
        try:
            return cls(**values)
        except TypeError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' xLSTMConfig reads (sLSTM fields only when there are sLSTM blocks)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "reference_fields"}
        d["slstm_block_indices"] = list(self.slstm_block_indices)
        if not self.slstm_block_indices:
            for key in ("slstm_block_indices", "slstm_num_heads", "slstm_conv1d_kernel_size"):
                d.pop(key)
        d.update(model_type="xlstm", architectures=["xLSTMForCausalLM"],
                 embedding_dim=self.hidden_size, num_blocks=self.num_hidden_layers)
        return d

    def config_hash(self) -> str:
        """Stable short hash of the shape-and-numerics fields (for provenance in best.json)."""
        blob = json.dumps(self.to_hf_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

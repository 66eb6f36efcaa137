"""load_model: presets (random weights of real shapes) and Hugging Face checkpoint directories.

Weights go straight to the target device and dtype: the module is built on the meta device, storage is
allocated once on the target, and each tensor is read from safetensors and copied into place, so no
second full copy of the model ever exists.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlstm_tune.errors import CheckpointError, UserError
from xlstm_tune.model.config import ModelConfig
from xlstm_tune.model.language_model import LanguageModel
from xlstm_tune.model.presets import PRESETS
from xlstm_tune.model.tokenizer import ByteTokenizer, HFTokenizer
from xlstm_tune.model.xlstm import XLSTMForCausalLM
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.options import RuntimeOptions

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UserError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[key]


def _empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> XLSTMForCausalLM:
    with torch.device("meta"):
        net = XLSTMForCausalLM(cfg)
    return net.to(dtype).to_empty(device=device)  # cast on meta (free), allocate once on the target


@torch.no_grad()
def init_random_weights(net: XLSTMForCausalLM, seed: int = 0) -> None:
    """Random weights that keep activations O(1) through depth, with realistic gate biases.

    Gate weights are random too (transformers' initialiser zeroes them, which would leave the gates
    constant and hide bugs). Generated on the weights' device, in float32, then cast.
    """
    gen = torch.Generator(device=net.lm_head.weight.device).manual_seed(seed)
    depth = max(1, net.config.num_hidden_layers)

    def normal_(p: nn.Parameter, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(std).add_(mean))

    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight" and "group_norm" not in name:
            normal_(p, 0.1, 1.0)
        elif name.endswith("group_norm_weight"):
            normal_(p, 0.1)
        elif "embeddings" in name:
            normal_(p, 1.0)
        elif "fgate_preact.bias" in name or ("ifgate_preact.bias" in name):
            p.copy_(torch.linspace(3.0, 6.0, p.numel(), device=p.device).view(p.shape))
            if "ifgate" in name:  # first half is the input gate
                normal_(p[: p.numel() // 2], 1.0)
        elif "igate_preact.bias" in name:
            normal_(p, 1.0)
        elif name.endswith("recurrent_kernel"):
            normal_(p, 0.5 / math.sqrt(p.shape[1]))
        elif p.ndim >= 2:
            fan_in = p.shape[-1]
            scale = 1.0 / math.sqrt(2 * depth) if ("out_proj" in name or "proj_down" in name) else 1.0
            normal_(p, scale / math.sqrt(fan_in))
        else:
            normal_(p, 0.1)


def _find_shards(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from None
        shards = sorted({path / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing shard file(s) {missing} named in {index.name}; download them again")
        return shards, weight_map
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {path} has no *.safetensors weights: save the model with safetensors")
    return shards, None


@torch.no_grad()
def load_weights(net: XLSTMForCausalLM, path: Path, device: torch.device) -> None:
    """Copy every tensor from the checkpoint's safetensors files into the (already allocated) model."""
    from safetensors import SafetensorError, safe_open

    shards, weight_map = _find_shards(path)
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    read_device = dev.safetensors_read_device(device)
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device=read_device) as fh:
                for name in fh.keys():
                    if weight_map is not None and weight_map.get(name) != shard.name:
                        continue
                    if name not in params:
                        unexpected.append(name)
                        continue
                    tensor = fh.get_tensor(name)
                    target = params[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"weight {name} has shape {tuple(tensor.shape)} in {shard.name}, the config implies "
                            f"{tuple(target.shape)}: the config.json does not match the weights"
                        )
                    target.copy_(tensor)
                    loaded.add(name)
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read {shard.name}: corrupt or truncated safetensors file ({exc}); download it again") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {shard.name}: {exc}") from None
    if "lm_head.weight" not in loaded and net.config.tie_word_embeddings and "backbone.embeddings.weight" in loaded:
        net.lm_head.weight.copy_(net.backbone.embeddings.weight)
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weight(s) {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected weight(s) {_short(sorted(unexpected))}")
        raise CheckpointError(f"checkpoint {path}: {'; '.join(parts)}: the weights do not match config.json")


def _short(names: list[str], limit: int = 8) -> str:
    return str(names) if len(names) <= limit else str(names[:limit])[:-1] + f", ... ({len(names)} in all)]"


def read_config(path: Path) -> ModelConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return ModelConfig.from_hf_dict(raw, str(cfg_path))


def model_config(source: str | Path) -> ModelConfig:
    """The config of a preset or a checkpoint directory, without loading any weights."""
    if str(source) in PRESETS:
        return PRESETS[str(source)]
    path = Path(source)
    if not path.exists():
        raise UserError(f"model {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (config.json + *.safetensors)")
    return read_config(path)


def load_model(source: str | Path = "tiny", device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
               runtime: RuntimeOptions | None = None, seed: int = 0) -> LanguageModel:
    """Load a preset (`tiny`, `xlstm-350m`, `xlstm-7b`, ...) or a Hugging Face checkpoint directory."""
    target = dev.resolve_device(device)
    wdtype = resolve_dtype(dtype)
    cfg = model_config(source)
    if str(source) in PRESETS:
        net = _empty_model(cfg, target, wdtype)
        init_random_weights(net, seed)
        tokenizer: Any = ByteTokenizer() if cfg.vocab_size == 256 else _NumericTokenizer(cfg.vocab_size)
        return LanguageModel(net, tokenizer, target, str(source), runtime)
    path = Path(source)
    net = _empty_model(cfg, target, wdtype)
    load_weights(net, path, target)
    tok_path = path / "tokenizer.json"
    tokenizer = HFTokenizer(tok_path) if tok_path.is_file() else _NumericTokenizer(cfg.vocab_size)
    return LanguageModel(net, tokenizer, target, str(path), runtime)


class _NumericTokenizer:
    """For models without a tokenizer file: text is a space-separated list of token ids, bytes otherwise.

    Random-weight presets have no vocabulary; this keeps prompts reproducible (bytes map to ids).
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        parts = text.split()
        if parts and all(p.isdigit() for p in parts):
            ids = [int(p) for p in parts]
            bad = [i for i in ids if i >= self.vocab_size]
            if bad:
                raise UserError(f"token id(s) {bad[:5]} outside the vocabulary (size {self.vocab_size})")
            return ids
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

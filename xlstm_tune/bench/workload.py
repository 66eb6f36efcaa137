"""What a benchmark feeds the model: prompts of given lengths, and cheap facts about models and devices.

Prompts come from text (`--prompt`), a file (`--prompt-file`) or are synthetic token ids of the lengths
asked for (`--prefill-len 512,2048,8192`). Text is tokenised once and tiled (repeated) or cut to each
length, so every length measures real tokens of the user's prompt. Synthetic ids are drawn from a seeded
generator: the same seed gives the same prompt on every run and every machine.

`describe_model` and `device_capabilities` answer "what can run here" without loading any weights, so a
study can validate its search space before it starts a worker.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError

MAX_PROMPT_FILE_BYTES = 64 * 2**20


def parse_lengths(value: str | int | Sequence[Any] | None, flag: str = "--prefill-len") -> list[int]:
    """`"512,2048"` / `[512, 2048]` / `512` -> `[512, 2048]` (positive, unique, ascending)."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise UserError(f"{flag} must be positive integers like 512,2048, got {value!r}")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
    else:
        items = list(value)
    if not items:
        raise UserError(f"{flag} is empty: give positive integers like 512,2048")
    out: list[int] = []
    for item in items:
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            n = int(str(item).strip()) if not isinstance(item, (int, float)) else int(item)
        except ValueError:
            raise UserError(f"{flag}: {item!r} is not an integer: give positive integers like 512,2048") from None
        if n < 1:
            raise UserError(f"{flag}: lengths must be >= 1, got {n}")
        out.append(n)
    return sorted(set(out))


@dataclass(frozen=True)
class PromptSource:
    """Where prompt tokens come from: `text` (already read from --prompt or --prompt-file) or synthetic ids.

    `origin` says which, for records: "synthetic", "--prompt" or the file's path.
    """

    text: str | None = None
    origin: str = "synthetic"
    seed: int = 0

    @classmethod
    def from_args(cls, prompt: str | None = None, prompt_file: str | Path | None = None, seed: int = 0) -> "PromptSource":
        """Validate the pair of flags (at most one) and read the file; UserError names the problem."""
        if prompt is not None and prompt_file is not None:
            raise UserError("--prompt and --prompt-file were both given: pass one of them")
        if prompt is not None:
            if not prompt.strip():
                raise UserError("--prompt is empty: give some text, or leave it out for synthetic prompts")
            return cls(text=prompt, origin="--prompt", seed=seed)
        if prompt_file is not None:
            path = Path(prompt_file)
            if not path.is_file():
                raise UserError(f"--prompt-file {str(path)!r} does not exist or is not a file: pass a text file")
            if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
                raise UserError(f"--prompt-file {str(path)!r} is larger than 64 MiB: pass a shorter text")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"--prompt-file {str(path)!r} is not UTF-8 text: convert it to UTF-8") from None
            except OSError as exc:
                raise UserError(f"cannot read --prompt-file {str(path)!r}: {exc.strerror or exc}") from None
            if not text.strip():
                raise UserError(f"--prompt-file {str(path)!r} is empty: give a file with some text")
            return cls(text=text, origin=str(path), seed=seed)
        return cls(seed=seed)

    @property
    def synthetic(self) -> bool:
        return self.text is None

    def describe(self) -> dict[str, Any]:
        return {"prompt_origin": self.origin, "prompt_seed": self.seed if self.synthetic else None}


def prompt_ids(model: Any, length: int | None, source: PromptSource, batch: int = 1) -> Any:
    """Token ids [batch, length] on the model's device; row 0 is the same whatever `batch` is.

    Text is encoded with the model's tokenizer and repeated or cut to `length` (its own length when
    `length` is None); row r starts r tokens further into the repeated text, so rows differ. Synthetic
    ids are uniform over the vocabulary from a generator seeded with `source.seed`, the length and the
    row, so each length and row is reproducible on its own.
    """
    import torch

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch!r}")
    if source.text is not None:
        ids = model.encode(source.text)[0].tolist()
        if length is None:
            length = len(ids)
        reps = math.ceil((length + batch) / len(ids)) + 1
        tiled = ids * reps
        rows = [tiled[r % len(ids):r % len(ids) + length] for r in range(batch)]
        return torch.tensor(rows, dtype=torch.long, device=model.device)
    if length is None:
        raise UserError("no prompt length: pass --prompt, --prompt-file or --prefill-len")
    vocab = int(model.config.vocab_size)
    rows = []
    for r in range(batch):
        gen = torch.Generator(device="cpu").manual_seed(int(source.seed) * 1_000_003 + int(length) + r * 7_919_993)
        rows.append(torch.randint(0, vocab, (1, int(length)), generator=gen, dtype=torch.long))
    return torch.cat(rows).to(model.device)


def open_model(source: str | Path, *, device: str = "auto", dtype: str | None = None, compile: bool = True,
               seed: int = 0) -> Any:
    """Load a model for benchmarking with the runtime's default knobs (heads_per_band clamped to the model).

    The one place above model/ that loads weights for measurement: the study's trial worker and the
    `bench` command both come through here.
    """
    from xlstm_tune import load_model
    from xlstm_tune.runtime.options import RuntimeOptions

    heads = describe_model(source)["num_heads"]
    default = RuntimeOptions(heads_per_band=min(4, heads), compile=compile)
    return load_model(str(source), device=device, dtype=dtype, runtime=default, seed=seed)


def where(model: Any) -> dict[str, str]:
    """Where a measurement runs: device name, type, OS, torch and Python versions (provenance)."""
    from xlstm_tune.runtime.device import device_summary

    return device_summary(model.device)


# ---- cheap facts: no weights are loaded ------------------------------------------------------------
def describe_model(source: str | Path) -> dict[str, Any]:
    """Shape facts of a preset or checkpoint directory from its config alone (no weights are read).

    Keys: model_id, num_heads, slstm_num_heads, has_mlstm, has_slstm, num_layers, vocab_size, config_hash.
    """
    from xlstm_tune.model.loading import model_config

    name = str(source)
    cfg = model_config(name)
    n_slstm = len(cfg.slstm_block_indices)
    return {
        "model_id": name,
        "num_heads": int(cfg.num_heads),
        "slstm_num_heads": int(cfg.slstm_num_heads) if n_slstm else 0,
        "has_mlstm": n_slstm < cfg.num_hidden_layers,
        "has_slstm": n_slstm > 0,
        "num_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(cfg.vocab_size),
        "config_hash": cfg.config_hash(),
    }


def available_backends() -> list[str]:
    """The prefill backends this installation can run: `ray` needs the ray package importable."""
    from importlib.util import find_spec

    from xlstm_tune.runtime.options import BACKENDS

    return [b for b in BACKENDS if b != "ray" or find_spec("ray") is not None]


def device_capabilities(device: str = "auto") -> dict[str, Any]:
    """What `device` offers the runtime knobs: decode modes, streams, torch.compile, device graphs.

    Raises DeviceUnavailableError (a UserError) for a device that is not here.
    """
    from xlstm_tune.runtime import device as dev
    from xlstm_tune.runtime.decode import available_decode_modes

    resolved = dev.resolve_device(device)
    return {
        "device": str(resolved),
        "backends": available_backends(),
        "device_type": resolved.type,
        "decode_modes": list(available_decode_modes(resolved)),
        "streams": bool(dev.streams_available(resolved)),
        "compile": bool(dev.compile_available(resolved)),
        "graphs": bool(dev.graphs_available(resolved)),
    }

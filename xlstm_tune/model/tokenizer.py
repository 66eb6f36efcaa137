"""Tokenizers: a byte-level one for the `tiny` preset, `tokenizers`' tokenizer.json for checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from xlstm_tune.errors import CheckpointError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens (vocab 256): no files, exact round trip for any text."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read through the `tokenizers` library (no transformers needed)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for bad files
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}; replace the file") from None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

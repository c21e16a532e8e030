"""Tokenizers: ``tokenizer.json`` through the ``tokenizers`` library when the model directory has one,
a byte-level fallback for dummy models. Plus incremental detokenization for streaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes; ids above are special tokens that decode to nothing."""

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs vocab_size >= 256, model has {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """An HF fast tokenizer from ``tokenizer.json``; special tokens are skipped when decoding."""

    def __init__(self, model_dir: Path, eos_token_ids: tuple[int, ...]) -> None:
        self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = eos_token_ids or self._eos_from_tokenizer_config(model_dir)

    def _eos_from_tokenizer_config(self, model_dir: Path) -> tuple[int, ...]:
        path = model_dir / "tokenizer_config.json"
        if not path.is_file():
            return ()
        eos = json.loads(path.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        token_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None
        return () if token_id is None else (token_id,)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return JsonTokenizer(Path(model_dir), eos_token_ids)
    return ByteTokenizer(vocab_size, eos_token_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Decodes a short window of recent tokens and emits only what is new; text ending in an incomplete
    UTF-8 sequence (U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tail: list[int]) -> None:
        self._tok = tokenizer
        # Context tokens so the first output token decodes with correct leading-space handling.
        self._tokens = list(prompt_tail[-6:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        self._tokens.append(token_id)
        prefix_text = self._tok.decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._tokens[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever was held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._tok.decode(self._tokens[self._prefix_offset : self._read_offset])
        rest = self._tok.decode(self._tokens[self._prefix_offset :])[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._tokens)
        self.text += rest
        return rest

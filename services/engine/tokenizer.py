"""Tokenizers: a model directory's ``tokenizer.json`` (through the ``tokenizers`` library) with its
``tokenizer_config.json`` (special tokens, Jinja chat template) and EOS ids from ``generation_config.json``; or the
byte-level tokenizer, only where it is asked for by name (``--tokenizer byte``, or a preset: random-weight models
have no vocabulary). A model directory without a tokenizer is an error, never a silent byte-level fallback.

Plus incremental detokenization and stop strings for streaming (``TextStream``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer

from .chat_template import ChatTemplate
from .presets import PRESETS

BYTE = "byte"
_RELEASE_GIL_CHARS = 4096
# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerNotFoundError(FileNotFoundError):
    """The model directory has no tokenizer and none was named."""


class Tokenizer(Protocol):
    name: str
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    chat_template: ChatTemplate | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


# Random-weight models have no vocabulary and no template of their own: roles are written as plain text.
PLAIN_CHAT_TEMPLATE = ("{% for message in messages %}<{{ message.role }}>{{ message.content or '' }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes; ids above are special tokens that decode to nothing. Its chat template
    writes roles as plain text (``PLAIN_CHAT_TEMPLATE``)."""

    name = BYTE

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs vocab_size >= 256, model has {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.chat_template = ChatTemplate(PLAIN_CHAT_TEMPLATE, {})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return loaded


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class JsonTokenizer:
    """An HF fast tokenizer from ``tokenizer.json``; special tokens are skipped when decoding."""

    def __init__(self, directory: Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.name = str(directory)
        self._tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(directory / "tokenizer_config.json")
        legacy = _read_json(directory / "special_tokens_map.json")
        self.special_tokens = {
            name: text for name in SPECIAL_TOKEN_NAMES
            if (text := _token_text(config.get(name, legacy.get(name)))) is not None
        }
        self.eos_token_ids = eos_token_ids or self._ids_of(self.special_tokens.get("eos_token"))
        self.chat_template = ChatTemplate.from_dir(directory, config, self.special_tokens)

    def _ids_of(self, token: str | None) -> tuple[int, ...]:
        token_id = None if token is None else self._tok.token_to_id(token)
        return () if token_id is None else (token_id,)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text (a chat template's <|im_start|>) become their ids, as in transformers;
        # nothing is added around the text (templates write their own BOS).
        if len(text) > _RELEASE_GIL_CHARS:
            # tokenizers' encode() holds the GIL throughout (measured: a 30K-token text held an event loop in
            # another thread for all of its 130 ms); the batch call releases it, so long texts can be tokenized
            # in a thread while the loop serves other streams.
            return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """``eos_token_id`` of ``generation_config.json`` (an id or a list), which is what generation stops on in
    transformers (Qwen lists both <|im_end|> and <|endoftext|> there); () if absent."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(t) for t in eos) if isinstance(eos, list) else (int(eos),)


def load_tokenizer(spec: str, model: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    """The tokenizer for ``model`` (an HF directory or a preset name). ``spec``: "" for the model's own (a
    directory's tokenizer.json; a preset's byte tokenizer), "byte", or a directory holding tokenizer.json.

    EOS ids: generation_config.json's, else ``eos_token_ids`` (config.json's), else the tokenizer's eos_token."""
    is_preset = model.partition(":")[0] in PRESETS
    model_dir = None if is_preset else Path(model)
    if spec == BYTE or (not spec and is_preset):
        return ByteTokenizer(vocab_size, eos_token_ids)
    directory = Path(spec) if spec else model_dir
    if not (directory / "tokenizer.json").is_file():
        what = "tokenizer directory" if spec else "model directory"
        raise TokenizerNotFoundError(
            f"{what} {directory} has no tokenizer.json: pass --tokenizer DIR (a directory with tokenizer.json "
            f"and tokenizer_config.json), or --tokenizer byte for byte-level ids (test models only)"
        )
    eos = (generation_eos_ids(model_dir) if model_dir is not None else ()) or eos_token_ids
    return JsonTokenizer(directory, eos)


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


def find_stop(text: str, stops: tuple[str, ...], already_sent: int) -> int | None:
    """Index where the earliest stop string starts, searching only text that could contain a new match."""
    best = None
    for stop in stops:
        idx = text.find(stop, max(0, already_sent - len(stop) + 1))
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


class TextStream:
    """One output stream's text, built from its tokens: incremental detokenization, stop strings (the text is cut
    before the earliest match), and hold-back of text that may still become the start of a stop string. The router
    runs one per request, so engines stream token ids only."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: tuple[str, ...] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        self.stop = stop
        self._holdback = max((len(s) - 1 for s in stop), default=0)
        self.text = ""  # all text so far (cut at a stop string once one matched)
        self.sent = 0  # characters of it handed out
        self.num_tokens = 0  # tokens taken, up to the one that completed a stop string
        self.stopped = False  # a stop string matched: the stream is over

    def add(self, token_ids: list[int]) -> str:
        """The text that may be sent now after these tokens; sets ``stopped`` when a stop string matched."""
        for token in token_ids:
            if self.stopped:
                break
            self.num_tokens += 1
            self.text += self._detokenizer.add(token)
            cut = find_stop(self.text, self.stop, self.sent)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
        visible = len(self.text) if self.stopped else max(self.sent, len(self.text) - self._holdback)
        return self._take(visible)

    def finish(self) -> str:
        """The stream ended (EOS, length): the rest of the text, including what was held back."""
        if not self.stopped:
            self.text += self._detokenizer.flush()
            cut = find_stop(self.text, self.stop, self.sent)
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        return self._take(len(self.text))

    def _take(self, visible: int) -> str:
        delta = self.text[self.sent : visible]
        self.sent = max(self.sent, visible)
        return delta

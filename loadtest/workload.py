"""A workload: sessions of turns, saved and replayed as JSONL.

A *session* is one conversation: its turns run in order, and each turn's prompt is the session's history
(every earlier prompt and answer, as the server produced it) followed by the turn's new tokens (``add``). A
session may branch from another one (``parent``: a sub-agent starting from its orchestrator's context): it
starts once that turn of the parent has finished, and its history starts as the parent's history then. A
session without a parent arrives at ``start_s`` (trace timestamps) or when the runner's closed loop or Poisson
process starts it.

New tokens are *segments*, never stored text: ``SeededTokens`` (n tokens named by a key, see
``loadtest.tokens``), ``HashBlocks`` (Mooncake trace blocks: equal hash ids give equal tokens) or explicit
``Tokens``. A segment expands under a *salt*: salt 0 is the workload as written; another salt gives new tokens
with the same reuse structure (runs at several concurrencies must not hit each other's cache).

File layout: one header line ``{"workload": kind, "version": 1, "vocab_size": ..., "timed": ..., "params": ...}``
then one line per session ``{"id", "start_s", "parent": [session, turn] | null, "turns": [{"add": [...],
"max_tokens", "think_s"}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.tokens import block_tokens, seeded_tokens

FORMAT_VERSION = 1


class WorkloadError(ValueError):
    """A workload file or trace that cannot be read; the message names the line and the problem."""


@dataclass(frozen=True)
class SeededTokens:
    key: str
    length: int

    def expand(self, vocab_size: int, salt: int = 0) -> list[int]:
        key = self.key if salt == 0 else f"salt{salt}/{self.key}"
        return seeded_tokens(key, self.length, vocab_size)

    def to_json(self) -> dict:
        return {"seed": self.key, "len": self.length}


@dataclass(frozen=True)
class HashBlocks:
    """``length`` tokens made of Mooncake blocks ``hash_ids`` (the last one cut short), under ``trace_key``."""

    trace_key: str
    hash_ids: tuple[int, ...]
    length: int
    block_size: int = 512

    def __post_init__(self) -> None:
        blocks = -(-self.length // self.block_size)
        if blocks != len(self.hash_ids):
            raise WorkloadError(f"{self.length} tokens in blocks of {self.block_size} need {blocks} hash ids, "
                                f"got {len(self.hash_ids)}")

    def expand(self, vocab_size: int, salt: int = 0) -> list[int]:
        key = self.trace_key if salt == 0 else f"salt{salt}/{self.trace_key}"
        tokens: list[int] = []
        for hash_id in self.hash_ids:
            tokens += block_tokens(key, hash_id, self.block_size, vocab_size)
        return tokens[:self.length]

    def to_json(self) -> dict:
        return {"trace": self.trace_key, "hash_ids": list(self.hash_ids), "len": self.length,
                "block_size": self.block_size}


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.ids)

    def expand(self, vocab_size: int, salt: int = 0) -> list[int]:
        return [(t + salt) % vocab_size for t in self.ids]

    def to_json(self) -> dict:
        return {"tokens": list(self.ids)}


Segment = SeededTokens | HashBlocks | Tokens


def segment_from_json(obj: dict) -> Segment:
    if "seed" in obj:
        return SeededTokens(str(obj["seed"]), int(obj["len"]))
    if "hash_ids" in obj:
        return HashBlocks(str(obj["trace"]), tuple(int(h) for h in obj["hash_ids"]), int(obj["len"]),
                          int(obj.get("block_size", 512)))
    if "tokens" in obj:
        return Tokens(tuple(int(t) for t in obj["tokens"]))
    raise WorkloadError(f"unknown segment {obj!r}: expected 'seed', 'hash_ids' or 'tokens'")


def expand(segments: Iterable[Segment], vocab_size: int, salt: int = 0) -> list[int]:
    tokens: list[int] = []
    for segment in segments:
        tokens += segment.expand(vocab_size, salt)
    return tokens


@dataclass(frozen=True)
class Turn:
    add: tuple[Segment, ...]  # new tokens after the history
    max_tokens: int  # answer length (the runner asks the server to ignore EOS)
    think_s: float = 0.0  # tool / user time after the previous answer (or after the parent's turn) before sending

    @property
    def new_tokens(self) -> int:
        return sum(s.length for s in self.add)

    def to_json(self) -> dict:
        return {"add": [s.to_json() for s in self.add], "max_tokens": self.max_tokens, "think_s": self.think_s}


@dataclass(frozen=True)
class Session:
    id: int
    turns: tuple[Turn, ...]
    start_s: float = 0.0  # arrival time of a root session in a timed workload
    parent: tuple[int, int] | None = None  # (session id, turn index) this session branches from

    def to_json(self) -> dict:
        return {"id": self.id, "start_s": self.start_s, "parent": list(self.parent) if self.parent else None,
                "turns": [t.to_json() for t in self.turns]}


@dataclass
class Workload:
    kind: str
    vocab_size: int
    sessions: list[Session]
    timed: bool = False  # root sessions carry arrival times (trace replay)
    params: dict = field(default_factory=dict)  # the generator's arguments, for the record

    def __post_init__(self) -> None:
        ids = {s.id for s in self.sessions}
        if len(ids) != len(self.sessions):
            raise WorkloadError("session ids are not unique")
        by_id = {s.id: s for s in self.sessions}
        for s in self.sessions:
            if not s.turns:
                raise WorkloadError(f"session {s.id} has no turns")
            if s.parent is not None:
                parent_id, turn = s.parent
                if parent_id not in by_id or not 0 <= turn < len(by_id[parent_id].turns):
                    raise WorkloadError(f"session {s.id} branches from missing turn {turn} of session {parent_id}")
                if parent_id >= s.id:
                    raise WorkloadError(f"session {s.id} must come after its parent {parent_id}")
            for turn in s.turns:
                if turn.max_tokens < 1:
                    raise WorkloadError(f"session {s.id}: max_tokens must be >= 1")
                if turn.think_s < 0:
                    raise WorkloadError(f"session {s.id}: think_s must be >= 0")

    @property
    def roots(self) -> list[Session]:
        return [s for s in self.sessions if s.parent is None]

    def children(self) -> dict[tuple[int, int], list[Session]]:
        out: dict[tuple[int, int], list[Session]] = {}
        for s in self.sessions:
            if s.parent is not None:
                out.setdefault(s.parent, []).append(s)
        return out

    def tree_sizes(self) -> dict[int, int]:
        """Root session id -> turns in it and every session branching from it (transitively)."""
        root_of: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for s in self.sessions:  # parents come first
            root = s.id if s.parent is None else root_of[s.parent[0]]
            root_of[s.id] = root
            sizes[root] = sizes.get(root, 0) + len(s.turns)
        return sizes

    def header(self) -> dict:
        return {"workload": self.kind, "version": FORMAT_VERSION, "vocab_size": self.vocab_size, "timed": self.timed,
                "sessions": len(self.sessions), "params": self.params}

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(self.header()) + "\n")
            for s in self.sessions:
                f.write(json.dumps(s.to_json(), separators=(",", ":")) + "\n")


def _session_from_json(obj: dict) -> Session:
    turns = tuple(
        Turn(tuple(segment_from_json(seg) for seg in t["add"]), int(t["max_tokens"]), float(t.get("think_s", 0.0)))
        for t in obj["turns"]
    )
    parent = tuple(obj["parent"]) if obj.get("parent") is not None else None
    return Session(int(obj["id"]), turns, float(obj.get("start_s", 0.0)), parent)


def _lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkloadError(f"{path}:{number}: not JSON ({err})") from None


def load(path: str | Path) -> Workload:
    """A workload file as written by ``Workload.save``."""
    lines = _lines(path)
    try:
        _, header = next(lines)
    except StopIteration:
        raise WorkloadError(f"{path}: empty file") from None
    if "workload" not in header:
        raise WorkloadError(f"{path}:1: not a workload file (no header); a Mooncake trace is read with "
                            "`python -m loadtest generate mooncake --trace FILE`")
    if header.get("version") != FORMAT_VERSION:
        raise WorkloadError(f"{path}: workload format version {header.get('version')}, expected {FORMAT_VERSION}")
    sessions = []
    for number, obj in lines:
        try:
            sessions.append(_session_from_json(obj))
        except (KeyError, TypeError, ValueError) as err:
            raise WorkloadError(f"{path}:{number}: bad session ({err})") from None
    return Workload(header["workload"], int(header["vocab_size"]), sessions, bool(header.get("timed", False)),
                    header.get("params", {}))

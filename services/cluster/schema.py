"""What pods and routers share through Redis: the key layout, a worker's record, and the binary form of
prefix-cache events, event batches and snapshots.

Keys (``ns`` is the namespace, ``baton`` by default, so that several clusters can share one Redis):

    {ns}:workers                 SET    ids of registered worker instances
    {ns}:worker:{id}             HASH   the worker's record (identity, capacity, load, event position),
                                        rewritten every heartbeat, expires after the heartbeat TTL
    {ns}:events:{id}             STREAM its prefix-cache event batches, one entry per engine step with
                                        events: {seq, events, digest}; trimmed to event_stream_maxlen entries
    {ns}:snapshot-request:{id}   STRING set by a router that lost track of the worker's cache
    {ns}:snapshot:{id}           STRING the worker's whole cache as one event batch, at a known seq
    {ns}:routers                 SET    ids of live routers
    {ns}:router:{id}             HASH   worker id -> requests that router has in flight there

An instance id is new every time a pod process starts, so a restarted pod is a new worker: whatever a router
learned about the old one (its cache above all) is dropped with it.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from services.engine.radix_cache import CacheDigest, CacheEvent

# Event kinds, in the order a segment applies its groups (see encode_events).
STATE_EVICTED, EVICTED, STORED, STATE_STORED = 0, 1, 2, 3
KIND_CODES = {"state_evicted": STATE_EVICTED, "evicted": EVICTED, "stored": STORED, "state_stored": STATE_STORED}

_FORMAT_VERSION = 2
_HEADER = struct.Struct("<BI")  # version, number of segments
_SEGMENT = struct.Struct("<IIII")  # events per group: state_evicted, evicted, stored, state_stored
_DIGEST = struct.Struct("<QQQQ")  # pages, states, page hash sum, state hash sum
_SNAPSHOT_HEADER = struct.Struct("<Q")  # seq


class Keys:
    """Redis key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        if not namespace or any(c in namespace for c in " \n\r\t"):
            raise ValueError(f"invalid Redis namespace {namespace!r}")
        self.namespace = namespace
        self.workers = f"{namespace}:workers"
        self.routers = f"{namespace}:routers"

    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}"

    def events(self, worker_id: str) -> str:
        return f"{self.namespace}:events:{worker_id}"

    def snapshot(self, worker_id: str) -> str:
        return f"{self.namespace}:snapshot:{worker_id}"

    def snapshot_request(self, worker_id: str) -> str:
        return f"{self.namespace}:snapshot-request:{worker_id}"

    def router(self, router_id: str) -> str:
        return f"{self.namespace}:router:{router_id}"

    def departed(self, worker_id: str) -> str:
        """Set by a pod as it deregisters (drain, stop): routers drop it at their next poll instead of waiting for
        its record's TTL, during which they would still place requests there."""
        return f"{self.namespace}:departed:{worker_id}"


# ---- events ---------------------------------------------------------------------------------------------
class Segment(NamedTuple):
    """Events of one worker that can be applied group by group, in this order: checkpoints evicted, pages
    evicted, pages stored (parents before children), checkpoints stored. Applying the groups in that order
    gives the same cache as applying the events in the order they happened (encode_events cuts a segment
    wherever that would not hold), and each group is one set operation for the router's index."""

    state_evicted: list[int]
    evicted: list[int]
    stored: list[int]
    stored_parents: list[int]
    state_stored: list[int]

    def __len__(self) -> int:
        return len(self.state_evicted) + len(self.evicted) + len(self.stored) + len(self.state_stored)


def _segments(events: Iterable[CacheEvent]) -> list[list[list[CacheEvent]]]:
    """Cut the events into segments whose groups can be applied in kind order: a new segment starts where an
    event would have to be applied before one already in a later group (the same page stored then evicted,
    a checkpoint stored then evicted, in one step)."""
    segments: list[list[list[CacheEvent]]] = []
    groups: list[list[CacheEvent]] | None = None
    latest: dict[int, int] = {}  # page hash -> the latest group holding an event on it in this segment
    for event in events:
        kind = KIND_CODES[event.kind]
        if groups is None or latest.get(event.page_hash, -1) > kind:
            groups = [[], [], [], []]
            segments.append(groups)
            latest = {}
        groups[kind].append(event)
        latest[event.page_hash] = max(kind, latest.get(event.page_hash, -1))
    return segments


def encode_events(events: Iterable[CacheEvent]) -> bytes:
    parts = []
    segments = _segments(events)
    for groups in segments:
        parts.append(_SEGMENT.pack(*(len(g) for g in groups)))
        hashes = [e.page_hash for g in groups for e in g] + [e.parent_hash for e in groups[STORED]]
        parts.append(np.array(hashes, dtype="<u8").tobytes())
    return _HEADER.pack(_FORMAT_VERSION, len(segments)) + b"".join(parts)


def decode_events(data: bytes) -> list[Segment]:
    """Raises ValueError on anything malformed (a corrupt entry must not be half-applied)."""
    if len(data) < _HEADER.size:
        raise ValueError("event batch shorter than its header")
    version, count = _HEADER.unpack_from(data)
    if version != _FORMAT_VERSION:
        raise ValueError(f"event batch format {version}, expected {_FORMAT_VERSION}")
    offset, segments = _HEADER.size, []
    for _ in range(count):
        if len(data) < offset + _SEGMENT.size:
            raise ValueError("event batch truncated")
        sizes = _SEGMENT.unpack_from(data, offset)
        offset += _SEGMENT.size
        total = sum(sizes) + sizes[STORED]
        if len(data) < offset + 8 * total:
            raise ValueError("event batch truncated")
        values = np.frombuffer(data, dtype="<u8", count=total, offset=offset).tolist()
        offset += 8 * total
        a, b, c = sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
        segments.append(Segment(values[:a], values[a:b], values[b:c], values[c + sizes[3]:], values[c:c + sizes[3]]))
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last event segment")
    return segments


def encode_digest(digest: CacheDigest) -> bytes:
    return _DIGEST.pack(*digest)


def decode_digest(data: bytes) -> CacheDigest:
    if len(data) != _DIGEST.size:
        raise ValueError(f"digest of {len(data)} bytes, expected {_DIGEST.size}")
    return CacheDigest(*_DIGEST.unpack(data))


class EventBatch(NamedTuple):
    """One stream entry: the events of one engine step, numbered per worker instance (1, 2, ...), with the
    cache's digest after them (so a reader can check its copy after every batch)."""

    seq: int
    events: bytes  # encode_events
    digest: CacheDigest

    def to_fields(self) -> dict[str, bytes]:
        return {"seq": str(self.seq).encode(), "events": self.events, "digest": encode_digest(self.digest)}

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> EventBatch:
        try:
            return cls(int(fields[b"seq"]), fields[b"events"], decode_digest(fields[b"digest"]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"malformed event batch: {err}") from err


class Snapshot(NamedTuple):
    """A worker's whole cache as events that rebuild it from empty, current at batch ``seq``."""

    seq: int
    events: bytes
    digest: CacheDigest

    def encode(self) -> bytes:
        return _SNAPSHOT_HEADER.pack(self.seq) + encode_digest(self.digest) + self.events

    @classmethod
    def decode(cls, data: bytes) -> Snapshot:
        head = _SNAPSHOT_HEADER.size + _DIGEST.size
        if len(data) < head:
            raise ValueError("snapshot shorter than its header")
        (seq,) = _SNAPSHOT_HEADER.unpack_from(data)
        return cls(seq, data[head:], decode_digest(data[_SNAPSHOT_HEADER.size : head]))


# ---- a worker's record ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerRecord:
    """What a pod publishes about itself (the registry hash). Identity and capacity are fixed for the
    process's life; load and event position change every heartbeat."""

    instance_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of its gRPC server, as routers and other pods reach it
    model: str  # the served model's name (what clients ask for)
    fingerprint: str  # architecture + weights (the PD handshake's model_id): pods pair only when equal
    hash_scheme: str  # services/common/page_hash.SCHEME
    page_size: int
    max_running: int
    max_waiting: int
    max_model_len: int
    pages_total: int
    slots_total: int
    remote_prefill_threshold: int  # decode pods: uncached prompts this long go to a prefill pod (0: never)
    metrics_address: str
    started_at: float
    # load
    running: int = 0
    waiting: int = 0
    free_pages: int = 0
    free_slots: int = 0
    queued_prefill_tokens: int = 0
    direct_requests: int = 0  # decode pods: requests in flight that no router placed (routers count their own)
    draining: bool = False
    # the last event batch sent to Redis, and the cache's digest after it
    event_seq: int = 0
    cache_pages: int = 0
    cache_states: int = 0
    cache_page_sum: int = 0
    cache_state_sum: int = 0

    @property
    def digest(self) -> CacheDigest:
        return CacheDigest(self.cache_pages, self.cache_states, self.cache_page_sum, self.cache_state_sum)

    @property
    def capacity(self) -> int:
        """Requests it takes before refusing: running plus its bounded waiting queue."""
        return self.max_running + self.max_waiting

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(int(v) if isinstance(v := getattr(self, f.name), bool) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> WorkerRecord:
        """Raises ValueError naming the missing or malformed field."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = fields.get(f.name.encode())
            if raw is None:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"worker record lacks {f.name!r}")
                continue
            text = raw.decode()
            kind = type(f.default) if f.default is not dataclasses.MISSING else _STATIC_TYPES.get(f.name, str)
            try:
                values[f.name] = bool(int(text)) if kind is bool else kind(text)
            except ValueError as err:
                raise ValueError(f"worker record field {f.name!r}: {text!r} is not a {kind.__name__}") from err
        return cls(**values)


_STATIC_TYPES = {
    "page_size": int, "max_running": int, "max_waiting": int, "max_model_len": int, "pages_total": int,
    "slots_total": int, "remote_prefill_threshold": int, "started_at": float,
}

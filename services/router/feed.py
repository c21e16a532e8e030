"""Keeping one worker's part of the router's index equal to that worker's prefix cache. Logic only: the Redis
side (services/router/sync.py) reads the worker's stream, heartbeat and snapshots and hands them here.

A worker numbers its event batches 1, 2, ... for its life. The feed applies them in order and checks the
cache's digest that travels with each batch. It loses track when a batch is missing (the stream was trimmed
past it, Redis restarted empty, the router started after the worker's first batches), when the worker's
heartbeat names a batch the stream never delivered, or when a digest disagrees. It then asks for a snapshot
(the worker's whole cache as events, at a known batch number), buffers the batches that keep arriving, and
rebuilds the worker from the first snapshot whose later batches it holds without a gap.

States (checked transitions):

    FOLLOWING ---- gap / digest mismatch / inconsistent batch ----> AWAITING_SNAPSHOT
    AWAITING_SNAPSHOT ---- a usable snapshot, then its later batches ----> FOLLOWING
"""

from __future__ import annotations

import enum
import logging

from services.cluster.schema import EventBatch, Snapshot, decode_events
from services.engine.radix_cache import CacheDigest

from .index import CacheIndex, InconsistentEvents

log = logging.getLogger("baton.router.feed")


class FeedState(enum.Enum):
    FOLLOWING = "following"
    AWAITING_SNAPSHOT = "awaiting_snapshot"


_TRANSITIONS = {
    FeedState.FOLLOWING: {FeedState.AWAITING_SNAPSHOT},
    FeedState.AWAITING_SNAPSHOT: {FeedState.FOLLOWING},
}


class WorkerFeed:
    def __init__(self, worker: str, index: CacheIndex, snapshot_retry_s: float = 2.0,
                 max_buffered: int = 100_000) -> None:
        self.worker = worker
        self.index = index
        self.snapshot_retry_s = snapshot_retry_s
        self.max_buffered = max_buffered
        self.state = FeedState.FOLLOWING  # from batch 0: an empty cache, as a new worker's is
        self.applied_seq = 0
        self.latest_seq = 0  # the highest batch known to exist (seen in the stream or named by a heartbeat)
        self.buffer: dict[int, EventBatch] = {}
        self.snapshot: Snapshot | None = None  # the newest one fetched, not yet usable
        self.snapshot_requested_at: float | None = None
        self.resyncs = 0
        self.last_problem = ""

    # ---- inputs -------------------------------------------------------------------------------------
    def on_batch(self, batch: EventBatch) -> None:
        self.latest_seq = max(self.latest_seq, batch.seq)
        if self.state is FeedState.AWAITING_SNAPSHOT:
            if batch.seq > self.applied_seq:
                self._buffer(batch)
                self._try_snapshot()
            return
        if batch.seq <= self.applied_seq:  # read twice (after a reconnect): already applied
            return
        if batch.seq != self.applied_seq + 1:
            self._lose(f"batch {batch.seq} follows batch {self.applied_seq}: batches lost")
            self._buffer(batch)
            return
        self._apply(batch)

    def on_report(self, seq: int, digest: CacheDigest) -> None:
        """The worker's heartbeat says ``seq`` is its last batch sent, with ``digest`` after it. Call only
        once the stream has been read to its end after that heartbeat was read: a batch named there and
        still not applied was lost."""
        self.latest_seq = max(self.latest_seq, seq)
        if self.state is FeedState.AWAITING_SNAPSHOT:
            self._try_snapshot()
        elif self.applied_seq < seq:
            self._lose(f"the worker sent batch {seq}, the stream ends at {self.applied_seq}")
        elif self.applied_seq == seq and self.index.digest(self.worker) != digest:
            self._lose(f"index digest {self.index.digest(self.worker)} != the worker's {digest} at batch {seq}")

    def on_snapshot(self, snapshot: Snapshot) -> None:
        if self.state is not FeedState.AWAITING_SNAPSHOT:
            return
        if self.snapshot is None or snapshot.seq > self.snapshot.seq:
            self.snapshot = snapshot
            self._try_snapshot()

    # ---- what the Redis side should do ----------------------------------------------------------------
    def wants_snapshot(self, now: float) -> bool:
        """True when a snapshot should be requested (again) now; the caller then calls ``requested``."""
        if self.state is not FeedState.AWAITING_SNAPSHOT:
            return False
        return self.snapshot_requested_at is None or now - self.snapshot_requested_at >= self.snapshot_retry_s

    def requested(self, now: float) -> None:
        self.snapshot_requested_at = now

    @property
    def in_sync(self) -> bool:
        return self.state is FeedState.FOLLOWING

    # ---- internals ----------------------------------------------------------------------------------
    def _move(self, new: FeedState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"feed of {self.worker}: transition {self.state.value} -> {new.value} not allowed")
        self.state = new

    def _apply(self, batch: EventBatch) -> bool:
        try:
            self.index.apply(self.worker, decode_events(batch.events))
        except (InconsistentEvents, ValueError) as err:
            self._lose(f"batch {batch.seq} does not apply: {err}")
            return False
        self.applied_seq = batch.seq
        if self.index.digest(self.worker) != batch.digest:
            self._lose(f"digest after batch {batch.seq} differs from the worker's")
            return False
        return True

    def _lose(self, problem: str) -> None:
        log.warning("index of %s out of step (%s): resynchronising from a snapshot", self.worker, problem)
        self.index.clear_worker(self.worker)  # counts for no hit until rebuilt: better than a wrong one
        self.last_problem = problem
        self.resyncs += 1
        if self.state is FeedState.FOLLOWING:
            self._move(FeedState.AWAITING_SNAPSHOT)
        self.snapshot_requested_at = None  # ask now
        self.snapshot = None

    def _buffer(self, batch: EventBatch) -> None:
        if len(self.buffer) >= self.max_buffered:  # a snapshot will cover these; keep memory bounded
            self.buffer.clear()
        self.buffer[batch.seq] = batch

    def _try_snapshot(self) -> None:
        snapshot = self.snapshot
        if snapshot is None:
            return
        later = sorted(seq for seq in self.buffer if seq > snapshot.seq)
        if later != list(range(snapshot.seq + 1, snapshot.seq + 1 + len(later))):
            return  # a batch after the snapshot is missing: wait for a newer snapshot
        if snapshot.seq + len(later) < self.latest_seq:
            return  # batches up to latest_seq exist that neither covers yet
        try:
            self.index.replace(self.worker, decode_events(snapshot.events))
        except (InconsistentEvents, ValueError) as err:
            self._lose(f"snapshot at batch {snapshot.seq} does not apply: {err}")
            return
        if self.index.digest(self.worker) != snapshot.digest:
            self._lose(f"snapshot at batch {snapshot.seq} does not match its digest")
            return
        self.applied_seq = snapshot.seq
        self._move(FeedState.FOLLOWING)
        self.snapshot = None
        self.snapshot_requested_at = None
        buffered, self.buffer = self.buffer, {}
        for seq in later:
            if not self._apply(buffered[seq]):
                return
        log.info("index of %s rebuilt from its snapshot at batch %d, now at batch %d", self.worker, snapshot.seq,
                 self.applied_seq)

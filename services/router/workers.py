"""The router's table of live workers: their records from the registry, in-flight requests, recent failures,
and each one's cache feed. Logic only; services/router/sync.py fills it from Redis.

A worker is dropped (with everything the index learned about it) when its record has not been seen for the
heartbeat TTL while the registry could be read, or when another instance registers at its address (the pod
restarted: its cache is gone). While Redis cannot be read nothing expires: the router keeps routing from the
last known state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from services.cluster.schema import WorkerRecord

from .feed import WorkerFeed
from .index import CacheIndex
from .policy import address_key

log = logging.getLogger("baton.router.workers")


@dataclass
class Worker:
    record: WorkerRecord
    feed: WorkerFeed
    last_seen: float
    inflight_here: int = 0  # requests this router has on it now
    inflight_elsewhere: int = 0  # other routers' (from Redis)
    unavailable_until: float = 0.0  # after a failed call: not chosen until then

    @property
    def name(self) -> str:
        return self.record.instance_id

    @property
    def active(self) -> int:
        """Requests running or waiting on it. A decode pod's are the routers' in-flight counts (exact for this
        router, a poll behind for the others) plus those no router placed, from its heartbeat: its own count
        of everything lags a heartbeat, and right after a request ends would still show it. A prefill pod's
        (asked by decode pods, not routers) come from its heartbeat."""
        if self.record.role == "decode":
            return self.inflight_here + self.inflight_elsewhere + self.record.direct_requests
        return self.record.running + self.record.waiting

    @property
    def full(self) -> bool:
        return self.active >= self.record.capacity


class RoleArrays:
    """One role's workers as arrays in id order, for scoring them all at once (services/router/policy.py).
    Rebuilt on every registry read; the per-request parts (in-flight counts, failures) are written in as they
    change, through the WorkerTable."""

    def __init__(self, workers: list[Worker], index: CacheIndex) -> None:
        self.workers = sorted(workers, key=lambda w: w.name)
        self.names = [w.name for w in self.workers]
        self.slot = {name: i for i, name in enumerate(self.names)}
        # index slot -> position here (-1: another role's), to turn the index's answer into a hits vector
        index_slots = [index.register(name) for name in self.names]
        self.position_of = np.full(index.num_slots, -1, dtype=np.int64)
        self.position_of[index_slots] = np.arange(len(index_slots))
        records = [w.record for w in self.workers]
        decode = bool(records) and records[0].role == "decode"
        self.address_keys = np.array([address_key(r.address) for r in records], dtype=np.uint64)
        self.fingerprints = np.array([r.fingerprint for r in records], dtype=object)
        self.capacity = np.array([r.capacity for r in records], dtype=np.float64)
        self.cache_tokens = np.array([r.pages_total * r.page_size for r in records], dtype=np.float64)
        self.queued_tokens = np.array([r.queued_prefill_tokens for r in records], dtype=np.float64)
        self.draining = np.array([r.draining for r in records], dtype=bool)
        # Decode pods: routers' in-flight counts + requests no router placed; prefill pods: their own report.
        self.reported = np.array([r.direct_requests if decode else r.running + r.waiting for r in records],
                                 dtype=np.float64)
        self.inflight = np.array([w.inflight_here + w.inflight_elsewhere if decode else 0 for w in self.workers],
                                 dtype=np.float64)
        self.unavailable_until = np.array([w.unavailable_until for w in self.workers], dtype=np.float64)

    @property
    def active(self) -> np.ndarray:
        return self.inflight + self.reported

    def eligible(self, now: float, excluded: set[str] = frozenset(), fingerprint: str = "") -> np.ndarray:
        mask = ~self.draining & (self.unavailable_until <= now) & (self.active < self.capacity)
        if fingerprint:
            mask &= self.fingerprints == fingerprint
        for name in excluded:
            slot = self.slot.get(name)
            if slot is not None:
                mask[slot] = False
        return mask

    def hits(self, slots: np.ndarray, pages: np.ndarray) -> np.ndarray:
        """Usable pages per worker here, from the index's (slots, pages) answer."""
        hits = np.zeros(len(self.names))
        inside = slots < len(self.position_of)  # a worker registered since these arrays were built: not here
        positions = self.position_of[slots[inside]]
        here = positions >= 0
        hits[positions[here]] = pages[inside][here]
        return hits


class WorkerTable:
    def __init__(self, index: CacheIndex, model: str, hash_scheme: str, page_size: int, ttl_s: float,
                 snapshot_retry_s: float = 2.0) -> None:
        self.index = index
        self.model = model
        self.hash_scheme = hash_scheme
        self.page_size = page_size
        self.ttl_s = ttl_s
        self.snapshot_retry_s = snapshot_retry_s
        self.workers: dict[str, Worker] = {}
        self.refused: dict[str, str] = {}  # instance id -> why it is not used (wrong model, page size, ...)
        self.arrays = {"decode": RoleArrays([], index), "prefill": RoleArrays([], index)}

    def update(self, records: list[WorkerRecord], now: float) -> None:
        """One complete read of the registry."""
        seen = set()
        for record in records:
            problem = self._incompatible(record)
            if problem:
                if self.refused.get(record.instance_id) != problem:
                    log.warning("ignoring worker %s at %s: %s", record.instance_id, record.address, problem)
                self.refused[record.instance_id] = problem
                continue
            seen.add(record.instance_id)
            worker = self.workers.get(record.instance_id)
            if worker is None:
                for other in [w for w in self.workers.values() if w.record.address == record.address]:
                    self.drop(other.name, f"replaced by instance {record.instance_id}")
                self.workers[record.instance_id] = Worker(
                    record, WorkerFeed(record.instance_id, self.index, self.snapshot_retry_s), now
                )
                self.index.register(record.instance_id)
                log.info("worker %s (%s) at %s joined", record.instance_id, record.role, record.address)
            else:
                worker.record, worker.last_seen = record, now
        for name in [n for n, w in self.workers.items() if n not in seen and now - w.last_seen > self.ttl_s]:
            self.drop(name, f"no heartbeat for {self.ttl_s:.1f}s")
        live = {r.instance_id for r in records}
        self.refused = {k: v for k, v in self.refused.items() if k in live}
        self._rebuild()

    def _rebuild(self) -> None:
        self.arrays = {role: RoleArrays(self.by_role(role), self.index) for role in ("decode", "prefill")}

    # ---- per-request changes, written into the arrays as they happen ----------------------------------------
    def started(self, worker: Worker) -> None:
        worker.inflight_here += 1
        self._adjust(worker, 1)

    def ended(self, worker: Worker) -> None:
        worker.inflight_here -= 1
        self._adjust(worker, -1)

    def _adjust(self, worker: Worker, delta: int) -> None:
        arrays = self.arrays[worker.record.role]
        slot = arrays.slot.get(worker.name)
        if slot is not None and arrays.workers[slot] is worker and worker.record.role == "decode":
            arrays.inflight[slot] += delta

    def set_inflight_elsewhere(self, counts: dict[str, int]) -> None:
        for worker in self.workers.values():
            worker.inflight_elsewhere = counts.get(worker.name, 0)
        decode = self.arrays["decode"]
        decode.inflight = np.array([w.inflight_here + w.inflight_elsewhere for w in decode.workers], dtype=np.float64)

    def failed(self, worker: Worker, until: float) -> None:
        """A call to ``worker`` failed: not chosen before ``until``."""
        worker.unavailable_until = until
        arrays = self.arrays[worker.record.role]
        slot = arrays.slot.get(worker.name)
        if slot is not None and arrays.workers[slot] is worker:
            arrays.unavailable_until[slot] = until

    def _incompatible(self, record: WorkerRecord) -> str:
        if record.role not in ("prefill", "decode"):
            return f"unknown role {record.role!r}"
        if self.model and record.model != self.model:
            return f"serves model {record.model!r}, this router {self.model!r}"
        if record.hash_scheme != self.hash_scheme:
            return f"page hash scheme {record.hash_scheme!r}, this router {self.hash_scheme!r}"
        if record.page_size != self.page_size:
            return f"page size {record.page_size}, this router {self.page_size}"
        return ""

    def drop(self, name: str, why: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            self.index.drop_worker(name)
            self._rebuild()
            log.info("worker %s at %s dropped: %s", name, worker.record.address, why)

    def by_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.record.role == role]

    def eligible(self, role: str, now: float, fingerprint: str = "") -> list[Worker]:
        """Workers of ``role`` that can take a request now (not draining, not recently failed, not full; of
        ``fingerprint`` when given)."""
        arrays = self.arrays[role]
        return [arrays.workers[i] for i in np.flatnonzero(arrays.eligible(now, fingerprint=fingerprint))]

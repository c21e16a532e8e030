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

from services.cluster.schema import WorkerRecord

from .feed import WorkerFeed
from .index import CacheIndex

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
        """Requests on it: its own report lags a heartbeat, the routers' counts do not but miss other clients;
        the larger of the two."""
        return max(self.record.running + self.record.waiting, self.inflight_here + self.inflight_elsewhere)

    @property
    def full(self) -> bool:
        return self.active >= self.record.capacity


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
                log.info("worker %s (%s) at %s joined", record.instance_id, record.role, record.address)
            else:
                worker.record, worker.last_seen = record, now
        for name in [n for n, w in self.workers.items() if n not in seen and now - w.last_seen > self.ttl_s]:
            self.drop(name, f"no heartbeat for {self.ttl_s:.1f}s")
        live = {r.instance_id for r in records}
        self.refused = {k: v for k, v in self.refused.items() if k in live}

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
            log.info("worker %s at %s dropped: %s", name, worker.record.address, why)

    def by_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.record.role == role]

    def eligible(self, role: str, now: float, fingerprint: str = "") -> list[Worker]:
        """Workers of ``role`` that can take a request now (not draining, not recently failed, not full; of
        ``fingerprint`` when given)."""
        return [
            w for w in self.workers.values()
            if w.record.role == role and not w.record.draining and w.unavailable_until <= now and not w.full
            and (not fingerprint or w.record.fingerprint == fingerprint)
        ]

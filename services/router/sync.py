"""The router's side of Redis: it reads the worker registry, follows every worker's event stream into the
index, fetches snapshots for workers it lost track of, and shares its in-flight counts with the other router
replicas (see services/cluster/schema.py for the keys).

Two loops on the router's event loop:
- ``_poll_loop`` every ``poll_interval_s``: the registry (records and load), snapshot requests and fetches,
  and the in-flight exchange. A failed read marks Redis down; routing then goes on from the last known state.
- ``_stream_loop``: one blocking XREAD over all workers' streams (its own connection), batches to their feeds.
  A heartbeat's batch number is checked against the stream only once the stream has been read to its end
  after that heartbeat was read, so a batch in flight is never mistaken for a lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from services.cluster.publisher import redis_client
from services.cluster.schema import EventBatch, Keys, Snapshot, WorkerRecord
from services.common.serving import cancel_tasks
from services.engine.radix_cache import CacheDigest

from .workers import WorkerTable

log = logging.getLogger("baton.router.sync")

# Bounds on one read: streams per read, entries per stream (a stream that returns this many is not read to its
# end yet), and entries per stream in the blocking read that waits for the next batch.
_XREAD_STREAMS = 64
_XREAD_COUNT = 32
_WAKE_COUNT = 4


@dataclass
class _Report:
    seq: int
    digest: CacheDigest
    read_at: float


class ClusterSync:
    def __init__(self, redis_url: str, namespace: str, router_id: str, table: WorkerTable, poll_interval_s: float,
                 ttl_s: float, on_batches=None) -> None:
        self.keys = Keys(namespace)
        self.router_id = router_id
        self.table = table
        self.poll_interval_s = poll_interval_s
        self.ttl_s = ttl_s
        self.redis = redis_client(redis_url)
        # XREAD blocks: its own connection, with room for the block and for reading a full reply.
        self.stream_redis = redis_client(redis_url, timeout_s=max(5.0, 4 * poll_interval_s))
        self.up = False
        self._reports: dict[str, _Report] = {}
        self._stream_ids: dict[str, bytes] = {}
        self._tasks: list[asyncio.Task] = []
        # The loops also stop on this flag: redis-py can turn a cancellation that lands inside a command into
        # a connection error, which the loops catch to ride out Redis outages.
        self._running = False
        self._first_poll = asyncio.Event()
        self.on_batches = on_batches  # metrics hook: called with the number of events applied
        self.inflight_published: dict[str, int] = {}

    def start(self) -> None:
        self._running = True
        self._tasks = [asyncio.ensure_future(self._poll_loop()), asyncio.ensure_future(self._stream_loop())]

    async def wait_first_poll(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_poll.wait(), timeout)

    async def stop(self) -> None:
        self._running = False
        await cancel_tasks(self._tasks)
        with contextlib.suppress(RedisError, OSError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(self.keys.routers, self.router_id)
            pipe.delete(self.keys.router(self.router_id))
            await pipe.execute()
        await self.redis.aclose()
        await self.stream_redis.aclose()

    def _set_up(self, up: bool, err: Exception | None = None) -> None:
        if up != self.up:
            if up:
                log.info("Redis reachable: cache-aware routing from the index")
            else:
                log.warning("Redis unreachable (%s): routing by load from the last known state", err)
        self.up = up

    # ---- registry, snapshots, in-flight -------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while self._running:
            try:
                await self.poll()
                self._set_up(True)
            except (RedisError, OSError) as err:
                self._set_up(False, err)
            self._first_poll.set()
            await asyncio.sleep(self.poll_interval_s)  # the polling period, not synchronisation

    async def poll(self) -> None:
        r, keys = self.redis, self.keys
        now = time.monotonic()
        ids = sorted(i.decode() for i in await r.smembers(keys.workers))
        pipe = r.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(keys.worker(worker_id))
        records, gone = [], []
        for worker_id, fields in zip(ids, await pipe.execute() if ids else [], strict=True):
            if not fields:
                gone.append(worker_id)  # its record expired: the registry set is cleaned here
                continue
            try:
                records.append(WorkerRecord.from_fields(fields))
            except ValueError as err:
                log.warning("ignoring malformed record of worker %s: %s", worker_id, err)
        if gone:
            await r.srem(keys.workers, *gone)
        listed = set(ids) - set(gone)
        missing = [name for name in self.table.workers if name not in listed]
        if missing:  # deregistered (a drain) or expired: a departure notice says which, without waiting a TTL
            pipe = r.pipeline(transaction=False)
            for name in missing:
                pipe.exists(keys.departed(name))
            for name, departed in zip(missing, await pipe.execute(), strict=True):
                if departed:
                    self.table.drop(name, "deregistered (draining or stopped)")
        self.table.update(records, now)
        for record in records:
            if record.instance_id in self.table.workers:
                self._reports[record.instance_id] = _Report(record.event_seq, record.digest, now)
        await self._snapshots(now)
        await self._exchange_inflight()

    async def _snapshots(self, now: float) -> None:
        r, keys = self.redis, self.keys
        awaiting = [w for w in self.table.workers.values() if not w.feed.in_sync]
        if not awaiting:
            return
        pipe = r.pipeline(transaction=False)
        for worker in awaiting:
            if worker.feed.wants_snapshot(now):
                pipe.set(keys.snapshot_request(worker.name), b"1", px=int(self.ttl_s * 1000) * 10)
                worker.feed.requested(now)
            pipe.get(keys.snapshot(worker.name))
        results = [res for res in await pipe.execute() if res is not True]
        for worker, data in zip(awaiting, results, strict=True):
            if data is None:
                continue
            try:
                snapshot = Snapshot.decode(data)
            except ValueError as err:
                log.warning("ignoring a malformed snapshot of %s: %s", worker.name, err)
                continue
            before = self.table.index.events_applied
            worker.feed.on_snapshot(snapshot)
            if self.on_batches is not None:
                self.on_batches(self.table.index.events_applied - before)

    async def _exchange_inflight(self) -> None:
        """Publish this router's in-flight counts and read the others' (so that replicas do not all pile onto
        the pod each of them thinks is idle)."""
        r, keys = self.redis, self.keys
        mine = {w.name: w.inflight_here for w in self.table.workers.values() if w.inflight_here}
        ttl_ms = int(self.ttl_s * 1000)
        pipe = r.pipeline(transaction=True)
        pipe.delete(keys.router(self.router_id))
        if mine:
            pipe.hset(keys.router(self.router_id), mapping=mine)
        pipe.sadd(keys.routers, self.router_id)
        pipe.pexpire(keys.router(self.router_id), ttl_ms)
        await pipe.execute()
        self.inflight_published = mine
        others = sorted(i.decode() for i in await r.smembers(keys.routers) if i.decode() != self.router_id)
        pipe = r.pipeline(transaction=False)
        for other in others:
            pipe.hgetall(keys.router(other))
        elsewhere: dict[str, int] = {}
        expired = []
        for other, counts in zip(others, await pipe.execute() if others else [], strict=True):
            if not counts:
                expired.append(other)
            for worker_id, count in counts.items():
                elsewhere[worker_id.decode()] = elsewhere.get(worker_id.decode(), 0) + int(count)
        if expired:
            await r.srem(keys.routers, *expired)
        self.table.set_inflight_elsewhere(elsewhere)

    # ---- event streams ------------------------------------------------------------------------------
    async def _stream_loop(self) -> None:
        """Drain every stream in bounded reads (a backlog of thousands of batches must not become one reply
        so large it times out, again and again), then wait in one blocking read for the next batch anywhere."""
        block_ms = max(1, int(self.poll_interval_s * 1000))
        while self._running:
            names = list(self.table.workers)
            for name in [n for n in self._stream_ids if n not in self.table.workers]:
                del self._stream_ids[name]
                self._reports.pop(name, None)
            if not names:
                await asyncio.sleep(self.poll_interval_s)  # nothing to follow yet: the registry poll adds workers
                continue
            started = time.monotonic()
            not_caught_up: set[str] = set()
            try:
                read_any = False
                for first in range(0, len(names), _XREAD_STREAMS):
                    chunk = names[first : first + _XREAD_STREAMS]
                    response = await self.stream_redis.xread(self._positions(chunk), count=_XREAD_COUNT)
                    read_any |= self._deliver(response, not_caught_up)
                if not read_any:
                    response = await self.stream_redis.xread(self._positions(names), count=_WAKE_COUNT,
                                                             block=block_ms)
                    read_any = self._deliver(response, not_caught_up)
                    not_caught_up.update(name for name in names if read_any)  # drained on the next pass
            except (RedisError, OSError) as err:
                self._set_up(False, err)
                await asyncio.sleep(self.poll_interval_s)  # retry period while Redis is away
                continue
            for name, report in list(self._reports.items()):
                worker = self.table.workers.get(name)
                if worker is not None and name not in not_caught_up and report.read_at < started:
                    worker.feed.on_report(report.seq, report.digest)
                    del self._reports[name]

    def _positions(self, names: list[str]) -> dict[str, bytes]:
        return {self.keys.events(name): self._stream_ids.setdefault(name, b"0-0") for name in names}

    def _deliver(self, response, not_caught_up: set[str]) -> bool:
        """Hand the batches read to their feeds; True if there were any."""
        applied_before = self.table.index.events_applied
        read = False
        for stream, entries in response or []:
            name = stream.decode().rsplit(":", 1)[1]
            worker = self.table.workers.get(name)
            if worker is None:
                continue
            for entry_id, fields in entries:
                read = True
                self._stream_ids[name] = entry_id
                try:
                    batch = EventBatch.from_fields(fields)
                except ValueError as err:
                    log.warning("ignoring a malformed event batch of %s: %s", name, err)
                    continue
                worker.feed.on_batch(batch)
            if len(entries) >= _XREAD_COUNT:
                not_caught_up.add(name)
        if self.on_batches is not None:
            self.on_batches(self.table.index.events_applied - applied_before)
        return read

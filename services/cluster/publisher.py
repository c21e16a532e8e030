"""A pod's side of the cluster: it registers in Redis, heartbeats its load, publishes its prefix-cache events
and answers routers' snapshot requests (see services/cluster/schema.py for the keys).

Two parts, on two threads:
- ``EventLog`` runs on the engine thread (it is the AsyncEngine's ``on_cache_events`` callback): it numbers
  each step's batch of events and hands it to the event loop. Snapshots are taken there too, after the
  pending events are numbered, so that a snapshot is exactly the cache after a known batch.
- ``ClusterPublisher`` runs on the pod's event loop: one task sends batches as they come (XADD, the stream
  trimmed to ``event_stream_maxlen`` entries), one heartbeats every ``heartbeat_interval_s`` (the
  record with its load and the number of the last batch sent, the TTL renewed) and takes snapshots when asked.

Redis being down never stops the pod: batches that cannot be sent are dropped (their numbers are used, so a
router sees the gap and asks for a snapshot), and the heartbeat re-registers the pod once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.page_hash import SCHEME
from services.common.serving import cancel_tasks
from services.engine.async_engine import AsyncEngine
from services.engine.engine import Engine
from services.engine.radix_cache import CacheDigest, CacheEvent

from .schema import EventBatch, Keys, Snapshot, WorkerRecord, encode_events

log = logging.getLogger("baton.cluster")


@dataclass(frozen=True)
class ClusterConfig:
    redis_url: str = field(
        default="", metadata={"help": "Redis of the cluster (redis://host:port/db); empty: not registered"}
    )
    redis_namespace: str = field(default="baton", metadata={"help": "prefix of every Redis key of this cluster"})
    served_model_name: str = field(default="", metadata={"help": "model name routers match (default: --model)"})
    advertise_address: str = field(
        default="", metadata={"help": "host:port routers and pods use to reach this pod (default: bound address)"}
    )
    heartbeat_interval_s: float = field(default=0.1, metadata={"help": "period of load reports to Redis"})
    heartbeat_ttl_s: float = field(default=3.0, metadata={"help": "a pod silent this long is dropped by routers"})
    event_stream_maxlen: int = field(
        default=1000, metadata={"help": "cache-event batches kept in Redis per pod (older ones are trimmed)"}
    )

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.heartbeat_ttl_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed two heartbeat intervals, both positive")
        if self.event_stream_maxlen < 10:
            raise ValueError("event_stream_maxlen must be at least 10")
        Keys(self.redis_namespace)  # validates it


def redis_client(url: str, timeout_s: float = 1.0) -> aioredis.Redis:
    """A client that fails fast when Redis is gone (no retries with back-off: callers retry on their own
    schedule and must not stall a request path or a heartbeat)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class EventLog:
    """Engine thread: numbers the prefix cache's event batches of this pod instance."""

    def __init__(self, deliver: Callable[[EventBatch], None]) -> None:
        self.seq = 0
        self._deliver = deliver

    def on_events(self, events: list[CacheEvent], digest: CacheDigest) -> None:
        self.seq += 1
        self._deliver(EventBatch(self.seq, encode_events(events), digest))

    def snapshot(self, engine: Engine) -> Snapshot:
        """Engine thread (through ``AsyncEngine.call``): the cache as it is after batch ``seq``."""
        events = engine.drain_cache_events()
        if events:
            self.on_events(events, engine.cache_digest)
        return Snapshot(self.seq, encode_events(engine.cache_snapshot()), engine.cache_digest)


class ClusterPublisher:
    """Created before the pod's engine loop (its ``event_log.on_events`` is that loop's ``on_cache_events``),
    started once the pod serves and knows its address."""

    def __init__(self, config: ClusterConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.record: WorkerRecord | None = None
        self.keys = Keys(config.redis_namespace)
        self.loop = loop
        self.redis = redis_client(config.redis_url)
        self.event_log = EventLog(self._deliver)
        self.async_engine: AsyncEngine | None = None
        self._batches: asyncio.Queue[EventBatch] = asyncio.Queue()
        self._sent = (0, CacheDigest(0, 0, 0, 0))  # the last batch handed to Redis, and the digest after it
        self._tasks: list[asyncio.Task] = []
        # The loops also stop on this flag: redis-py can turn a cancellation that lands inside a command into
        # a connection error, which the loops catch to ride out Redis outages.
        self._running = False
        self.redis_up = True
        self.draining = False
        self.direct_requests_of: Callable[[], int] = lambda: 0  # decode pods: requests no router placed
        self.snapshots_sent = 0
        self._stopped = False

    # ---- engine thread ------------------------------------------------------------------------------
    def _deliver(self, batch: EventBatch) -> None:
        self.loop.call_soon_threadsafe(self._batches.put_nowait, batch)

    # ---- event loop ---------------------------------------------------------------------------------
    def start(self, async_engine: AsyncEngine, record: WorkerRecord) -> None:
        self.async_engine = async_engine
        self.record = record
        self._running = True
        self._tasks = [asyncio.ensure_future(self._send_batches()), asyncio.ensure_future(self._heartbeat())]

    async def stop(self) -> None:
        """Stop publishing and deregister (best effort: Redis may be gone), leaving a departure notice so that
        routers drop this pod at their next poll. A draining pod calls it as the drain starts; calling it again
        (when the process ends) does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.record is None:
            await self.redis.aclose()
            return
        self._running = False
        await cancel_tasks(self._tasks)
        worker_id = self.record.instance_id
        with contextlib.suppress(RedisError, OSError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.keys.departed(worker_id), b"1", px=int(self.config.heartbeat_ttl_s * 1000) * 10)
            pipe.srem(self.keys.workers, worker_id)
            pipe.delete(self.keys.worker(worker_id), self.keys.events(worker_id), self.keys.snapshot(worker_id))
            await pipe.execute()
            log.info("deregistered %s from %s", worker_id, self.config.redis_url)
        await self.redis.aclose()

    def _set_up(self, up: bool, err: Exception | None = None) -> None:
        if up != self.redis_up:
            if up:
                log.info("Redis at %s reachable again: re-registered", self.config.redis_url)
            else:
                log.warning("Redis at %s unreachable (%s): serving on, cache events dropped until it is back",
                            self.config.redis_url, err)
        self.redis_up = up

    async def _send_batches(self) -> None:
        worker_id = self.record.instance_id
        stream = self.keys.events(worker_id)
        while self._running:
            batches = [await self._batches.get()]
            while not self._batches.empty():
                batches.append(self._batches.get_nowait())
            try:
                pipe = self.redis.pipeline(transaction=False)
                for batch in batches:
                    pipe.xadd(stream, batch.to_fields(), maxlen=self.config.event_stream_maxlen, approximate=False)
                pipe.pexpire(stream, int(self.config.heartbeat_ttl_s * 1000) * 10)
                await pipe.execute()
                self._set_up(True)
            except (RedisError, OSError) as err:
                self._set_up(False, err)  # lost: their numbers stay used, routers see the gap
            self._sent = (batches[-1].seq, batches[-1].digest)

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        while self._running:
            try:
                await self._beat()
                self._set_up(True)
            except (RedisError, OSError) as err:
                self._set_up(False, err)
            await asyncio.sleep(interval)  # the heartbeat period, not synchronisation

    def current_record(self) -> WorkerRecord:
        load = self.async_engine.load
        seq, digest = self._sent
        return dataclasses.replace(
            self.record, running=load.running, waiting=load.waiting, free_pages=load.free_pages,
            free_slots=load.free_slots, queued_prefill_tokens=load.queued_prefill_tokens,
            direct_requests=self.direct_requests_of(), draining=self.draining,
            event_seq=seq, cache_pages=digest.pages, cache_states=digest.states, cache_page_sum=digest.page_sum,
            cache_state_sum=digest.state_sum,
        )

    async def _beat(self) -> None:
        worker_id = self.record.instance_id
        ttl_ms = int(self.config.heartbeat_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.worker(worker_id), mapping=self.current_record().to_fields())
        pipe.pexpire(self.keys.worker(worker_id), ttl_ms)
        pipe.sadd(self.keys.workers, worker_id)
        pipe.getdel(self.keys.snapshot_request(worker_id))
        *_, wanted = await pipe.execute()
        if wanted is not None:
            snapshot = await asyncio.wrap_future(self.async_engine.call(self.event_log.snapshot))
            # Kept long enough for every router that asked to read it; a newer one replaces it.
            await self.redis.set(self.keys.snapshot(worker_id), snapshot.encode(), px=ttl_ms * 10)
            self.snapshots_sent += 1
            log.info("published a snapshot of the prefix cache at batch %d (%d pages, %d checkpoints)",
                     snapshot.seq, snapshot.digest.pages, snapshot.digest.states)


def advertised_address(config: ClusterConfig, host: str, port: int) -> str:
    """How others reach a pod bound to ``host:port``."""
    if config.advertise_address:
        return config.advertise_address
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


def worker_record(role: str, instance_id: str, address: str, model: str, fingerprint: str, engine: Engine,
                  metrics_address: str, remote_prefill_threshold: int) -> WorkerRecord:
    """The static part of a pod's record."""
    config = engine.config
    return WorkerRecord(
        instance_id=instance_id, role=role, address=address, model=model, fingerprint=fingerprint,
        hash_scheme=SCHEME, page_size=config.page_size, max_running=config.max_num_seqs,
        max_waiting=config.max_waiting_requests, max_model_len=engine.max_model_len,
        pages_total=engine.pages.capacity, slots_total=engine.slots.capacity,
        remote_prefill_threshold=remote_prefill_threshold, metrics_address=metrics_address, started_at=time.time(),
    )

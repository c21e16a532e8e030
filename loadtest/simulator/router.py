"""The router as the simulator runs it: the real index, feeds, session table and placer, fed as the real router is
fed.

Each worker's event batches (numbered, with the cache digest after them) reach the router's ``WorkerFeed`` at the
router's next poll of Redis (every ``poll_interval_s``), so the index lags the caches as it does in a cluster; a
batch that does not apply or whose digest disagrees sends the feed to resynchronise, as in production (the report
counts those; there should be none). Placement scores the workers as ``services/router/server.py``'s ``_place``
does: the index's usable pages capped so the last prompt token is computed, in-flight requests as the load,
workers at capacity not eligible, the session table's live conversations, then ``Placer.choose_among``. Token
counts given to the placer are real tokens, so the weights mean what they mean in the router.

``oracle`` is not a router policy: a perfectly balanced sticky assignment, the baseline cache_aware must match.
A conversation's first turn goes to the worker with the fewest live conversations, and every later turn follows.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import numpy as np

from services.cluster.schema import EventBatch
from services.router.feed import WorkerFeed
from services.router.index import CacheIndex
from services.router.policy import Placer, Policy, Weights, Workers, address_key
from services.router.sessions import SessionTable

from .worker import SimWorker

ORACLE = "oracle"
POLICIES = (*(p.value for p in Policy), ORACLE)


class Placed(NamedTuple):
    """A placement as the router saw it (usable hits in real tokens)."""

    worker: SimWorker | None  # None: every worker is at capacity
    chosen_hit: int  # on the chosen worker
    available_hit: int  # the best on any worker
    previous_hit: int  # on the worker that served the conversation's previous turn (0 without one)


class SimRouter:
    def __init__(self, workers: list[SimWorker], policy: str, weights: Weights, page_size: int, token_scale: int,
                 capacity: int, poll_interval_s: float, session_ttl_s: float) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.workers = workers  # in name order (names sort like indices), as the router's arrays are
        self.policy = policy
        self.page_size = page_size
        self.scale = token_scale
        self.capacity = capacity
        self.poll_interval_s = poll_interval_s
        self.index = CacheIndex()
        self.feeds = {w.name: WorkerFeed(w.name, self.index) for w in workers}
        self.placer = Placer(Policy(policy), weights) if policy != ORACLE else None
        self.sessions = SessionTable(session_ttl_s)
        self.names = [w.name for w in workers]
        self.cache_tokens = np.array([w.config.num_pages * page_size * token_scale for w in workers], dtype=np.float64)
        self.position = {w.name: w.index for w in workers}
        self.address_keys = np.array([address_key(w.address) for w in workers], dtype=np.uint64)
        index_slots = np.array([self.index.register(name) for name in self.names], dtype=np.int64)
        self.position_of = np.full(self.index.num_slots, -1, dtype=np.int64)
        self.position_of[index_slots] = np.arange(len(workers))
        self._pending: deque[tuple[float, str, EventBatch]] = deque()
        self.live_conversations = [0] * len(workers)  # the oracle's balance
        self.decisions: dict[str, int] = {}
        self.sessions_forgotten = 0

    # ---- the index ----------------------------------------------------------------------------------
    def publish(self, worker: SimWorker, batch: EventBatch, now: float) -> None:
        """A worker sent a batch at ``now``: the router reads it at its next poll."""
        deliver = math.ceil(now / self.poll_interval_s - 1e-9) * self.poll_interval_s
        self._pending.append((deliver, worker.name, batch))

    def poll(self, now: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, name, batch = pending.popleft()
            self.feeds[name].on_batch(batch)

    def flush(self) -> None:
        self.poll(math.inf)

    @property
    def resyncs(self) -> int:
        return sum(feed.resyncs for feed in self.feeds.values())

    # ---- placement ----------------------------------------------------------------------------------
    def place(self, prompt_len: int, hashes: list[int], session_id: str, now: float,
              sticky: SimWorker | None = None, previous: int | None = None) -> Placed:
        """The worker for a prompt, with the usable hits the router saw. ``sticky``: the oracle's worker for a
        later turn; ``previous``: the worker that served the conversation's previous turn (for the report)."""
        self.poll(now)
        page, scale = self.page_size, self.scale
        cap = (prompt_len - 1) // page  # the last token is always computed: its logits are needed
        slots, pages = self.index.usable(hashes)
        hits = np.zeros(len(self.workers))
        hits[self.position_of[slots]] = np.minimum(pages, cap) * page * scale
        available = int(hits.max(initial=0))
        previous_hit = int(hits[previous]) if previous is not None else 0
        if self.policy == ORACLE:
            worker = sticky or min(self.workers, key=lambda w: (self.live_conversations[w.index], w.index))
            self._count("oracle_sticky" if sticky else "oracle_new")
            return Placed(worker, int(hits[worker.index]), available, previous_hit)
        self.sessions.expire(now)
        active = np.fromiter((w.active for w in self.workers), dtype=np.float64, count=len(self.workers))
        queued = np.fromiter((w.queued_tokens for w in self.workers), dtype=np.float64, count=len(self.workers))
        n = len(self.workers)
        workers = Workers(self.names, self.address_keys, active, queued * scale, hits, active < self.capacity,
                          self.sessions.counts(self.position, n, session_id),
                          self.sessions.tokens(self.position, n, session_id), self.cache_tokens)
        choice = self.placer.choose_among(workers, prompt_len * scale, session_id)
        if choice is None:
            self._count("refused_all_full")
            return Placed(None, 0, available, previous_hit)
        self._count(choice.reason)
        if session_id and previous is not None and self.sessions.worker_of(session_id) is None:
            self.sessions_forgotten += 1  # a follow-up of a conversation the table had taken as over
        self.sessions.placed(session_id, choice.name, now, prompt_len * scale)
        return Placed(self.workers[choice.index], choice.hit_tokens, available, previous_hit)

    def answered(self, session_id: str, now: float) -> None:
        self.sessions.answered(session_id, now)

    def session_ended(self, session_id: str) -> None:
        self.sessions.ended(session_id)

    def _count(self, reason: str) -> None:
        self.decisions[reason] = self.decisions.get(reason, 0) + 1

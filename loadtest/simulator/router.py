"""The router as the simulator runs it: the real index, feeds and placer, fed as the real router is fed.

Each worker's event batches (numbered, with the cache digest after them) reach the router's ``WorkerFeed`` at the
router's next poll of Redis (every ``poll_interval_s``), so the index lags the caches as it does in a cluster; a
batch that does not apply or whose digest disagrees sends the feed to resynchronise, as in production (the report
counts those; there should be none). Placement builds ``Candidate``s the way ``services/router/server.py``'s
``_place`` does (usable hit capped so the last prompt token is computed, in-sync workers only, workers at capacity
left out) and asks ``Placer.choose``. All token counts given to the placer are real tokens, so the weights mean
what they mean in the router.

``oracle`` is not a router policy: a perfectly balanced sticky assignment, the baseline cache_aware must match.
A conversation's first turn goes to the worker with the fewest live conversations, and every later turn follows.
"""

from __future__ import annotations

import math
from collections import deque

from services.cluster.schema import EventBatch
from services.router.feed import WorkerFeed
from services.router.index import CacheIndex
from services.router.policy import Candidate, Placer, Policy, Weights
from services.router.sessions import SessionTable

from .worker import SimWorker

ORACLE = "oracle"
POLICIES = (*(p.value for p in Policy), ORACLE)


class SimRouter:
    def __init__(self, workers: list[SimWorker], policy: str, weights: Weights, page_size: int, token_scale: int,
                 capacity: int, poll_interval_s: float, session_ttl_s: float) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.workers = workers
        self.policy = policy
        self.page_size = page_size
        self.scale = token_scale
        self.capacity = capacity
        self.poll_interval_s = poll_interval_s
        self.index = CacheIndex()
        self.feeds = {w.name: WorkerFeed(w.name, self.index) for w in workers}
        self.placer = Placer(Policy(policy), weights) if policy != ORACLE else None
        self._pending: deque[tuple[float, str, EventBatch]] = deque()
        self._base: list[Candidate | None] = [None] * len(workers)  # hit-free candidates, as of the last decision
        self._dirty: set[int] = set(range(len(workers)))
        self._full: set[int] = set()
        self._by_name = {w.name: w for w in workers}
        self.sessions = SessionTable(session_ttl_s)
        self.live_conversations = [0] * len(workers)  # the oracle's balance
        self.decisions: dict[str, int] = {}

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
              sticky: SimWorker | None = None) -> tuple[SimWorker | None, int, int]:
        """The worker for a prompt (None: every worker is at capacity), with the usable hit (real tokens) on it as
        the router saw it and the best anywhere. ``sticky``: the oracle's worker for a later turn."""
        self.poll(now)
        page, scale = self.page_size, self.scale
        cap = (prompt_len - 1) // page  # the last token is always computed: its logits are needed
        feeds = self.feeds
        hits = {name: min(pages, cap) * page * scale for name, pages in self.index.usable_pages(hashes).items()
                if feeds[name].in_sync}
        available = max(hits.values(), default=0)
        if self.policy == ORACLE:
            worker = sticky or min(self.workers, key=lambda w: (self.live_conversations[w.index], w.index))
            self._count("oracle_sticky" if sticky else "oracle_new")
            return worker, hits.get(worker.name, 0), available
        for name in self.sessions.expire(now):
            self._dirty.add(self._by_name[name].index)
        candidates = self._eligible(hits, session_id)
        if not candidates:
            self._count("refused_all_full")
            return None, 0, available
        choice = self.placer.choose(candidates, prompt_len * scale, session_id)
        self._count(choice.reason)
        worker = self._by_name[choice.worker.name]
        previous = self.sessions.worker_of(session_id)
        self.sessions.placed(session_id, worker.name, now)
        self._dirty.add(worker.index)
        if previous is not None:
            self._dirty.add(self._by_name[previous].index)
        return worker, choice.worker.hit_tokens, available

    def session_ended(self, session_id: str) -> None:
        holder = self.sessions.worker_of(session_id)
        if holder is not None:
            self.sessions.ended(session_id)
            self._dirty.add(self._by_name[holder].index)

    def load_changed(self, worker: SimWorker) -> None:
        """The worker's load (in flight, queued tokens) changed: rebuild its candidate before the next decision."""
        self._dirty.add(worker.index)

    def _candidate(self, w: SimWorker, hit: int, sessions: int, holds_session: bool = False) -> Candidate:
        return Candidate(w.name, w.address, w.active, w.queued_tokens * self.scale, hit, sessions, holds_session)

    def _eligible(self, hits: dict[str, int], session_id: str) -> list[Candidate]:
        """The candidates ``_place`` would build, from a kept list of every worker's hit-free candidate where only
        workers whose load or conversations changed are rebuilt (the router builds all of them afresh: the same
        values, far less Python time at 1,000 workers; ``naive_candidates`` is the check)."""
        base, sessions, workers = self._base, self.sessions, self.workers
        for i in self._dirty:
            w = workers[i]
            base[i] = self._candidate(w, 0, sessions.live(w.name))
            if w.active >= self.capacity:
                self._full.add(i)
            else:
                self._full.discard(i)
        self._dirty.clear()
        out = list(base)
        own = sessions.worker_of(session_id)
        patched = set(hits) | ({own} if own is not None else set())
        for name in patched:
            w = self._by_name[name]
            out[w.index] = self._candidate(w, hits.get(name, 0), sessions.live(name, session_id), name == own)
        if self._full:
            out = [c for i, c in enumerate(out) if i not in self._full]
        return out

    def naive_candidates(self, hits: dict[str, int], session_id: str) -> list[Candidate]:
        """Every candidate built afresh, as ``_place`` does (for tests of ``_eligible``)."""
        own = self.sessions.worker_of(session_id)
        return [self._candidate(w, hits.get(w.name, 0), self.sessions.live(w.name, session_id), w.name == own)
                for w in self.workers if w.active < self.capacity]

    def _count(self, reason: str) -> None:
        self.decisions[reason] = self.decisions.get(reason, 0) + 1

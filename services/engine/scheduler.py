"""Continuous batching with chunked prefill, on top of the hybrid prefix cache.

Each step takes, in order: one token for every running request that is decoding, the next prefill chunk
of running requests that are part-way through their prompt, then new requests from the queue while a
working state slot, pages and token budget are left. A new request first takes its longest cached prefix
(its working slot starts as a copy of the checkpoint there). When pages run short, unlocked cached pages
are evicted first; if that is not enough, the most recently arrived running request is preempted (its
computed pages go to the cache, it is recomputed later from there), so the engine never fails for lack
of memory. A request that could never fit is refused when it is added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .allocator import IdPool
from .prefix_cache import HybridPrefixCache
from .request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # running requests at once (= working state slots)
    max_num_batched_tokens: int  # token budget of one forward pass
    prefill_chunk_size: int  # most prompt tokens of one request in one step
    page_size: int
    # Decode pods: a new request whose uncached prompt is at least this long is prefilled by a prefill
    # pod (0 = never). Shorter suffixes (follow-up turns of a conversation) are prefilled locally.
    remote_prefill_threshold: int = 0


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # computed this step, starting at request.num_computed_tokens
    copy_state_from: int | None = None  # checkpoint slot to copy into the working slot before the step
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (tokens into the step, checkpoint slot)
    start: int = 0  # request.num_computed_tokens when scheduled
    # The step computes the request's last token, so a new one is sampled (set when scheduled: a step
    # launched ahead computes a token the host does not know yet).
    samples: bool = False


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: IdPool, slots: IdPool, cache: HybridPrefixCache) -> None:
        self.config = config
        self.pages = pages
        self.slots = slots
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last one is preempted first
        self.remote_prefills: list[Request] = []  # admitted this step for a prefill pod to compute
        self.quarantined_pages: list[int] = []  # never reused: a prefill pod may still write them
        self.quarantined_slots: list[int] = []

    # ---- queue management ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request, release: bool = True) -> None:
        """Take a request out (finished or aborted) and return its memory, unless ``release`` is False
        (a prefill pod holds it until the hand-over is done, then calls ``release``)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if release:
            self._release(request)
        request.status = RequestStatus.FINISHED

    def release(self, request: Request) -> None:
        self._release(request)

    def quarantine(self, request: Request) -> None:
        """Take the request out with its destination memory kept out of circulation (see Engine)."""
        self.running.remove(request)
        request.awaiting_remote_prefill = False
        if request.cache_node is not None:  # the prefix it matched is not written by the prefill pod
            self.cache.tree.unlock(request.cache_node)
        self.quarantined_pages += [p for p in request.page_ids if not self.cache.tree.owns_page(p)]
        self.quarantined_slots.append(request.state_slot)
        request.page_ids, request.state_slot = [], None
        request.cache_node = request.checkpoint_node = None
        request.num_computed_tokens = request.num_cached_tokens = 0
        request.status = RequestStatus.WAITING

    def requeue(self, request: Request) -> None:
        """A remote prefill failed: give the memory back and put the request first in line again."""
        self.running.remove(request)
        request.awaiting_remote_prefill = False
        self._release(request)
        request.num_computed_tokens = request.num_cached_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.cache.release(request)
        if request.state_slot is not None:
            self.slots.free([request.state_slot])
            request.state_slot = None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.num_cached_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # ---- paging -------------------------------------------------------------------------------------
    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the request's pages cover ``num_tokens`` tokens, evicting cached pages if needed."""
        missing = self._pages_for(num_tokens) - len(request.page_ids)
        if missing <= 0:
            return True
        if not self.pages.can_allocate(missing):
            self.cache.evict_pages(missing - self.pages.num_free)
            if not self.pages.can_allocate(missing):
                return False
        request.page_ids.extend(self.pages.allocate(missing))
        return True

    def _grow_or_preempt(self, request: Request, num_tokens: int, scheduled: set[int]) -> bool:
        """Grow, preempting younger unscheduled running requests if needed. False if ``request`` itself
        had to be preempted (nothing younger was left to take from)."""
        while not self._grow(request, num_tokens):
            # A request waiting for a remote prefill cannot give its pages back: a pod is writing them.
            victims = [
                r for r in self.running
                if id(r) not in scheduled and r is not request and not r.awaiting_remote_prefill
            ]
            if not victims or self.running.index(victims[-1]) < self.running.index(request):
                self._preempt(request)
                return False
            self._preempt(victims[-1])
        return True

    # ---- one step -----------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[int] = set()

        # Running requests first, oldest first: decodes take one token, prefills their next chunk.
        for request in list(self.running):
            if budget == 0:
                break
            if request not in self.running or request.awaiting_remote_prefill:  # preempted, or on a prefill pod
                continue
            remaining = request.num_uncomputed_tokens
            num_new = 1 if remaining == 1 else min(remaining, cfg.prefill_chunk_size, budget)
            if not self._grow_or_preempt(request, request.num_computed_tokens + num_new, scheduled):
                continue
            batch.append(ScheduledSeq(request, num_new))
            scheduled.add(id(request))
            budget -= num_new

        # Then new (or preempted) requests, first come first served, while resources last.
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs and self.slots.can_allocate(1):
            request = self.waiting[0]
            admission = self.cache.match(request)
            remote = (
                cfg.remote_prefill_threshold > 0
                and not request.local_prefill_only
                and request.num_uncomputed_tokens >= cfg.remote_prefill_threshold
            )
            # A remote prefill needs pages for the whole prompt now (the pod writes them all at once).
            num_new = request.num_uncomputed_tokens if remote else min(
                request.num_uncomputed_tokens, cfg.prefill_chunk_size, budget
            )
            if not self._grow(request, request.num_computed_tokens + num_new):
                self.cache.cancel(request)
                break
            self.waiting.popleft()
            self.cache.confirm(request, admission)
            request.state_slot = self.slots.allocate_one()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if remote:  # no compute here; the pod also sends the final state, so no checkpoint copy
                request.awaiting_remote_prefill = True
                self.remote_prefills.append(request)
                continue
            batch.append(ScheduledSeq(request, num_new, copy_state_from=admission.copy_state_from))
            budget -= num_new

        for seq in batch:
            seq.start = seq.request.num_computed_tokens
            seq.samples = seq.start + seq.num_new_tokens == seq.request.num_tokens
            seq.snapshots = self.cache.plan_snapshots(seq.request, seq.num_new_tokens, seq.samples)
        return batch

    def schedule_decode_ahead(self, launched: list[ScheduledSeq]) -> list[ScheduledSeq] | None:
        """The step after ``launched`` (committed, its tokens not known to the host yet), scheduled before
        those tokens arrive: each request decodes the token being sampled for it (the runner takes it from
        the device). Only when that is certain to be wanted and exactly what ``schedule`` would run next;
        otherwise None, and the caller waits for ``launched`` and schedules normally. Not for:
        - a step where some request does not sample, or a request that may be at its end (max_tokens:
          the token in flight is its last);
        - a request whose memory a prefill pod hands over as it is, or whose sampling penalties read its
          tokens on the host;
        - a queue to admit, another running request that could compute, or pages that would need a
          preemption."""
        requests = [seq.request for seq in launched]
        for seq in launched:
            request, params = seq.request, seq.request.params
            if (not seq.samples or request.is_finished or request.hold_memory or params.needs_penalties
                    or len(request.output_token_ids) + 2 > params.max_tokens):
                return None
        runnable = [r for r in self.running if not r.awaiting_remote_prefill]
        if not requests or self.waiting or len(runnable) != len(requests):
            return None
        if any(a is not b for a, b in zip(runnable, requests, strict=True)):
            return None
        if len(requests) > self.config.max_num_batched_tokens:
            return None
        # Pages first, for all: checkpoint slots planned for a step that is then not launched would leak.
        # Pages grown for a step that is not launched are simply the next step's.
        for request in requests:
            if not self._grow(request, request.num_computed_tokens + 1):
                return None
        batch = []
        for request in requests:
            seq = ScheduledSeq(request, 1, start=request.num_computed_tokens, samples=True)
            seq.snapshots = self.cache.plan_snapshots(request, 1, samples=True)
            batch.append(seq)
        return batch

    def commit(self, seq: ScheduledSeq) -> None:
        """The step ran: advance the request and publish the checkpoints it took."""
        seq.request.num_computed_tokens = seq.start + seq.num_new_tokens
        self.cache.commit(seq.request, seq.start, seq.snapshots)

"""Continuous batching with chunked prefill, on top of the hybrid prefix cache.

Each step takes, in order: one token for every running request that is decoding, the next prefill chunk
of running requests that are part-way through their prompt, then new requests from the queue while a
working state slot, pages and token budget are left. A new request first takes its longest cached prefix
(its working slot starts as a copy of the checkpoint there). When pages run short, unlocked cached pages
are evicted first; if that is not enough, the most recently arrived running request is preempted (its
computed pages go to the cache, it is recomputed later from there), so the engine never fails for lack
of memory. A request that could never fit is refused when it is added.

Decode pods also admit requests for a prefill pod to compute (REMOTE_PREFILL): pages for the whole prompt
and a working slot are reserved at once, and until that pod is done with them (answered, confirmed it
stopped) they are neither preempted nor reused; if it cannot be established that it stopped, they are
quarantined (see quarantine.py). The request's transitions are ``Request.move_to``'s, checked.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .allocator import IdPool
from .prefix_cache import HybridPrefixCache
from .quarantine import Quarantine, QuarantinedMemory
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
    # Reserve a checkpoint slot for the state at the prompt's resume boundary, for the prefill pod to fill.
    handover_resume_checkpoint: bool = True


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
        self.num_preemptions = 0  # for the metrics
        self.remote: list[Request] = []  # REMOTE_PREFILL or ABORTING: a prefill pod may write their memory
        self.remote_prefills: list[Request] = []  # admitted for a prefill pod since the engine last took them
        self.quarantine = Quarantine(pages, slots, cache.checkpoint_slots)

    # ---- queue management ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.remote)

    def finish(self, request: Request) -> None:
        """A waiting or running request is done (finished or aborted): out of the queues, memory back."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        request.move_to(RequestStatus.FINISHED)

    def hold(self, request: Request) -> None:
        """Prefill side: the request is computed; keep its memory until ``release_held`` (the hand-over)."""
        self.running.remove(request)
        request.move_to(RequestStatus.HANDING_OVER)

    def release_held(self, request: Request) -> None:
        self._release(request)
        request.move_to(RequestStatus.FINISHED)

    def abort(self, request: Request) -> bool:
        """Cancel the request. True when it is finished with its memory back; False when a prefill pod may
        still write its memory: it is ABORTING until that pod settles (``remote_prefill_done/failed``)."""
        status = request.status
        if status in (RequestStatus.REMOTE_PREFILL, RequestStatus.ABORTING):
            if status == RequestStatus.REMOTE_PREFILL:
                request.move_to(RequestStatus.ABORTING)
            return False
        if status == RequestStatus.HANDING_OVER:
            self.release_held(request)
        elif status != RequestStatus.FINISHED:
            self.finish(request)
        return True

    # ---- remote prefill (decode side) ---------------------------------------------------------------
    def remote_prefill_done(self, request: Request, checkpoint_written: bool) -> None:
        """The prefill pod wrote the prompt's pages and final state (and, if ``checkpoint_written``, the
        state at the resume boundary into the snapshot slot). The request decodes here from now on; an
        aborted one is finished, what it computed going to the cache."""
        self.remote.remove(request)
        request.num_computed_tokens = request.num_tokens
        if not checkpoint_written:
            self.cache.drop_snapshot(request)
        if request.status == RequestStatus.ABORTING:
            self._release(request)
            request.move_to(RequestStatus.FINISHED)
            return
        self.cache.publish_snapshot(request)
        request.move_to(RequestStatus.RUNNING)
        self.running.append(request)

    def remote_prefill_failed(self, request: Request, quarantine_key: str | None, prefill_locally: bool) -> None:
        """The prefill pod will not complete the request. ``quarantine_key`` None: it confirmed it writes
        nothing more, so the memory is freed; otherwise the memory is quarantined under that key until
        ``reclaim(quarantine_key)``. The request is prefilled again, first in line, on a prefill pod or
        (``prefill_locally``) here; an aborted one is finished."""
        self.remote.remove(request)
        if quarantine_key is None:
            self.cache.drop_snapshot(request)  # never written: must not become a checkpoint
            self._release(request)
        else:
            self._quarantine(request, quarantine_key)
        request.num_computed_tokens = request.num_cached_tokens = 0
        if request.status == RequestStatus.ABORTING:
            request.move_to(RequestStatus.FINISHED)
            return
        request.prefill_locally = request.prefill_locally or prefill_locally
        request.move_to(RequestStatus.WAITING)
        self.waiting.appendleft(request)

    def _quarantine(self, request: Request, key: str) -> None:
        tree = self.cache.tree
        if request.cache_node is not None:  # the prefix it matched is the cache's; the pod never writes it
            tree.unlock(request.cache_node)
        checkpoints = () if request.snapshot_slot is None else (request.snapshot_slot,)
        self.quarantine.add(QuarantinedMemory(
            key, request.request_id, tuple(p for p in request.page_ids if not tree.owns_page(p)),
            (request.state_slot,), checkpoints,
        ))
        request.page_ids, request.state_slot = [], None
        request.snapshot_slot, request.snapshot_position = None, 0
        request.cache_node = request.checkpoint_node = None

    def reclaim(self, key: str) -> QuarantinedMemory | None:
        """The write quarantined under ``key`` can no longer land: its memory goes back to the pools."""
        return self.quarantine.reclaim(key)

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
        self.num_preemptions += 1
        request.move_to(RequestStatus.WAITING)
        self.waiting.appendleft(request)

    # ---- paging -------------------------------------------------------------------------------------
    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the request's pages cover ``num_tokens`` tokens, evicting cached pages if needed. Several
        pages at once (a prefill chunk, a prefill pod's destination) come in runs of consecutive ids,
        continuing the request's last page where possible: a hand-over of pages in runs costs Mooncake one
        descriptor per run and layer instead of one per page and layer."""
        missing = self._pages_for(num_tokens) - len(request.page_ids)
        if missing <= 0:
            return True
        if not self.pages.can_allocate(missing):
            self.cache.evict_pages(missing - self.pages.num_free)
            if not self.pages.can_allocate(missing):
                return False
        if missing == 1:
            request.page_ids.extend(self.pages.allocate(1))
        else:
            last = request.page_ids[-1] if request.page_ids else None
            request.page_ids.extend(self.pages.allocate_runs(missing, after=last))
        return True

    def _grow_or_preempt(self, request: Request, num_tokens: int, scheduled: set[int]) -> bool:
        """Grow, preempting younger unscheduled running requests if needed. False if ``request`` itself
        had to be preempted (nothing younger was left to take from)."""
        while not self._grow(request, num_tokens):
            # Requests on a prefill pod are not in ``running``: their pages cannot be given back.
            victims = [r for r in self.running if id(r) not in scheduled and r is not request]
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
            if request not in self.running:  # preempted meanwhile
                continue
            remaining = request.num_uncomputed_tokens
            num_new = 1 if remaining == 1 else min(remaining, cfg.prefill_chunk_size, budget)
            if not self._grow_or_preempt(request, request.num_computed_tokens + num_new, scheduled):
                continue
            batch.append(ScheduledSeq(request, num_new))
            scheduled.add(id(request))
            budget -= num_new

        # Then new (or preempted) requests, first come first served, while resources last.
        while (self.waiting and budget > 0 and len(self.running) + len(self.remote) < cfg.max_num_seqs
               and self.slots.can_allocate(1)):
            request = self.waiting[0]
            admission = self.cache.match(request)
            remote = (
                cfg.remote_prefill_threshold > 0
                and not request.prefill_locally
                and not request.hold_memory  # computed here for another pod: never passed on
                and request.num_uncomputed_tokens >= cfg.remote_prefill_threshold
            )
            if remote:  # the pod sends only the pages this cache lacks, also past its deepest checkpoint
                self.cache.use_kv_match(request, admission)
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
            if remote:  # no compute here; the pod also sends the final state, so no checkpoint copy
                if cfg.handover_resume_checkpoint:
                    self.cache.reserve_resume_checkpoint(request)
                request.move_to(RequestStatus.REMOTE_PREFILL)
                self.remote.append(request)
                self.remote_prefills.append(request)
                continue
            request.move_to(RequestStatus.RUNNING)
            self.running.append(request)
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
        runnable = self.running
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

"""A simulated worker: the engine's own prefix cache and allocators, driven as the engine drives them, with time
taken from the calibrated model.

A worker is one decode pod with the prefill capacity that serves it (a prefill GPU of its own: a 1:1 PD pair).
Its memory is the engine's: ``HybridPrefixCache`` over a real ``RadixCache``, page and checkpoint-slot ``IdPool``s,
real ``Request`` objects moving through their lifecycle, so matching, page and checkpoint publishing, supersession
and eviction (and the events they emit) are the engine's code. The calls follow the scheduler's order
(``services/engine/scheduler.py``): admission first come first served while a running slot and pages are free
(``match``; pages for the prompt and the answer, evicting cached pages as ``_grow`` does; ``confirm``). A prompt
whose uncached part is at least the remote threshold is prefilled by the prefill pod: the decode pod keeps its KV
match (``use_kv_match``), reserves the resume-boundary checkpoint the pod hands over and publishes it when the
prefill completes (``publish_snapshot``). A shorter one is prefilled here in chunks with the engine's checkpoint
plan. One decode snapshot lands at the last page boundary the answer crosses; then ``release``. Simplifications
(stated in the report): a request's pages for its whole answer are taken at admission, so nothing is preempted; the
decode snapshot slot is taken when the answer ends, not at its first full page.

The hit a request is credited with (``cached``) is its checkpoint match at admission: what the prefill starts from.
For a remote prefill the engine also counts the KV pages past the checkpoint (not sent again), which save transfer,
not compute.

Time: prefills run one at a time, first come first served, on the pair's prefill GPU; decoding requests form one
continuous batch whose step time follows the batch (``TimeModel.decode_step_s``), advanced as a fluid: all decoding
requests progress at one token per step, and the step changes whenever a request joins or leaves.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from services.cluster.schema import EventBatch, encode_events
from services.engine.allocator import IdPool
from services.engine.prefix_cache import HybridPrefixCache
from services.engine.request import Request, RequestStatus

from .timing import TimeModel
from .trace import Conversation

_EPS = 1e-6  # tokens: completions within this of the virtual clock are due


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's engine settings, in simulated tokens."""

    page_size: int
    num_pages: int
    num_checkpoint_slots: int
    max_num_seqs: int
    checkpoint_interval: int
    prefill_chunk_size: int
    remote_prefill_threshold: int
    handover_resume_checkpoint: bool
    token_scale: int  # real tokens per simulated token (for the time model)


@dataclass(eq=False)
class SimRequest:
    request: Request  # the engine's request: prompt, page ids, cache bookkeeping
    conversation: Conversation
    turn: int
    answer: list[int]
    sent_at: float  # when the client sent it (the first attempt, if it was refused)
    reusable: int  # tokens of the prompt computed by an earlier finished request (an upper bound on hits)
    chosen_hit: int = 0  # the usable hit the router saw on the worker it chose
    available_hit: int = 0  # the best usable hit the router saw on any worker
    previous_worker: int = -1  # the worker that served the conversation's previous turn (-1: first turn)
    previous_hit: int = 0  # the usable hit the router saw there when it placed this turn
    worker: int = -1
    remote: bool = False
    cached: int = 0  # tokens the worker's cache served at admission
    prefill_start: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return self.request.num_prompt_tokens


class SimWorker:
    def __init__(self, index: int, config: WorkerConfig, time_model: TimeModel, window: tuple[float, float]) -> None:
        self.index = index
        self.name = f"w{index:05d}"  # sorts like the index: the placer orders candidates by name
        self.address = f"sim-worker-{index}:50051"
        self.config = config
        self.time_model = time_model
        self.window = window
        self.pages = IdPool(config.num_pages, "pages")
        self.checkpoint_slots = IdPool(config.num_checkpoint_slots, "checkpoint slots")
        self.slots = IdPool(config.max_num_seqs, "state slots")
        self.cache = HybridPrefixCache(config.page_size, self.pages, self.checkpoint_slots, config.checkpoint_interval,
                                       enabled=True, record_events=True)
        self.waiting: deque[SimRequest] = deque()
        self.prefill_queue: deque[SimRequest] = deque()
        self.prefilling: SimRequest | None = None
        self.prefill_end = math.inf
        self.decoding: list[tuple[float, int, SimRequest]] = []  # (virtual clock at its last token, tiebreak, request)
        self._decode_seq = 0
        self.v = 0.0  # decode virtual clock: steps run since time 0 (each decoding request gains a token a step)
        self.v_time = 0.0
        self.step_s = math.inf
        self.context_sum = 0.0  # real tokens of context over the decoding requests (for the step time)
        self.active = 0  # requests placed here and not finished (what the router counts in flight)
        self.queued_tokens = 0  # prompt tokens waiting or admitted and not yet prefilled (the engine's load report)
        self.event_seq = 0  # event batches published
        self.version = 0  # bumped when next_time() changes, to drop stale wake-ups
        self.scheduled = math.inf
        # accounting over the measurement window
        self._last = 0.0
        self._was_busy = self._was_decoding = self._was_prefilling = False
        self.busy_s = self.decoding_s = self.prefilling_s = 0.0
        self.requests_finished = 0

    # ---- inputs -------------------------------------------------------------------------------------
    def submit(self, sim: SimRequest, now: float) -> None:
        need = self._pages_for(sim.prompt_len + len(sim.answer))
        if need > self.config.num_pages:
            raise ValueError(f"a request of {sim.prompt_len + len(sim.answer)} tokens needs {need} pages; a worker "
                             f"has {self.config.num_pages}: raise the cache size")
        self._account(now)
        sim.worker = self.index
        self.waiting.append(sim)
        self.active += 1
        self.queued_tokens += sim.prompt_len
        self._admit(now)
        self._refresh()

    def advance(self, now: float) -> list[SimRequest]:
        """Complete what is due at ``now``; returns the requests that finished."""
        self._account(now)
        finished = []
        if self.prefill_end <= now:
            finished += self._finish_prefill(now)
        self._advance_clock(now)
        while self.decoding and self.decoding[0][0] <= self.v + _EPS:
            _, _, sim = heapq.heappop(self.decoding)
            self.context_sum -= self._context(sim)
            finished.append(self._finish(sim, now))
        self._restep()
        if finished:
            self._admit(now)
        self._refresh()
        return finished

    def next_time(self) -> float:
        t = self.prefill_end
        if self.decoding:
            t = min(t, self.v_time + max(0.0, self.decoding[0][0] - self.v) * self.step_s)
        return t

    def drain_events(self) -> EventBatch | None:
        """The cache events since the last call, as the pod publishes them: one numbered batch with the digest."""
        events = self.cache.tree.events
        if not events:
            return None
        self.event_seq += 1
        batch = EventBatch(self.event_seq, encode_events(events), self.cache.tree.digest)
        events.clear()
        return batch

    def close(self, now: float) -> None:
        self._account(now)

    # ---- the engine's calls -------------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        cfg, cache = self.config, self.cache
        while self.waiting and self.slots.can_allocate(1):
            sim = self.waiting[0]
            request = sim.request
            admission = cache.match(request)
            cached = request.num_cached_tokens  # from its deepest checkpoint: where the prefill starts
            remote = cfg.remote_prefill_threshold > 0 and request.num_uncomputed_tokens >= cfg.remote_prefill_threshold
            if remote:
                cache.use_kv_match(request, admission)
            missing = self._pages_for(request.num_prompt_tokens + len(sim.answer)) - len(request.page_ids)
            if not self.pages.can_allocate(missing):
                cache.evict_pages(missing - self.pages.num_free)
                if not self.pages.can_allocate(missing):
                    cache.cancel(request)
                    break
            request.page_ids.extend(self.pages.allocate(missing))
            self.waiting.popleft()
            cache.confirm(request, admission)
            request.state_slot = self.slots.allocate_one()
            if remote:
                if cfg.handover_resume_checkpoint:
                    cache.reserve_resume_checkpoint(request)
                request.move_to(RequestStatus.REMOTE_PREFILL)
            else:
                request.move_to(RequestStatus.RUNNING)
            sim.remote = remote
            sim.cached = cached
            self.queued_tokens -= cached
            self.prefill_queue.append(sim)
        if self.prefilling is None:
            self._start_prefill(now)

    def _start_prefill(self, now: float) -> None:
        if not self.prefill_queue:
            return
        sim = self.prefilling = self.prefill_queue.popleft()
        sim.prefill_start = now
        scale = self.config.token_scale
        self.prefill_end = now + self.time_model.prefill_s(sim.cached * scale, sim.prompt_len * scale)

    def _finish_prefill(self, now: float) -> list[SimRequest]:
        sim, self.prefilling, self.prefill_end = self.prefilling, None, math.inf
        request = sim.request
        start = request.num_computed_tokens
        self.queued_tokens -= sim.prompt_len - sim.cached
        if sim.remote:  # the prefill pod wrote the pages, the final state and the resume-boundary checkpoint
            request.num_computed_tokens = request.num_tokens
            self.cache.publish_snapshot(request)
            request.move_to(RequestStatus.RUNNING)
        else:  # prefilled here, chunk by chunk, publishing the engine's planned checkpoints
            while start < request.num_tokens:
                n = min(self.config.prefill_chunk_size, request.num_tokens - start)
                samples = start + n == request.num_tokens
                snapshots = self.cache.plan_snapshots(request, n, samples)
                request.num_computed_tokens = start + n
                self.cache.commit(request, start, snapshots)
                start += n
        request.output_token_ids.append(sim.answer[0])
        sim.first_token_at = now
        self._start_prefill(now)
        if len(sim.answer) == 1:
            return [self._finish(sim, now)]
        self._advance_clock(now)
        self._decode_seq += 1
        steps = len(sim.answer) * self.config.token_scale - 1  # real decode steps: one per real token after the first
        heapq.heappush(self.decoding, (self.v + steps, self._decode_seq, sim))
        self.context_sum += self._context(sim)
        self._restep()
        return []

    def _finish(self, sim: SimRequest, now: float) -> SimRequest:
        """The answer is complete: the decode snapshot at its last full page, then the engine's release."""
        request, cache, page = sim.request, self.cache, self.config.page_size
        request.output_token_ids.extend(sim.answer[1:])
        # Decode steps end at positions prompt+1 .. prompt+answer-1; the snapshot slot holds the last page boundary.
        last_boundary = (request.num_tokens - 1) // page * page
        if last_boundary > request.num_prompt_tokens:
            request.num_computed_tokens = last_boundary - 1
            cache.commit(request, last_boundary - 1, cache.plan_snapshots(request, 1, True))
        request.num_computed_tokens = request.num_tokens - 1
        cache.release(request)
        self.slots.free([request.state_slot])
        request.state_slot = None
        request.move_to(RequestStatus.FINISHED)
        self.active -= 1
        self.requests_finished += 1
        sim.finished_at = now
        return sim

    # ---- time ---------------------------------------------------------------------------------------
    def _context(self, sim: SimRequest) -> float:
        return (sim.prompt_len + len(sim.answer) / 2) * self.config.token_scale

    def _advance_clock(self, now: float) -> None:
        if self.decoding:
            self.v += (now - self.v_time) / self.step_s
        self.v_time = now

    def _restep(self) -> None:
        batch = len(self.decoding)
        self.step_s = self.time_model.decode_step_s(batch, self.context_sum) if batch else math.inf

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.config.page_size)

    def _account(self, now: float) -> None:
        """Credit the time since the last change to what the worker was doing."""
        start, end = max(self._last, self.window[0]), min(now, self.window[1])
        if end > start:
            span = end - start
            self.busy_s += span if self._was_busy else 0.0
            self.decoding_s += span if self._was_decoding else 0.0
            self.prefilling_s += span if self._was_prefilling else 0.0
        self._last = now

    def _refresh(self) -> None:
        self._was_busy = self.active > 0
        self._was_decoding = bool(self.decoding)
        self._was_prefilling = self.prefilling is not None

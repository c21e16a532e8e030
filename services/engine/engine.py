"""The engine: requests in, token streams out. ``step()`` runs one scheduled forward pass; the services
drive it from a loop thread (``AsyncEngine``), tests and scripts call ``generate()``."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from .allocator import IdPool
from .config import EngineConfig
from .model_config import ModelConfig
from .model_runner import ModelRunner
from .prefix_cache import HybridPrefixCache
from .presets import model_config_for
from .quarantine import QuarantinedMemory
from .radix_cache import CacheDigest, CacheEvent
from .request import (
    REMOTE_WRITABLE,
    FinishReason,
    InvalidRequestError,
    OverloadedError,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from .sampler import SampledTokens
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from .tokenizer import IncrementalDetokenizer, find_stop, load_tokenizer

log = logging.getLogger(__name__)


def resolve_model_config(config: EngineConfig) -> ModelConfig:
    return model_config_for(config.model, dummy=config.load_format == "dummy")


class LoadReport(NamedTuple):
    """What a router weighs besides the cache: the queue, the free memory, and the prompt work still ahead."""

    running: int
    waiting: int
    free_pages: int
    free_slots: int
    queued_prefill_tokens: int  # tokens of prompts admitted or waiting that this engine has yet to compute


@dataclass
class Completion:
    """A finished request, as ``Engine.generate`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: FinishReason
    num_cached_tokens: int


@dataclass
class _LaunchedStep:
    """A forward pass on its way through the device: what it computes and the tokens it samples."""

    seqs: list[ScheduledSeq]
    sampled: SampledTokens | None  # rows: the seqs that sample, in order; None if none does


class Engine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None, remote_prefill: bool = False,
                 record_cache_events: bool = False):
        """``remote_prefill``: this engine is a decode pod with prefill pods to send long prompts to.
        ``record_cache_events``: keep the prefix cache's events for ``drain_cache_events`` (a pod publishing
        them to routers); off, nothing accumulates."""
        self.config = config
        self.model_config = model_config or resolve_model_config(config)
        self.runner = ModelRunner(config, self.model_config)
        self.tokenizer = load_tokenizer(config.tokenizer, config.model, self.model_config.vocab_size,
                                        self.model_config.eos_token_ids)
        capacity = self.runner.num_pages * config.page_size
        limit = config.max_model_len or capacity
        self.max_model_len = min(limit, capacity, self.model_config.max_position_embeddings)
        self.pages = IdPool(self.runner.num_pages, "kv pages")
        self.slots = IdPool(self.runner.num_working_slots, "working state slots")
        self.checkpoint_slots = IdPool(
            self.runner.num_checkpoint_slots, "checkpoint state slots", first_id=self.runner.num_working_slots
        )
        self.cache = HybridPrefixCache(
            config.page_size, self.pages, self.checkpoint_slots, config.checkpoint_interval,
            enabled=config.enable_prefix_cache, record_events=record_cache_events,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                prefill_chunk_size=config.prefill_chunk_size,
                page_size=config.page_size,
                remote_prefill_threshold=config.remote_prefill_threshold if remote_prefill else 0,
                handover_resume_checkpoint=config.handover_resume_checkpoint,
            ),
            self.pages,
            self.slots,
            self.cache,
        )
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished, memory kept until the caller releases it
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.last_step_scheduled = 0  # sequences in the last forward pass; 0 means only a command can help
        self._in_flight: _LaunchedStep | None = None  # launched ahead, its tokens not processed yet
        self.num_steps_launched_ahead = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        hold_memory: bool = False,
    ) -> str:
        """Queue a request; raises InvalidRequestError (nothing queued) if it can never be served.

        ``hold_memory``: when it finishes, keep its pages and state slot (listed in ``held``) until
        ``release_held`` is called; a prefill pod hands them over in between."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        capacity = self.config.max_num_seqs + self.config.max_waiting_requests
        running = len(self.scheduler.running) + len(self.scheduler.remote)
        if running + len(self.scheduler.waiting) >= capacity:
            raise OverloadedError(
                f"{running} requests running and {len(self.scheduler.waiting)} waiting: at "
                f"capacity (max_num_seqs + max_waiting_requests = {capacity}); retry later"
            )
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {vocab}): {bad[:8]}")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum "
                f"context of {self.max_model_len} tokens"
            )
        request = Request(request_id, token_ids, params, hold_memory=hold_memory)
        self.requests[request_id] = request
        if params.detokenize:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, token_ids)
        self.scheduler.add(request)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its memory; returns its final output (None if unknown or already
        cancelled). The stream ends now either way; the memory of a request whose prompt a prefill pod is
        writing is kept (ABORTING) until that pod is done with it."""
        if request_id in self.held:
            self.release_held(request_id)
            return None
        request = self.requests.get(request_id)
        if request is None or request.status == RequestStatus.ABORTING:
            return None
        request.finish_reason = FinishReason.ABORT
        if self.scheduler.abort(request):
            self._forget(request)
        return self._output(request, [], [])

    # ---- prefill/decode disaggregation --------------------------------------------------------------
    def pop_remote_prefills(self) -> list[Request]:
        """Requests admitted for a prefill pod since the last call (decode side)."""
        tasks, self.scheduler.remote_prefills = self.scheduler.remote_prefills, []
        return tasks

    def complete_remote_prefill(
        self, request_id: str, token: int, logprob: float | None, checkpoint_written: bool = False
    ) -> RequestOutput | None:
        """A prefill pod wrote the prompt's KV pages and final state (and the resume-boundary checkpoint
        into the request's snapshot slot, if ``checkpoint_written``) and sampled ``token``."""
        request = self.requests.get(request_id)
        if request is None or request.status not in REMOTE_WRITABLE:
            return None
        aborted = request.status == RequestStatus.ABORTING
        self.scheduler.remote_prefill_done(request, checkpoint_written)
        if aborted:
            self._forget(request)
            return None
        # Keep a seeded request's random stream where a single engine would have it: the prefill pod
        # drew the first token's noise.
        self.runner.sampler.skip_draw(request, self.model_config.vocab_size)
        return self._append_token(request, token, logprob)

    def fail_remote_prefill(
        self, request_id: str, quarantine_key: str | None = None, prefill_locally: bool = True
    ) -> None:
        """The prefill pod will not complete the request. ``quarantine_key`` None: it confirmed it writes
        nothing more (or was never asked), so the memory is freed; else it may still write it, so the memory
        is quarantined under that key until ``reclaim_quarantined(quarantine_key)``: a late write must never
        land in another request's memory. The request is prefilled again with fresh memory, by a prefill pod
        or (``prefill_locally``) here; dropped if the client already left."""
        request = self.requests.get(request_id)
        if request is None or request.status not in REMOTE_WRITABLE:
            return
        if quarantine_key is not None:
            log.error("quarantining the memory of %s: its prefill pod did not confirm it stopped (%s)", request_id,
                      quarantine_key)
        aborted = request.status == RequestStatus.ABORTING
        self.scheduler.remote_prefill_failed(request, quarantine_key, prefill_locally)
        if aborted:
            self._forget(request)

    def reclaim_quarantined(self, quarantine_key: str) -> QuarantinedMemory | None:
        """The write quarantined under this key can no longer land (its pod confirmed or restarted)."""
        memory = self.scheduler.reclaim(quarantine_key)
        if memory is not None:
            log.info("reclaimed the quarantined memory of %s (%d pages, %d slots)", memory.request_id,
                     len(memory.pages), len(memory.working_slots) + len(memory.checkpoint_slots))
        return memory

    def release_held(self, request_id: str) -> None:
        """Prefill side: the state was handed over (or the hand-over failed); free the memory."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.scheduler.release_held(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Process one forward pass's tokens and return the outputs.

        With ``overlap_schedule``, while a step runs on the device the next decode step of the same
        requests is launched first (its input tokens taken from the device), and only then does the host
        wait for this step's tokens and process them (detokenize, stop checks, streaming): the GPU never
        idles on the host. ``schedule`` itself only runs when no step is in flight, so memory freed by a
        request that finished meanwhile is never handed out while a kernel may still write it."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            seqs = self.scheduler.schedule()
            self.last_step_scheduled = len(seqs)
            if not seqs:
                return []
            launched = self._launch(seqs)
        if self.config.overlap_schedule:
            self._in_flight = self._launch_ahead(launched)
        return self._process(launched)

    def _launch(self, seqs: list[ScheduledSeq], input_ids_on_device=None) -> _LaunchedStep:
        sampled = self.runner.execute(seqs, input_ids_on_device)
        # The host's view advances now: the next step can be scheduled before this one's tokens are known.
        for seq in seqs:
            self.scheduler.commit(seq)
        return _LaunchedStep(seqs, sampled)

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Launch the next decode step of ``launched``'s requests, when the scheduler says it is wanted."""
        if launched.sampled is None:
            return None
        seqs = self.scheduler.schedule_decode_ahead(launched.seqs)
        if seqs is None:
            return None
        self.last_step_scheduled = len(seqs)
        self.num_steps_launched_ahead += 1
        return self._launch(seqs, launched.sampled.tokens)

    def _process(self, launched: _LaunchedStep) -> list[RequestOutput]:
        if launched.sampled is None:
            return []
        tokens, logprobs = launched.sampled.result()  # waits for the step
        sampling = [seq.request for seq in launched.seqs if seq.samples]
        outputs = []
        for request, token, logprob in zip(sampling, tokens, logprobs, strict=True):
            if request.is_finished:  # finished or aborted while the step ran: the token is not wanted
                continue
            outputs.append(self._append_token(request, token, logprob))
        return outputs

    def _append_token(self, request: Request, token: int, logprob: float | None) -> RequestOutput:
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.output_token_ids.append(token)
        if logprob is not None:
            request.output_logprobs.append(logprob)
        stop_ids = params.stop_token_ids + (() if params.ignore_eos else self.tokenizer.eos_token_ids)
        cut = None
        if token in stop_ids:
            request.finish_reason = FinishReason.STOP
        elif params.detokenize:  # off: the caller (a router) makes the text and watches for stop strings
            request.text += self._detokenizers[request.request_id].add(token)
            cut = find_stop(request.text, params.stop, request.num_text_sent)
            if cut is not None:
                request.text = request.text[:cut]
                request.finish_reason = FinishReason.STOP
        if request.finish_reason is None and len(request.output_token_ids) >= params.max_tokens:
            request.finish_reason = FinishReason.LENGTH
        if request.finish_reason is not None:
            if cut is None and params.detokenize:  # text cut at a stop string is final; else release the rest
                request.text += self._detokenizers[request.request_id].flush()
            self._finish(request)
        new_tokens = request.output_token_ids[request.num_tokens_sent :]
        new_logprobs = request.output_logprobs[request.num_tokens_sent :] if params.logprobs else None
        return self._output(request, new_tokens, new_logprobs)

    def _output(self, request: Request, new_tokens: list[int], new_logprobs: list[float] | None) -> RequestOutput:
        # While a stop string could still complete, hold back the text that might turn out to be its start.
        holdback = 0 if request.is_finished else max((len(s) - 1 for s in request.params.stop), default=0)
        visible = max(request.num_text_sent, len(request.text) - holdback)
        new_text = request.text[request.num_text_sent : visible]
        request.num_text_sent = visible
        request.num_tokens_sent += len(new_tokens)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            new_logprobs=new_logprobs,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            queue_time=None if request.scheduled_time is None else request.scheduled_time - request.arrival_time,
        )

    def _finish(self, request: Request) -> None:
        if request.hold_memory and request.finish_reason != FinishReason.ABORT:
            self.scheduler.hold(request)
            self.held[request.request_id] = request
        else:
            self.scheduler.finish(request)
        self._forget(request)

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        self.runner.forget(request.request_id)

    # ---- convenience --------------------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run the prompts to completion together (continuous batching) and return them in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        requests = {i: self.requests[i] for i in ids}
        while any(not r.is_finished for r in requests.values()):
            self.step()
        return [
            Completion(
                request_id=i,
                prompt_token_ids=r.prompt_token_ids,
                token_ids=r.output_token_ids,
                text=r.text,
                logprobs=r.output_logprobs if r.params.logprobs else None,
                finish_reason=r.finish_reason,
                num_cached_tokens=r.num_cached_tokens,
            )
            for i, r in requests.items()
        ]

    def resource_usage(self) -> dict[str, int]:
        return {
            "pages_used": self.pages.num_used,
            "pages_cached": self.cache.tree.num_cached_pages,
            "pages_total": self.pages.capacity,
            "slots_used": self.slots.num_used,
            "slots_total": self.slots.capacity,
            "checkpoints_used": self.checkpoint_slots.num_used,
            "checkpoints_cached": self.cache.tree.num_cached_states,
            "checkpoints_total": self.checkpoint_slots.capacity,
            "running": len(self.scheduler.running) + len(self.scheduler.remote),
            "waiting": len(self.scheduler.waiting),
            "held": len(self.held),
            "cache_page_digest": self.cache.tree.digest.page_sum,
            "cache_state_digest": self.cache.tree.digest.state_sum,
            "pages_quarantined": self.scheduler.quarantine.num_pages,
            "slots_quarantined": self.scheduler.quarantine.num_working_slots,
            "checkpoints_quarantined": self.scheduler.quarantine.num_checkpoint_slots,
        }

    def flush_cache(self) -> None:
        """Drop every cached page and checkpoint that no running request holds."""
        self.cache.flush()

    def drain_cache_events(self) -> list[CacheEvent]:
        """Stored/evicted page and checkpoint events since the last call (the router's index feed)."""
        events = list(self.cache.tree.events)
        self.cache.tree.events.clear()
        return events

    def cache_snapshot(self) -> list[CacheEvent]:
        """Events that rebuild the prefix cache from empty, as it is now (after every drained event)."""
        return self.cache.tree.snapshot()

    @property
    def cache_digest(self) -> CacheDigest:
        return self.cache.tree.digest

    def load_report(self) -> LoadReport:
        scheduler = self.scheduler
        queued = sum(r.num_uncomputed_tokens for r in scheduler.waiting)
        queued += sum(r.num_uncomputed_tokens for r in scheduler.running if r.num_uncomputed_tokens > 1)
        return LoadReport(len(scheduler.running) + len(scheduler.remote), len(scheduler.waiting), self.pages.num_free,
                          self.slots.num_free,
                          queued)

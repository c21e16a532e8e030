"""Shared test helpers: building engines, driving the model directly, checking for leaks."""

from __future__ import annotations

import torch

from services.engine.allocator import IdPool
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.prefix_cache import HybridPrefixCache
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig


def cpu_engine(model: str, load_format: str = "auto", record_cache_events: bool = False, **overrides) -> Engine:
    settings = dict(
        model=model, load_format=load_format, device="cpu", dtype="float32", page_size=4, num_pages=512,
        max_num_seqs=16, prefill_chunk_size=64, max_num_batched_tokens=256,
    )
    settings.update(overrides)
    return Engine(EngineConfig(**settings), record_cache_events=record_cache_events)


def assert_no_leaks(engine: Engine) -> None:
    """No request is left behind; every page and slot is either free or held by the prefix cache (which is
    consistent and unlocked), and flushing the cache returns everything to the pools."""
    usage = engine.resource_usage()
    assert usage["running"] == 0 and usage["waiting"] == 0, usage
    assert not engine.requests
    assert usage["slots_used"] == 0, usage
    assert usage["pages_used"] == usage["pages_cached"], usage
    assert usage["checkpoints_used"] == usage["checkpoints_cached"], usage
    tree = engine.cache.tree
    tree.check_integrity()
    assert all(node.lock_ref == 0 for node in tree._nodes()), "a finished request left a lock behind"
    engine.flush_cache()
    usage = engine.resource_usage()
    assert usage["pages_used"] == 0 and usage["checkpoints_used"] == 0, usage


class DirectSequence:
    """Runs one sequence through the engine's model chunk by chunk, bypassing the scheduler, returning the
    logits of every position (the scheduler only asks for the last one)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.request = Request("direct", [], SamplingParams())
        self.request.state_slot = engine.slots.allocate_one()
        self.start = 0

    def forward(self, token_ids: list[int]) -> torch.Tensor:
        req, runner = self.request, self.engine.runner
        req.prompt_token_ids = req.prompt_token_ids + list(token_ids)
        end = req.num_computed_tokens + len(token_ids)
        missing = -(-end // runner.page_size) - len(req.page_ids)
        req.page_ids.extend(self.engine.pages.allocate(max(0, missing)))
        batch = runner.build_batch([ScheduledSeq(req, len(token_ids), start=req.num_computed_tokens)])
        batch.logits_indices = torch.arange(len(token_ids), device=runner.device)
        logits = runner.model(batch, runner.kv_cache, runner.state_cache)
        req.num_computed_tokens = end
        return logits

    def close(self) -> None:
        self.engine.pages.free(self.request.page_ids)
        self.engine.slots.free([self.request.state_slot])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def cuda_engine(model: str, load_format: str = "auto", **overrides) -> Engine:
    settings = dict(
        model=model, load_format=load_format, device="cuda", dtype="bfloat16", page_size=16, num_pages=1024,
        max_num_seqs=16, prefill_chunk_size=256, max_num_batched_tokens=1024,
    )
    settings.update(overrides)
    return Engine(EngineConfig(**settings))


def logic_scheduler(max_seqs: int, budget: int, chunk: int, num_pages: int, checkpoints: int = 3, enabled=True,
                    remote_threshold: int = 0) -> Scheduler:
    """A scheduler over plain id pools (no model): pages of 4 tokens, a checkpoint every 8 tokens."""
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, prefill_chunk_size=chunk,
                             page_size=4, remote_prefill_threshold=remote_threshold)
    pages, slots = IdPool(num_pages, "pages"), IdPool(max_seqs, "slots")
    checkpoint_slots = IdPool(checkpoints, "checkpoints", first_id=max_seqs)
    cache = HybridPrefixCache(4, pages, checkpoint_slots, checkpoint_interval=8, enabled=enabled)
    return Scheduler(config, pages, slots, cache)


class SchedulerDriver:
    """What the engine does around forward passes, minus the model: launch (commit), sample a token, finish
    (a ``hold_memory`` request is held, as Engine._finish does). With ``overlap``, as Engine.step: the next
    decode step is scheduled and committed before the tokens of the step in flight are processed, and a
    request finished meanwhile has its in-flight token dropped."""

    def __init__(self, scheduler: Scheduler, on_finish, overlap: bool) -> None:
        self.scheduler, self.on_finish, self.overlap = scheduler, on_finish, overlap
        self.in_flight: list | None = None
        self.steps_ahead = 0

    def step(self) -> list:
        launched, self.in_flight = self.in_flight, None
        if launched is None:
            launched = self.scheduler.schedule()
            for seq in launched:
                self.scheduler.commit(seq)
        if self.overlap and launched:
            ahead = self.scheduler.schedule_decode_ahead(launched)
            if ahead is not None:
                for seq in ahead:
                    assert seq.num_new_tokens == 1 and seq.samples
                    self.scheduler.commit(seq)
                self.in_flight = ahead
                self.steps_ahead += 1
        for seq in launched:
            request = seq.request
            if not seq.samples or request.is_finished:
                continue
            request.output_token_ids.append(7)
            assert request.num_computed_tokens <= request.num_tokens
            if len(request.output_token_ids) >= request.params.max_tokens:
                if request.hold_memory:
                    self.scheduler.hold(request)
                else:
                    self.scheduler.finish(request)
                self.on_finish(request)
        return launched

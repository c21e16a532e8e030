"""Shared test helpers: building engines, driving the model directly, checking for leaks."""

from __future__ import annotations

import torch

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import ScheduledSeq


def cpu_engine(model: str, load_format: str = "auto", record_cache_events: bool = False, **overrides) -> Engine:
    settings = dict(
        model=model, load_format=load_format, device="cpu", dtype="float32", page_size=4, num_pages=512,
        max_num_seqs=16, prefill_chunk_size=64, max_num_batched_tokens=256,
        tokenizer="byte",  # the test checkpoints carry no tokenizer: byte-level ids, asked for by name
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
        max_num_seqs=16, prefill_chunk_size=256, max_num_batched_tokens=1024, tokenizer="byte",
    )
    settings.update(overrides)
    return Engine(EngineConfig(**settings))

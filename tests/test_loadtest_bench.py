"""The batched-decode benchmark's bookkeeping on the tiny model (CPU): the roofline arithmetic against the model's
own parameters, and one phase of handed-over requests (every step gives every request a token, the experts
counted are possible ones, nothing is left behind)."""

from __future__ import annotations

import dataclasses

import torch

from loadtest.bench_batch_decode import (
    add_roofline,
    decode_engine_config,
    fill_caches,
    kv_fit,
    profile_phase,
    run_phase,
)
from loadtest.model_costs import decode_step_bytes, decode_step_flops, expert_bytes
from services.engine.engine import Engine


def _engine() -> Engine:
    config = decode_engine_config("tiny-qwen3.5-moe", max_batch=4, max_context=64, max_new_tokens=16, device="cpu")
    return Engine(dataclasses.replace(config, dtype="float32", load_format="dummy"), remote_prefill=True)


def test_decode_bytes_count_every_weight_once():
    engine = _engine()
    model, cfg = engine.runner.model, engine.model_config
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    num_moe = sum(name.endswith(".w13") for name, _ in params)
    every_expert = decode_step_bytes(params, cfg, torch.float32, [10], [cfg.num_experts] * num_moe)
    all_params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_rows_skipped = (cfg.vocab_size - 1) * cfg.hidden_size * 4
    assert every_expert["dense_weights"] + every_expert["experts"] == all_params - embed_rows_skipped
    one = decode_step_bytes(params, cfg, torch.float32, [10], [2] * num_moe)
    per_expert = expert_bytes(cfg, torch.float32)
    assert every_expert["experts"] - one["experts"] == (cfg.num_experts - 2) * num_moe * per_expert
    # KV and states scale with the batch and the contexts; FLOPs with both.
    two = decode_step_bytes(params, cfg, torch.float32, [10, 30], [2] * num_moe)
    assert two["gdn_state"] == 2 * one["gdn_state"] and two["kv"] == one["kv"] * (11 + 31) // 11
    assert decode_step_flops(params, cfg, [10, 30]) > 2 * decode_step_flops(params, cfg, [10])
    # An fp8 KV cache: one byte per element, everything else unchanged.
    bf16 = decode_step_bytes(params, cfg, torch.bfloat16, [10, 30], [2] * num_moe)
    fp8 = decode_step_bytes(params, cfg, torch.bfloat16, [10, 30], [2] * num_moe, kv_dtype=torch.float8_e4m3fn)
    assert fp8["kv"] * 2 == bf16["kv"] and fp8["total"] == bf16["total"] - fp8["kv"]


def test_one_phase_of_handed_over_requests():
    engine = _engine()
    fill_caches(engine, seed=0)
    assert kv_fit(engine, 8, 64, 16) is not None  # more than max_num_seqs
    run = run_phase(engine, 3, 40, warmup=1, steps=3, seed=1)  # raises if a step misses a token or memory leaks
    add_roofline(run, engine, bandwidth=1e12, gemm_flops=1e14, warmup=1, steps=3)
    cfg = engine.model_config
    assert len(run["experts_touched"]) == cfg.num_hidden_layers
    assert all(cfg.num_experts_per_tok <= n <= cfg.num_experts for n in run["experts_touched"])
    assert run["bound"] == "memory" and run["fraction_of_roofline"] > 0
    assert engine.resource_usage()["pages_used"] == 0


def test_one_phase_with_an_fp8_kv_cache():
    """fill_caches draws the fp8 pool through bf16 (torch has no normal_ in fp8): finite values, all of it."""
    config = decode_engine_config("tiny-qwen3.5-moe", max_batch=4, max_context=64, max_new_tokens=16, device="cpu",
                                  kv_cache_dtype="fp8_e4m3")
    engine = Engine(dataclasses.replace(config, dtype="float32", load_format="dummy"), remote_prefill=True)
    fill_caches(engine, seed=0)
    kv = engine.runner.kv_cache.buffer.float()
    assert kv.dtype == torch.float32 and torch.isfinite(kv).all() and 0.9 < kv.std() < 1.1
    run = run_phase(engine, 3, 40, warmup=1, steps=3, seed=1)
    add_roofline(run, engine, bandwidth=1e12, gemm_flops=1e14, warmup=1, steps=3)
    assert run["bytes_per_step"]["kv"] == 3 * (40 + 1 + 2) * 2 * engine.runner.kv_cache.buffer[:, 0, 0, 0].numel()


def test_a_profile_phase_admits_what_the_engine_was_sized_for_and_leaves_nothing():
    """The per-kernel profile of a batch (``--profile-batches``) admits requests of the new tokens the engine was
    sized for (it once asked for more and was refused), runs eager steps and aborts them all. On CPU the table
    has no device times, so it is empty; the GPU run fills it."""
    engine = _engine()
    fill_caches(engine, seed=0)
    rows = profile_phase(engine, 3, 40, max_new=16)
    assert isinstance(rows, list) and all(r["us_per_step"] > 0 for r in rows)
    assert engine.resource_usage()["pages_used"] == 0 and engine.resource_usage()["running"] == 0

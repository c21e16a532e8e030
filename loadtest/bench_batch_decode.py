"""Batched decode on one GPU: throughput and per-user speed at each batch size and context, against the roofline
measured in the same run.

    python -m loadtest.bench_batch_decode --model qwen3.5-35b-a3b --batches 1,8,32,64,128,256 \\
        --contexts 4096,32768 --out loadtest/results/batch_decode.json

A decode GPU of a PD pair receives its requests' contexts from a prefill pod: the engine here is such a decode
engine (``remote_prefill``), and each request's prompt is handed over as a prefill pod would -- its pages
reserved at admission, its KV and GDN states written, its first token given -- except that the KV and states are
random values written once for the whole pool (decode speed does not depend on them, and prefilling 256 x 4K
tokens would cost minutes of the GPU budget for nothing measured). Every phase starts B fresh requests of exactly
the stated context, times ``--steps`` consecutive ``Engine.step()`` calls after ``--warmup`` (host included, the
overlap scheduler on, as a serving loop runs them), then replays the step's CUDA graph back to back (GPU time
alone) and runs one eager step whose router choices give the experts actually touched per MoE layer.

Roofline per phase (``loadtest.model_costs``): the step's fewest bytes over the device-to-device copy bandwidth,
and its FLOPs over the bf16 GEMM rate, both measured at the start of the run; the slower bound is the roofline.
Writes JSON and a PNG (throughput and per-user speed against the roofline, the 70 tok/s per-user floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.norm import gemma_rms_norm_residual
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.model import SparseMoE
from services.engine.request import SamplingParams

from .model_costs import decode_step_bytes, decode_step_flops

log = logging.getLogger("bench_batch_decode")

PER_USER_FLOOR = 70.0  # tok/s every user of an agentic session should keep (DESIGN.md)


def decode_engine_config(model: str, max_batch: int, max_context: int, max_new_tokens: int,
                         **overrides) -> EngineConfig:
    """A dummy bf16 decode engine on the GPU for up to ``max_batch`` requests: prompts handed over as by a prefill
    pod (every prompt is 'remote'), no prefix cache (its checkpoint slots would take KV memory)."""
    return EngineConfig(
        model=model, load_format="dummy", device=overrides.pop("device", "cuda"), dtype="bfloat16",
        max_num_seqs=max_batch, max_num_batched_tokens=max(max_batch, 2048), prefill_chunk_size=2048,
        max_model_len=max_context + max_new_tokens, cuda_graph_max_batch=max_batch, enable_prefix_cache=False,
        remote_prefill_threshold=1, **overrides,
    )


def fill_caches(engine: Engine, seed: int) -> None:
    """Random KV pages and GDN states for the whole pool, as if prefill pods had written them (not zeros: they
    can run faster than real data)."""
    runner = engine.runner
    gen = torch.Generator(device=runner.device).manual_seed(seed)
    kv = runner.kv_cache.buffer
    if kv.dtype.itemsize == 1:
        # torch draws no normal numbers in fp8: draw in bf16 a slice at a time (the pool is most of the GPU's
        # memory, so a bf16 copy of it all would not fit) and round them into the cache.
        flat = kv.view(-1)
        step = 1 << 28
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step]
            piece.copy_(torch.empty(piece.shape, dtype=torch.bfloat16, device=kv.device).normal_(0.0, 1.0,
                                                                                                 generator=gen))
    else:
        kv.normal_(0.0, 1.0, generator=gen)
    runner.state_cache.conv.normal_(0.0, 1.0, generator=gen)
    runner.state_cache.ssm.normal_(0.0, 0.05, generator=gen)


def admit_handed_over(engine: Engine, batch: int, context: int, max_tokens: int, seed: int) -> list[str]:
    """``batch`` requests of ``context`` random prompt tokens, admitted and completed as remote prefills."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(torch.randint(0, vocab, (context,), generator=gen).tolist(), params)
           for _ in range(batch)]
    if engine.step():
        raise RuntimeError("admitting handed-over requests computed something")
    tasks = engine.pop_remote_prefills()
    if len(tasks) != batch:
        raise RuntimeError(f"{len(tasks)} of {batch} requests admitted: the pool is too small for this phase")
    first_tokens = torch.randint(0, vocab, (batch,), generator=gen).tolist()
    for task, token in zip(tasks, first_tokens, strict=True):
        engine.complete_remote_prefill(task.request_id, token, None)
    return ids


def timed_steps(engine: Engine, batch: int, warmup: int, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` consecutive steps after ``warmup``; every step must give every request
    a token (a step that does not is not a decode step of this batch)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        got = sum(len(o.new_token_ids) for o in outputs)
        if got != batch:
            raise RuntimeError(f"step {i} gave {got} tokens for a batch of {batch}")
        if i >= warmup:
            times.append(elapsed)
    return times


def drain(engine: Engine) -> None:
    """Process the step in flight without launching another: afterwards nothing runs on the device."""
    overlap = engine.config.overlap_schedule
    engine.config = dataclasses.replace(engine.config, overlap_schedule=False)
    try:
        engine.step()
    finally:
        engine.config = dataclasses.replace(engine.config, overlap_schedule=overlap)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def graph_replay_ms(engine: Engine, batch: int, replays: int = 20) -> float | None:
    """GPU time of the batch's decode graph replayed back to back (no host work in between); None without graphs.
    It re-runs the last step's inputs: KV rewritten in place, states advanced once more (values, not speed)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.enabled:
        return None
    graph = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def experts_touched(engine: Engine) -> list[int]:
    """Distinct routed experts per MoE layer in one eager decode step of the running batch, from the router's
    choices on the step's own activations (torch ops beside the kernels; no graph)."""
    counts: list[int] = []

    def count(module: SparseMoE, args) -> None:
        x, residual, norm = args[:3]  # (then_norm, the fourth, is not applied by these torch ops)
        h, _ = gemma_rms_norm_residual(x, residual, norm.weight, norm.eps)
        logits = F.linear(h, module.router)[:, :-1].float()
        counts.append(int(torch.topk(logits, module.top_k, dim=-1).indices.unique().numel()))

    hooks = [m.register_forward_pre_hook(count) for m in engine.runner.model.modules() if isinstance(m, SparseMoE)]
    graphs = engine.runner.graphs
    overlap = engine.config.overlap_schedule
    engine.config = dataclasses.replace(engine.config, overlap_schedule=False)
    if graphs is not None:
        graphs.enabled = False
    try:
        engine.step()
    finally:
        for hook in hooks:
            hook.remove()
        if graphs is not None:
            graphs.enabled = True
        engine.config = dataclasses.replace(engine.config, overlap_schedule=overlap)
    return counts


def run_phase(engine: Engine, batch: int, context: int, warmup: int, steps: int, seed: int) -> dict:
    """One batch size at one context: admit, time, measure GPU time and experts touched, abort everything."""
    ids = admit_handed_over(engine, batch, context, warmup + steps + 16, seed)
    try:
        times = timed_steps(engine, batch, warmup, steps)
        drain(engine)
        replay_ms = graph_replay_ms(engine, batch)
        touched = experts_touched(engine)
    finally:
        drain(engine)
        for request_id in ids:
            engine.abort_request(request_id)
    leaked = engine.resource_usage()
    if leaked["pages_used"] or leaked["slots_used"] or leaked["running"]:
        raise RuntimeError(f"memory left behind after the phase: {leaked}")
    median = statistics.median(times)
    return {
        "batch": batch, "context": context,
        "step_ms_median": median * 1e3, "step_ms_mean": statistics.fmean(times) * 1e3,
        "step_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
        "tokens_per_s": batch / median, "per_user_tokens_per_s": 1.0 / median,
        "graph_replay_ms": replay_ms, "experts_touched": touched,
    }


def profile_phase(engine: Engine, batch: int, context: int, max_new: int) -> list[dict]:
    """The per-kernel table (``profile_decode.kernel_table``) of eager decode steps of ``batch`` handed-over
    requests, which are then aborted. ``max_new``: the new tokens the engine was sized for."""
    from loadtest.profile_decode import kernel_table

    ids = admit_handed_over(engine, batch, context, max_new, seed=7)
    try:
        engine.step()
        return kernel_table(engine, 3)
    finally:
        drain(engine)
        for request_id in ids:
            engine.abort_request(request_id)


def add_roofline(run: dict, engine: Engine, bandwidth: float, gemm_flops: float, warmup: int, steps: int) -> None:
    """The phase's roofline: its mid-run contexts, the experts its eager step touched."""
    model = engine.runner.model
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    contexts = [run["context"] + warmup + steps // 2] * run["batch"]
    traffic = decode_step_bytes(params, engine.model_config, engine.runner.dtype, contexts, run["experts_touched"],
                                engine.runner.kv_dtype)
    flops = decode_step_flops(params, engine.model_config, contexts)
    memory_ms, compute_ms = traffic["total"] / bandwidth * 1e3, flops / gemm_flops * 1e3
    roofline_ms = max(memory_ms, compute_ms)
    run.update({
        "bytes_per_step": traffic, "flops_per_step": flops,
        "roofline_ms_memory": memory_ms, "roofline_ms_compute": compute_ms,
        "bound": "memory" if memory_ms >= compute_ms else "compute",
        "roofline_tokens_per_s": run["batch"] / roofline_ms * 1e3,
        "fraction_of_roofline": roofline_ms / run["step_ms_median"],
        "gpu_fraction_of_roofline": roofline_ms / run["graph_replay_ms"] if run["graph_replay_ms"] else None,
        "experts_touched_mean": statistics.fmean(run["experts_touched"]) if run["experts_touched"] else 0,
    })


def kv_fit(engine: Engine, batch: int, context: int, max_tokens: int) -> str | None:
    """Why ``batch`` requests of ``context`` tokens cannot run together on this engine, or None if they can."""
    if batch > engine.config.max_num_seqs:
        return f"batch {batch} > max_num_seqs {engine.config.max_num_seqs}"
    page = engine.config.page_size
    need = batch * -(-(context + max_tokens) // page)
    have = engine.pages.num_free
    if need > have:
        per_page = engine.runner.kv_cache.buffer[:, 0].numel() * engine.runner.kv_cache.buffer.element_size()
        return (f"KV for {batch} x {context + max_tokens} tokens needs {need * per_page / 2**30:.1f} GiB of pages, "
                f"the pool holds {have * per_page / 2**30:.1f} GiB (weights, {engine.runner.num_working_slots} GDN "
                f"state slots and graphs take the rest)")
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "tokens_per_s" in r]
    labels = [f"B{r['batch']}\n{r['context'] // 1024}K" for r in runs]
    xs = range(len(runs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 1.4 * len(runs)), 4.5))
    left.bar([x - 0.2 for x in xs], [r["tokens_per_s"] for r in runs], 0.4, label="measured")
    left.bar([x + 0.2 for x in xs], [r["roofline_tokens_per_s"] for r in runs], 0.4, label="roofline")
    for x, r in zip(xs, runs, strict=True):
        left.annotate(f"{r['fraction_of_roofline']:.2f}", (x - 0.2, r["tokens_per_s"]), ha="center", va="bottom",
                      fontsize=8)
    left.set(ylabel="tokens/s (all users)", title="throughput (fraction of roofline on the bars)")
    left.set_xticks(list(xs), labels, fontsize=8)
    left.legend(fontsize=8)
    right.bar([x - 0.2 for x in xs], [r["per_user_tokens_per_s"] for r in runs], 0.4, label="measured")
    right.bar([x + 0.2 for x in xs], [r["roofline_tokens_per_s"] / r["batch"] for r in runs], 0.4, label="roofline")
    right.axhline(PER_USER_FLOOR, color="k", linestyle="--", label=f"{PER_USER_FLOOR:.0f} tok/s floor")
    right.set(ylabel="tokens/s per user", yscale="log", title="per-user decode speed")
    right.set_xticks(list(xs), labels, fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"{results['model']} on {results['gpu']}: batched decode ({results['backend']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from kernels.bench_util import measure_copy_bandwidth, measure_gemm_flops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--profile-batches", default="", help="batch sizes (first context) to profile per kernel")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8_e4m3")
    parser.add_argument("--decode-attention", default="auto",
                        help="auto (flashinfer) or triton (the fused Triton attention block on decode steps)")
    parser.add_argument("--out", default="batch_decode.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    batches = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    profile_batches = {int(b) for b in args.profile_batches.split(",") if b}
    device = torch.device("cuda")
    bandwidth, gemm_flops = measure_copy_bandwidth(device), measure_gemm_flops(device)
    log.info("copy %.0f GB/s (read + write), bf16 GEMM %.0f TFLOP/s", bandwidth / 1e9, gemm_flops / 1e12)
    max_new = args.warmup + args.steps + 16
    config = decode_engine_config(args.model, max(batches), max(contexts), max_new,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  kv_cache_dtype=args.kv_cache_dtype, decode_attention=args.decode_attention)
    started = time.monotonic()
    engine = Engine(config, remote_prefill=True)
    log.info("engine ready in %.0fs", time.monotonic() - started)
    fill_caches(engine, seed=0)
    runner = engine.runner
    results = {
        "benchmark": "batched decode", "model": args.model,
        "backend": f"{runner.ops.name}, CUDA graphs up to {max(runner.graphs.sizes) if runner.graphs else 0}, "
                   f"overlap {'on' if config.overlap_schedule else 'off'}, KV {config.kv_cache_dtype}, "
                   f"decode attention {config.decode_attention}",
        "kv_cache_dtype": config.kv_cache_dtype,
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9, "gemm_bf16_TFLOPs": gemm_flops / 1e12,
        "engine": {"kv_pages": runner.num_pages, "page_size": config.page_size,
                   "working_slots": runner.num_working_slots,
                   "gpu_memory_used_GiB": torch.cuda.memory_allocated(device) / 2**30},
        "command": "python -m loadtest.bench_batch_decode " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "runs": [], "profiles": [],
    }
    for ci, context in enumerate(contexts):
        for batch in batches:
            reason = kv_fit(engine, batch, context, max_new)
            if reason:
                log.info("batch %d at %d: does not fit (%s)", batch, context, reason)
                results["runs"].append({"batch": batch, "context": context, "fits": False, "reason": reason})
                continue
            run = run_phase(engine, batch, context, args.warmup, args.steps, seed=1000 * ci + batch)
            add_roofline(run, engine, bandwidth, gemm_flops, args.warmup, args.steps)
            results["runs"].append(run)
            log.info("batch %d at %d: %.2f ms/step (GPU %.2f), %.0f tok/s, %.1f per user, %.2f of roofline",
                     batch, context, run["step_ms_median"], run["graph_replay_ms"] or 0, run["tokens_per_s"],
                     run["per_user_tokens_per_s"], run["fraction_of_roofline"])
            if ci == 0 and batch in profile_batches:
                results["profiles"].append({"batch": batch, "context": context,
                                            "kernels": profile_phase(engine, batch, context, max_new)[:40]})
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{'batch':>5} {'ctx':>6} {'tok/s':>8} {'user':>6} {'roof':>8} {'frac':>5} {'gpu':>5} {'step':>7} "
          f"{'replay':>7} {'exp':>5} bound")
    for r in results["runs"]:
        if "tokens_per_s" not in r:
            print(f"{r['batch']:>5} {r['context']:>6} does not fit: {r['reason']}")
            continue
        print(f"{r['batch']:>5} {r['context']:>6} {r['tokens_per_s']:>8.0f} {r['per_user_tokens_per_s']:>6.1f} "
              f"{r['roofline_tokens_per_s']:>8.0f} {r['fraction_of_roofline']:>5.2f} "
              f"{r['gpu_fraction_of_roofline'] or 0:>5.2f} {r['step_ms_median']:>7.2f} "
              f"{r['graph_replay_ms'] or 0:>7.2f} "
              f"{r['experts_touched_mean']:>5.0f} {r['bound']}")
    for p in results["profiles"]:
        print(f"\nbatch {p['batch']} eager kernels (us per step):")
        for k in p["kernels"][:15]:
            print(f"  {k['us_per_step']:9.1f} x{k['calls_per_step']:5.1f} {k['name'][:90]}")


if __name__ == "__main__":
    main()

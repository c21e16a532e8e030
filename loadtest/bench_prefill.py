"""Prefill speed of single prompts on one GPU, by chunk size: tokens/s, time to first token and MFU.

    python -m loadtest.bench_prefill --model qwen3.5-35b-a3b --lengths 8192,32768,50000,131072 \\
        --chunk-sizes 2048,4096,8192,16384 --out loadtest/results/prefill.json

For each chunk size, each prompt length runs twice with fresh random tokens: the first run compiles what the
new shapes need (Triton specialisations, flashinfer plans) and is not reported; the second is timed from
``add_request`` to the step that returns the first token, chunked as the engine chunks it (``prefill_chunk_size``
= the step's token budget). MFU is the model's FLOPs for the prompt (``loadtest.model_costs.prefill_flops``:
projections with k experts + the shared one per token, causal attention, the delta rule's recurrence) over the
time, divided by the bf16 GEMM rate measured at the start of the run. Peak memory per chunk size is recorded
(above the weights and caches: activations grow with the chunk). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.request import SamplingParams

from .model_costs import prefill_flops

log = logging.getLogger("bench_prefill")


def prefill_once(engine: Engine, length: int, seed: int) -> float:
    """Seconds from adding a prompt of ``length`` random tokens to its first token (one output token)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, engine.model_config.vocab_size, (length,), generator=gen).tolist()
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while True:
        outputs = engine.step()
        if any(o.new_token_ids for o in outputs):
            ttft = time.perf_counter() - start
            break
    while engine.has_unfinished():
        engine.step()
    return ttft


# Substrings of kernel names, first match wins: where a prefill chunk's GPU time goes.
KERNEL_GROUPS = (("gdn", ("gdn", "chunk_", "delta", "solve", "kkt")), ("conv1d", ("conv",)),
                 ("moe", ("moe", "expert", "align", "topk", "router")),
                 ("attention", ("prefill", "flashinfer", "attention", "fmha")),
                 ("gemm (cuBLAS/CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas")),
                 ("norms / rope", ("norm", "rope")))


def profile_prefill(engine: Engine, length: int, seed: int) -> dict:
    """GPU time per kernel over one warm prefill of ``length`` tokens, largest first, and summed by group."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ttft = prefill_once(engine, length, seed)
        torch.cuda.synchronize()
    engine.flush_cache()
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        # Device kernels and copies only: a host op (aten::mm, cuLaunchKernelEx) is also given its kernels' time.
        if device_us > 0 and not event.key.startswith(("aten::", "cuLaunch", "cuda")):
            kernels.append({"name": event.key[:160], "ms": device_us / 1e3, "calls": event.count})
    kernels.sort(key=lambda k: -k["ms"])
    gaps = _gpu_idle_gaps(prof)
    host = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()
                   if e.self_cpu_time_total > 0), key=lambda t: -t[1])[:20]
    groups: dict[str, float] = {}
    for k in kernels:
        name = k["name"].lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(key in name for key in keys)), "other")
        groups[group] = groups.get(group, 0.0) + k["ms"]
    # gpu_ms below the TTFT is time the GPU waited for the host (planning, synchronisations between chunks).
    return {"length": length, "ttft_s_profiled": ttft, "gpu_ms": sum(k["ms"] for k in kernels),
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "idle": gaps, "kernels": kernels[:60],
            "host_ops_self_ms": [{"name": n[:100], "ms": ms, "calls": c} for n, ms, c in host]}


def _gpu_idle_gaps(prof, top: int = 15) -> dict:
    """Where the GPU ran nothing: from the first host op to the first kernel, and the gaps between kernels (the
    longest ``top`` with the kernels on either side), in ms."""
    from torch.autograd import DeviceType

    events = prof.events()
    device = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start),
                    key=lambda t: t[0])
    if not device:
        return {}
    host_start = min(e.time_range.start for e in events if e.device_type == DeviceType.CPU)
    gaps, busy_until, before = [], device[0][1], device[0][2]
    for start, end, name in device[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, before, name))
        if end > busy_until:
            busy_until, before = end, name
    gaps.sort(key=lambda g: -g[0])
    return {"before_first_kernel_ms": (device[0][0] - host_start) / 1e3,
            "between_kernels_ms": sum(g[0] for g in gaps) / 1e3,
            "gaps_over_0.1ms": sum(1 for g in gaps if g[0] > 100),
            "longest": [{"ms": g / 1e3, "after": a[:80], "before": b[:80]} for g, a, b in gaps[:top]]}


def host_profile_prefill(engine: Engine, length: int, seed: int, top: int = 30) -> list[dict]:
    """Python functions by cumulative host time over one warm prefill of ``length`` tokens (cProfile: what the
    host does while the GPU waits for its first kernel; its own overhead inflates Python-heavy functions)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    prefill_once(engine, length, seed)
    profiler.disable()
    engine.flush_cache()
    stats = pstats.Stats(profiler)
    rows = [{"function": f"{func[0].rsplit('/', 2)[-1]}:{func[1]} {func[2]}", "cumulative_ms": ct * 1e3,
             "own_ms": tt * 1e3, "calls": nc} for func, (_, nc, tt, ct, _) in stats.stats.items()]
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    lengths = sorted({r["length"] for r in results["runs"]})
    for chunk in sorted({r["chunk_size"] for r in results["runs"]}):
        rows = sorted((r for r in results["runs"] if r["chunk_size"] == chunk), key=lambda r: r["length"])
        left.plot([r["length"] for r in rows], [r["mfu"] for r in rows], marker="o", label=f"chunk {chunk}")
        right.plot([r["length"] for r in rows], [r["ttft_s"] for r in rows], marker="o", label=f"chunk {chunk}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(lengths, [f"{n // 1000}K" for n in lengths])
        ax.legend(fontsize=8)
        ax.set_xlabel("prompt tokens")
    left.set(ylabel=f"MFU (of {results['gemm_bf16_TFLOPs']:.0f} TFLOP/s measured)", title="prefill MFU")
    right.set(ylabel="time to first token (s)", yscale="log", title="TTFT, one prompt, warm")
    fig.suptitle(f"{results['model']} on {results['gpu']}: single-prompt prefill", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from kernels.bench_util import measure_gemm_flops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--lengths", default="8192,32768,50000,131072")
    parser.add_argument("--chunk-sizes", default="2048,4096,8192,16384")
    parser.add_argument("--profile-length", type=int, default=0,
                        help="then profile one prompt of this length at the largest chunk size (0: none)")
    parser.add_argument("--host-profile", action="store_true",
                        help="also cProfile the host over one warm prefill of --profile-length (or the longest) tokens")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8_e4m3")
    parser.add_argument("--out", default="prefill.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lengths = [int(n) for n in args.lengths.split(",")]
    chunks = [int(c) for c in args.chunk_sizes.split(",")]

    device = torch.device("cuda")
    gemm_flops = measure_gemm_flops(device)
    log.info("bf16 GEMM %.0f TFLOP/s", gemm_flops / 1e12)
    config = EngineConfig(model=args.model, load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=4,
                          prefill_chunk_size=max(chunks), max_num_batched_tokens=max(chunks),
                          max_model_len=max(lengths + [args.profile_length]) + 16,
                          kv_cache_dtype=args.kv_cache_dtype,
                          cuda_graph_max_batch=0)  # prefill is never graphed: no capture time
    engine = Engine(config)
    params = [(name, tuple(p.shape)) for name, p in engine.runner.model.named_parameters()]
    results = {"benchmark": "single-prompt prefill", "model": args.model, "gpu": torch.cuda.get_device_name(device),
               "torch": torch.__version__, "gemm_bf16_TFLOPs": gemm_flops / 1e12, "backend": engine.runner.ops.name,
               "prefix_cache": config.enable_prefix_cache, "kv_cache_dtype": args.kv_cache_dtype, "runs": []}
    out = Path(args.out)
    for chunk in chunks:
        engine.scheduler.config = dataclasses.replace(engine.scheduler.config, prefill_chunk_size=chunk,
                                                      max_num_batched_tokens=chunk)
        static = torch.cuda.memory_allocated(device)  # weights, KV pool, state slots, graphs
        torch.cuda.reset_peak_memory_stats(device)
        for i, length in enumerate(lengths):
            prefill_once(engine, length, seed=2 * i)  # compiles and plans the new shapes
            engine.flush_cache()
            ttft = prefill_once(engine, length, seed=2 * i + 1)
            engine.flush_cache()
            flops = prefill_flops(params, engine.model_config, length)
            run = {"chunk_size": chunk, "length": length, "ttft_s": ttft, "tokens_per_s": length / ttft,
                   "flops": flops, "tflops": flops / ttft / 1e12, "mfu": flops / ttft / gemm_flops}
            results["runs"].append(run)
            log.info("chunk %d, %d tokens: %.3f s, %.0f tok/s, MFU %.2f", chunk, length, ttft, run["tokens_per_s"],
                     run["mfu"])
            out.write_text(json.dumps(results, indent=2))  # after every run: a long sweep cut short keeps its part
        peak = (torch.cuda.max_memory_allocated(device) - static) / 2**30
        for run in results["runs"]:
            if run["chunk_size"] == chunk:
                run["activation_peak_GiB"] = peak
    if args.profile_length:
        prefill_once(engine, args.profile_length, seed=98)
        engine.flush_cache()
        results["profile"] = {"chunk_size": chunks[-1], **profile_prefill(engine, args.profile_length, seed=99)}
        prof = results["profile"]
        log.info("profile of %d tokens (chunk %d): %.0f ms of GPU time: %s", args.profile_length, chunks[-1],
                 prof["gpu_ms"], ", ".join(f"{g} {ms:.0f}" for g, ms in prof["groups_ms"].items()))
        for k in prof["kernels"][:25]:
            log.info("  %8.1f ms %5d x  %s", k["ms"], k["calls"], k["name"][:110])
        idle = prof["idle"]
        if idle:
            log.info("GPU idle: %.1f ms before the first kernel, %.1f ms between kernels (%d gaps over 0.1 ms)",
                     idle["before_first_kernel_ms"], idle["between_kernels_ms"], idle["gaps_over_0.1ms"])
        for g in idle.get("longest", []):
            log.info("  %7.2f ms after %s, before %s", g["ms"], g["after"][:60], g["before"][:60])
        for h in prof["host_ops_self_ms"]:
            log.info("  host %8.1f ms %6d x  %s", h["ms"], h["calls"], h["name"][:90])
    if args.host_profile:
        prefill_once(engine, args.profile_length or max(lengths), seed=96)
        engine.flush_cache()
        results["host_profile"] = host_profile_prefill(engine, args.profile_length or max(lengths), seed=97)
        for r in results["host_profile"]:
            log.info("  host %8.1f ms cumulative %8.1f own %7d x  %s", r["cumulative_ms"], r["own_ms"], r["calls"],
                     r["function"][:100])
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{'chunk':>6} {'tokens':>7} {'ttft s':>7} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>5} {'act GiB':>8}")
    for r in results["runs"]:
        print(f"{r['chunk_size']:>6} {r['length']:>7} {r['ttft_s']:>7.3f} {r['tokens_per_s']:>8.0f} "
              f"{r['tflops']:>8.0f} {r['mfu']:>5.2f} {r['activation_peak_GiB']:>8.2f}")


if __name__ == "__main__":
    main()

"""Benchmark the fused Triton kernels (norms, QK-norm/RoPE/gate, MoE routing and experts) against the torch
reference sequences the model runs today, at Qwen3.5-35B-A3B and Qwen3.5-397B shapes, bf16.

    python -m kernels.bench_fused --out results.json            # writes results.json and results.png

For every (model, kernel, tokens) case: run both, check the fused result against the reference (bf16
tolerances; a failure is recorded and makes the exit status 1, the timing still runs), then time both.

Timing: ``triton.testing.do_bench`` median with the L2 cache flushed before every call ("events"), for every
case; for T <= 64 also ``do_bench_cudagraph`` median ("graph": launch overhead removed, as in the CUDA-graph
decode path, but with a warm L2). ``speedup`` uses graph times where both sides have one, events otherwise.
The MoE reference (``kernels.moe.fused_experts``) syncs with the host, so it only has event timings, and the
MoE's bandwidth and FLOP/s figures always use the L2-flushed event timing (a warm L2 would hold much of the
selected experts' weights at decode sizes and overstate bandwidth).

MoE figures: ``weight_GBps`` = bytes of the distinct selected experts' w13 + w2 / fused time, next to the
device-to-device copy bandwidth measured in the same run (bytes read + written / time); ``tflops`` =
``6 * T * top_k * hidden * moe_intermediate`` / fused time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import moe as moe_ref
from kernels import norm as norm_ref
from kernels.bench_util import measure_copy_bandwidth
from kernels.rope import apply_partial_rope, rope_cos_sin_cache
from kernels.triton import moe as moe_tk
from kernels.triton import norm as norm_tk
from kernels.triton.qk_norm_rope import qk_norm_rope

log = logging.getLogger("bench_fused")
EPS = 1e-6
DEVICE = "cuda"
GRAPH_MAX_TOKENS = 64


@dataclass(frozen=True)
class Shapes:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    gdn_v_heads: int
    gdn_v_dim: int
    experts: int
    top_k: int
    moe_inter: int


MODELS = {
    "35b-a3b": Shapes("Qwen3.5-35B-A3B", 2048, 16, 2, 256, 64, 32, 128, 256, 8, 512),
    "397b": Shapes("Qwen3.5-397B", 4096, 32, 2, 256, 64, 64, 128, 512, 10, 1024),
}


# ------------------------------------------------------------------------------------------------- timing


def time_events(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def time_graph(fn: Callable[[], object], rep_ms: int) -> float | None:
    """Median per-call time inside a CUDA graph; None if ``fn`` cannot be captured (host syncs)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception as err:  # capture fails on host syncs (.tolist(), .item()); fall back to events only
        log.debug("graph capture failed: %s", err)
        torch.cuda.synchronize()
        return None


def check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-2, atol: float = 1e-2) -> dict:
    """Closeness record; ``ok`` follows torch.testing.assert_close semantics with bf16 tolerances."""
    got32, want32 = got.float(), want.float()
    diff = (got32 - want32).abs()
    ok = bool(torch.isfinite(got32).all()) and bool((diff <= atol + rtol * want32.abs()).all())
    scale = max(float(want32.abs().max()), 1e-30)
    return {f"{name}_max_abs_err": float(diff.max()), f"{name}_rel_err": float(diff.max()) / scale, f"{name}_ok": ok}


# -------------------------------------------------------------------------------------------------- cases


def _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, s: Shapes):
    """The unfused sequence of GatedAttention.forward, including its sigmoid(gate)."""
    tokens = qkv.shape[0]
    q_size, kv_size = s.heads * s.head_dim * 2, s.kv_heads * s.head_dim
    q_gate, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q_gate = q_gate.view(tokens, s.heads, 2 * s.head_dim)
    q, gate = q_gate[..., : s.head_dim], q_gate[..., s.head_dim :]
    q = norm_ref.gemma_rms_norm(q, q_w, EPS)
    k = norm_ref.gemma_rms_norm(k.reshape(tokens, s.kv_heads, s.head_dim), k_w, EPS)
    v = v.reshape(tokens, s.kv_heads, s.head_dim)
    q = apply_partial_rope(q, positions, cos_sin)
    k = apply_partial_rope(k, positions, cos_sin)
    return q, k, v, torch.sigmoid(gate.reshape(tokens, -1))


def case_norm_residual(s: Shapes, tokens: int):
    x = torch.randn(tokens, s.hidden, device=DEVICE, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(s.hidden, device=DEVICE, dtype=torch.bfloat16) * 0.1
    ref = lambda: norm_ref.gemma_rms_norm_residual(x, res, w, EPS)  # noqa: E731
    fused = lambda: norm_tk.gemma_rms_norm_residual(x, res, w, EPS)  # noqa: E731
    (a, b), (ra, rb) = fused(), ref()
    return ref, fused, {**check("normed", a, ra), **check("residual", b, rb, rtol=0, atol=0)}, {}


def case_gated_norm(s: Shapes, tokens: int):
    x = torch.randn(tokens, s.gdn_v_heads, s.gdn_v_dim, device=DEVICE, dtype=torch.bfloat16)
    width = s.gdn_v_heads * s.gdn_v_dim
    z = torch.randn(tokens, 2 * width, device=DEVICE, dtype=torch.bfloat16)[:, :width]  # strided, as in the model
    gate = z.reshape(tokens, s.gdn_v_heads, s.gdn_v_dim)
    w = torch.randn(s.gdn_v_dim, device=DEVICE, dtype=torch.bfloat16)
    ref = lambda: norm_ref.gated_rms_norm(x, gate, w, EPS)  # noqa: E731
    fused = lambda: norm_tk.gated_rms_norm(x, gate, w, EPS)  # noqa: E731
    return ref, fused, check("out", fused(), ref()), {}


def case_qk_norm_rope(s: Shapes, tokens: int):
    width = s.heads * 2 * s.head_dim + 2 * s.kv_heads * s.head_dim
    qkv = torch.randn(tokens, width, device=DEVICE, dtype=torch.bfloat16) * 3
    q_w = torch.randn(s.head_dim, device=DEVICE, dtype=torch.bfloat16) * 0.2
    k_w = torch.randn(s.head_dim, device=DEVICE, dtype=torch.bfloat16) * 0.2
    cos_sin = rope_cos_sin_cache(s.rotary_dim, 262144, 1e7, device=DEVICE)
    positions = torch.randint(0, 262144, (tokens,), device=DEVICE)
    ref = lambda: _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, s)  # noqa: E731
    fused = lambda: qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, s.heads, s.kv_heads, s.head_dim, EPS)  # noqa: E731
    result = {}
    for name, got, want in zip(("q", "k", "v", "gate"), fused(), ref(), strict=True):
        result.update(check(name, got, want))
    extra = {}
    if tokens >= 64:
        # As the engine's prefill calls it: k and v straight into a paged cache. Bytes: qkv read; q, the gate,
        # k and v written. Each heads-per-program choice, timed alone (do_bench, L2 flushed).
        page = 64
        kv_cache = torch.empty(tokens // page + 1, 2, page, s.kv_heads, s.head_dim, device=DEVICE,
                               dtype=torch.bfloat16)
        slots = torch.arange(tokens, device=DEVICE)
        moved = qkv.numel() * 2 + tokens * (2 * s.heads + 2 * s.kv_heads) * s.head_dim * 2
        extra["bytes"] = moved
        for heads in QK_HEADS_SWEEP:
            for warps in QK_WARPS_SWEEP:
                ms = time_events(lambda heads=heads, warps=warps: qk_norm_rope(
                    qkv, q_w, k_w, cos_sin, positions, s.heads, s.kv_heads, s.head_dim, EPS,
                    heads_per_program=heads, num_warps=warps, kv_cache=kv_cache, kv_slot_ids=slots), 50)
                label = f"kv_cache_heads_{heads}_warps_{warps}"
                extra[f"{label}_ms"] = ms
                extra[f"{label}_GBps"] = moved / (ms * 1e-3) / 1e9
    return ref, fused, result, extra


# Heads per program and warps timed at prefill sizes (``qk_norm_rope``'s default from 1024 tokens: 2 heads x 1
# warp, chosen from this sweep; the committed result's keys without ``_warps_`` are the earlier default's warps,
# 4 at 4 heads or more, 2 at 1-2 heads).
QK_HEADS_SWEEP = (1, 2, 4, 8, 16)
QK_WARPS_SWEEP = (1, 2, 4, 8)


def case_route(s: Shapes, tokens: int):
    x = torch.randn(tokens, s.hidden, device=DEVICE, dtype=torch.bfloat16)
    router = torch.randn(s.experts, s.hidden, device=DEVICE, dtype=torch.bfloat16) * s.hidden**-0.5
    shared_gate = torch.randn(1, s.hidden, device=DEVICE, dtype=torch.bfloat16) * s.hidden**-0.5
    fused_w = moe_tk.concat_router_weights(router, shared_gate)

    def ref():
        w, ids = moe_ref.topk_softmax(F.linear(x, router), s.top_k, True)
        return w, ids, torch.sigmoid(F.linear(x, shared_gate))

    fused = lambda: moe_tk.route_topk(x, fused_w, None, s.top_k, True, fused_shared_gate=True)  # noqa: E731
    (w, ids, gate), (rw, _, rgate) = fused(), ref()
    # Tie/near-tie tolerant: the chosen experts must carry the reference's top-k probabilities.
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    picked, best = probs.gather(1, ids.long()), torch.topk(probs, s.top_k, dim=-1).values
    result = {**check("weights", w, rw), **check("picked_probs", picked, best), **check("shared_gate", gate, rgate)}
    return ref, fused, result, {}


def case_experts(s: Shapes, tokens: int, weights_cache: dict):
    if s.name not in weights_cache:
        weights_cache.clear()  # one model's experts at a time (the 397B stack is 13 GB)
        torch.cuda.empty_cache()
        w13 = torch.randn(s.experts, 2 * s.moe_inter, s.hidden, device=DEVICE, dtype=torch.bfloat16)
        w13.mul_(s.hidden**-0.5)
        w2 = torch.randn(s.experts, s.hidden, s.moe_inter, device=DEVICE, dtype=torch.bfloat16)
        w2.mul_(s.moe_inter**-0.5)
        weights_cache[s.name] = (w13, w2)
    w13, w2 = weights_cache[s.name]
    x = torch.randn(tokens, s.hidden, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.randn(tokens, s.experts, device=DEVICE)
    topk_w, topk_ids = moe_ref.topk_softmax(logits, s.top_k, True)
    topk_ids32 = topk_ids.to(torch.int32)
    ref = lambda: moe_ref.fused_experts(x, w13, w2, topk_w, topk_ids)  # noqa: E731
    fused = lambda: moe_tk.fused_experts(x, w13, w2, topk_w, topk_ids32)  # noqa: E731
    result = check("out", fused(), ref())

    distinct = int(torch.unique(topk_ids).numel())
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    cfg = moe_tk.default_moe_config(tokens, s.top_k, s.experts)
    extra = {
        "distinct_experts": distinct,
        "weight_bytes": distinct * per_expert,
        "flops": 6 * tokens * s.top_k * s.hidden * s.moe_inter,
        "config": asdict(cfg),
        "align_ms": time_events(lambda: moe_tk.moe_align_block_size(topk_ids32, cfg.block_m, s.experts), 50),
    }
    return ref, fused, result, extra


KERNELS = {
    "gemma_rms_norm_residual": case_norm_residual,
    "gated_rms_norm": case_gated_norm,
    "qk_norm_rope": case_qk_norm_rope,
    "route_topk": case_route,
    "fused_experts": case_experts,
}


# ------------------------------------------------------------------------------------------------- driver


def run(models: list[str], tokens_list: list[int], kernels: list[str], rep_ms: int) -> dict:
    import triton

    copy_bw = measure_copy_bandwidth(torch.device(DEVICE))
    log.info("device-to-device copy bandwidth: %.0f GB/s", copy_bw / 1e9)
    results = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "timing": "median; events = do_bench with L2 flush; graph = do_bench_cudagraph (T <= 64)",
        "cases": [],
    }
    weights_cache: dict = {}
    for model in models:
        s = MODELS[model]
        for kernel in kernels:
            for tokens in tokens_list:
                torch.manual_seed(tokens)
                if kernel == "fused_experts":
                    ref, fused, correctness, extra = case_experts(s, tokens, weights_cache)
                else:
                    ref, fused, correctness, extra = KERNELS[kernel](s, tokens)
                ok = all(v for k, v in correctness.items() if k.endswith("_ok"))
                ref_ms, fused_ms = time_events(ref, rep_ms), time_events(fused, rep_ms)
                ref_graph = fused_graph = None
                if tokens <= GRAPH_MAX_TOKENS:
                    fused_graph = time_graph(fused, rep_ms)
                    ref_graph = time_graph(ref, rep_ms) if kernel != "fused_experts" else None
                both_graph = ref_graph is not None and fused_graph is not None
                speedup = ref_graph / fused_graph if both_graph else ref_ms / fused_ms
                case = {
                    "model": s.name, "kernel": kernel, "tokens": tokens, "ok": ok,
                    "ref_ms": ref_ms, "fused_ms": fused_ms, "ref_graph_ms": ref_graph, "fused_graph_ms": fused_graph,
                    "speedup": speedup, "speedup_basis": "graph" if both_graph else "events",
                    **correctness, **extra,
                }
                if kernel == "fused_experts":
                    case["weight_GBps"] = extra["weight_bytes"] / (fused_ms * 1e-3) / 1e9
                    case["weight_bw_fraction_of_copy"] = case["weight_GBps"] * 1e9 / copy_bw
                    case["tflops"] = extra["flops"] / (fused_ms * 1e-3) / 1e12
                results["cases"].append(case)
                log.info(
                    "%-16s %-24s T=%-5d %s ref %.4f ms fused %.4f ms speedup %.1fx (%s)%s",
                    s.name, kernel, tokens, "ok  " if ok else "FAIL", ref_ms, fused_ms, speedup,
                    case["speedup_basis"],
                    f"  {case['weight_GBps']:.0f} GB/s, {case['tflops']:.1f} TFLOP/s"
                    if kernel == "fused_experts" else "",
                )
                del ref, fused
        weights_cache.clear()
        torch.cuda.empty_cache()
    return results


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the plot")
        return
    cases = results["cases"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for model in sorted({c["model"] for c in cases}):
        for kernel in KERNELS:
            rows = [c for c in cases if c["model"] == model and c["kernel"] == kernel]
            if rows:
                ax.plot([c["tokens"] for c in rows], [c["speedup"] for c in rows], marker="o",
                        label=f"{kernel} ({model})")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="speedup vs torch reference (x)",
           title="Fused kernel speedup (graph time for T<=64)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7)

    moe = [c for c in cases if c["kernel"] == "fused_experts"]
    ax = axes[1]
    for model in sorted({c["model"] for c in moe}):
        rows = [c for c in moe if c["model"] == model]
        ax.plot([c["tokens"] for c in rows], [c["weight_GBps"] for c in rows], marker="o", label=model)
    ax.axhline(results["copy_bandwidth_GBps"], color="red", ls="--", label="D2D copy (read+write)")
    ax.set(xscale="log", xlabel="tokens", ylabel="GB/s", title="MoE: selected experts' weight bytes / time")
    ax.legend(fontsize=8)

    ax = axes[2]
    for model in sorted({c["model"] for c in moe}):
        rows = [c for c in moe if c["model"] == model]
        ax.plot([c["tokens"] for c in rows], [c["tflops"] for c in rows], marker="o", label=model)
    ax.set(xscale="log", xlabel="tokens", ylabel="TFLOP/s", title="MoE: achieved TFLOP/s (bf16)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{results['device']}, torch {results['torch']}, triton {results['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_fused.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--tokens", default="1,8,64,512,4096")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {list(KERNELS)}")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("bench_fused needs a CUDA GPU")
        return 2
    models = [m for m in args.models.split(",") if m]
    kernels = [k for k in args.kernels.split(",") if k]
    for name, known in ((models, MODELS), (kernels, KERNELS)):
        unknown = set(name) - set(known)
        if unknown:
            parser.error(f"unknown {sorted(unknown)}; known: {sorted(known)}")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    results = run(models, tokens, kernels, args.rep_ms)
    args.out.write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out)
    plot(results, args.plot or args.out.with_suffix(".png"))
    failed = [c for c in results["cases"] if not c["ok"]]
    for c in failed:
        log.error("correctness FAILED: %s %s T=%d", c["model"], c["kernel"], c["tokens"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

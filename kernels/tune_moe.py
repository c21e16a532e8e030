"""Sweep the fused-MoE launch configurations on this GPU (as vLLM's and SGLang's MoE tuners do) and report the
best of each path against the defaults: the grouped-GEMM path (tile shapes, one GEMM at a time) and the
matrix-vector path (``GemvConfig``), for decode-sized batches; with ``--sweep prefill``, the grouped path for
prefill chunks (BLOCK_M 64 and 128, wider tiles, 4 and 8 warps).

    python -m kernels.tune_moe --model 35b-a3b --tokens 1,2,4 --sweep gemv,grouped --out moe_tune.json
    python -m kernels.tune_moe --model 35b-a3b --tokens 8192,50000 --sweep prefill --out moe_tune_prefill.json

Each timing replays a CUDA graph of 32 ``fused_experts`` calls with different routings (so the same
experts' weights are not served from L2 call after call), with the shared expert as expert E routed to
every token, as the engine runs it. The gate/up tile is swept with the default down tile, then the down
tile with the best gate/up tile. Writes JSON and a PNG of the best configurations per token count.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from pathlib import Path

import torch

from kernels.bench_fused import MODELS
from kernels.bench_util import graph_replay_us, grouped_bar_chart, measure_copy_bandwidth
from kernels.triton import moe as moe_tk

log = logging.getLogger("tune_moe")

_CALLS_PER_GRAPH = 32


def _routings(tokens: int, num_routed: int, top_k: int, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` routings of ``tokens`` tokens: top_k distinct routed experts plus the shared expert (id E)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        # The top-k of random scores: top_k distinct experts per token, uniform (a randperm per token is slow
        # at prefill sizes).
        ids = torch.rand(tokens, num_routed, generator=gen).topk(top_k, dim=1).indices
        ids = torch.cat([ids, torch.full((tokens, 1), num_routed)], dim=1).to(torch.int32).cuda()
        weights = torch.rand(tokens, top_k + 1, generator=gen).cuda()
        out.append((ids, weights))
    return out


def _time_config(x, w13, w2, routings, cfg: moe_tk.MoeConfig | moe_tk.GemvConfig) -> float:
    """Microseconds per fused_experts call, replayed from a CUDA graph; inf if the tile does not fit the
    GPU's shared memory."""
    from triton.runtime.errors import OutOfResources

    def calls():
        for ids, weights in routings:
            moe_tk.fused_experts(x, w13, w2, weights, ids, config=cfg)

    try:
        return graph_replay_us(calls, len(routings), replays=4, samples=5)
    except OutOfResources:  # raised by the first (compiling) run, before any capture
        return float("inf")


_GEMM_TILES = [moe_tk.GemmTile(n, k, num_warps=w, num_stages=s)
               for n, k, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (4,), (3, 5))]


# The matrix-vector path: the gate/up tile (columns, K step with 0 = the whole K, warps) crossed with the down
# kernel's (columns, warps), around the one-token defaults that kernels/bench_moe_block.py found on the H200
# (2 x whole K x 4 warps; down 1 or 2 columns on one warp).
_GEMV_CONFIGS = [moe_tk.GemvConfig(n, k, num_warps=w, down_block_n=down_n, down_num_warps=down_w)
                 for (n, k, w), (down_n, down_w) in itertools.product(
                     itertools.product((1, 2, 4), (0, 512), (4, 8)), ((1, 1), (2, 1), (4, 4)))]


def _weights_and_input(s, num_experts: int, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 expert stacks (gate/up ``[E, 2I, H]``, down ``[E, H, I]``) and a ``[tokens, H]`` input."""
    torch.manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * s.moe_inter, s.hidden, device="cuda", dtype=torch.bfloat16) * s.hidden**-0.5
    w2 = torch.randn(num_experts, s.hidden, s.moe_inter, device="cuda", dtype=torch.bfloat16) * s.moe_inter**-0.5
    return w13, w2, torch.randn(tokens, s.hidden, device="cuda", dtype=torch.bfloat16)


# Prefill chunks: hundreds to thousands of pairs per expert, so wide tiles and 8 warps come into play.
_PREFILL_TILES = [moe_tk.GemmTile(n, k, num_warps=w, num_stages=s, group_m=8)
                  for n, k, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))]
# The down GEMM's K is only I (512 at 35B-A3B) and it writes a [pairs, H] output: also 256-column tiles (fewer
# re-reads of the activations per output byte) and a K step of 32 with deeper pipelines. (Gate/up's block_n
# counts each of gate and up: 256 there would be a 128 x 512 fp32 accumulator.)
_PREFILL_DOWN_TILES = _PREFILL_TILES + [moe_tk.GemmTile(n, k, num_warps=8, num_stages=s, group_m=8)
                                        for n, k, s in ((256, 64, 3), (256, 64, 4), (256, 32, 4), (256, 32, 5),
                                                        (128, 32, 4), (128, 32, 5))]


def tune_prefill(model: str, tokens: int, seed: int, block_ms: tuple[int, ...] = (64, 128)) -> dict:
    """The grouped path at a prefill chunk of ``tokens``: each BLOCK_M, gate/up tiles with the default down tile,
    then down tiles with the best gate/up; two calls per graph (each is milliseconds)."""
    s = MODELS[model]
    num_experts = s.experts + 1
    w13, w2, x = _weights_and_input(s, num_experts, tokens, seed)
    routings = _routings(tokens, s.experts, s.top_k, 2, seed)
    # The down tiles swept are the Triton down kernel's: bf16 prefill in the engine takes torch's grouped GEMM for
    # the down projection instead (MoeConfig.down_grouped_mm; kernels/bench_moe_prefill.py compares the two).
    default = dataclasses.replace(moe_tk.default_moe_config(tokens, s.top_k + 1, num_experts), down_grouped_mm=False)
    default_us = _time_config(x, w13, w2, routings, default)
    flops = 2 * 3 * tokens * (s.top_k + 1) * s.hidden * s.moe_inter
    log.info("%s T=%d: default %s -> %.0f us (%.0f TFLOP/s)", model, tokens, default, default_us,
             flops / default_us / 1e6)
    best, best_us, sweep = default, default_us, []
    for block_m in block_ms:
        current = dataclasses.replace(default, block_m=block_m)
        current_us = _time_config(x, w13, w2, routings, current)
        for which, tiles in (("gate_up", _PREFILL_TILES), ("down", _PREFILL_DOWN_TILES)):
            for tile in tiles:
                cfg = dataclasses.replace(current, **{which: tile})
                us = _time_config(x, w13, w2, routings, cfg)
                sweep.append({"block_m": block_m, "gemm": which, "tile": dataclasses.asdict(tile), "us": us})
                log.info("  block_m %d %s %s: %.0f us", block_m, which, tile, us)
                if us < current_us:
                    current, current_us = cfg, us
        if current_us < best_us:
            best, best_us = current, current_us
    ids, weights = routings[0]
    torch.testing.assert_close(moe_tk.fused_experts(x, w13, w2, weights, ids, config=best),
                               moe_tk.fused_experts(x, w13, w2, weights, ids, config=default), rtol=2e-2, atol=2e-2)
    return {"model": model, "tokens": tokens, "flops": flops, "default": dataclasses.asdict(default),
            "default_us": default_us, "best": dataclasses.asdict(best), "best_us": best_us,
            "default_TFLOPs": flops / default_us / 1e6, "best_TFLOPs": flops / best_us / 1e6, "sweep": sweep}


def tune(model: str, tokens: int, seed: int, sweeps: set[str]) -> dict:
    s = MODELS[model]
    num_experts = s.experts + 1  # the shared expert stacked as expert E
    w13, w2, x = _weights_and_input(s, num_experts, tokens, seed)
    routings = _routings(tokens, s.experts, s.top_k, _CALLS_PER_GRAPH, seed)
    top_k = s.top_k + 1
    default = moe_tk.default_moe_config(tokens, top_k, num_experts)
    distinct = sum(int(torch.unique(ids).numel()) for ids, _ in routings) / len(routings)
    weight_bytes = distinct * (w13[0].numel() + w2[0].numel()) * w13.element_size()

    default_us = _time_config(x, w13, w2, routings, default)
    log.info("%s T=%d: grouped default %s -> %.1f us", model, tokens, default, default_us)
    sweep = []
    best_gate_up, best_us = default.gate_up, default_us
    best_down = default.down
    if "grouped" in sweeps:
        for i, tile in enumerate(_GEMM_TILES):
            us = _time_config(x, w13, w2, routings, dataclasses.replace(default, gate_up=tile))
            sweep.append({"gemm": "gate_up", "tile": dataclasses.asdict(tile), "us": us})
            log.info("  gate_up %2d/%d %s: %.1f us", i + 1, len(_GEMM_TILES), tile, us)
            if us < best_us:
                best_gate_up, best_us = tile, us
        for i, tile in enumerate(_GEMM_TILES):
            us = _time_config(x, w13, w2, routings, dataclasses.replace(default, gate_up=best_gate_up, down=tile))
            sweep.append({"gemm": "down", "tile": dataclasses.asdict(tile), "us": us})
            log.info("  down %2d/%d %s: %.1f us", i + 1, len(_GEMM_TILES), tile, us)
            if us < best_us:
                best_down, best_us = tile, us
    best = dataclasses.replace(default, gate_up=best_gate_up, down=best_down)

    gemv_default = moe_tk.default_gemv_config(s.moe_inter, tokens)
    gemv_default_us = _time_config(x, w13, w2, routings, gemv_default)
    log.info("%s T=%d: gemv default %s -> %.1f us", model, tokens, gemv_default, gemv_default_us)
    best_gemv, best_gemv_us = gemv_default, gemv_default_us
    if "gemv" in sweeps:
        for i, cfg in enumerate(_GEMV_CONFIGS):
            us = _time_config(x, w13, w2, routings, cfg)
            sweep.append({"gemm": "gemv", "tile": dataclasses.asdict(cfg), "us": us})
            log.info("  gemv %2d/%d %s: %.1f us", i + 1, len(_GEMV_CONFIGS), cfg, us)
            if us < best_gemv_us:
                best_gemv, best_gemv_us = cfg, us

    # The winners must compute what the default computes.
    ids, weights = routings[0]
    want = moe_tk.fused_experts(x, w13, w2, weights, ids, config=default)
    for cfg in (best, best_gemv):
        torch.testing.assert_close(moe_tk.fused_experts(x, w13, w2, weights, ids, config=cfg), want,
                                   rtol=2e-2, atol=2e-2)
    return {
        "model": model, "tokens": tokens, "experts_read": distinct, "weight_bytes": weight_bytes,
        "default": dataclasses.asdict(default), "default_us": default_us,
        "best": dataclasses.asdict(best), "best_us": best_us,
        "default_weight_GBps": weight_bytes / default_us / 1e3, "best_weight_GBps": weight_bytes / best_us / 1e3,
        "gemv_default": dataclasses.asdict(gemv_default), "gemv_default_us": gemv_default_us,
        "gemv_best": dataclasses.asdict(best_gemv), "gemv_best_us": best_gemv_us,
        "gemv_best_weight_GBps": weight_bytes / best_gemv_us / 1e3,
        "sweep": sweep,
    }


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    series = [(label, [r[key] for r in runs]) for key, label in (
        ("default_weight_GBps", "grouped, default"),
        ("best_weight_GBps", "grouped, best swept"),
        ("gemv_best_weight_GBps", "matrix-vector, best swept"),
    )]
    grouped_bar_chart(
        path, [f"{r['model']} T={r['tokens']}" for r in runs], series, xlabel="batch", ylabel="expert weight GB/s",
        title=f"fused MoE decode configurations on {results['gpu']}",
        hline=("copy bandwidth (read + write)", results["copy_bandwidth_GBps"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="35b-a3b", choices=sorted(MODELS))
    parser.add_argument("--tokens", default="1,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", default="gemv,grouped", help="which paths to sweep: gemv, grouped")
    parser.add_argument("--block-m", default="64,128", help="prefill sweep: the BLOCK_M values to sweep")
    parser.add_argument("--out", type=Path, default=Path("moe_tune.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "copy_bandwidth_GBps": measure_copy_bandwidth(torch.device("cuda")) / 1e9, "runs": []}
    sweeps = set(args.sweep.split(","))
    if "prefill" in sweeps:
        for tokens in (int(t) for t in args.tokens.split(",")):
            run = tune_prefill(args.model, tokens, args.seed, tuple(int(m) for m in args.block_m.split(",")))
            results["runs"].append(run)
            print(f"{args.model} T={tokens}: default {run['default_us']:.0f} us ({run['default_TFLOPs']:.0f} TFLOP/s), "
                  f"best {run['best_us']:.0f} us ({run['best_TFLOPs']:.0f} TFLOP/s): {run['best']}")
        args.out.write_text(json.dumps(results, indent=2))
        return
    for tokens in (int(t) for t in args.tokens.split(",")):
        run = tune(args.model, tokens, args.seed, sweeps)
        results["runs"].append(run)
        print(f"{args.model} T={tokens}: grouped default {run['default_us']:.1f} us "
              f"({run['default_weight_GBps']:.0f} GB/s), best {run['best_us']:.1f} us: {run['best']}; "
              f"gemv default {run['gemv_default_us']:.1f} us, best {run['gemv_best_us']:.1f} us "
              f"({run['gemv_best_weight_GBps']:.0f} GB/s): {run['gemv_best']}")
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

"""Decode-sized dense projections: the Triton matrix-vector kernel (``kernels.triton.gemv``) against
``F.linear`` (cuBLAS) on every projection shape of the model, in the same run, with a tile sweep.

    python -m kernels.bench_gemv --models 35b-a3b,397b --tokens 1,2,4 --out gemv_h100.json

Each timing replays a CUDA graph of calls that cycle through enough copies of the weight (>= 256 MB in all)
that no call finds its weight in L2, as in a decode step where every layer has its own weights. Reports
microseconds per call, weight GB/s, and the speedup over cuBLAS of the default tile (``default_tile(K)``),
with programmatic dependent launch as the engine runs it and without (``BATON_PDL=0``; with PDL a call's
weight loads overlap the previous call); the tile sweep runs at the first token count on the first model, and
the best swept tile is then timed on every case next to the default. Every result
is checked against ``F.linear`` first. Then the projections with the norm inside (``rms_norm_linear``: GDN
in_proj, attention qkv_proj) at each cap on their programs per SM (``normed`` in the JSON), and every fused
launcher of the decode step (norm / gate prologues, the in_proj's conv epilogue) at each tile of rows per
program x warps (``fused``; ``fused_best``: per launcher and K, the tile of least time weighted by the
projections' count per step). ``--sections`` picks among the three. Writes JSON and a PNG (weight GB/s per
case of the first section).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.bench_fused import MODELS
from kernels.bench_util import graph_replay_us, grouped_bar_chart, measure_copy_bandwidth
from kernels.triton import gemv as gemv_tk

log = logging.getLogger("bench_gemv")

_ROTATION_BYTES = 256 << 20
_VOCAB = 248320

_SWEEP = [gemv_tk.GemvTile(n, k, num_warps=w)
          for n, k, w in itertools.product((1, 2, 4, 8), (0, 256, 512), (4, 8))]


def projections(model: str) -> dict[str, tuple[int, int]]:
    """Name -> (N, K) of each weight a decode step multiplies (Qwen3.5 shapes)."""
    s = MODELS[model]
    gdn_k_heads = 16
    key_size, value_size = gdn_k_heads * 128, s.gdn_v_heads * s.gdn_v_dim
    return {
        "gdn in_proj": (2 * key_size + 2 * value_size + 2 * s.gdn_v_heads, s.hidden),
        "gdn out_proj": (s.hidden, value_size),
        "attn qkv_proj": (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim, s.hidden),
        "attn o_proj": (s.hidden, s.heads * s.head_dim),
        "router": (s.experts + 1, s.hidden),
        "lm_head": (_VOCAB, s.hidden),
    }


def time_calls(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Median microseconds per call of ``fn(weight)`` over a CUDA graph cycling through ``weights``."""

    def calls():
        for w in weights:
            fn(w)

    return graph_replay_us(calls, len(weights), replays=3, samples=7)


def rotating_weights(n: int, k: int) -> list[torch.Tensor]:
    """Enough copies of an ``[n, k]`` bf16 weight (>= 256 MB in all) that a call cycling through them never
    finds its weight in L2."""
    copies = max(2, -(-_ROTATION_BYTES // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]


def bench_case(n: int, k: int, tokens: int, tiles: list[gemv_tk.GemvTile], with_no_pdl: bool = False) -> dict:
    weight_bytes = n * k * 2
    weights = rotating_weights(n, k)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0])
    out = {"N": n, "K": k, "tokens": tokens, "weight_bytes": weight_bytes,
           "cublas_us": time_calls(lambda w: F.linear(x, w), weights), "tiles": []}
    if with_no_pdl:
        # The same kernel without programmatic dependent launch: each call waits for the last to finish.
        os.environ["BATON_PDL"] = "0"
        try:
            out["gemv_no_pdl_us"] = time_calls(lambda w: gemv_tk.gemv(x, w), weights)
        finally:
            del os.environ["BATON_PDL"]
    for tile in tiles:
        got = gemv_tk.gemv(x, weights[0], tile=tile)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        us = time_calls(lambda w, tile=tile: gemv_tk.gemv(x, w, tile=tile), weights)
        out["tiles"].append({"tile": dataclasses.asdict(tile), "us": us})
    del weights
    torch.cuda.empty_cache()
    return out


_NORMED = ("gdn in_proj", "attn qkv_proj")  # the projections rms_norm_linear runs (the norm in the kernel)
_PROGRAM_CAPS = (0, 2, 4, 8)  # rms_norm_linear programs_per_sm: 0 = one program per tile (the default)


def bench_normed_case(n: int, k: int, caps: tuple[int, ...] = _PROGRAM_CAPS) -> dict:
    """``rms_norm_linear`` of one row (residual add + norm inside the projection) at each cap on its programs
    per SM: with a cap each program normalises the row once for several column tiles instead of once per tile."""
    weight_bytes = n * k * 2
    weights = rotating_weights(n, k)
    x, residual = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    norm_weight = torch.randn(k, device="cuda", dtype=torch.bfloat16) * 0.1
    want = gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, weights[0])[0]
    out = {"N": n, "K": k, "weight_bytes": weight_bytes, "us_by_programs_per_sm": {}}
    for cap in caps:
        got = gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, weights[0], programs_per_sm=cap)[0]
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        out["us_by_programs_per_sm"][str(cap)] = time_calls(
            lambda w, cap=cap: gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, w, programs_per_sm=cap),
            weights)
    del weights
    torch.cuda.empty_cache()
    return out


# The fused one-row projections of the decode step and their launcher; weights per decode step of 35B-A3B's
# 40 layers (30 GDN, 10 attention) weigh the tile choice of a launcher shared by two projections.
_FUSED = {"gdn in_proj": "rms_norm_linear", "attn qkv_proj": "rms_norm_linear", "gdn out_proj": "gated_norm_linear",
          "attn o_proj": "gated_linear"}
_FUSED_WEIGHT = {"gdn in_proj": 3, "attn qkv_proj": 1, "gdn out_proj": 3, "attn o_proj": 1}
_FUSED_TILES = [gemv_tk.GemvTile(n, 0, num_warps=w) for n, w in itertools.product((1, 2, 4, 8), (1, 2, 4))]
_MAX_TILE_ELEMENTS_PER_THREAD = 256  # beyond, the whole-K tile spills: not worth compiling


def bench_fused_case(model: str, name: str, tiles: list[gemv_tk.GemvTile]) -> dict:
    """The projection ``name`` through its fused launcher (the norm / gate prologue, the GDN in_proj with its
    conv epilogue, as the decode step runs it) at each tile, against the launcher's default tile."""
    s = MODELS[model]
    n, k = projections(model)[name]
    weights = rotating_weights(n, k)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    if _FUSED[name] == "gated_norm_linear":
        heads = s.gdn_v_heads
        core, z = (torch.randn(1, heads, k // heads, **bf16) for _ in range(2))
        norm_weight = torch.randn(k // heads, **bf16) * 0.1 + 1

        def call(w, tile):
            return gemv_tk.gated_norm_linear(core, z, norm_weight, 1e-6, w, tile=tile)
    elif _FUSED[name] == "gated_linear":
        x, gate = (torch.randn(1, k, **bf16) for _ in range(2))

        def call(w, tile):
            return gemv_tk.gated_linear(x, gate, w, tile=tile)
    else:
        x, residual = (torch.randn(1, k, **bf16) for _ in range(2))
        norm_weight = torch.randn(k, **bf16) * 0.1
        conv = {}
        if name == "gdn in_proj":  # the conv update on the q|k|v columns, one state slot
            conv_dim = 2 * 16 * 128 + s.gdn_v_heads * s.gdn_v_dim
            conv = dict(conv_weight=torch.randn(conv_dim, 4, **bf16) * 0.5,
                        conv_states=torch.zeros(2, conv_dim, 3, **bf16), state_slot=torch.ones(1, dtype=torch.long,
                                                                                             device="cuda"))

        def call(w, tile):
            return gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, w, tile=tile, **conv)[0]
    want = call(weights[0], None)
    out = {"model": model, "projection": name, "launcher": _FUSED[name], "N": n, "K": k, "weight_bytes": n * k * 2,
           "default_tile": dataclasses.asdict(gemv_tk.default_norm_tile(k) if _FUSED[name] == "rms_norm_linear"
                                              else gemv_tk.default_tile(k)),
           "default_us": time_calls(lambda w: call(w, None), weights), "tiles": []}
    for tile in tiles:
        if tile.block_n * k > _MAX_TILE_ELEMENTS_PER_THREAD * 32 * tile.num_warps:
            continue
        if name != "gdn in_proj":  # (the conv keeps state: its output moves call by call)
            torch.testing.assert_close(call(weights[0], tile), want, rtol=2e-2, atol=2e-2)
        out["tiles"].append({"tile": dataclasses.asdict(tile), "us": time_calls(lambda w, t=tile: call(w, t), weights)})
    del weights
    torch.cuda.empty_cache()
    return out


def best_fused_tiles(cases: list[dict]) -> dict[str, dict[int, dict]]:
    """Launcher -> K -> the tile with the least weighted time over the projections that share it (among the
    tiles timed on all of them)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for case in cases:
        groups.setdefault((case["launcher"], case["K"]), []).append(case)
    best: dict[str, dict[int, dict]] = {}
    for (launcher, k), group in groups.items():
        timed = [{tuple(t["tile"].items()): t["us"] for t in case["tiles"]} for case in group]
        common = set.intersection(*(set(us) for us in timed))
        weights = [_FUSED_WEIGHT[case["projection"]] for case in group]
        weighted = {tile: sum(w * us[tile] for w, us in zip(weights, timed, strict=True)) for tile in common}
        best.setdefault(launcher, {})[k] = dict(min(weighted, key=weighted.get))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="35b-a3b,397b")
    parser.add_argument("--tokens", default="1,2,4")
    parser.add_argument("--no-sweep", action="store_true", help="time the default tile only")
    parser.add_argument("--out", type=Path, default=Path("gemv.json"))
    parser.add_argument("--sections", default="plain,normed,fused",
                        help="plain: gemv vs cuBLAS; normed: rms_norm_linear grid caps; fused: fused launchers' tiles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    models = args.models.split(",")
    token_counts = [int(t) for t in args.tokens.split(",")]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "copy_bandwidth_GBps": measure_copy_bandwidth(torch.device("cuda")) / 1e9,
               "sweep": [], "runs": []}

    sections = set(args.sections.split(","))
    best = None
    if not args.no_sweep and "plain" in sections:
        # Sweep on the tall-K and the wide-N shapes of the first model: their sum of times picks the tile.
        totals = {tile: 0.0 for tile in _SWEEP}
        for name in ("gdn in_proj", "gdn out_proj"):
            n, k = projections(models[0])[name]
            case = bench_case(n, k, token_counts[0], _SWEEP)
            for entry, tile in zip(case["tiles"], _SWEEP, strict=True):
                totals[tile] += entry["us"]
                log.info("sweep %s %s: %.1f us (cuBLAS %.1f)", name, tile, entry["us"], case["cublas_us"])
            results["sweep"].append({"projection": name, **case})
        best = min(totals, key=totals.get)
        log.info("best swept tile: %s", best)
        results["best_tile"] = dataclasses.asdict(best)

    for model in (models if "plain" in sections else []):
        for name, (n, k) in projections(model).items():
            for tokens in token_counts:
                default = gemv_tk.default_tile(k)
                tiles = [default] if best in (None, default) else [default, best]
                case = bench_case(n, k, tokens, tiles, with_no_pdl=True)
                case["default_us"] = case["tiles"][0]["us"]
                gemv_us = case["default_us"]
                case.update(model=model, projection=name, gemv_us=gemv_us, speedup=case["cublas_us"] / gemv_us,
                            cublas_GBps=case["weight_bytes"] / case["cublas_us"] / 1e3,
                            gemv_GBps=case["weight_bytes"] / gemv_us / 1e3)
                results["runs"].append(case)
                best_us = min(t["us"] for t in case["tiles"])
                print(f"{model} {name} [{n}x{k}] T={tokens}: cuBLAS {case['cublas_us']:.1f} us "
                      f"({case['cublas_GBps']:.0f} GB/s), gemv default tile {gemv_us:.1f} us "
                      f"({case['gemv_GBps']:.0f} GB/s) -> {case['speedup']:.2f}x; without PDL "
                      f"{case['gemv_no_pdl_us']:.1f} us; best swept tile {best_us:.1f} us", flush=True)
    results["normed"] = []
    for model in (models if "normed" in sections else []):
        for name in _NORMED:
            n, k = projections(model)[name]
            case = {"model": model, "projection": name, **bench_normed_case(n, k)}
            results["normed"].append(case)
            times = case["us_by_programs_per_sm"]
            labels = [f"{'tile per program' if cap == '0' else cap + '/SM'} {us:.1f} us" for cap, us in times.items()]
            print(f"{model} {name} with the norm [{n}x{k}]: " + ", ".join(labels), flush=True)
    results["fused"] = []
    for model in (models if "fused" in sections else []):
        for name in _FUSED:
            case = bench_fused_case(model, name, _FUSED_TILES)
            results["fused"].append(case)
            top = sorted(case["tiles"], key=lambda t: t["us"])[:3]
            fastest = ", ".join(f"{t['tile']['block_n']}x{t['tile']['num_warps']}w {t['us']:.1f} us" for t in top)
            print(f"{model} {name} via {case['launcher']} [{case['N']}x{case['K']}]: "
                  f"default {case['default_us']:.1f} us; best {fastest}", flush=True)
    if results["fused"]:
        results["fused_best"] = best_fused_tiles(results["fused"])
        print("best fused tiles:", json.dumps(results["fused_best"]), flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    runs = results["runs"]
    if not runs:
        return
    grouped_bar_chart(
        args.out.with_suffix(".png"), [f"{r['model']} {r['projection']} T={r['tokens']}" for r in runs],
        [("cuBLAS (F.linear)", [r["cublas_GBps"] for r in runs]),
         ("Triton gemv, no PDL", [r["weight_bytes"] / r["gemv_no_pdl_us"] / 1e3 for r in runs]),
         ("Triton gemv, PDL", [r["gemv_GBps"] for r in runs])],
        xlabel="projection", ylabel="weight GB/s",
        title=f"decode projections, Triton matrix-vector vs cuBLAS on {results['gpu']}",
        hline=("copy bandwidth (read + write)", results["copy_bandwidth_GBps"]),
    )


if __name__ == "__main__":
    main()

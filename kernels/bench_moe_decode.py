"""The decode MoE block of one token: the one-launch kernel (kernels/triton/moe_decode.py) against the three
kernels it replaces (norm_route_topk, then the matrix-vector gate/up and down+sum of fused_experts), on this GPU.

    python -m kernels.bench_moe_decode --models 35b-a3b,397b --out moe_decode.json   # JSON + PNG

Each variant is captured in a CUDA graph of ``--calls`` back-to-back MoE blocks with different inputs (so
different experts, read from HBM rather than L2: one layer's expert stacks are 1.5 GB at 35B-A3B), chained
with programmatic dependent launch as in the decode step; the graphs are replayed in alternation. Every
variant is first checked against the three-kernel path. The floor is the bytes one block must read (the
router, k routed experts and the shared one) over the device-to-device copy bandwidth measured in the run.
Sweeps the one-launch grid and tiles (``MoeDecodeConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from pathlib import Path

import torch

from kernels.bench_fused import EPS, MODELS
from kernels.bench_util import alternating_graph_us, grouped_bar_chart, measure_copy_bandwidth
from kernels.triton import moe as moe_tk
from kernels.triton.moe_decode import MoeDecodeConfig, norm_moe_decode

log = logging.getLogger("bench_moe_decode")

SWEEP = [MoeDecodeConfig(programs_per_sm=p, gate_up_n=g, down_n=d, prefetch_down=f)
         for p, g, d, f in itertools.product((1, 2), (1, 2, 4), (2, 4, 8), (False, True))]


def bench_model(key: str, calls: int, bandwidth: float, sweep: bool) -> dict:
    s = MODELS[key]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, hidden, inter, experts = torch.bfloat16, s.hidden, s.moe_inter, s.experts

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    router = randn(experts + 1, hidden, scale=hidden**-0.5)
    w13 = randn(experts + 1, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(experts + 1, hidden, inter, scale=inter**-0.5)
    norm_weight = randn(hidden, scale=0.1)
    inputs = [(randn(1, hidden, scale=1.0), randn(1, hidden, scale=1.0)) for _ in range(calls)]
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")

    def three_kernels(x, residual):
        weights, ids, _, h, new_res = moe_tk.norm_route_topk(x, residual, norm_weight, EPS, router, s.top_k, True,
                                                             ticket)
        return moe_tk.fused_experts(h, w13, w2, weights, ids), new_res

    def one_block(config: MoeDecodeConfig, one_launch: bool):
        return lambda x, residual: norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2, s.top_k, True,
                                                   sync, one_launch=one_launch, config=config)[:2]

    variants = {"three_kernels": three_kernels, "phased": one_block(MoeDecodeConfig(), False),
                "one_launch": one_block(MoeDecodeConfig(), True),
                "one_launch_shared_late": one_block(MoeDecodeConfig(shared_first=False), True)}
    if sweep:
        for config in SWEEP:
            name = f"one_launch_p{config.programs_per_sm}_g{config.gate_up_n}_d{config.down_n}"
            name += ("_prefetch" if config.prefetch_down else "") + ("" if config.shared_first else "_shared_late")
            variants[name] = one_block(config, True)

    expected = [three_kernels(x, r) for x, r in inputs[:3]]
    errors, timed = {}, {}
    for name, fn in variants.items():
        try:
            got = [fn(x, r) for x, r in inputs[:3]]
            for (out, res), (want_out, want_res) in zip(got, expected, strict=True):
                err = float((out.float() - want_out.float()).norm() / want_out.float().norm())
                if not (err < 1e-2 and torch.equal(res, want_res)):
                    raise RuntimeError(f"{name}: output differs from the three-kernel path (rel err {err:.2e})")
            timed[name] = (lambda fn=fn: [fn(x, r) for x, r in inputs])
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("%s %s: %s", key, name, errors[name])
    times = {name: t / calls for name, t in alternating_graph_us(timed, rounds=7, replays=3).items()}
    per_expert = (2 * inter * hidden + hidden * inter) * dtype.itemsize
    nbytes = (experts + 1) * hidden * dtype.itemsize + (s.top_k + 1) * per_expert
    floor_us = nbytes / bandwidth * 1e6
    best = min((n for n in times if n.startswith("one_launch")), key=times.get, default=None)
    result = {"model": s.name, "hidden": hidden, "inter": inter, "experts": experts, "top_k": s.top_k,
              "bytes_per_block": nbytes, "floor_us": floor_us, "us_per_block": times, "errors": errors,
              "best_one_launch": best}
    if best is not None:
        result["speedup_best_vs_three_kernels"] = times["three_kernels"] / times[best]
    log.info("%s: three kernels %.2f us, one launch %.2f us (best %s %.2f us), floor %.2f us", s.name,
             times.get("three_kernels", float("nan")), times.get("one_launch", float("nan")), best,
             times.get(best, float("nan")), floor_us)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="35b-a3b,397b")
    parser.add_argument("--calls", type=int, default=16, help="MoE blocks per CUDA graph (different inputs)")
    parser.add_argument("--no-sweep", action="store_true", help="only the default one-launch configuration")
    parser.add_argument("--out", default="moe_decode.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)
    log.info("device-to-device copy: %.0f GB/s (read + write)", bandwidth / 1e9)
    results = {"benchmark": "decode MoE block, one token", "gpu": torch.cuda.get_device_name(device),
               "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
               "sweep": [dataclasses.asdict(c) for c in SWEEP] if not args.no_sweep else [], "models": []}
    for key in args.models.split(","):
        results["models"].append(bench_model(key, args.calls, bandwidth, not args.no_sweep))
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    rows = results["models"]
    grouped_bar_chart(
        out.with_suffix(".png"), [r["model"] for r in rows],
        [("three kernels", [r["us_per_block"].get("three_kernels", 0) for r in rows]),
         ("one launch (default)", [r["us_per_block"].get("one_launch", 0) for r in rows]),
         ("one launch (best)", [r["us_per_block"].get(r["best_one_launch"], 0) for r in rows]),
         ("HBM floor", [r["floor_us"] for r in rows])],
        xlabel="model", ylabel="us per MoE block (1 token)", title=f"decode MoE block on {results['gpu']}",
    )
    for r in rows:
        print(f"{r['model']:18s} three {r['us_per_block'].get('three_kernels', float('nan')):7.2f} us  one-launch "
              f"{r['us_per_block'].get('one_launch', float('nan')):7.2f} us  best {r['best_one_launch']} "
              f"{r['us_per_block'].get(r['best_one_launch'], float('nan')):7.2f} us  floor {r['floor_us']:6.2f} us")


if __name__ == "__main__":
    main()

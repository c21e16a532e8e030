"""The decode MoE block of one token (post-attention norm + router + top-k, then the experts' gate/up and
down+sum, the engine's three kernels) on this GPU: its launch options swept one after another, each against
the default in the same run.

    python -m kernels.bench_moe_block --models 35b-a3b,397b --out moe_block.json   # JSON + PNG

Each variant is captured in a CUDA graph of ``--calls`` back-to-back MoE blocks with different inputs (so
different experts, read from HBM rather than L2: one layer's expert stacks are 1.6 GB at 35B-A3B), chained
with programmatic dependent launch as in the decode step; the graphs are replayed in alternation. Every
variant is first checked against the default. The floor is the bytes one block must read (the router, the k
routed experts and the shared one) over the device-to-device copy bandwidth measured in the run.

Before the sweep, the parts are timed the same way, each PDL-chained with copies of itself (``parts_us``):
the block, the router alone (top-k and top-1), and the experts alone on the router's routings; the block
costing about router + experts means nothing overlaps the router.

The sweep is coordinate descent, in the order of the chain's dependence: ``shared_last`` (the shared expert's
weights loaded before the PDL wait), then the router's rows per program and warps, then the gate/up tile,
then the down tile, each stage starting from the best of the one before; then the best few values of each
axis crossed with each other's (``refine``), next to the default, since the axes interact.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.bench_fused import EPS, MODELS
from kernels.bench_util import alternating_graph_us, grouped_bar_chart, per_model_results
from kernels.triton import moe as moe_tk
from kernels.triton.gemv import GemvTile

log = logging.getLogger("bench_moe_block")


@dataclass(frozen=True)
class BlockVariant:
    """The launch options of one MoE block: ``router`` (rows per program, warps), ``gate_up`` (columns per
    program, K step with 0 = whole K, warps) and ``down`` (columns, warps); None: the library default
    (``moe._ROUTER_BLOCK_N``, ``moe.default_gemv_config``). ``shared_last`` as the engine runs it."""

    shared_last: bool = True
    router: tuple[int, int] | None = None
    gate_up: tuple[int, int, int] | None = None
    down: tuple[int, int] | None = None

    def router_tile(self) -> GemvTile | None:
        return None if self.router is None else GemvTile(self.router[0], 0, num_warps=self.router[1])

    def experts(self, inter: int) -> moe_tk.GemvConfig:
        default = moe_tk.default_gemv_config(inter)
        n, k, w = self.gate_up or (default.block_n, default.block_k, default.num_warps)
        down_n, down_w = self.down or (default.down_block_n or n, default.down_num_warps or w)
        return moe_tk.GemvConfig(n, k, num_warps=w, down_block_n=down_n, down_num_warps=down_w)

    def label(self) -> str:
        def fmt(tile):
            return "default" if tile is None else "x".join(map(str, tile[:-1])) + f"x{tile[-1]}w"

        return (f"shared_last={int(self.shared_last)} router={fmt(self.router)} gate_up={fmt(self.gate_up)} "
                f"down={fmt(self.down)}")


# Each axis with the values swept; the library default (None) first, then the earlier defaults (2 rows x 4
# warps for the router; 2 columns x 512 x 4 warps for both expert kernels) among the rest.
AXES = {
    "shared_last": [True, False],
    "router": [None, *itertools.product((1, 2, 4), (1, 2, 4))],
    "gate_up": [None, *itertools.product((1, 2, 4), (0, 512), (2, 4, 8))],
    "down": [None, *itertools.product((1, 2, 4, 8), (1, 2, 4))],
}
# How many of each axis' best values the refinement crosses with the others'.
REFINE_TOP = {"shared_last": 2, "router": 2, "gate_up": 3, "down": 4}


def _time_variants(block, variants: list[BlockVariant], inputs, expected, calls: int) -> tuple[dict, dict]:
    """Microseconds per block of each variant (checked against ``expected`` first); errors of variants that
    fail to compile or differ."""
    timed, errors = {}, {}
    for v in variants:
        try:
            for (x, r), (want_out, want_res) in zip(inputs[:3], expected, strict=True):
                out, res = block(x, r, v)
                err = float((out.float() - want_out.float()).norm() / want_out.float().norm())
                if not (err < 1e-2 and torch.equal(res, want_res)):
                    raise RuntimeError(f"output differs from the default (rel err {err:.2e})")
            timed[v] = lambda v=v: [block(x, r, v) for x, r in inputs]
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile or fit is recorded, not fatal
            errors[v.label()] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("%s: %s", v.label(), errors[v.label()])
    times = {v: t / calls for v, t in alternating_graph_us(timed, rounds=7, replays=3).items()}
    return times, errors


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
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")

    def block(x, residual, v: BlockVariant):
        weights, ids, _, h, new_res = moe_tk.norm_route_topk(x, residual, norm_weight, EPS, router, s.top_k, True,
                                                             ticket, router_tile=v.router_tile())
        return moe_tk.fused_experts(h, w13, w2, weights, ids, config=v.experts(inter),
                                    shared_last=v.shared_last), new_res

    default = BlockVariant()
    expected = [block(x, r, default) for x, r in inputs[:3]]

    # Where the block's time goes: each part PDL-chained with copies of itself (the router alone, top-k 8 and
    # top-k 1; the experts alone on the routings the router chose), against the block, in one alternation.
    routings = [moe_tk.norm_route_topk(x, r, norm_weight, EPS, router, s.top_k, True, ticket) for x, r in inputs]
    config = default.experts(inter)
    parts = {
        "block": lambda: [block(x, r, default) for x, r in inputs],
        "router": lambda: [moe_tk.norm_route_topk(x, r, norm_weight, EPS, router, s.top_k, True, ticket)
                           for x, r in inputs],
        "router_top1": lambda: [moe_tk.norm_route_topk(x, r, norm_weight, EPS, router, 1, True, ticket)
                                for x, r in inputs],
        "experts": lambda: [moe_tk.fused_experts(h, w13, w2, weights, ids, config=config, shared_last=True)
                            for weights, ids, _, h, _ in routings],
    }
    parts_us = {name: t / calls for name, t in alternating_graph_us(parts, rounds=7, replays=3).items()}
    log.info("%s parts (us per call): %s", s.name, {k: round(v, 2) for k, v in parts_us.items()})
    axes = AXES if sweep else {"shared_last": AXES["shared_last"]}
    best = default
    stages, errors = [], {}
    ranked: dict[str, list] = {}
    # Coordinate descent in the order of the chain's dependence, each axis from the best of the ones before.
    for axis, values in axes.items():
        variants = list(dict.fromkeys([best] + [dataclasses.replace(best, **{axis: value}) for value in values]))
        times, stage_errors = _time_variants(block, variants, inputs, expected, calls)
        errors.update(stage_errors)
        ranked[axis] = [getattr(v, axis) for v in sorted(times, key=times.get)]
        best = min(times, key=times.get)
        stages.append({"stage": axis, "us_per_block": {v.label(): us for v, us in times.items()},
                       "best": best.label(), "best_us": times[best]})
        log.info("%s %s: best %s %.2f us (from %s: %.2f us)", s.name, axis, best.label(), times[best],
                 variants[0].label(), times.get(variants[0], float("nan")))
    if sweep:
        # The axes interact (how many programs wait on one kernel decides what the next can overlap): cross each
        # axis' best values with the others' and time them side by side.
        tops = [ranked[axis][:REFINE_TOP[axis]] for axis in axes]
        variants = list(dict.fromkeys([default] + [BlockVariant(*values) for values in itertools.product(*tops)]))
        times, stage_errors = _time_variants(block, variants, inputs, expected, calls)
        errors.update(stage_errors)
        best = min(times, key=times.get)
        stages.append({"stage": "refine", "us_per_block": {v.label(): us for v, us in times.items()},
                       "best": best.label(), "best_us": times[best], "default_us": times[default]})
        log.info("%s refine (%d variants): best %s %.2f us, default %.2f us", s.name, len(variants), best.label(),
                 times[best], times[default])
    last = stages[-1]
    default_us = last.get("default_us", stages[0]["us_per_block"][default.label()])
    best_us = last["best_us"]
    per_expert = (2 * inter * hidden + hidden * inter) * dtype.itemsize
    nbytes = (experts + 1) * hidden * dtype.itemsize + (s.top_k + 1) * per_expert
    floor_us = nbytes / bandwidth * 1e6
    return {"model": s.name, "hidden": hidden, "inter": inter, "experts": experts, "top_k": s.top_k,
            "bytes_per_block": nbytes, "floor_us": floor_us, "default_us": default_us, "best": best.label(),
            "best_variant": dataclasses.asdict(best), "best_us": best_us,
            "speedup_best_vs_default": default_us / best_us, "parts_us": parts_us, "stages": stages,
            "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="35b-a3b,397b")
    parser.add_argument("--calls", type=int, default=16, help="MoE blocks per CUDA graph (different inputs)")
    parser.add_argument("--no-sweep", action="store_true", help="the defaults with shared_last on and off only")
    parser.add_argument("--out", default="moe_block.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = per_model_results("decode MoE block, one token (norm_route_topk + fused_experts)", args.models.split(","),
                                lambda key, bandwidth: bench_model(key, args.calls, bandwidth, not args.no_sweep))
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    rows = results["models"]
    grouped_bar_chart(
        out.with_suffix(".png"), [r["model"] for r in rows],
        [("default", [r["default_us"] for r in rows]), ("best swept", [r["best_us"] for r in rows]),
         ("HBM floor", [r["floor_us"] for r in rows])],
        xlabel="model", ylabel="us per MoE block (1 token)", title=f"decode MoE block on {results['gpu']}",
    )
    for r in rows:
        print(f"{r['model']:18s} default {r['default_us']:7.2f} us  best {r['best_us']:7.2f} us "
              f"({r['speedup_best_vs_default']:.2f}x: {r['best']})  floor {r['floor_us']:6.2f} us", flush=True)


if __name__ == "__main__":
    main()

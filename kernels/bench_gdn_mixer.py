"""The GDN mixer of one decode token after in_proj: ``gdn_decode``, then ``gated_norm_linear`` (gated RMSNorm
and out_proj), on this GPU, with out_proj's programs capped at a few per SM (the default: each normalises
the row once for several column tiles) and with one program per tile (the form before 2026-12-02).

    python -m kernels.bench_gdn_mixer --models 35b-a3b,397b --out gdn_mixer.json   # JSON + PNG

Each variant is captured in a CUDA graph of ``--calls`` back-to-back mixers, each with its own out_proj and
state pool (as the layers of a decode step: read from HBM, not L2), chained with programmatic dependent
launch as in the decode step; the graphs are replayed in alternation. Every variant is first checked against
the default. The floor is the bytes one mixer must move (out_proj, the state read and written) over the
device-to-device copy bandwidth measured in the run. ``--sweep`` also tries other program caps.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from kernels.bench_fused import EPS, MODELS
from kernels.bench_util import alternating_graph_us, grouped_bar_chart, per_model_results
from kernels.triton.gdn_decode import gdn_decode
from kernels.triton.gemv import gated_norm_linear

log = logging.getLogger("bench_gdn_mixer")

GDN_K_HEADS, GDN_K_DIM = 16, 128  # both Qwen3.5 sizes
DEFAULT_PROGRAMS_PER_SM = 2  # gated_norm_linear's default
SWEEP_PROGRAMS_PER_SM = (1, 3, 4, 8)


def bench_model(key: str, calls: int, bandwidth: float, sweep: bool) -> dict:
    s = MODELS[key]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, hv, dv, hk, dk = torch.bfloat16, s.gdn_v_heads, s.gdn_v_dim, GDN_K_HEADS, GDN_K_DIM

    def randn(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    layers = []
    for _ in range(calls):
        qkv = randn(1, 2 * hk * dk + hv * dv)
        q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
        zab = randn(1, hv * dv + 2 * hv)
        layers.append(dict(
            q=q.unflatten(-1, (hk, dk)), k=k.unflatten(-1, (hk, dk)), v=v.unflatten(-1, (hv, dv)),
            z=zab[:, :hv * dv].unflatten(-1, (hv, dv)), a=zab[:, hv * dv:hv * dv + hv], b=zab[:, hv * dv + hv:],
            A_log=randn(hv, dtype=torch.float32) * 0.5 - 2, dt_bias=randn(hv, dtype=torch.float32) * 0.5,
            states=randn(2, hv, dk, dv, scale=0.05, dtype=torch.float32), norm_weight=1 + randn(dv, scale=0.1),
            out_proj=randn(s.hidden, hv * dv, scale=(hv * dv) ** -0.5),
        ))
    slot = torch.ones(1, dtype=torch.int32, device="cuda")

    def mixer(programs_per_sm: int):
        def run(L):  # noqa: N803 - one layer's tensors
            core = gdn_decode(L["q"][:, None], L["k"][:, None], L["v"][:, None], L["a"][:, None], L["b"][:, None],
                              L["A_log"], L["dt_bias"], L["states"], slot)[:, 0]
            return gated_norm_linear(core, L["z"], L["norm_weight"], EPS, L["out_proj"],
                                     programs_per_sm=programs_per_sm)
        return run

    variants = {"default": mixer(DEFAULT_PROGRAMS_PER_SM), "tile_per_program": mixer(0)}
    if sweep:
        for p in SWEEP_PROGRAMS_PER_SM:
            variants[f"programs_per_sm_{p}"] = mixer(p)

    def outputs(fn):
        saved = [L["states"].clone() for L in layers[:2]]
        got = [fn(L) for L in layers[:2]]
        for L, state in zip(layers, saved, strict=False):
            L["states"].copy_(state)
        return got

    expected = outputs(variants["default"])
    errors, timed = {}, {}
    for name, fn in variants.items():
        try:
            for out, want in zip(outputs(fn), expected, strict=True):
                err = float((out.float() - want.float()).norm() / want.float().norm())
                if not err < 1e-2:
                    raise RuntimeError(f"{name}: differs from the default (rel err {err:.2e})")
            timed[name] = (lambda fn=fn: [fn(L) for L in layers])
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("%s %s: %s", key, name, errors[name])
    # The states drift over the replays (each replay is a decode step); decays keep them bounded.
    times = {name: t / calls for name, t in alternating_graph_us(timed, rounds=7, replays=3).items()}
    nbytes = s.hidden * hv * dv * dtype.itemsize + 2 * hv * dk * dv * 4
    floor_us = nbytes / bandwidth * 1e6
    result = {"model": s.name, "v_heads": hv, "v_dim": dv, "hidden": s.hidden, "bytes_per_mixer": nbytes,
              "floor_us": floor_us, "us_per_mixer": times, "errors": errors,
              "speedup_vs_tile_per_program": times["tile_per_program"] / times["default"]}
    log.info("%s: default %.2f us, one program per tile %.2f us, floor %.2f us", s.name, times["default"],
             times["tile_per_program"], floor_us)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="35b-a3b,397b")
    parser.add_argument("--calls", type=int, default=16, help="mixers per CUDA graph (different layers)")
    parser.add_argument("--sweep", action="store_true", help="also other caps on out_proj's programs per SM")
    parser.add_argument("--out", default="gdn_mixer.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = per_model_results("decode GDN mixer (gdn_decode + gated_norm_linear), one token", args.models.split(","),
                                lambda key, bandwidth: bench_model(key, args.calls, bandwidth, args.sweep))
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    rows = results["models"]
    grouped_bar_chart(
        out.with_suffix(".png"), [r["model"] for r in rows],
        [("default (row normed once per program)", [r["us_per_mixer"]["default"] for r in rows]),
         ("one program per tile", [r["us_per_mixer"]["tile_per_program"] for r in rows]),
         ("HBM floor", [r["floor_us"] for r in rows])],
        xlabel="model", ylabel="us per GDN mixer (1 token)", title=f"decode GDN mixer on {results['gpu']}",
    )
    for r in rows:
        print(f"{r['model']:18s} default {r['us_per_mixer']['default']:7.2f} us  one program per tile "
              f"{r['us_per_mixer']['tile_per_program']:7.2f} us  floor {r['floor_us']:6.2f} us")


if __name__ == "__main__":
    main()

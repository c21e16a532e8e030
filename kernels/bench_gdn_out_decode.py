"""The GDN mixer of one decode token: the one-launch kernel (kernels/triton/gdn_out_decode.py) against the two
kernels it replaces (gdn_decode, then gated_norm_linear with out_proj), on this GPU.

    python -m kernels.bench_gdn_out_decode --models 35b-a3b,397b --out gdn_out_decode.json   # JSON + PNG

Each variant is captured in a CUDA graph of ``--calls`` back-to-back mixers, each with its own out_proj and
state pool (as the layers of a decode step: read from HBM, not L2), chained with programmatic dependent
launch as in the decode step; the graphs are replayed in alternation. Every variant is first checked against
the two-kernel path. The floor is the bytes one mixer must move (out_proj, the state read and written) over
the device-to-device copy bandwidth measured in the run. Sweeps the one-launch grid and tiles.
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
from kernels.triton.gdn_decode import gdn_decode
from kernels.triton.gdn_out_decode import GdnOutDecodeConfig, gdn_out_decode
from kernels.triton.gemv import gated_norm_linear

log = logging.getLogger("bench_gdn_out_decode")

GDN_K_HEADS, GDN_K_DIM = 16, 128  # both Qwen3.5 sizes
SWEEP = [GdnOutDecodeConfig(programs_per_sm=p, num_warps=8 // p, block_v=v, block_n=n)
         for p, v, n in itertools.product((1, 2), (16, 32), (2, 4, 8))]


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
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")

    def two_kernels(L):  # noqa: N803 - one layer's tensors
        core = gdn_decode(L["q"][:, None], L["k"][:, None], L["v"][:, None], L["a"][:, None], L["b"][:, None],
                          L["A_log"], L["dt_bias"], L["states"], slot)[:, 0]
        return gated_norm_linear(core, L["z"], L["norm_weight"], EPS, L["out_proj"])

    def fused(config: GdnOutDecodeConfig, one_launch: bool):
        def run(L):  # noqa: N803 - one layer's tensors
            return gdn_out_decode(L["q"], L["k"], L["v"], L["a"], L["b"], L["A_log"], L["dt_bias"], L["states"],
                                  slot, L["z"], L["norm_weight"], EPS, L["out_proj"], sync, one_launch=one_launch,
                                  config=config)
        return run

    variants = {"two_kernels": two_kernels, "phased": fused(GdnOutDecodeConfig(), False),
                "one_launch": fused(GdnOutDecodeConfig(), True)}
    if sweep:
        for c in SWEEP:
            variants[f"one_launch_p{c.programs_per_sm}_w{c.num_warps}_v{c.block_v}_n{c.block_n}"] = fused(c, True)

    def checked(fn):
        saved = [L["states"].clone() for L in layers[:2]]
        got = [fn(L) for L in layers[:2]]
        after = [L["states"].clone() for L in layers[:2]]
        for L, state in zip(layers, saved, strict=False):
            L["states"].copy_(state)
        return got, after

    expected, expected_states = checked(two_kernels)
    errors, timed = {}, {}
    for name, fn in variants.items():
        try:
            got, states = checked(fn)
            for out, want, state, want_state in zip(got, expected, states, expected_states, strict=True):
                # Other value blocks reduce the state's columns in another order on the GPU: close, not equal.
                err = float((out.float() - want.float()).norm() / want.float().norm())
                state_err = float((state - want_state).norm() / want_state.norm())
                if not (err < 1e-2 and state_err < 1e-5):
                    raise RuntimeError(f"{name}: differs from the two-kernel path (rel err {err:.2e}, state "
                                       f"{state_err:.2e})")
            timed[name] = (lambda fn=fn: [fn(L) for L in layers])
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("%s %s: %s", key, name, errors[name])
    # The states drift over the replays (each replay is a decode step); decays keep them bounded.
    times = {name: t / calls for name, t in alternating_graph_us(timed, rounds=7, replays=3).items()}
    nbytes = s.hidden * hv * dv * dtype.itemsize + 2 * hv * dk * dv * 4
    floor_us = nbytes / bandwidth * 1e6
    best = min((n for n in times if n.startswith("one_launch")), key=times.get, default=None)
    result = {"model": s.name, "v_heads": hv, "v_dim": dv, "hidden": s.hidden, "bytes_per_mixer": nbytes,
              "floor_us": floor_us, "us_per_mixer": times, "errors": errors, "best_one_launch": best}
    if best is not None:
        result["speedup_best_vs_two_kernels"] = times["two_kernels"] / times[best]
    log.info("%s: two kernels %.2f us, one launch %.2f us (best %s %.2f us), floor %.2f us", s.name,
             times.get("two_kernels", float("nan")), times.get("one_launch", float("nan")), best,
             times.get(best, float("nan")), floor_us)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="35b-a3b,397b")
    parser.add_argument("--calls", type=int, default=16, help="mixers per CUDA graph (different layers)")
    parser.add_argument("--no-sweep", action="store_true", help="only the default one-launch configuration")
    parser.add_argument("--out", default="gdn_out_decode.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)
    log.info("device-to-device copy: %.0f GB/s (read + write)", bandwidth / 1e9)
    results = {"benchmark": "decode GDN mixer with out_proj, one token", "gpu": torch.cuda.get_device_name(device),
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
        [("two kernels", [r["us_per_mixer"].get("two_kernels", 0) for r in rows]),
         ("one launch (default)", [r["us_per_mixer"].get("one_launch", 0) for r in rows]),
         ("one launch (best)", [r["us_per_mixer"].get(r["best_one_launch"], 0) for r in rows]),
         ("HBM floor", [r["floor_us"] for r in rows])],
        xlabel="model", ylabel="us per GDN mixer (1 token)", title=f"decode GDN mixer on {results['gpu']}",
    )
    for r in rows:
        print(f"{r['model']:18s} two {r['us_per_mixer'].get('two_kernels', float('nan')):7.2f} us  one-launch "
              f"{r['us_per_mixer'].get('one_launch', float('nan')):7.2f} us  best {r['best_one_launch']} "
              f"{r['us_per_mixer'].get(r['best_one_launch'], float('nan')):7.2f} us  floor {r['floor_us']:6.2f} us")


if __name__ == "__main__":
    main()

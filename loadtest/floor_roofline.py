"""How many concurrent users one decode GPU can give a per-user decode floor, at the HBM roofline.

    python -m loadtest.floor_roofline --measured loadtest/results/batch_decode_h200.json \\
        --out loadtest/results/floor_roofline_h200.json

A decode step of B requests must move at least ``loadtest.model_costs.decode_step_bytes`` (the experts the batch
is routed to -- ``E (1 - (1 - k/E)^B)`` per MoE layer under uniform routing, which the measured counts match:
221.5 of 256 at B = 64 --, the dense weights, every request's KV and GDN states); each user then gets at most
``copy bandwidth / bytes per step`` tokens per second, whatever the kernels. This script takes the copy
bandwidth and the measured step times from a ``bench_batch_decode`` result (same GPU, same model dims), and
reports, per context and KV dtype, the largest batch whose roofline still gives every user ``--floor`` tok/s,
and the same at the fraction of the roofline the engine reached in that run. No GPU: the model's parameter
shapes come from a model built on PyTorch's meta device. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from services.engine.model import Qwen35ForCausalLM
from services.engine.ops import select_ops
from services.engine.presets import preset_config

from .model_costs import decode_step_bytes


def parameter_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    cfg = preset_config(model)
    with torch.device("meta"):
        net = Qwen35ForCausalLM(cfg, torch.bfloat16, "meta", select_ops("torch", torch.device("cpu")), page_size=16)
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def per_user_roofline(params, model: str, batch: int, context: int, bandwidth: float,
                      kv_dtype: torch.dtype) -> tuple[float, dict[str, int]]:
    """Tokens per second per user at the roofline, and the step's bytes by part."""
    cfg = preset_config(model)
    traffic = decode_step_bytes(params, cfg, torch.bfloat16, [context] * batch, None, kv_dtype)
    return bandwidth / traffic["total"], traffic


def largest_batch(params, model: str, context: int, bandwidth: float, kv_dtype: torch.dtype, floor: float,
                  fraction: float = 1.0, limit: int = 512) -> int:
    """The largest batch whose every user gets ``floor`` tok/s at ``fraction`` of the roofline (0: none)."""
    best = 0
    for batch in range(1, limit + 1):
        speed, _ = per_user_roofline(params, model, batch, context, bandwidth, kv_dtype)
        if speed * fraction >= floor:
            best = batch
        else:
            break
    return best


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for curve in results["curves"]:
        ax.plot(curve["batches"], curve["per_user_tok_s"], label=f"roofline, {curve['context'] // 1024}K, "
                f"{curve['kv_dtype']} KV")
    measured = results["measured"]
    ax.scatter([p["batch"] for p in measured], [p["per_user_tokens_per_s"] for p in measured], marker="x",
               color="black", label="engine, measured (4K and 32K)")
    ax.axhline(results["floor"], color="red", linestyle="--", label=f"floor {results['floor']:.0f} tok/s")
    ax.axvline(results["goal_users"], color="grey", linestyle=":", label=f"goal {results['goal_users']} users")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent users (decode batch)")
    ax.set_ylabel("tokens/s per user")
    ax.set_title(f"{results['model']}: per-user decode at the HBM roofline ({results['copy_bandwidth_GBps']:.0f} GB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--measured", type=Path, required=True, help="a bench_batch_decode JSON (same GPU)")
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--floor", type=float, default=70.0)
    parser.add_argument("--goal-users", type=int, default=56)
    parser.add_argument("--out", type=Path, default=Path("floor_roofline.json"))
    args = parser.parse_args()

    measured = json.loads(args.measured.read_text())
    bandwidth = measured["copy_bandwidth_GBps"] * 1e9
    runs = [r for r in measured["runs"] if "step_ms_median" in r]
    params = parameter_shapes(args.model)
    batches = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256]
    results = {"model": args.model, "gpu": measured.get("gpu"), "copy_bandwidth_GBps": bandwidth / 1e9,
               "floor": args.floor, "goal_users": args.goal_users, "measured_from": str(args.measured),
               "measured": [{k: r[k] for k in ("batch", "context", "per_user_tokens_per_s", "fraction_of_roofline")}
                            for r in runs],
               "curves": [], "limits": []}
    for context in (int(c) for c in args.contexts.split(",")):
        # The engine's own fraction of the roofline at the batches around the goal, in that run.
        near = [r["fraction_of_roofline"] for r in runs if r["context"] == context and 32 <= r["batch"] <= 64]
        engine_fraction = max(near) if near else None
        for kv_name, kv_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            speeds, parts = [], None
            for batch in batches:
                speed, traffic = per_user_roofline(params, args.model, batch, context, bandwidth, kv_dtype)
                speeds.append(speed)
                if batch == args.goal_users:
                    parts = traffic
            results["curves"].append({"context": context, "kv_dtype": kv_name, "batches": batches,
                                      "per_user_tok_s": speeds})
            limit = {
                "context": context, "kv_dtype": kv_name,
                "users_at_roofline": largest_batch(params, args.model, context, bandwidth, kv_dtype, args.floor),
                "per_user_tok_s_at_goal": speeds[batches.index(args.goal_users)],
                "bytes_per_step_at_goal": parts,
                "bandwidth_needed_for_goal_GBps": parts["total"] * args.floor / 1e9,
                "engine_fraction_of_roofline": engine_fraction,
                "users_at_engine_fraction": (largest_batch(params, args.model, context, bandwidth, kv_dtype,
                                                           args.floor, engine_fraction) if engine_fraction else None),
            }
            results["limits"].append(limit)
            print(f"{context // 1024:>4}K {kv_name:>4} KV: {limit['users_at_roofline']:>3} users at the roofline, "
                  f"{limit['users_at_engine_fraction']} at the engine's {engine_fraction:.2f} of it; "
                  f"{args.goal_users} users get {limit['per_user_tok_s_at_goal']:.1f} tok/s at the roofline "
                  f"(needs {limit['bandwidth_needed_for_goal_GBps']:.0f} GB/s for {args.floor:.0f})")
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

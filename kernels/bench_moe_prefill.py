"""The experts of a prefill chunk, end to end and part by part: the down projection as Baton's Triton grouped GEMM
(rows gathered through the pair ids) against torch's CUTLASS grouped GEMM (``torch._grouped_mm``, sm90) on
activations stored in sorted order, with cuBLAS's dense GEMM of the same total shape (all pairs against one
expert's weights) as the ceiling in the same run.

    python -m kernels.bench_moe_prefill --tokens 8192,32768,65536 --out moe_prefill.json

Each entry is captured in its own CUDA graph of two calls on two routings (the shared expert as expert E routed to
every token, as the engine runs it) and timed in alternation with the others:

* ``fused_triton_down`` / ``fused_grouped_mm_down``: ``fused_experts`` with each down path (the second is the
  default for bf16 prefill on sm90/sm100): alignment, gate/up, down, k-sum;
* ``align`` / ``align_blocked``: the torch alignment (with slots and group ends) / the blocked Triton one (the same
  result, checked here); ``sum_pairs`` / ``sum_slots``: the k-sum over rows in
  pair order / through the slots with the routing weights;
* ``triton_gate_up`` / ``triton_gate_up_sorted`` / ``triton_gate_up_sorted_tma``: the gate/up kernel storing in
  pair / sorted order with pointer loads of its weight tiles, and in sorted order through TMA (the default);
  ``triton_down`` / ``grouped_mm_down``: the two down GEMMs alone;
* ``grouped_mm_gate_up``: ``torch._grouped_mm`` of the expert-sorted input rows (gathered beforehand) with the
  gate/up stacks, and ``gather`` / ``swiglu``: the gather of those rows and the SwiGLU it would need after (why
  gate/up stays a Triton kernel);
* ``dense_gate_up`` / ``dense_down``: ``torch.mm`` of all pairs' rows with one expert's weights.

Writes JSON (microseconds and TFLOP/s per entry) and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from kernels.bench_fused import MODELS
from kernels.bench_util import alternating_graph_us, grouped_bar_chart
from kernels.triton import moe as moe_tk
from kernels.tune_moe import _routings, _weights_and_input

log = logging.getLogger("bench_moe_prefill")


# Gate/up tiles timed with their weights through TMA or pointers (``--sweep-tma``), around the prefill default
# (128 x 64 x 8 warps, 3 stages; pointer loads when these sweeps ran, TMA since). A first sweep
# (moe_prefill_tma_h200.json) found K steps of 32 with 5 stages best by 8-14%, which a second did not repeat
# (moe_prefill_tma2_h200.json); K 128 and 64-column tiles were 20-60% slower in both.
_TMA_TILES = [moe_tk.GemmTile(n, k, num_warps=w, num_stages=st, group_m=8, tma=tma)
              for n, k, w, st, tma in ((128, 64, 8, 4, True), (128, 32, 8, 4, True), (128, 32, 8, 5, True),
                                       (128, 32, 8, 6, True), (128, 32, 4, 5, True), (64, 32, 4, 6, True),
                                       (128, 32, 8, 5, False), (128, 32, 8, 6, False))]


def bench(model: str, tokens: int, seed: int, sweep_tma: bool = False) -> dict:
    s = MODELS[model]
    num_experts = s.experts + 1
    top_k = s.top_k + 1
    inter, hidden = s.moe_inter, s.hidden
    w13, w2, x = _weights_and_input(s, num_experts, tokens, seed)
    routings = _routings(tokens, s.experts, s.top_k, 2, seed)
    cfg = moe_tk.default_moe_config(tokens, top_k, num_experts)
    pairs = tokens * top_k

    # Gate/up with pointer loads of its weight tiles and with TMA (the default), whatever the default is.
    ptr_cfg = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, tma=False))
    tma_cfg = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, tma=True))
    triton_down = dataclasses.replace(cfg, down_grouped_mm=False)
    grouped_down = dataclasses.replace(cfg, down_grouped_mm=True)
    max_padded, max_blocks = moe_tk._padded_sizes(pairs, num_experts, cfg.block_m)
    aligned, gathered = [], []
    for ids, _ in routings:
        aligned.append(moe_tk._moe_align_torch(ids.flatten(), cfg.block_m, num_experts, max_padded, max_blocks))
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
        gathered.append((x.index_select(0, order // top_k), order // top_k, ends))
    act = torch.randn(pairs, inter, device="cuda", dtype=x.dtype)
    act_sorted = torch.randn(max_padded, inter, device="cuda", dtype=x.dtype)
    y = torch.randn(max_padded, hidden, device="cuda", dtype=x.dtype)
    h = torch.randn(pairs, 2 * inter, device="cuda", dtype=x.dtype)
    out = torch.empty(tokens, hidden, device="cuda", dtype=x.dtype)
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, K, N] views, N-major: no copies

    # The same math both ways, on the GPU's own numerics.
    ids, weights = routings[0]
    torch.testing.assert_close(moe_tk.fused_experts(x, w13, w2, weights, ids, config=grouped_down),
                               moe_tk.fused_experts(x, w13, w2, weights, ids, config=triton_down),
                               rtol=2e-2, atol=2e-2)

    blocked = moe_tk._moe_align_blocked(ids.flatten(), cfg.block_m, num_experts, max_padded, max_blocks)
    assert all(torch.equal(a, b) for a, b in zip(blocked, aligned[0], strict=True)), "blocked alignment differs"

    def twice(fn):
        return lambda: [fn(i) for i in range(2)]

    def k_sum(i, slots):
        block_h = 1024
        moe_tk._moe_sum_kernel[(tokens, hidden // block_h)](
            y, out, y if slots is None else slots, routings[i][1], hidden, TOP_K=top_k, BLOCK_H=block_h,
            SLOTS=slots is not None, num_warps=4)

    parts = {
        "fused_triton_down": twice(lambda i: moe_tk.fused_experts(x, w13, w2, routings[i][1], routings[i][0],
                                                                  config=triton_down)),
        "fused_grouped_mm_down": twice(lambda i: moe_tk.fused_experts(x, w13, w2, routings[i][1], routings[i][0],
                                                                      config=grouped_down)),
        "align": twice(lambda i: moe_tk._moe_align_torch(routings[i][0].flatten(), cfg.block_m, num_experts,
                                                         max_padded, max_blocks)),
        "align_blocked": twice(lambda i: moe_tk._moe_align_blocked(routings[i][0].flatten(), cfg.block_m, num_experts,
                                                                   max_padded, max_blocks)),
        "sum_pairs": twice(lambda i: k_sum(i, None)),
        "sum_slots": twice(lambda i: k_sum(i, aligned[i][4])),
        "triton_gate_up": twice(lambda i: moe_tk._grouped_gate_up(x, w13, *aligned[i][:3], ptr_cfg, top_k)),
        "triton_gate_up_sorted": twice(lambda i: moe_tk._grouped_gate_up(x, w13, *aligned[i][:3], ptr_cfg, top_k,
                                                                         sorted_out=True)),
        "triton_gate_up_sorted_tma": twice(lambda i: moe_tk._grouped_gate_up(x, w13, *aligned[i][:3], tma_cfg, top_k,
                                                                             sorted_out=True)),
        "triton_down": twice(lambda i: moe_tk._grouped_down(act, w2, routings[i][1], *aligned[i][:3], cfg)),
        "grouped_mm_down": twice(lambda i: torch._grouped_mm(act_sorted, w2_t, offs=aligned[i][3])),
        "grouped_mm_gate_up": twice(lambda i: torch._grouped_mm(gathered[i][0], w13_t, offs=gathered[i][2])),
        "gather": twice(lambda i: x.index_select(0, gathered[i][1])),
        "swiglu": twice(lambda i: F.silu(h[:, :inter]) * h[:, inter:]),
        "dense_gate_up": twice(lambda i: torch.mm(gathered[i][0], w13[i].t())),
        "dense_down": twice(lambda i: torch.mm(act, w2[i].t())),
    }
    if sweep_tma:
        for tile in _TMA_TILES:
            tiled = dataclasses.replace(cfg, gate_up=tile)
            try:  # compiles; a tile over the GPU's shared memory is left out
                moe_tk._grouped_gate_up(x, w13, *aligned[0][:3], tiled, top_k, sorted_out=True)
            except OutOfResources:
                log.info("gate/up tile %s does not fit", tile)
                continue
            kind = "tma" if tile.tma else "ptr"
            parts[f"gate_up_{kind}_n{tile.block_n}_k{tile.block_k}_w{tile.num_warps}_s{tile.num_stages}"] = twice(
                lambda i, c=tiled: moe_tk._grouped_gate_up(x, w13, *aligned[i][:3], c, top_k, sorted_out=True))
    us = {name: t / 2 for name, t in alternating_graph_us(parts, rounds=7, replays=3).items()}
    gate_up_flops, down_flops = 2 * pairs * hidden * 2 * inter, 2 * pairs * inter * hidden
    flops = {name: gate_up_flops for name in parts if name.startswith("gate_up_")}
    flops |= {"fused_triton_down": gate_up_flops + down_flops, "fused_grouped_mm_down": gate_up_flops + down_flops,
             "triton_gate_up_sorted_tma": gate_up_flops,
             "triton_gate_up": gate_up_flops, "triton_gate_up_sorted": gate_up_flops, "triton_down": down_flops,
             "grouped_mm_down": down_flops, "grouped_mm_gate_up": gate_up_flops, "dense_gate_up": gate_up_flops,
             "dense_down": down_flops}
    tflops = {name: flops[name] / us[name] / 1e6 for name in flops}
    for name in us:
        log.info("%s T=%d %-20s %9.1f us %s", model, tokens, name, us[name],
                 f"{tflops[name]:6.0f} TFLOP/s" if name in tflops else "")
    return {"model": model, "tokens": tokens, "pairs": pairs, "max_padded": max_padded, "config": str(cfg),
            "us": us, "TFLOPs": tflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="35b-a3b", choices=sorted(MODELS))
    parser.add_argument("--tokens", default="8192,32768,65536")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-tma", action="store_true", help="also time gate/up tiles with TMA weight loads")
    parser.add_argument("--out", type=Path, default=Path("moe_prefill.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"benchmark": "moe_prefill", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "runs": [bench(args.model, int(t), args.seed, args.sweep_tma) for t in args.tokens.split(",")]}
    args.out.write_text(json.dumps(results, indent=2))
    names = ["fused_triton_down", "fused_grouped_mm_down", "triton_gate_up", "triton_gate_up_sorted_tma",
             "grouped_mm_gate_up", "dense_gate_up",
             "triton_down", "grouped_mm_down", "dense_down"]
    grouped_bar_chart(args.out.with_suffix(".png"), [f"T={r['tokens']}" for r in results["runs"]],
                      [(n, [r["TFLOPs"][n] for r in results["runs"]]) for n in names], xlabel="tokens in the chunk",
                      ylabel="TFLOP/s", title=f"MoE prefill GEMMs, {args.model} ({results['gpu']})")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

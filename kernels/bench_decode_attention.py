"""Paged decode attention at Qwen3.5-35B-A3B's shape (16 query heads, 2 KV heads, head_dim 256, pages of 16):
the Triton split-KV kernel (``kernels.triton.decode_attention``) against flashinfer's decode as the engine runs it
(``FlashInferAttention`` in CUDA-graph mode: tensor-core decode plus its merge), and against the KV bytes at the
copy bandwidth measured in the same run.

    python -m kernels.bench_decode_attention --cases 1x1024,1x4096,1x32768,1x131072,8x4096,8x32768 --out out.json

Each timing replays a CUDA graph of the 10 attention layers of a decode step, each layer over its own KV pool
(so no layer finds its pages in L2), and reports microseconds per layer; the Triton kernel runs at a few
shapes (most splits x fewest pages per split, pages prefetched ahead), each checked against flashinfer's output
first. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from kernels.bench_util import graph_replay_us, grouped_bar_chart, measure_copy_bandwidth
from kernels.flashinfer_attention import FlashInferAttention
from kernels.rope import rope_cos_sin_cache
from kernels.triton.decode_attention import (
    DecodeAttentionScratch,
    DecodeShape,
    FusedInputs,
    decode_attention,
    decode_attention_fused,
)
from kernels.triton.qk_norm_rope import qk_norm_rope

log = logging.getLogger("bench_decode_attention")

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 16, 2, 256, 16, 10
# (max_splits, min_pages, tile_pages, prefetch_pages, num_warps, num_stages): the page loop as a while loop with
# L2 prefetches (stages 0), or software-pipelined (Triton gives the gathers stages - 3 buffers: the page ids take
# a stage of their own).
SPLITS = [(16, 4, 4, 0, 8, 0), (16, 4, 4, 4, 8, 0), (32, 4, 4, 4, 8, 0), (32, 4, 4, 0, 8, 5), (64, 8, 4, 0, 8, 5),
          (64, 16, 4, 0, 8, 5), (128, 8, 4, 0, 8, 5), (128, 16, 2, 0, 8, 6)]


def bench_case(batch: int, context: int, bandwidth: float, splits: list[tuple] = SPLITS) -> dict:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(batch * context)
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq
    pools = [torch.randn(num_pages, 2, PAGE, KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
             for _ in range(LAYERS)]
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
    order = torch.randperm(num_pages, device="cpu").to(torch.int32)
    tables = [order[i * pages_per_seq:(i + 1) * pages_per_seq] for i in range(batch)]
    kv_lens = [context] * batch
    scale = HEAD_DIM**-0.5
    fi = FlashInferAttention(HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16, device, graph_batch_size=batch,
                             graph_max_pages=num_pages)
    fi.plan_graph_decode(kv_lens, tables, scale)
    indptr = torch.tensor([0] + [pages_per_seq] * batch, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    indices = torch.cat(tables).to(device)
    last = torch.tensor([(n - 1) % PAGE + 1 for n in kv_lens], dtype=torch.int32, device=device)
    want = fi.run(q, pools[0])
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    case = {"batch": batch, "context": context, "kv_bytes_per_layer": kv_bytes,
            "copy_us": kv_bytes / bandwidth * 1e6,  # as bench_decode_floor counts a kernel's bytes
            "flashinfer_us": graph_replay_us(lambda: [fi.run(q, pool) for pool in pools], LAYERS, replays=3,
                                             samples=7),
            "triton": []}
    case["block"] = bench_block(batch, context, pools, tables, indptr, indices, last, fi, scale)
    for max_splits, min_pages, tile, prefetch, warps, stages in splits:
        scratch = DecodeAttentionScratch.new(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, max_splits, device)
        shape = dict(min_pages=min_pages, tile_pages=tile, prefetch_pages=prefetch, num_warps=warps,
                     num_stages=stages)

        def run(pool, scratch=scratch, shape=shape):
            return decode_attention(q, pool, indptr, indices, last, scale, scratch, **shape)

        err = ((run(pools[0]).float() - want.float()).norm() / want.float().norm()).item()
        if err > 2e-2:
            raise RuntimeError(f"Triton decode attention differs from flashinfer: relative error {err:.3g}")
        us = graph_replay_us(lambda run=run: [run(pool) for pool in pools], LAYERS, replays=3, samples=7)
        case["triton"].append({"max_splits": max_splits, **shape, "us": us, "rel_err": err})
    if case["triton"]:
        best = min(case["triton"], key=lambda t: t["us"])
        case["triton_best_us"], case["triton_best"] = best["us"], _label(best)
    pools.clear()
    torch.cuda.empty_cache()
    return case


# The fused kernel's shapes: (max_splits, DecodeShape); the first won at 1K-4K and the second was at parity from 32K
# (attention alone, run 12), the second is the engine's (kernels/triton_attention.py). The last two are candidates
# for it: the pipelined loop with 4-page splits (at 1K, 16 splits of one tile: 9.0 us against 10.0 at 32 x 4
# pipelined in run 12) and the same with the first pages asked of L2 before the PDL wait.
FUSED_SHAPES = [(16, DecodeShape(min_pages=4, tile_pages=4, prefetch_pages=4)),
                (64, DecodeShape(min_pages=8, tile_pages=4, prefetch_pages=0, num_stages=5)),
                (64, DecodeShape(min_pages=4, tile_pages=4, prefetch_pages=0, num_stages=5)),
                (64, DecodeShape(min_pages=4, tile_pages=4, prefetch_pages=4, num_stages=5))]
ROTARY_DIM = 64  # 35B-A3B: a quarter of each head rotates


def bench_block(batch: int, context: int, pools: list[torch.Tensor], tables: list[torch.Tensor],
                indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor, fi: FlashInferAttention,
                scale: float) -> dict:
    """The attention layer's block between its two projections as the engine runs it -- the QK-norm/RoPE
    kernel storing the new K/V, flashinfer's decode + merge, the output gate's multiply -- against the fused
    kernel doing all of it (``decode_attention_fused``), 10 layers in a graph; the fused output checked against
    the engine's first."""
    device = pools[0].device
    gen = torch.Generator(device=device).manual_seed(context + batch)
    qkv = torch.randn(batch, (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen, device=device,
                      dtype=torch.bfloat16)
    q_w, k_w = (0.1 * torch.randn(HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    cos_sin = rope_cos_sin_cache(ROTARY_DIM, context + 1, 1e7, device)
    positions = torch.full((batch,), context - 1, dtype=torch.long, device=device)
    slots = torch.stack([t[(context - 1) // PAGE].long() * PAGE + (context - 1) % PAGE for t in tables]).to(device)

    def engine_block(pool):
        q, _, _, gate = qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, HEADS, KV_HEADS, HEAD_DIM, 1e-6,
                                     kv_cache=pool, kv_slot_ids=slots)
        return fi.run(q, pool) * gate.view(batch, HEADS, HEAD_DIM)

    want = engine_block(pools[0])
    block = {"engine_us": graph_replay_us(lambda: [engine_block(pool) for pool in pools], LAYERS, replays=3,
                                          samples=7), "fused": []}
    inputs = FusedInputs(qkv, q_w, k_w, cos_sin, positions, slots, 1e-6)
    for max_splits, shape in FUSED_SHAPES:
        scratch = DecodeAttentionScratch.new(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, max_splits, device)

        def fused(pool, scratch=scratch, shape=shape):
            return decode_attention_fused(inputs, HEADS, pool, indptr, indices, last, scale, scratch, shape=shape)

        err = ((fused(pools[0]).float() - want.float()).norm() / want.float().norm()).item()
        if err > 2e-2:
            raise RuntimeError(f"the fused decode attention differs from the engine's block: relative error {err:.3g}")
        us = graph_replay_us(lambda fused=fused: [fused(pool) for pool in pools], LAYERS, replays=3, samples=7)
        block["fused"].append({"max_splits": max_splits, **dataclasses.asdict(shape), "us": us, "rel_err": err})
    return block


def _label(t: dict) -> str:
    return (f"{t['max_splits']}x{t['min_pages']}t{t['tile_pages']}p{t['prefetch_pages']}w{t['num_warps']}"
            f"s{t.get('num_stages', 0)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1x1024,1x4096,1x32768,1x131072,8x4096,8x32768")
    parser.add_argument("--out", type=Path, default=Path("decode_attention.json"))
    parser.add_argument("--no-splits", action="store_true", help="only the layer block: engine against fused")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bandwidth = measure_copy_bandwidth(torch.device("cuda"))
    results = {"benchmark": "paged decode attention, 35B-A3B shape", "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9, "cases": []}
    for spec in args.cases.split(","):
        batch, context = (int(v) for v in spec.split("x"))
        case = bench_case(batch, context, bandwidth, [] if args.no_splits else SPLITS)
        results["cases"].append(case)
        block = case["block"]
        fused = ", ".join(f"{_label(t)} {t['us']:.1f}" for t in block["fused"])
        print(f"B={batch} ctx={context}: layer block (QK-norm/RoPE + attention + gate) engine "
              f"{block['engine_us']:.1f} us/layer, fused {fused}", flush=True)
        if case["triton"]:
            splits = ", ".join(f"{_label(t)} {t['us']:.1f}" for t in case["triton"])
            speedup = case["flashinfer_us"] / case["triton_best_us"]
            print(f"  attention alone: flashinfer {case['flashinfer_us']:.1f} us/layer, Triton best "
                  f"{case['triton_best_us']:.1f} ({case['triton_best']}) -> {speedup:.2f}x; KV at copy rate "
                  f"{case['copy_us']:.1f}; splits: {splits}", flush=True)
        args.out.write_text(json.dumps(results, indent=2))  # after each case: a cut-short run keeps what it had
    cases = results["cases"]
    series = [("engine block: QK-norm/RoPE + flashinfer + gate", [c["copy_us"] / c["block"]["engine_us"]
                                                                   for c in cases]),
              ("fused Triton block, best shape", [c["copy_us"] / min(t["us"] for t in c["block"]["fused"])
                                                  for c in cases])]
    if all(c["triton"] for c in cases):
        series += [("flashinfer decode + merge", [c["copy_us"] / c["flashinfer_us"] for c in cases]),
                   ("Triton split-KV, best split", [c["copy_us"] / c["triton_best_us"] for c in cases])]
    grouped_bar_chart(
        args.out.with_suffix(".png"), [f"B={c['batch']} {c['context'] // 1024}K" for c in cases], series,
        xlabel="batch x context", ylabel="fraction of the KV read at copy bandwidth",
        title=f"decode attention, 10 layers in a CUDA graph, on {results['gpu']}",
    )


if __name__ == "__main__":
    main()

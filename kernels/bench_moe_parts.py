"""The batched-decode MoE layer's small parts at 35B-A3B shapes (256 experts + the shared one as expert 256, top-8):
the router GEMM and the pair alignment, each in the variants the code chooses between, and the whole expert
computation for scale.

    python -m kernels.bench_moe_parts --tokens 8,64,128,256 --out moe_parts.json

Each callable runs 40 times with 40 different inputs (a decode step's 40 MoE layers) inside one CUDA graph; the
graphs are replayed in alternation (``bench_util.alternating_graph_us``) and reported per layer in microseconds.
Router GEMM: ``F.linear`` writing a 257-wide output (what ``route_topk`` does; cuBLAS runs an align-1 sm75 kernel
for it) against ``torch.mm`` into rows padded to 8 elements (tried and measured no faster: cuBLAS keeps its kernel).
Alignment of the T x 9 (token, expert) pairs: the one-program bitonic sort, the
many-program ranking, and the torch ops, each checked equal to the torch result first. Experts: ``fused_experts``
on those routings (gate/up, down, sum and the alignment).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.bench_util import alternating_graph_us
from kernels.triton import moe as moe_tk

log = logging.getLogger("bench_moe_parts")

HIDDEN, INTER, EXPERTS, TOP_K, LAYERS = 2048, 512, 256, 8, 40


def routings(tokens: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Top-8 of 256 random experts per token plus the shared expert (id 256) as a ninth column."""
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    shared = torch.full((tokens, 1), EXPERTS, dtype=ids.dtype)
    return torch.cat([ids, shared], dim=1).to(torch.int32).to(device)


def bench_tokens(tokens: int, device: torch.device, experts_weights: tuple[torch.Tensor, torch.Tensor]) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    x = [torch.randn(tokens, HIDDEN, generator=gen).to(device, torch.bfloat16) for _ in range(LAYERS)]
    router = [torch.randn(EXPERTS + 1, HIDDEN, generator=gen).to(device, torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    padded = torch.empty(tokens, 264, dtype=torch.bfloat16, device=device)[:, :EXPERTS + 1]
    ids = [routings(tokens, gen, device) for _ in range(LAYERS)]
    weights = [torch.rand(tokens, TOP_K + 1, generator=gen).to(device) for _ in range(LAYERS)]
    w13, w2 = experts_weights
    cfg = moe_tk.default_moe_config(tokens, TOP_K + 1, EXPERTS + 1)

    # Correctness first: the padded GEMM equals F.linear; both Triton alignments equal the torch one.
    torch.mm(x[0], router[0].t(), out=padded)
    gemm_err = (padded.float() - F.linear(x[0], router[0]).float()).abs().max().item()
    max_padded, max_blocks = moe_tk._padded_sizes(ids[0].numel(), EXPERTS + 1, cfg.block_m)
    want = moe_tk._moe_align_torch(ids[0].flatten(), cfg.block_m, EXPERTS + 1, max_padded, max_blocks)
    total = int(want[2].item())
    align_equal = {}
    for name, parallel in (("one_program", False), ("parallel", True)):
        got = moe_tk.moe_align_block_size(ids[0], cfg.block_m, EXPERTS + 1, parallel=parallel)
        align_equal[name] = bool(torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
                                 and torch.equal(got[1][: total // cfg.block_m], want[1][: total // cfg.block_m]))

    def layers(fn):
        return lambda: [fn(i) for i in range(LAYERS)]

    calls = {
        "router_gemm_unpadded": layers(lambda i: F.linear(x[i], router[i])),
        "router_gemm_padded": layers(lambda i: torch.mm(x[i], router[i].t(), out=padded)),
        "align_one_program": layers(lambda i: moe_tk.moe_align_block_size(ids[i], cfg.block_m, EXPERTS + 1,
                                                                          parallel=False)),
        "align_parallel": layers(lambda i: moe_tk.moe_align_block_size(ids[i], cfg.block_m, EXPERTS + 1,
                                                                       parallel=True)),
        "align_torch": layers(lambda i: moe_tk._moe_align_torch(ids[i].flatten(), cfg.block_m, EXPERTS + 1,
                                                                max_padded, max_blocks)),
        "experts": layers(lambda i: moe_tk.fused_experts(x[i], w13, w2, weights[i], ids[i], shared_last=True)),
    }
    us = alternating_graph_us(calls, rounds=7, replays=3)
    return {"tokens": tokens, "pairs": tokens * (TOP_K + 1), "block_m": cfg.block_m,
            "router_gemm_max_abs_err": gemm_err, "align_equal_to_torch": align_equal,
            "us_per_layer": {k: v / LAYERS for k, v in us.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="8,64,128,256")
    parser.add_argument("--out", default="moe_parts.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    # One layer's expert stacks (1.6 GB): the 40 calls share them, so the experts' times include L2 reuse across
    # calls; they are there for scale, not as a roofline figure.
    w13 = torch.randn(EXPERTS + 1, 2 * INTER, HIDDEN, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(EXPERTS + 1, HIDDEN, INTER, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
    results = {"benchmark": "batched-decode MoE parts, 35B-A3B shapes", "gpu": torch.cuda.get_device_name(device),
               "torch": torch.__version__, "runs": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        run = bench_tokens(tokens, device, (w13, w2))
        results["runs"].append(run)
        print(f"tokens {tokens} (block_m {run['block_m']}, gemm err {run['router_gemm_max_abs_err']:.2e}, align equal "
              f"{run['align_equal_to_torch']}): " + ", ".join(f"{k} {v:.2f}" for k, v in run["us_per_layer"].items()))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The one-launch MoE block of one decode token (kernels/triton/moe_decode.py) against the three-kernel path
it replaces (norm_route_topk + the matrix-vector fused_experts) and the torch reference.

On CPU the kernel runs under Triton's interpreter as three launches of its phases (a grid barrier cannot
run there: programs run one after another); on a GPU both the one-launch form (grid barriers) and the phased
form are checked, the one-launch form also inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from kernels import norm as norm_ref
from kernels.triton import moe as moe_tk
from kernels.triton.moe_decode import MoeDecodeConfig, norm_moe_decode
from services.engine.ops import norm_moe_with_shared_expert_torch
from tests.kernels.test_norm_rope_moe_kernels import DEVICE, EPS, _close, _gen, _randn, poisoned_outputs

# (hidden, inter, experts, top_k, gate/up and down tile columns, residual, shared expert in phase 1): odd
# sizes with narrow tiles (partial tiles, several items per program), and the Qwen3.5-35B-A3B
# hidden/intermediate sizes (expert count cut down) with wide tiles, whose cost under the interpreter is per item.
CASES = [
    (torch.float32, 72, 40, 13, 3, 4, 8, True, True),
    (torch.float32, 72, 40, 13, 3, 4, 8, False, False),
    (torch.bfloat16, 72, 40, 13, 3, 4, 8, True, False),
    (torch.bfloat16, 72, 40, 13, 3, 4, 8, False, True),
    (torch.bfloat16, 2048, 512, 24, 8, 64, 256, True, True),
]


def make_inputs(dtype, hidden, inter, experts, with_residual, seed):
    gen = _gen(seed)
    x = _randn(1, hidden, gen=gen, dtype=dtype)
    residual = _randn(1, hidden, gen=gen, dtype=dtype) if with_residual else None
    norm_weight = _randn(hidden, gen=gen, dtype=dtype, scale=0.1)
    router = _randn(experts + 1, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)  # last row: shared gate
    w13 = _randn(experts + 1, 2 * inter, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    w2 = _randn(experts + 1, hidden, inter, gen=gen, dtype=dtype, scale=inter**-0.5)
    return x, residual, norm_weight, router, w13, w2


@pytest.mark.parametrize("dtype,hidden,inter,experts,top_k,gate_up_n,down_n,with_residual,shared_first", CASES)
def test_norm_moe_decode_matches_three_kernel_path(dtype, hidden, inter, experts, top_k, gate_up_n, down_n,
                                                   with_residual, shared_first):
    x, residual, norm_weight, router, w13, w2 = make_inputs(dtype, hidden, inter, experts, with_residual,
                                                            hidden + experts + int(with_residual))
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    config = MoeDecodeConfig(gate_up_n=gate_up_n, down_n=down_n, shared_first=shared_first)
    with poisoned_outputs():
        out, new_res, weights, ids = norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2, top_k, True,
                                                     sync, config=config)
        ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        ref_w, ref_ids, _, h, ref_res = moe_tk.norm_route_topk(x, residual, norm_weight, EPS, router, top_k, True,
                                                               ticket)
        ref_out = moe_tk.fused_experts(h, w13, w2, ref_w, ref_ids)
    # The same roundings at the same steps as the three kernels: equal up to the dots' summation order.
    assert torch.equal(new_res, ref_res)
    assert torch.equal(ids, ref_ids) and ids[0, -1] == experts
    _close(weights, ref_w, torch.float32)
    _close(out, ref_out, dtype)
    torch_out, torch_res = norm_moe_with_shared_expert_torch(x, residual, norm_weight, EPS, router, w13, w2, top_k,
                                                             True)
    assert torch.equal(new_res, torch_res)
    _close(out, torch_out, dtype)


def test_norm_moe_decode_sigmoid_scoring_without_renormalisation():
    dtype, hidden, inter, experts, top_k = torch.float32, 64, 32, 16, 4
    x, residual, norm_weight, router, w13, w2 = make_inputs(dtype, hidden, inter, experts, True, 7)
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with poisoned_outputs():
        out, _, weights, ids = norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2, top_k, False, sync,
                                               scoring="sigmoid")
    h, _ = norm_ref.gemma_rms_norm_residual(x, residual, norm_weight, EPS)
    ref_w, ref_ids, _ = moe_tk.route_topk(h, router, None, top_k, False, fused_shared_gate=True,
                                          shared_as_expert=True, scoring="sigmoid")
    assert torch.equal(ids, ref_ids)
    _close(weights, ref_w, dtype)
    _close(out, moe_tk.fused_experts(h, w13, w2, ref_w, ref_ids), dtype)


def test_norm_moe_decode_argument_checks():
    x, residual, norm_weight, router, w13, w2 = make_inputs(torch.float32, 64, 32, 8, True, 1)
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous token"):
        norm_moe_decode(x.repeat(2, 1), None, norm_weight, EPS, router, w13, w2, 2, True, sync)
    with pytest.raises(ValueError, match="w2 must be"):
        norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2[:, :, :16], 2, True, sync)
    with pytest.raises(ValueError, match="top_k"):
        norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2, 9, True, sync)
    with pytest.raises(ValueError, match="sync"):
        norm_moe_decode(x, residual, norm_weight, EPS, router, w13, w2, 2, True, sync[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid barrier needs a GPU (programs run at once)")
@pytest.mark.timeout(120, method="thread")  # a broken barrier hangs the GPU: end the run instead of waiting
@pytest.mark.parametrize("hidden,inter,experts,top_k", [(2048, 512, 256, 8), (4096, 1024, 512, 10)])
def test_norm_moe_decode_one_launch_on_gpu(hidden, inter, experts, top_k):
    """The one-launch form (two grid barriers) equals the phased form bit for bit, over repeated calls (the
    barrier words return to rest), eagerly and replayed in a CUDA graph; the arrival counter ends at 0."""
    dtype = torch.bfloat16
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for seed in range(3):
        x, residual, norm_weight, router, w13, w2 = make_inputs(dtype, hidden, inter, experts, True, seed)
        args = (x, residual, norm_weight, EPS, router, w13, w2, top_k, True, sync)
        phased = norm_moe_decode(*args, one_launch=False)
        for config in (MoeDecodeConfig(), MoeDecodeConfig(shared_first=False)):
            fused = norm_moe_decode(*args, one_launch=True, config=config)
            for a, b in zip(fused, phased, strict=True):
                assert torch.equal(a, b)
            assert int(sync[0]) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = norm_moe_decode(*args, one_launch=True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, phased, strict=True))
    assert int(sync[0]) == 0
    _close(phased[0], norm_moe_with_shared_expert_torch(x, residual, norm_weight, EPS, router, w13, w2, top_k,
                                                        True)[0], dtype)


def test_moe_decode_config_keeps_every_program_resident():
    MoeDecodeConfig(programs_per_sm=2, num_warps=4)
    MoeDecodeConfig(programs_per_sm=1, num_warps=8)
    with pytest.raises(ValueError, match="all programs resident"):
        MoeDecodeConfig(programs_per_sm=4, num_warps=4)
    with pytest.raises(ValueError, match="power of two"):
        MoeDecodeConfig(gate_up_n=3)

"""The GDN mixer of one decode token in one launch (kernels/triton/gdn_out_decode.py) against the two kernels it
replaces (gdn_decode, then gemv.gated_norm_linear) and the torch references.

On CPU the kernel runs under Triton's interpreter as two launches of its phases (a grid barrier cannot run
there); on a GPU the one-launch form is checked against the phased one, also inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from kernels import gdn as gdn_ref
from kernels import norm as norm_ref
from kernels.triton.gdn_decode import gdn_decode
from kernels.triton.gdn_out_decode import GdnOutDecodeConfig, gdn_out_decode
from kernels.triton.gemv import gated_norm_linear
from tests.kernels.test_gdn_kernels import (
    DEVICE,
    LAYER,
    TOL,
    assert_only_slots_changed,
    decode_inputs,
    gating,
    rel_err,
)
from tests.kernels.test_norm_rope_moe_kernels import poisoned_outputs

EPS = 1e-6


def mixer_inputs(hk, hv, dk, dv, hidden, dtype, seed):
    """One token's q, k, v, a, b (strided slices, as the model's in_proj split), the layer's parameters, a pool
    with spare slots and the request's slot, z, the norm weight and out_proj."""
    q, k, v, a, b, A_log, dt_bias, pool, slots = decode_inputs(1, 1, hk, hv, dk, dv, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(1, hv, dv + 1, generator=gen).to(DEVICE, dtype)[..., 1:]  # head stride dv + 1
    norm_weight = (1 + 0.1 * torch.randn(dv, generator=gen)).to(DEVICE, dtype)
    out_proj = (torch.randn(hidden, hv * dv, generator=gen) * (hv * dv) ** -0.5).to(DEVICE, dtype)
    return q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], A_log, dt_bias, pool, slots.to(DEVICE), z, norm_weight, \
        out_proj


@pytest.mark.parametrize("dtype,hk,hv,dk,dv,hidden,block_v,block_n", [
    (torch.float32, 2, 6, 32, 48, 40, 0, 0),  # odd head count, non-power-of-2 Dv: masked V-blocks and tiles
    (torch.float32, 1, 3, 16, 40, 24, 16, 8),  # narrow tiles: several items and tiles per program
    (torch.bfloat16, 2, 4, 64, 32, 72, 32, 0),
])
def test_gdn_out_decode_matches_two_kernels_and_reference(dtype, hk, hv, dk, dv, hidden, block_v, block_n):
    q, k, v, a, b, A_log, dt_bias, pool, slots, z, norm_weight, out_proj = mixer_inputs(
        hk, hv, dk, dv, hidden, dtype, hv * 10 + dv)
    before = pool.clone()
    two_kernel_pool = pool.clone()
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    config = GdnOutDecodeConfig(block_v=block_v, block_n=block_n)
    with poisoned_outputs():
        y = gdn_out_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, z, norm_weight, EPS, out_proj,
                           sync, config=config)
        core = gdn_decode(q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias,
                          two_kernel_pool[:, LAYER], slots, block_v=block_v or None)[:, 0]
        want = gated_norm_linear(core, z, norm_weight, EPS, out_proj)
    # The two kernels' code: the same state (the same value blocks), and the same output up to the order in
    # which the GPU sums an out_proj row (its tile is narrower here).
    assert torch.equal(pool, two_kernel_pool)
    assert rel_err(y, want) < TOL[dtype]
    assert_only_slots_changed(pool, before, slots.tolist())

    g, beta = gating(a[:, None], b[:, None], A_log, dt_bias)
    ref_core, ref_state = gdn_ref.recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g, beta,
                                                             before[slots, LAYER])
    ref = torch.nn.functional.linear(
        norm_ref.gated_rms_norm(ref_core[:, 0].to(dtype), z, norm_weight, EPS).flatten(1), out_proj)
    assert rel_err(pool[slots, LAYER], ref_state) < TOL[dtype]
    assert rel_err(y, ref) < TOL[dtype]


def test_gdn_out_decode_argument_checks():
    q, k, v, a, b, A_log, dt_bias, pool, slots, z, norm_weight, out_proj = mixer_inputs(
        1, 2, 16, 16, 8, torch.float32, 3)
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    states = pool[:, LAYER]
    with pytest.raises(ValueError, match="one token"):
        gdn_out_decode(q.repeat(2, 1, 1), k, v, a, b, A_log, dt_bias, states, slots, z, norm_weight, EPS,
                       out_proj, sync)
    with pytest.raises(ValueError, match="out_proj must be"):
        gdn_out_decode(q, k, v, a, b, A_log, dt_bias, states, slots, z, norm_weight, EPS, out_proj[:, :8], sync)
    with pytest.raises(ValueError, match="state_slot"):
        gdn_out_decode(q, k, v, a, b, A_log, dt_bias, states, slots.repeat(2), z, norm_weight, EPS, out_proj,
                       sync)
    with pytest.raises(ValueError, match="sync"):
        gdn_out_decode(q, k, v, a, b, A_log, dt_bias, states, slots, z, norm_weight, EPS, out_proj, sync[:1])
    with pytest.raises(ValueError, match="all programs resident"):
        GdnOutDecodeConfig(programs_per_sm=4, num_warps=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid barrier needs a GPU (programs run at once)")
@pytest.mark.timeout(120, method="thread")  # a broken barrier hangs the GPU: end the run instead of waiting
@pytest.mark.parametrize("hk,hv,dk,dv,hidden", [(16, 32, 128, 128, 2048), (16, 64, 128, 128, 4096)])
def test_gdn_out_decode_one_launch_on_gpu(hk, hv, dk, dv, hidden):
    """Qwen3.5-35B-A3B and 397B mixer shapes: the one-launch form (a grid barrier) equals the phased form bit
    for bit over repeated calls (the barrier words return to rest), eagerly and replayed in a CUDA graph."""
    dtype = torch.bfloat16
    sync = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    q, k, v, a, b, A_log, dt_bias, pool, slots, z, norm_weight, out_proj = mixer_inputs(
        hk, hv, dk, dv, hidden, dtype, 5)
    states = pool[:, LAYER]
    phased_pool, fused_pool = pool.clone(), pool.clone()
    for _ in range(3):  # three steps: each reads the state the last one wrote
        phased = gdn_out_decode(q, k, v, a, b, A_log, dt_bias, phased_pool[:, LAYER], slots, z, norm_weight, EPS,
                                out_proj, sync, one_launch=False)
        fused = gdn_out_decode(q, k, v, a, b, A_log, dt_bias, fused_pool[:, LAYER], slots, z, norm_weight, EPS,
                               out_proj, sync, one_launch=True)
        assert torch.equal(fused, phased) and torch.equal(fused_pool, phased_pool)
        assert int(sync[0]) == 0
    graph = torch.cuda.CUDAGraph()
    graph_pool = pool.clone()
    states = graph_pool[:, LAYER]
    with torch.cuda.graph(graph):
        captured = gdn_out_decode(q, k, v, a, b, A_log, dt_bias, states, slots, z, norm_weight, EPS, out_proj,
                                  sync, one_launch=True)
    graph_pool.copy_(pool)  # capture does not run the kernel, but start the replays from the same state anyway
    for step in range(3):
        graph.replay()
        expected = gdn_out_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, z, norm_weight, EPS,
                                  out_proj, sync, one_launch=False)
        torch.cuda.synchronize()
        assert torch.equal(captured, expected) and torch.equal(graph_pool, pool), f"replay {step}"
    assert int(sync[0]) == 0

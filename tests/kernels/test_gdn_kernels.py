"""Triton GDN kernels (decode, chunked varlen prefill, causal conv1d) against the plain-torch references.

On CPU these run under Triton's interpreter (tests/kernels/conftest.py), so shapes stay small; the same
tests run the compiled kernels on a GPU. Every test uses fresh random inputs, poisons outputs and target
state slots with NaN so unwritten elements show up, and checks that states change only in the requested
slots of the requested layer.

Tolerances (relative Frobenius error): fp32 inputs 1e-4 (the kernels use ieee fp32 dots for fp32 inputs),
bf16 inputs 1e-2 (16-bit tensor-core operands with fp32 accumulation).
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F
from triton import next_power_of_2 as triton_next_power_of_2

from kernels import conv1d as conv_ref
from kernels import gdn as gdn_ref
from kernels import norm as norm_ref
from kernels.triton import norm as norm_tk
from kernels.triton.conv1d import conv1d_prefill, conv1d_update
from kernels.triton.gdn_chunk import CHUNK, _plan_chunks, gdn_prefill
from kernels.triton.gdn_decode import commit_step_states, gdn_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NUM_LAYERS = 3  # the pool holds several layers; the kernels get the strided view of one
LAYER = 1


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_numpy_blas():
    """Under the interpreter each tl.dot is a small numpy matmul; multi-threaded OpenBLAS sharing a couple of
    cores with torch's thread pool can spin ~20 ms per such call instead of ~20 us. Use one BLAS thread."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    setter = getter = None
    try:  # numpy's bundled OpenBLAS, found among the loaded libraries (Linux)
        with open("/proc/self/maps") as maps:
            libs = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
        for path in libs:
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
                if hasattr(lib, f"{prefix}set_num_threads{suffix}"):
                    setter = getattr(lib, f"{prefix}set_num_threads{suffix}")
                    getter = getattr(lib, f"{prefix}get_num_threads{suffix}")
                    break
    except OSError:
        setter = None
    if setter is None:
        yield
        return
    previous = getter()
    setter(1)
    yield
    setter(previous)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output or poisoned state read)"
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """g (log-decay) and beta exactly as services/engine/model.py computes them."""
    beta = b.sigmoid()
    g = -A_log.exp() * F.softplus(a.float() + dt_bias)
    return g, beta


def gdn_params(num_v_heads: int, gen: torch.Generator):
    # exp(A_log) in [e^-4, 1]: some heads keep their state over many chunks, some forget within a few tokens
    A_log = (torch.rand(num_v_heads, generator=gen) * 4 - 4).to(DEVICE)
    dt_bias = (torch.randn(num_v_heads, generator=gen) * 0.5).to(DEVICE)
    return A_log, dt_bias


def mixed_qkv(tokens: tuple[int, ...], hk: int, hv: int, dk: int, dv: int, dtype, gen: torch.Generator):
    """q, k, v as strided views of one packed projection, the way the model splits its conv output."""
    packed = torch.randn(*tokens, 2 * hk * dk + hv * dv + 3, generator=gen).to(DEVICE, dtype)
    q, k, v = packed[..., 3:].split([hk * dk, hk * dk, hv * dv], dim=-1)
    return q.unflatten(-1, (hk, dk)), k.unflatten(-1, (hk, dk)), v.unflatten(-1, (hv, dv))


def raw_gates(tokens: tuple[int, ...], hv: int, dtype, gen: torch.Generator):
    """a, b as strided column slices of one projection output."""
    ab = (torch.randn(*tokens, 2 * hv + 1, generator=gen) * 2).to(DEVICE, dtype)
    return ab[..., 1 : hv + 1], ab[..., hv + 1 :]


def ssm_pool(num_slots: int, hv: int, dk: int, dv: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(num_slots, NUM_LAYERS, hv, dk, dv, generator=gen) * 0.1).to(DEVICE)


def assert_only_slots_changed(pool: torch.Tensor, before: torch.Tensor, slots: list[int]) -> None:
    """Every other layer, and every other slot of the kernel's layer, is bit-identical."""
    keep = torch.ones(pool.shape[0], NUM_LAYERS, dtype=torch.bool)
    keep[slots, LAYER] = False
    assert torch.equal(pool[keep], before[keep]), "state changed outside the requested slots"


# ----------------------------------------------------------------------------------------------- decode


def decode_inputs(batch: int, tokens: int, hk: int, hv: int, dk: int, dv: int, dtype, seed: int):
    """q, k, v, a, b, A_log, dt_bias of a decode step, a pool with spare slots, and distinct random slots."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = mixed_qkv((batch, tokens), hk, hv, dk, dv, dtype, gen)
    a, b = raw_gates((batch, tokens), hv, dtype, gen)
    A_log, dt_bias = gdn_params(hv, gen)
    pool = ssm_pool(2 * batch + 1, hv, dk, dv, gen)
    slots = torch.randperm(pool.shape[0], generator=gen)[:batch]
    return q, k, v, a, b, A_log, dt_bias, pool, slots


@pytest.mark.parametrize(
    "dtype,batch,tokens,hk,hv,dk,dv,block_v",
    [
        (torch.float32, 3, 1, 2, 6, 32, 48, None),  # odd head count, non-power-of-2 Dv, several V-blocks
        (torch.float32, 2, 3, 1, 3, 16, 40, 32),  # speculative decode (T=3), masked last V-block
        (torch.bfloat16, 2, 2, 2, 4, 64, 32, None),
    ],
)
def test_gdn_decode_matches_recurrent_reference(dtype, batch, tokens, hk, hv, dk, dv, block_v):
    q, k, v, a, b, A_log, dt_bias, pool, slots = decode_inputs(batch, tokens, hk, hv, dk, dv, dtype,
                                                               batch * 100 + tokens * 10 + hv)
    before = pool.clone()
    out = torch.full((batch, tokens, hv, dv), float("nan"), dtype=dtype, device=DEVICE)

    result = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots.to(DEVICE), out=out, block_v=block_v)

    g, beta = gating(a, b, A_log, dt_bias)
    ref_out, ref_state = gdn_ref.recurrent_gated_delta_rule(q, k, v, g, beta, before[slots, LAYER])
    assert result is out
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(pool[slots, LAYER], ref_state) < TOL[dtype]
    assert_only_slots_changed(pool, before, slots.tolist())


@pytest.mark.parametrize("dtype,batch,tokens,hk,hv,dk,dv", [
    (torch.float32, 2, 1, 2, 4, 32, 32),
    (torch.bfloat16, 3, 2, 1, 2, 64, 64),  # two tokens a step: the norm applies to each
    (torch.float32, 2, 1, 1, 2, 16, 48),  # non-power-of-2 Dv: masked lanes out of the norm's sum
])
def test_gdn_decode_with_the_gated_norm(dtype, batch, tokens, hk, hv, dk, dv):
    """``gated_norm``: the output through the gated RMSNorm with z, bit for bit the norm kernel's on the plain
    output of the same launch shape (one head per program), with the same state update; close to the torch
    reference."""
    q, k, v, a, b, A_log, dt_bias, pool, slots = decode_inputs(batch, tokens, hk, hv, dk, dv, dtype, 31 * dv + hv)
    gen = torch.Generator().manual_seed(dv)
    z = torch.randn(batch, tokens, hv, dv, generator=gen).to(dtype).to(DEVICE)
    norm_weight = (1 + 0.1 * torch.randn(dv, generator=gen)).to(dtype).to(DEVICE)
    slots = slots.to(DEVICE)
    plain_pool = pool.clone()
    plain = gdn_decode(q, k, v, a, b, A_log, dt_bias, plain_pool[:, LAYER], slots,
                       block_v=triton_next_power_of_2(dv), num_warps=4)
    gated = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, gated_norm=(z, norm_weight, 1e-6))
    want = norm_tk.gated_rms_norm(plain.flatten(0, 1), z.flatten(0, 1), norm_weight, 1e-6).unflatten(0, (batch,
                                                                                                         tokens))
    assert torch.equal(gated, want)
    assert torch.equal(pool, plain_pool)
    ref = norm_ref.gated_rms_norm(plain, z, norm_weight, 1e-6)
    assert rel_err(gated, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="z must be"):
        gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, gated_norm=(z[:, :, :1], norm_weight, 1e-6))


def test_gdn_decode_qwen35_397b_head_shape():
    """64 value heads, 16 key heads, head dim 128, bf16 activations, one token."""
    hk, hv, d = 16, 64, 128
    gen = torch.Generator().manual_seed(397)
    q, k, v = mixed_qkv((1, 1), hk, hv, d, d, torch.bfloat16, gen)
    a, b = raw_gates((1, 1), hv, torch.bfloat16, gen)
    A_log, dt_bias = gdn_params(hv, gen)
    pool = ssm_pool(3, hv, d, d, gen)
    before = pool.clone()
    slots = torch.tensor([2], device=DEVICE)
    # BV=64 keeps the interpreter's program count down; the GPU default heuristic is covered above.
    out = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, block_v=64)
    g, beta = gating(a, b, A_log, dt_bias)
    ref_out, ref_state = gdn_ref.recurrent_gated_delta_rule(q, k, v, g, beta, before[[2], LAYER])
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    assert rel_err(pool[[2], LAYER], ref_state) < TOL[torch.bfloat16]
    assert_only_slots_changed(pool, before, [2])


@pytest.mark.parametrize("dtype,hk,hv,dk,dv,block_v", [
    (torch.float32, 2, 6, 32, 48, 32),  # odd head count, non-power-of-2 Dv: a masked last V-block
    (torch.bfloat16, 1, 2, 64, 32, None),
])
def test_gdn_decode_step_states_for_speculative_verification(dtype, hk, hv, dk, dv, block_v):
    """T tokens per request with ``step_states``: the state after every token is written there (each equal to
    the recurrent reference over that prefix), the pool is left untouched, and ``commit_step_states`` moves
    each request's accepted prefix state into its slot."""
    batch, tokens = 3, 4
    q, k, v, a, b, A_log, dt_bias, pool, slots = decode_inputs(batch, tokens, hk, hv, dk, dv, dtype, 4242 + hv)
    before = pool.clone()
    steps = torch.full((batch, tokens, hv, dk, dv), float("nan"), device=DEVICE)

    out = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots.to(DEVICE), step_states=steps,
                     block_v=block_v)

    assert torch.equal(pool, before), "a verification step must not write the pool"
    g, beta = gating(a, b, A_log, dt_bias)
    ref_out, _ = gdn_ref.recurrent_gated_delta_rule(q, k, v, g, beta, before[slots, LAYER])
    assert rel_err(out, ref_out) < TOL[dtype]
    for t in range(tokens):
        _, ref_state = gdn_ref.recurrent_gated_delta_rule(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1],
                                                          g[:, : t + 1], beta[:, : t + 1], before[slots, LAYER])
        assert rel_err(steps[:, t], ref_state) < TOL[dtype], f"state after token {t}"

    accepted = torch.tensor([1, tokens, 2], device=DEVICE)
    commit_step_states(pool[:, LAYER], slots.to(DEVICE), steps, accepted)
    for i, (slot, n) in enumerate(zip(slots.tolist(), accepted.tolist(), strict=True)):
        assert torch.equal(pool[slot, LAYER], steps[i, n - 1])
    assert_only_slots_changed(pool, before, slots.tolist())


def test_gdn_decode_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = mixed_qkv((2, 1), 2, 4, 16, 16, torch.float32, gen)
    a, b = raw_gates((2, 1), 4, torch.float32, gen)
    A_log, dt_bias = gdn_params(4, gen)
    pool = ssm_pool(4, 4, 16, 16, gen)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="ssm_states must be fp32"):
        gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER].bfloat16(), slots)
    with pytest.raises(ValueError, match="multiple of key heads"):
        gdn_decode(q[:, :, :1].expand(2, 1, 3, 16), k[:, :, :1].expand(2, 1, 3, 16), v, a, b, A_log, dt_bias,
                   pool[:, LAYER], slots)
    with pytest.raises(ValueError, match="state_slots"):
        gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots[:1])
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        gdn_decode(q.repeat_interleave(2, dim=-1)[..., ::2], k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots)
    with pytest.raises(ValueError, match="step_states must be fp32"):
        gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots,
                   step_states=torch.zeros(2, 2, 4, 16, 16, device=DEVICE))  # T is 1


# ------------------------------------------------------------------------------------------ chunked prefill


def reference_prefill(q, k, v, a, b, A_log, dt_bias, states, slots, cu, has_init, checkpoints):
    """Per-sequence reference (chunked form; recurrent for single tokens, as the model does). Returns the
    output and {slot: expected state} for final states and checkpoints."""
    g, beta = gating(a, b, A_log, dt_bias)
    hv, dk, dv = states.shape[1:]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    expected: dict[int, torch.Tensor] = {}

    def run(rows: slice, init):
        if rows.stop == rows.start:
            return None, init if init is not None else torch.zeros(1, hv, dk, dv, device=v.device)
        rule = gdn_ref.recurrent_gated_delta_rule if rows.stop - rows.start == 1 else gdn_ref.chunk_gated_delta_rule
        return rule(q[rows][None], k[rows][None], v[rows][None], g[rows][None], beta[rows][None], init)

    for seq, slot in enumerate(slots):
        start, end = cu[seq], cu[seq + 1]
        init = states[slot][None] if has_init[seq] else None
        seq_out, final = run(slice(start, end), init)
        if seq_out is not None:
            out[start:end] = seq_out[0]
        expected[slot] = final[0]
        for ck_seq, offset, dest in checkpoints:
            if ck_seq == seq:
                expected[dest] = run(slice(start, start + offset), init)[1][0]
    return out, expected


def prefill_inputs(dtype, lens, hk, hv, dk, dv, gen):
    """cu_seqlens of ``lens`` and random ``q, k, v, a, b, A_log, dt_bias`` for that many tokens."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = mixed_qkv((cu[-1],), hk, hv, dk, dv, dtype, gen)
    a, b = raw_gates((cu[-1],), hv, dtype, gen)
    return cu, q, k, v, a, b, *gdn_params(hv, gen)


def run_prefill_case(dtype, lens, hk, hv, dk, dv, has_init, checkpoints, seed, **launch):
    """checkpoints: (sequence, offset) pairs; each gets its own destination slot."""
    gen = torch.Generator().manual_seed(seed)
    cu, q, k, v, a, b, A_log, dt_bias = prefill_inputs(dtype, lens, hk, hv, dk, dv, gen)
    num_slots = 2 * len(lens) + len(checkpoints) + 1
    pool = ssm_pool(num_slots, hv, dk, dv, gen)
    perm = torch.randperm(num_slots, generator=gen).tolist()
    slots, ckpt_slots = perm[: len(lens)], perm[len(lens) : len(lens) + len(checkpoints)]
    checkpoints = [(s, o, d) for (s, o), d in zip(checkpoints, ckpt_slots, strict=True)]
    for seq, slot in enumerate(slots):
        if not has_init[seq]:
            pool[slot, LAYER] = float("nan")  # must not be read
    pool[ckpt_slots, LAYER] = float("nan")  # must be fully written
    before = pool.clone()
    out = torch.full((cu[-1], hv, dv), float("nan"), dtype=dtype, device=DEVICE)

    result = gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], torch.tensor(slots, device=DEVICE),
                         torch.tensor(cu), has_init, checkpoints, out=out, **launch)

    ref_out, expected = reference_prefill(q, k, v, a, b, A_log, dt_bias, before[:, LAYER], slots, cu, has_init,
                                          checkpoints)
    assert result is out
    if cu[-1]:
        assert rel_err(out, ref_out) < TOL[dtype]
    for slot, state in expected.items():
        assert rel_err(pool[slot, LAYER], state) < TOL[dtype], f"state of slot {slot}"
    assert_only_slots_changed(pool, before, list(expected))


def test_gdn_prefill_varlen_checkpoints_fp32():
    # lengths: a chunk and a bit, a single token, an empty sequence, several chunks; checkpoints at a
    # multiple of 16 that is not a multiple of 64, at chunk multiples, at 0 and at the sequence end.
    run_prefill_case(
        torch.float32, lens=[70, 1, 0, 130], hk=2, hv=6, dk=32, dv=48,
        has_init=[True, False, True, True],
        checkpoints=[(0, 16), (0, 0), (3, 64), (3, 96), (3, 130), (2, 0)],
        seed=1,
    )


def test_gdn_prefill_bf16_multi_chunk():
    run_prefill_case(
        torch.bfloat16, lens=[150, 37], hk=1, hv=3, dk=64, dv=32, has_init=[True, False],
        checkpoints=[(0, 48), (1, 32)], seed=2,
    )


def test_gdn_prefill_bf16_narrow_heads():
    """Head dims below the bf16 tensor-core minimums (Dk 32 < 64, Dv 16 < 32, an explicit block_v=16): the
    launcher pads those tiles (narrow bf16 wgmma tiles faulted or gave NaN on H100); the masks must cover it."""
    run_prefill_case(
        torch.bfloat16, lens=[70, 5], hk=1, hv=2, dk=32, dv=16, has_init=[False, True],
        checkpoints=[(0, 40)], seed=4, block_v=16,
    )


def test_gdn_prefill_nearly_identical_keys():
    """beta ~ 1 and nearly parallel keys make I + M far from the identity (entries ~1 below the diagonal):
    the blocked inverse must still match the reference's triangular solve."""
    gen = torch.Generator().manual_seed(5)
    total, hv, d = 100, 2, 16
    q, k, v = mixed_qkv((total,), 1, hv, d, d, torch.float32, gen)
    k = torch.randn(1, 1, d, generator=gen).to(DEVICE) + 0.05 * k  # every key ~ the same direction
    a, b = raw_gates((total,), hv, torch.float32, gen)
    b = b.abs() + 4.0  # beta > 0.98
    A_log = torch.full((hv,), -6.0, device=DEVICE)  # almost no decay
    dt_bias = torch.zeros(hv, device=DEVICE)
    pool = ssm_pool(2, hv, d, d, gen)
    before = pool.clone()
    slots = torch.tensor([1], device=DEVICE)
    out = gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, [0, total], [True])
    g, beta = gating(a, b, A_log, dt_bias)
    ref_out, ref_state = gdn_ref.chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                                        before[[1], LAYER])
    assert rel_err(out, ref_out[0]) < TOL[torch.float32]
    assert rel_err(pool[[1], LAYER], ref_state) < TOL[torch.float32]


def test_gdn_prefill_qwen35_397b_head_shape():
    """64 value heads, 16 key heads, head dim 128, bf16, a few tokens continuing from a cached state."""
    run_prefill_case(
        torch.bfloat16, lens=[20], hk=16, hv=64, dk=128, dv=128, has_init=[True], checkpoints=[], seed=3,
        block_v=128,  # fewer programs under the interpreter
    )


def test_gdn_prefill_chunk_plan():
    starts, lens, ckpts, seq_ptr, zero, dup = _plan_chunks(
        [130, 0, 20], [(0, 16, 7), (0, 16, 8), (0, 130, 9), (1, 0, 5), (2, 20, 6)], CHUNK
    )
    # sequence 0 restarts its 64-token tiling at the checkpoint at 16
    assert list(zip(starts, lens, ckpts, strict=True)) == [
        (0, 16, 7), (16, 64, -1), (80, 50, 9), (130, 20, 6),
    ]
    assert seq_ptr == [0, 3, 3, 4]
    assert zero == [(1, 5)] and dup == [(7, 8)]
    with pytest.raises(ValueError, match="outside sequence"):
        _plan_chunks([10], [(0, 11, 3)], CHUNK)


def test_gdn_prefill_chunk_plan_splits_without_storing():
    """A split ends a chunk as a checkpoint would, storing nothing (-1); one at an offset that also has a
    checkpoint keeps the checkpoint's slot; a split at 0 or at the end changes nothing."""
    starts, lens, ckpts, _, zero, dup = _plan_chunks(
        [160, 40], [(1, 24, 5)], CHUNK, splits=[(0, 156), (0, 0), (1, 24), (1, 40)]
    )
    assert list(zip(starts, lens, ckpts, strict=True)) == [
        (0, 64, -1), (64, 64, -1), (128, 28, -1), (156, 4, -1), (160, 24, 5), (184, 16, -1),
    ]
    assert zero == [] and dup == []
    with pytest.raises(ValueError, match="split"):
        _plan_chunks([10], [], CHUNK, splits=[(0, 11)])


def test_gdn_prefill_refuses_narrow_single_stage_state_pass():
    """BV=32 with one pipeline stage faulted on the H100 (illegal address): refused with a clear error, and
    nothing is written to the pool before the check."""
    gen = torch.Generator().manual_seed(6)
    _, q, k, v, a, b, A_log, dt_bias = prefill_inputs(torch.bfloat16, [64], 1, 2, 64, 64, gen)
    pool = ssm_pool(2, 2, 64, 64, gen)
    before = pool.clone()
    slots = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="state_stages=1 needs block_v >= 64"):
        gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool[:, LAYER], slots, [0, 64], [True],
                    block_v=32, state_stages=1)
    assert torch.equal(pool, before)


# ------------------------------------------------------------------------------------------------ conv1d


def conv_pool(num_slots: int, dim: int, kernel: int, dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(num_slots, NUM_LAYERS, dim, kernel - 1, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype,dim,kernel,block_d", [(torch.float32, 40, 4, 16), (torch.bfloat16, 96, 4, 256),
                                                      (torch.float32, 24, 3, 256)])
def test_conv1d_update_matches_reference(dtype, dim, kernel, block_d):
    gen = torch.Generator().manual_seed(dim + kernel)
    batch = 3
    weight = torch.randn(dim, kernel, generator=gen).to(DEVICE, dtype)
    pool = conv_pool(2 * batch, dim, kernel, dtype, gen)
    slots = torch.randperm(2 * batch, generator=gen)[:batch]
    x = torch.randn(batch, dim + 5, generator=gen).to(DEVICE, dtype)[:, 5:]  # strided rows
    before = pool.clone()
    out = torch.full((batch, dim), float("nan"), dtype=dtype, device=DEVICE)

    conv1d_update(x, weight, pool[:, LAYER], slots.to(DEVICE), out=out, block_d=block_d)

    states = before[slots, LAYER].clone()
    ref = conv_ref.causal_conv1d_update(x, weight, states)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(pool[slots, LAYER], states)  # the state is a pure shift: exact
    assert_only_slots_changed(pool, before, slots.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_prefill_varlen_checkpoints(dtype):
    gen = torch.Generator().manual_seed(7)
    dim, kernel = 72, 4
    lens = [5, 1, 0, 2, 40]
    has_init = [True, True, False, True, False]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    weight = torch.randn(dim, kernel, generator=gen).to(DEVICE, dtype)
    num_slots = 12
    pool = conv_pool(num_slots, dim, kernel, dtype, gen)
    perm = torch.randperm(num_slots, generator=gen).tolist()
    slots = perm[: len(lens)]
    # offsets shorter than K-1 reach into the initial state; 0 is the initial state itself
    checkpoints = [(0, 2, perm[5]), (4, 33, perm[6]), (3, 1, perm[7]), (4, 0, perm[8]), (0, 5, perm[9])]
    for seq, slot in enumerate(slots):
        if not has_init[seq]:
            pool[slot, LAYER] = float("nan")
    pool[[d for _, _, d in checkpoints], LAYER] = float("nan")
    before = pool.clone()
    x = torch.randn(cu[-1], dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(x, float("nan"))

    conv1d_prefill(x, weight, pool[:, LAYER], torch.tensor(slots, device=DEVICE), torch.tensor(cu, device=DEVICE),
                   torch.tensor(has_init, device=DEVICE), checkpoints, out=out, block_t=16, block_d=32)

    def reference(seq: int, length: int):
        init = before[slots[seq], LAYER] if has_init[seq] else torch.zeros(dim, kernel - 1, dtype=dtype, device=DEVICE)
        rows = x[cu[seq] : cu[seq] + length]
        if length == 0:
            return rows, init
        return conv_ref.causal_conv1d_prefill(rows, weight, init)

    expected = {}
    for seq, n in enumerate(lens):
        ref_out, expected[slots[seq]] = reference(seq, n)
        if n:
            assert rel_err(out[cu[seq] : cu[seq + 1]], ref_out) < TOL[dtype]
    for seq, offset, dest in checkpoints:
        expected[dest] = reference(seq, offset)[1]
    for slot, state in expected.items():
        assert torch.equal(pool[slot, LAYER], state.to(dtype)), f"conv state of slot {slot}"  # copies: exact
    assert_only_slots_changed(pool, before, list(expected))

"""Fused Gated DeltaNet decode step: gating, q/k L2 norm, state decay, delta-rule update and output in one
launch per layer, reading and writing each request's fp32 state in place in its state-pool slot.

Reference: ``kernels.gdn.recurrent_gated_delta_rule`` with ``g = -exp(A_log) * softplus(a + dt_bias)`` and
``beta = sigmoid(b)`` computed the way the model does (beta rounded to the activation dtype).

Decode is bound by the state traffic (Qwen3.5-397B: 64 value heads x 128 x 128 fp32 = 4 MiB per layer and
request, read once and written once). The grid is therefore (V-block, value head, request): each program
holds a ``[Dk, BV]`` slice of one head's state in registers for all T tokens, so the state makes exactly one
round trip, and small BV gives enough programs to cover every SM even at batch 1. Rows of the slice are BV
contiguous fp32 (128 B at BV=32), so the state loads and stores are full, vectorised lines.

Speculative decoding verifies T tokens per request in one step (the last accepted token and T-1 drafts) and
keeps the state after only the accepted prefix. With ``step_states`` the kernel writes the state after every
token there instead of into the pool slot, and ``commit_step_states`` then copies the accepted one into the
slot (as SGLang's and vLLM's intermediate-state buffers do): a rejected draft never touches the pool.

With ``gated_norm`` the kernel also applies the layer's output norm (gated RMSNorm with z) to each head's output,
one program a whole value head; the engine does so for decode batches of 2-16 rows (``services.engine.ops``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.triton.norm import _TL_DTYPES, gated_rms_norm_rows, round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait


def is_interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def softplus(x):
    # Stable form, accurate everywhere (torch's softplus returns x itself above 20; the difference is < 1 ulp).
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


def decode_config(batch: int, num_v_heads: int, v_dim: int) -> tuple[int, int, bool]:
    """(BV, num_warps, evict_state) for the decode kernel, from ``kernels/bench_gdn.py --sweep`` on the H200
    (35B-A3B, ``kernels/results/gdn_decode_h200_35b.json``).

    Small batches need many programs to spread the state over 132 SMs: at B=1 (32 heads) BV=16 gives 256
    programs of 8 KiB, and one warp each ran in 2.5 us against 4.3 with four (the copy of the same bytes: 2.9).
    Large batches have programs to spare; a wider BV reads q/k fewer times and makes longer contiguous rows, and
    there marking the state's loads and stores evict-first in L2 (each is read and written once per step, and
    a step streams far more than L2 holds) took B=64 / 256 from 77.4 / 292 to 72.7 / 281 us; at B=1 and 8 it
    changed nothing measurable.
    """
    heads = batch * num_v_heads
    if heads <= 64:
        block_v, warps = 16, 1
    elif heads <= 1024:
        block_v, warps = 32, 4
    else:
        block_v, warps = 64, 4
    return min(block_v, triton.next_power_of_2(v_dim)), warps, heads > 1024


@triton.jit
def _gdn_decode_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, state_ptr, slots_ptr, out_ptr, step_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ab, stride_at, stride_ah,
    stride_bb, stride_bt, stride_bh,
    stride_s_slot, stride_s_head, stride_s_k,
    stride_ob, stride_ot, stride_oh,
    stride_step_b, stride_step_t, stride_step_h, stride_step_k,
    z_ptr, norm_w_ptr, stride_zb, stride_zt, stride_zh, norm_eps,
    num_tokens, scale,
    GROUP: tl.constexpr,  # value heads per key head
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STEP_STATES: tl.constexpr,  # write the state after each token to step_ptr, leave the pool slot as it is
    STATE_EVICT: tl.constexpr,  # L2 eviction policy of the state's load and store ("" or "evict_first")
    GATED_NORM: tl.constexpr,  # the output through the gated RMSNorm with z (BV covers the whole value head)
    PROD_DTYPE: tl.constexpr,  # the norm's weight * normed product dtype (see gated_rms_norm_rows)
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    i_hk = i_h // GROUP
    # The state slice is read before the PDL wait, so its round trip overlaps the kernels in front (the
    # in_proj): the slot ids and the state were written before this step's chain of PDL kernels began (host
    # copies, earlier steps), never by a kernel that may still run (see kernels.triton.pdl).
    slot = tl.load(slots_ptr + i_b).to(tl.int64)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_s = mask_k[:, None] & mask_v[None, :]

    p_state = state_ptr + slot * stride_s_slot + i_h * stride_s_head + offs_k[:, None] * stride_s_k + offs_v[None, :]
    state = tl.load(p_state, mask=mask_s, other=0.0, eviction_policy=STATE_EVICT)

    neg_a = -tl.exp(tl.load(a_log_ptr + i_h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)
    pdl_wait(PDL)

    p_q = q_ptr + i_b * stride_qb + i_hk * stride_qh + offs_k
    p_k = k_ptr + i_b * stride_kb + i_hk * stride_kh + offs_k
    p_v = v_ptr + i_b * stride_vb + i_h * stride_vh + offs_v
    p_a = a_ptr + i_b * stride_ab + i_h * stride_ah
    p_b = b_ptr + i_b * stride_bb + i_h * stride_bh
    p_o = out_ptr + i_b * stride_ob + i_h * stride_oh + offs_v
    p_step = (step_ptr + i_b * stride_step_b + i_h * stride_step_h + offs_k[:, None] * stride_step_k
              + offs_v[None, :])
    # A while loop rather than range(num_tokens): Triton's interpreter (CPU tests) cannot take a runtime
    # range bound with numpy >= 2.4, and pipelining across a handful of tokens would not help anyway.
    t = 0
    while t < num_tokens:
        q = tl.load(p_q + t * stride_qt, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(p_k + t * stride_kt, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(p_v + t * stride_vt, mask=mask_v, other=0.0).to(tl.float32)
        a = tl.load(p_a + t * stride_at).to(tl.float32)
        b = tl.load(p_b + t * stride_bt)
        decay = tl.exp(neg_a * softplus(a + dt_bias))
        # The model computes beta = b.sigmoid() in the activation dtype; round the same way.
        beta = tl.sigmoid(b.to(tl.float32)).to(b.dtype).to(tl.float32)
        # L2 norm as kernels.gdn.l2norm: x * rsqrt(sum(x^2) + 1e-6)
        q = q * tl.rsqrt(tl.sum(q * q) + 1e-6) * scale
        k = k * tl.rsqrt(tl.sum(k * k) + 1e-6)

        state = state * decay
        # Both reductions read the decayed state, so they can run together; the output of the updated state
        # follows algebraically: o = S'^T q = S^T q + (k.q) * delta.
        predicted = tl.sum(state * k[:, None], axis=0)
        s_q = tl.sum(state * q[:, None], axis=0)
        delta = (v - predicted) * beta
        state = state + k[:, None] * delta[None, :]
        o = s_q + tl.sum(k * q) * delta
        if GATED_NORM:
            # The model's core output (rounded to the activation dtype), then its gated RMSNorm over the head.
            core = round_to(o, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
            z = tl.load(z_ptr + i_b * stride_zb + t * stride_zt + i_h * stride_zh + offs_v, mask=mask_v, other=0.0)
            norm_w = tl.load(norm_w_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            o = tl.reshape(gated_rms_norm_rows(core[None, :], z.to(tl.float32)[None, :], norm_w[None, :], DV,
                                               norm_eps, PROD_DTYPE, out_ptr.dtype.element_ty), [BV])
        # (round_to here and above: the GPU's rounding under the interpreter too, whose cast to bf16 truncates)
        tl.store(p_o + t * stride_ot, round_to(o, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask_v)
        if STEP_STATES:
            tl.store(p_step + t * stride_step_t, state, mask=mask_s)
        t += 1

    if not STEP_STATES:
        tl.store(p_state, state, mask=mask_s, eviction_policy=STATE_EVICT)


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def gdn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    state_slots: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    step_states: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    evict_state: bool | None = None,
    gated_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """One decode (or short speculative) step of a GDN layer for a batch of requests.

    ``q, k [B, T, Hk, Dk]`` and ``v [B, T, Hv, Dv]`` (post-conv, not normalised; any strides with the last dim
    contiguous), ``a, b [B, T, Hv]`` raw projections, ``A_log, dt_bias [Hv]`` fp32, ``ssm_states`` the pool view
    of one layer ``[num_slots, Hv, Dk, Dv]`` fp32 (any slot stride; each slot's ``[Hv, Dk, Dv]`` contiguous),
    ``state_slots [B]`` int slot per request (distinct). Updates the states in place and returns
    ``o [B, T, Hv, Dv]`` in v's dtype (written into ``out`` if given). ``block_v``/``num_warps``/``evict_state``
    (the state's loads and stores marked evict-first in L2) override the tuning heuristic. No host
    synchronisation: safe to capture in a CUDA graph.

    ``step_states [B, T, Hv, Dk, Dv]`` fp32 (speculative verification; each ``[Hv, Dk, Dv]`` contiguous): the
    state after token t of request b goes to ``step_states[b, t]`` and the pool slots are only read; commit
    the accepted prefix with :func:`commit_step_states`.

    ``gated_norm = (z [B, T, Hv, Dv], weight [Dv], eps)``: the output is ``gated_rms_norm(o, z, weight, eps)``
    (as kernels.triton.norm.gated_rms_norm, rounding for rounding, on o rounded to v's dtype) instead of o: one
    program then holds a whole value head (BV = Dv), which the norm reduces over.
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv], got {q.shape}, {k.shape}, {v.shape}")
    batch, num_tokens, num_k_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[2], v.shape[3]
    if num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    if a.shape != (batch, num_tokens, num_v_heads) or b.shape != a.shape:
        raise ValueError(f"a and b must be [B, T, Hv] = {(batch, num_tokens, num_v_heads)}, got {a.shape}, {b.shape}")
    if A_log.shape != (num_v_heads,) or dt_bias.shape != (num_v_heads,):
        raise ValueError(f"A_log and dt_bias must be [{num_v_heads}], got {A_log.shape}, {dt_bias.shape}")
    if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
        raise ValueError("A_log and dt_bias must be fp32")
    if ssm_states.dim() != 4 or ssm_states.shape[1:] != (num_v_heads, k_dim, v_dim):
        raise ValueError(f"ssm_states must be [slots, {num_v_heads}, {k_dim}, {v_dim}], got {ssm_states.shape}")
    if ssm_states.dtype != torch.float32:
        raise ValueError(f"ssm_states must be fp32, got {ssm_states.dtype}")
    if ssm_states.stride()[1:] != (k_dim * v_dim, v_dim, 1):
        raise ValueError(f"each slot of ssm_states must be contiguous, got strides {ssm_states.stride()}")
    if state_slots.shape != (batch,) or state_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slots must be int32/int64 [{batch}], got {state_slots.dtype} {state_slots.shape}")
    for name, t in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b)):
        _check_last_dim_contiguous(name, t)
    if len({t.device for t in (q, k, v, a, b, A_log, dt_bias, ssm_states, state_slots)}) != 1:
        raise ValueError("all tensors must be on the same device")
    if not (A_log.is_contiguous() and dt_bias.is_contiguous()):
        raise ValueError("A_log and dt_bias must be contiguous")
    if out is None:
        out = torch.empty(batch, num_tokens, num_v_heads, v_dim, dtype=v.dtype, device=v.device)
    elif out.shape != v.shape or out.dtype != v.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(v.shape)} {v.dtype} with a contiguous last dim")
    if step_states is not None:
        want = (batch, num_tokens, num_v_heads, k_dim, v_dim)
        if (step_states.shape != want or step_states.dtype != torch.float32
                or step_states.stride()[2:] != (k_dim * v_dim, v_dim, 1) or step_states.device != q.device):
            raise ValueError(f"step_states must be fp32 {list(want)} on {q.device} with each [Hv, Dk, Dv] "
                             f"contiguous, got {step_states.dtype} {list(step_states.shape)}")
    if batch == 0 or num_tokens == 0:
        return out

    default_bv, default_warps, default_evict = decode_config(batch, num_v_heads, v_dim)
    if gated_norm is not None:
        z, norm_weight, norm_eps = gated_norm
        if z.shape != v.shape or z.dtype != v.dtype or z.stride(-1) != 1 or z.device != v.device:
            raise ValueError(f"z must be {v.dtype} {tuple(v.shape)} with a contiguous last dim, got {z.dtype} "
                             f"{tuple(z.shape)}")
        if norm_weight.shape != (v_dim,) or not norm_weight.is_contiguous():
            raise ValueError(f"the gated norm's weight must be a contiguous [{v_dim}], got {tuple(norm_weight.shape)}")
        if block_v not in (None, triton.next_power_of_2(v_dim)):
            raise ValueError("with gated_norm a program holds a whole value head: block_v must be left default")
        # One head per program: 4 warps, from the sweep's BV=128 column (kernels/results/gdn_decode_sweep_*).
        default_bv, default_warps = triton.next_power_of_2(v_dim), 4
        z_strides = z.stride()[:3]
        prod_dtype = _TL_DTYPES[torch.promote_types(norm_weight.dtype, v.dtype)]
    else:
        z, norm_weight, norm_eps, z_strides, prod_dtype = v, A_log, 0.0, (0, 0, 0), _TL_DTYPES[v.dtype]
    block_v = block_v or default_bv
    num_warps = num_warps or default_warps
    evict_state = default_evict if evict_state is None else evict_state
    grid = (triton.cdiv(v_dim, block_v), num_v_heads, batch)
    step = step_states if step_states is not None else out
    step_strides = step_states.stride()[:4] if step_states is not None else (0, 0, 0, 0)
    _gdn_decode_kernel[grid](
        q, k, v, a, b, A_log, dt_bias, ssm_states, state_slots, out, step,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *step_strides,
        z, norm_weight, *z_strides, float(norm_eps),
        num_tokens, k_dim**-0.5,
        GROUP=num_v_heads // num_k_heads,
        DK=k_dim, DV=v_dim, BK=triton.next_power_of_2(k_dim), BV=block_v, STEP_STATES=step_states is not None,
        STATE_EVICT="evict_first" if evict_state else "", GATED_NORM=gated_norm is not None, PROD_DTYPE=prod_dtype,
        num_warps=num_warps, **pdl_launch_args(q.device),
    )
    return out


def commit_step_states(ssm_states: torch.Tensor, state_slots: torch.Tensor, step_states: torch.Tensor,
                       num_accepted: torch.Tensor) -> None:
    """After a verification step run with ``gdn_decode(..., step_states=)``: request b keeps the state after its
    first ``num_accepted[b]`` tokens (in ``[1, T]``; the first token is the one already accepted), copied into
    its pool slot. ``num_accepted`` is a device tensor ``[B]``: no host synchronisation (not range-checked)."""
    batch = step_states.shape[0] if step_states.dim() == 5 else -1
    if batch < 0 or state_slots.shape != (batch,) or num_accepted.shape != (batch,):
        raise ValueError(f"expected step_states [B, T, Hv, Dk, Dv], state_slots [B] and num_accepted [B], got "
                         f"{list(step_states.shape)}, {list(state_slots.shape)}, {list(num_accepted.shape)}")
    rows = torch.arange(batch, device=step_states.device)
    ssm_states[state_slots.long()] = step_states[rows, num_accepted.long() - 1]

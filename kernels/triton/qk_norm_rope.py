"""Fused QK-RMSNorm + partial NeoX RoPE + output-gate split for Qwen3.5's gated full-attention layer.

The qkv projection output is one row per token: ``[q_0 | gate_0 | q_1 | gate_1 | ... | k (Hkv*D) | v (Hkv*D)]``
(query and gate interleaved per head, each ``head_dim`` wide). The unfused model code splits it, runs the Gemma
RMSNorm over head_dim on q and k (weights ``q_norm``/``k_norm``), rotates the first ``rotary_dim`` dims of q
and k with NeoX "rotate half", and later multiplies the attention output by ``sigmoid(gate)``. That is about a
dozen torch kernels with several full-size intermediates; here it is one kernel with everything in registers.

One program handles one token and a block of heads (q heads and k heads get separate programs, so a block
never mixes weights or layouts). Each head row is loaded as three pieces that the math needs separately:
``x1 = x[:half]``, ``x2 = x[half:rotary_dim]``, ``x3 = x[rotary_dim:]``; ``sum(x^2)`` is the sum over the three,
and rotate-half is then plain elementwise math on x1/x2 (no register shuffles, nothing loaded twice).

Numerics match ``kernels.norm.gemma_rms_norm`` then ``kernels.rope.apply_partial_rope`` rounding for rounding:
the normed head is rounded to the model dtype, cos/sin are rounded to the model dtype, each product
``n * cos`` / ``n * sin`` is rounded, then their sum is rounded. Into an fp8 KV cache, k and v (so rounded) are
then quantized as ``kernels.attention.quantize_fp8`` does: multiplied by the fp32 ``1 / scale``, saturated at
+-448, rounded to nearest even; the same bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import FP8_E4M3_MAX, fp8_multiplier, is_fp8
from kernels.triton.norm import round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def _round_to_e4m3(y):
    """fp32 ``y`` (|y| <= 448) rounded to the nearest e4m3 value (ties to even), still in fp32, so that the cast
    that follows is exact. Done here rather than left to the cast because Triton's CPU interpreter rounds that
    cast wrongly (a value rounding up across a power of two loses its carry: -125 -> -64), and the CPU tests
    compare these bytes with torch's; on the GPU it is a few integer operations in a memory-bound kernel."""
    bits = y.to(tl.int32, bitcast=True)
    # Normal range (|y| >= 2^-6): drop 20 of fp32's 23 mantissa bits, half to even; a carry moves into the exponent.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Subnormal range: one fixed step of 2^-9. Adding and subtracting 1.5 * 2^23 rounds |y| * 2^9 to an integer
    # (half to even); the sign bit is put back after, so -0.0 stays -0.0 as in torch's cast.
    steps = (tl.abs(y) * 512.0 + 12582912.0) - 12582912.0
    sign = (bits >> 31) << 31
    subnormal = ((steps * 0.001953125).to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _store(ptrs, x, mask, multiplier, FP8_OUT: tl.constexpr):
    """Store fp32 ``x`` (already rounded to the model dtype) in ``ptrs``' dtype; into an fp8 cache as
    ``x * multiplier`` saturated at the e4m3 range (a NaN stays NaN: it is a bug upstream, not ours to hide)."""
    if FP8_OUT:
        x = _round_to_e4m3(tl.clamp(x * multiplier, -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL))
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_heads(
    in_ptrs, out_ptrs, w_ptr, head_mask, cos, sin, eps, out_multiplier,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    FP8_OUT: tl.constexpr,
):
    """Gemma-RMSNorm then rotate a ``[BLOCK_H]`` block of head rows; ``in_ptrs``/``out_ptrs`` point at each row.
    Rounded in the input's (the model's) dtype; stored in the output's (fp8: see ``_store``)."""
    dtype = in_ptrs.dtype.element_ty
    r = tl.arange(0, BLOCK_HALF)
    p = tl.arange(0, BLOCK_PASS)
    rot_mask = head_mask[:, None] & (r < HALF)[None, :]
    pass_mask = head_mask[:, None] & (p < HEAD_DIM - 2 * HALF)[None, :]

    x1 = tl.load(in_ptrs[:, None] + r[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptrs[:, None] + HALF + r[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    x3 = tl.load(in_ptrs[:, None] + 2 * HALF + p[None, :], mask=pass_mask, other=0.0).to(tl.float32)
    sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(x3 * x3, axis=1)
    rstd = tl.math.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]

    w1 = tl.load(w_ptr + r, mask=r < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + r, mask=r < HALF, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w_ptr + 2 * HALF + p, mask=p < HEAD_DIM - 2 * HALF, other=0.0).to(tl.float32)[None, :]
    # gemma_rms_norm: (x * rstd) * (1 + w) in fp32, then rounded to the model dtype.
    n1 = round_to((x1 * rstd) * (1.0 + w1), dtype)
    n2 = round_to((x2 * rstd) * (1.0 + w2), dtype)
    n3 = round_to((x3 * rstd) * (1.0 + w3), dtype)

    # apply_partial_rope: x_rot * cos + rotate_half(x_rot) * sin, every product and the sum in the model dtype.
    out1 = round_to(round_to(n1 * cos, dtype) - round_to(n2 * sin, dtype), dtype)
    out2 = round_to(round_to(n2 * cos, dtype) + round_to(n1 * sin, dtype), dtype)
    _store(out_ptrs[:, None] + r[None, :], out1, rot_mask, out_multiplier, FP8_OUT)
    _store(out_ptrs[:, None] + HALF + r[None, :], out2, rot_mask, out_multiplier, FP8_OUT)
    _store(out_ptrs[:, None] + 2 * HALF + p[None, :], n3, pass_mask, out_multiplier, FP8_OUT)


@triton.jit
def store_new_kv(k_in, k_dst, k_w_ptr, k_mask, cos, sin, eps, k_multiplier, v_multiplier, v_offset, stride_kv_kind,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
                 BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr):
    """A block of KV heads of one token into its cache slot: K (rows ``k_in`` of the projection) normed and
    rotated to ``k_dst``, V (``v_offset`` elements after each K row) copied ``stride_kv_kind`` after it; an fp8
    cache gets them times the multipliers (see ``_store``)."""
    # V loads with K: after K's stores (which may alias it, for all the compiler knows) it was a second trip to
    # memory (sm_90 PTX).
    d = tl.arange(0, BLOCK_D)
    v_mask = k_mask[:, None] & (d < HEAD_DIM)[None, :]
    v = tl.load(k_in[:, None] + v_offset + d[None, :], mask=v_mask, other=0.0)
    _norm_rope_heads(k_in, k_dst, k_w_ptr, k_mask, cos, sin, eps, k_multiplier, HEAD_DIM, HALF, BLOCK_HALF,
                     BLOCK_PASS, KV_FP8)
    _store(k_dst[:, None] + stride_kv_kind + d[None, :], v.to(tl.float32), v_mask, v_multiplier, KV_FP8)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, q_w_ptr, k_w_ptr, cos_sin_ptr, pos_ptr, q_ptr, k_ptr, gate_ptr, kv_ptr, slot_ptr,
    num_heads, num_kv_heads, stride_qkv, stride_cos_sin, eps,
    page_size, stride_kv_page, stride_kv_kind, stride_kv_token, k_multiplier, v_multiplier,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, SIGMOID_GATE: tl.constexpr, WRITE_KV: tl.constexpr,
    KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty

    # cos/sin of this token's position, rounded to the model dtype like the reference's .to(x.dtype). Before the
    # wait: the position is the step's input and the table is constant (kernels.triton.pdl), and the table's
    # load depends on the position's, two trips that would otherwise follow the wait.
    pos = tl.load(pos_ptr + token).to(tl.int64)
    r = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + r, mask=r < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + r, mask=r < HALF, other=0.0).to(tl.float32)
    cos = round_to(cos, dtype)[None, :]
    sin = round_to(sin, dtype)[None, :]
    pdl_wait(PDL)

    row = qkv_ptr + token * stride_qkv
    num_q_blocks = tl.cdiv(num_heads, BLOCK_HQ)
    # (The two branches use distinct variable names: Triton requires a name assigned in both branches of a
    # runtime `if` to have one type, and the q and k head blocks have different sizes.)
    if head_block < num_q_blocks:
        q_heads = head_block * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
        q_mask = q_heads < num_heads
        q_in = row + q_heads * (2 * HEAD_DIM)  # q of head h starts at h * 2D, its gate at h * 2D + D
        q_out = q_ptr + (token * num_heads + q_heads) * HEAD_DIM
        # The gate loads with q: after q's stores (which may alias it, for all the compiler knows) it was a second
        # trip to memory (sm_90 PTX).
        d = tl.arange(0, BLOCK_D)
        gate_mask = q_mask[:, None] & (d < HEAD_DIM)[None, :]
        gate = tl.load(q_in[:, None] + HEAD_DIM + d[None, :], mask=gate_mask, other=0.0)
        _norm_rope_heads(q_in, q_out, q_w_ptr, q_mask, cos, sin, eps, 1.0, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_PASS,
                         False)
        # The gate: copied out contiguous, with the sigmoid applied (fp32, rounded once) if asked.
        if SIGMOID_GATE:
            g32 = gate.to(tl.float32)
            gate = round_to(1.0 / (1.0 + tl.exp(-g32)), dtype).to(dtype)
        tl.store(gate_ptr + ((token * num_heads + q_heads) * HEAD_DIM)[:, None] + d[None, :], gate, mask=gate_mask)
    else:
        k_heads = (head_block - num_q_blocks) * BLOCK_HK + tl.arange(0, BLOCK_HK)
        k_mask = k_heads < num_kv_heads
        k_in = row + num_heads * 2 * HEAD_DIM + k_heads * HEAD_DIM
        if WRITE_KV:
            # Straight into the paged KV cache at the token's slot (page * page_size + offset): K, then V
            # copied from the projection row, so the layer needs no separate cache-write kernels.
            slot = tl.load(slot_ptr + token).to(tl.int64)
            page = slot // page_size
            k_dst = kv_ptr + page * stride_kv_page + (slot - page * page_size) * stride_kv_token + k_heads * HEAD_DIM
            store_new_kv(k_in, k_dst, k_w_ptr, k_mask, cos, sin, eps, k_multiplier, v_multiplier,
                         num_kv_heads * HEAD_DIM, stride_kv_kind, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_PASS, BLOCK_D,
                         KV_FP8)
        else:
            k_out = k_ptr + (token * num_kv_heads + k_heads) * HEAD_DIM
            _norm_rope_heads(k_in, k_out, k_w_ptr, k_mask, cos, sin, eps, 1.0, HEAD_DIM, HALF, BLOCK_HALF,
                             BLOCK_PASS, False)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    *,
    sigmoid_gate: bool = True,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    kv_cache: torch.Tensor | None = None,
    kv_slot_ids: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Split the gated-attention qkv projection and prepare q, k for attention, in one kernel.

    Args:
        qkv: ``[T, num_heads*2*head_dim + 2*num_kv_heads*head_dim]`` (per-head ``[q | gate]``, then k, then v),
            unit stride in the last dim, any row stride.
        q_norm_weight, k_norm_weight: ``[head_dim]`` Gemma (zero-centred) RMSNorm weights.
        cos_sin_cache: ``[max_pos, rotary_dim]`` holding ``cat(cos, sin)`` of the half-angles (fp32 normally).
        positions: ``[T]`` integer positions (values must be < max_pos; not checked on the device).
        sigmoid_gate: if True (default) the fourth result is ``sigmoid(gate)`` rounded to the model dtype, which
            is bit-for-bit what ``torch.sigmoid(gate)`` gives, so the model computes ``out * gate``. If False, the
            raw gate is copied.
        heads_per_program: heads per program (power of two); default picks by token count.
        num_warps: warps per program; default by the block's size (1 for prefill-sized calls whose heads per
            program are defaulted too).
        kv_cache, kv_slot_ids: one layer's paged KV cache ``[num_pages, 2, page_size, num_kv_heads, head_dim]``
            (K then V in each page; qkv's dtype or float8_e4m3fn; each token's ``[heads, head_dim]`` contiguous)
            and ``[T]`` flat slots ``page * page_size + offset``: k and v go straight there, as
            ``kernels.attention.write_kv`` stores them, and the k and v results are None.
        k_scale, v_scale: an fp8 cache's per-layer scales (it stores ``k / k_scale``, ``v / v_scale``);
            ignored for any other cache.

    Returns:
        ``q [T, H, D]`` and ``k [T, Hkv, D]``: normed and roped, new contiguous tensors in qkv's dtype;
        ``v [T, Hkv, D]``: a zero-copy *view* into qkv (strides ``(qkv.stride(0), D, 1)``), not a copy;
        ``gate [T, H*D]``: a new contiguous tensor, ``sigmoid(gate)`` unless ``sigmoid_gate=False``.
    """
    if qkv.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if qkv.dim() != 2:
        raise ValueError(f"qkv must be [tokens, features], got shape {tuple(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError(f"qkv must have unit stride in its last dimension, got strides {tuple(qkv.stride())}")
    if num_heads <= 0 or num_kv_heads <= 0 or head_dim <= 0:
        raise ValueError("num_heads, num_kv_heads and head_dim must be positive")
    q_size = num_heads * 2 * head_dim
    kv_size = num_kv_heads * head_dim
    if qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(
            f"qkv has {qkv.shape[1]} features, expected {q_size + 2 * kv_size} "
            f"(= {num_heads} heads * 2 * {head_dim} + 2 * {num_kv_heads} kv heads * {head_dim})"
        )
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w.shape != (head_dim,) or w.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [{head_dim}] tensor, got shape {tuple(w.shape)}")
        if w.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got {w.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.stride(1) != 1 or cos_sin_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError("cos_sin_cache must be a float [max_pos, rotary_dim] tensor with unit last stride")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even, positive and <= head_dim {head_dim}")
    tokens = qkv.shape[0]
    if positions.shape != (tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an int32/int64 [{tokens}] tensor, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    for name, t in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
                    ("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, qkv on {qkv.device}")
    if (kv_cache is None) != (kv_slot_ids is None):
        raise ValueError("kv_cache and kv_slot_ids go together")
    if kv_cache is not None:
        expected = (2, kv_cache.shape[2] if kv_cache.dim() == 5 else -1, num_kv_heads, head_dim)
        if kv_cache.dim() != 5 or tuple(kv_cache.shape[1:]) != expected:
            raise ValueError(f"kv_cache must be [pages, 2, page_size, {num_kv_heads}, {head_dim}], "
                             f"got {tuple(kv_cache.shape)}")
        if kv_cache.dtype not in (qkv.dtype, torch.float8_e4m3fn) or kv_cache.device != qkv.device:
            raise ValueError(f"kv_cache must be {qkv.dtype} or float8_e4m3fn on {qkv.device}, got {kv_cache.dtype} "
                             f"on {kv_cache.device}")
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"k_scale and v_scale must be positive, got {k_scale} and {v_scale}")
        if kv_cache.stride()[3:] != (head_dim, 1):
            raise ValueError(f"each token of kv_cache must be a contiguous [heads, head_dim], got strides "
                             f"{tuple(kv_cache.stride())}")
        if kv_slot_ids.shape != (tokens,) or kv_slot_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_slot_ids must be an int32/int64 [{tokens}] tensor, got {kv_slot_ids.dtype} "
                             f"{tuple(kv_slot_ids.shape)}")
        if kv_slot_ids.device != qkv.device:
            raise ValueError(f"kv_slot_ids is on {kv_slot_ids.device}, qkv on {qkv.device}")
    if heads_per_program is not None and (heads_per_program < 1 or heads_per_program & (heads_per_program - 1)):
        raise ValueError(f"heads_per_program must be a power of two, got {heads_per_program}")
    positions = positions.contiguous()

    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    gate = torch.empty(tokens, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if kv_cache is None:
        k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
        kv_strides = (0, 0, 0, 0)
    else:
        k = v = None
        kv_slot_ids = kv_slot_ids.contiguous()
        kv_strides = (kv_cache.shape[2], kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2))
    kv_fp8 = kv_cache is not None and is_fp8(kv_cache.dtype)
    multipliers = (fp8_multiplier(k_scale), fp8_multiplier(v_scale)) if kv_fp8 else (1.0, 1.0)
    if tokens == 0:
        return q, k, v, gate

    # Prefill-sized calls (a chunk of a prompt: the sweep below measured 8K and 32K tokens) get their own
    # launch shape; batched decode (64 to a few hundred tokens) keeps the one its batch runs were measured with.
    prefill_shape = tokens >= 1024 and heads_per_program is None and num_warps is None
    if heads_per_program is None:
        # Decode: one head per program for parallelism (a handful of tokens would otherwise be a handful of
        # programs). Larger batches: several heads per program to amortise the position/cos/sin loads.
        heads_per_program = 1 if tokens < 64 else 2 if prefill_shape else 4
    block_hq = min(heads_per_program, triton.next_power_of_2(num_heads))
    block_hk = min(heads_per_program, triton.next_power_of_2(num_kv_heads))
    half = rotary_dim // 2
    block_d = triton.next_power_of_2(head_dim)
    grid = (tokens, triton.cdiv(num_heads, block_hq) + triton.cdiv(num_kv_heads, block_hk))
    if prefill_shape:
        # Two heads, one warp: each thread then loads and stores 16-byte vectors of a head's pieces (a [4, 32]
        # rotary half over 4 warps is one bf16 per thread). Swept on the H200 at 35B-A3B shapes into the paged
        # cache (kernels/bench_fused.py, kernels/results/qk_norm_rope_prefill_h200.json): 0.63 ms at 32K tokens
        # against 0.76 for 4 heads x 4 warps, 0.16 against 0.20 at 8K; more heads or warps were slower.
        num_warps = 1
    elif num_warps is None:
        num_warps = 4 if block_hq * block_d >= 1024 else 2 if block_hq * block_d >= 256 else 1
    _qk_norm_rope_kernel[grid](
        qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, q, k if k is not None else q, gate,
        kv_cache if kv_cache is not None else q, kv_slot_ids if kv_slot_ids is not None else positions,
        num_heads, num_kv_heads, qkv.stride(0), cos_sin_cache.stride(0), float(eps), *kv_strides, *multipliers,
        HEAD_DIM=head_dim, HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
        SIGMOID_GATE=sigmoid_gate, WRITE_KV=kv_cache is not None, KV_FP8=kv_fp8, num_warps=num_warps,
        **pdl_launch_args(qkv.device),
    )
    return q, k, v, gate

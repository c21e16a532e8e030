"""Chunked Gated DeltaNet prefill over a variable-length batch, in two launches.

Reference: ``kernels.gdn.chunk_gated_delta_rule`` per sequence, chained through the state slots.

Per chunk of C=64 tokens of one value head (rows i, j of the chunk, gc = cumulative log-decay in the chunk,
k, q L2-normalised, q scaled by Dk**-0.5):

    M[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j)             for i > j (0 elsewhere)
    T       = (I + M)^-1                                        (UT transform of the chunk's delta updates)
    w       = T (beta * exp(gc) * k),   u = T (beta * v)
    Aqk     = (q k^T) * exp(gc_i - gc_j)                        for i >= j
    v_new   = u - w S;   o = (exp(gc) * q) S + Aqk v_new;   S <- exp(gc_last) S + (exp(gc_last - gc) * k)^T v_new

(the state pass applies the q/k norms and exp factors as row scales: o = (q_raw S) * qscale + Aqk v_new,
S <- exp(gc_last) S + k_raw^T (v_new * kscale)).

1. ``_gdn_chunk_prep_kernel``, grid (chunk, value head), fully parallel: gating (softplus/sigmoid of the raw
   projections), cumsum, q/k row norms, Aqk, M, the triangular inverse, w and u, written to scratch. q and k
   stay raw 16-bit dot operands; their norms are applied as row/column scales of the fp32 products.
   The inverse is blocked: the four 16x16 diagonal blocks are inverted together by Gauss transforms
   (15 rank-1 steps on a [4, 16, 16] tile, ``_diag_block_inverse``), then merged exactly: with D the
   block-diagonal inverse and M_off the strictly block-lower part of M, (I + M)^-1 = (I + N)^-1 D with
   N = D M_off, and N^4 = 0, so (I + N)^-1 = (I - N)(I + N^2). Four 64x64 products instead of 63 dependent
   row updates, and no power series of M itself (whose entries can grow combinatorially when keys are nearly parallel).
2. ``_gdn_chunk_state_kernel``, grid (V-block, sequence x value head), sequential over the chunks of one
   sequence: carries the ``[Dk, BV]`` state slice in registers, computes v_new, the output and the state
   update per chunk, and writes the state in place (final state to the sequence's slot, checkpoint states to
   theirs). The output is produced here, so the per-chunk states are never written to memory (fla writes
   them, 32 KiB per chunk and head, and reads them back in a separate output kernel).

Varlen and checkpoints: chunks are laid out per sequence on the host. A chunk never crosses a sequence end
or a checkpoint offset: each checkpoint offset restarts the 64-token tiling, so any offset (not only
multiples of 64) gets its exact state at the cost of one partial chunk. This needs ``cu_seqlens`` and the
checkpoint list on the host (one small sync if they are device tensors).

Precision: bf16 inputs use tensor-core dots on 16-bit operands with fp32 accumulation (the state stays
fp32; it is rounded to 16 bits only as a dot operand, as in fla), and tf32 for the fp32 dots of the
triangular inverse. fp32 inputs use fp32 operands with ``input_precision="ieee"`` everywhere, so results match
the fp32 reference to ~1e-5 on the GPU too (slow: testing only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gdn_decode import is_interpreting, softplus
from .gemv import prefetch_l2

CHUNK = 64  # tokens per chunk; the blocked inverse below assumes a multiple of 16
SUB = 16  # diagonal block size of the blocked inverse
# bf16: smallest N of the 16-bit tensor-core dots (see gdn_prefill: narrower tiles miscompile on sm_90)
_MIN_PREP_N = 64  # prep kernel: w = T k (N = BK) and u = T v (N = BVF)
# State pass: V-block width. 32 is right for the real heads (Dv 128: bench_gdn's errors on H100), but with
# heads narrower than 64 (Dk 64, Dv 32: test_gdn_prefill_bf16_multi_chunk) BV 32 gave non-finite outputs on
# H100; 64 passed every prefill test there.
_MIN_STATE_BV = 32
_MIN_STATE_BV_NARROW_HEADS = 64


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str, str]:
    """(operand dtype of the data dots, precision of the data dots, precision of the fp32 solve dots)."""
    if is_interpreting():
        # The interpreter multiplies bf16 operands as raw integers; fp32 operands are exact there.
        return tl.float32, "ieee", "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee", "ieee"
    return tl.bfloat16, "tf32", "tf32"


@triton.jit
def _diag_block_inverse(m, C: tl.constexpr, S: tl.constexpr):
    """The ``[C, C]`` matrix holding ``(I + L_b)^-1`` on its ``S x S`` diagonal blocks and zeros elsewhere, where
    ``L_b`` is diagonal block b of the strictly lower ``m``. All blocks at once, by Gauss transforms:
    ``I + L = G_0 ... G_{S-2}`` with ``G_j = I + l_j e_j^T`` (``l_j`` column j of L), so the inverse is
    ``X = I`` followed by ``X -= l_j (x) X[j, :]`` for j = 0..S-2. Each step is two masked reductions of
    tiles in their own layouts and an outer-product update, so nothing changes layout inside the loop (row-wise
    forward substitution needs a layout conversion every step: measured 40 us slower per 8K-token 397B layer).
    """
    NB: tl.constexpr = C // S
    rows = tl.arange(0, C)
    same_block = (rows[:, None] // S) == (rows[None, :] // S)
    # diagonal blocks as [NB, S, S]: entries outside them are zero, so summing the column-block axis picks them
    m_diag = tl.sum(tl.reshape(tl.where(same_block, m, 0.0), (NB, S, NB, S)), axis=2)
    sub = tl.arange(0, S)
    inv = tl.broadcast_to((sub[:, None] == sub[None, :]).to(tl.float32)[None, :, :], (NB, S, S))
    for j in tl.static_range(S - 1):
        col = tl.sum(tl.where((sub == j)[None, None, :], m_diag, 0.0), axis=2)  # [NB, S]: l_j of each block
        row = tl.sum(tl.where((sub == j)[None, :, None], inv, 0.0), axis=1)  # [NB, S]: X[j, :] of each block
        inv = inv - col[:, :, None] * row[:, None, :]
    # placed on the block diagonal of a [C, C] matrix
    blk = tl.arange(0, NB)
    d4 = tl.broadcast_to(tl.expand_dims(inv, 2), (NB, S, NB, S))
    on_diag = (blk[:, None, None, None] == blk[None, None, :, None])
    return tl.reshape(tl.where(on_diag, d4, 0.0), (C, C))


@triton.jit
def _gdn_chunk_prep_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, chunk_start_ptr, chunk_len_ptr,
    w_ptr, u_ptr, aqk_ptr, gc_ptr, qs_ptr, ks_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_at, stride_ah, stride_bt, stride_bh,
    total_tokens, scale,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_hk = i_h // GROUP
    tok0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    length = tl.load(chunk_len_ptr + i_c)

    rows = tl.arange(0, C)
    mask_t = rows < length
    tok = tok0 + rows
    srow = i_h.to(tl.int64) * total_tokens + tok  # scratch is head-major: [Hv, total_tokens, ...]
    if PREFETCH:
        # v is needed only for the last dot: start its trip from HBM now, so that the load there hits L2
        # (17 us of 460 per 8K-token 397B layer). One prefetch per 128-byte line (64 bf16); rows past the
        # chunk end are clamped to valid addresses.
        v_rows = v_ptr + tl.minimum(tok, total_tokens - 1) * stride_vt + i_h * stride_vh
        prefetch_l2(v_rows[:, None] + (tl.arange(0, DV // 64) * 64)[None, :])

    # --- gating: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) rounded like the model's ---
    a = tl.load(a_ptr + tok * stride_at + i_h * stride_ah, mask=mask_t, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + tok * stride_bt + i_h * stride_bh, mask=mask_t, other=0.0)
    neg_a = -tl.exp(tl.load(a_log_ptr + i_h).to(tl.float32))
    g = tl.where(mask_t, neg_a * softplus(a + tl.load(dt_bias_ptr + i_h).to(tl.float32)), 0.0)
    beta = (1.0 / (1.0 + tl.exp(-b.to(tl.float32)))).to(b.dtype).to(tl.float32)
    beta = tl.where(mask_t, beta, 0.0)
    gc = tl.cumsum(g, axis=0)

    # --- q and k stay raw (exact 16-bit dot operands); their L2 norms become row scales of the products ---
    offs_k = tl.arange(0, BK)
    mask_tk = mask_t[:, None] & (offs_k < DK)[None, :]
    k = tl.load(k_ptr + tok[:, None] * stride_kt + i_hk * stride_kh + offs_k[None, :], mask=mask_tk, other=0.0)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + i_hk * stride_qh + offs_k[None, :], mask=mask_tk, other=0.0)
    kf = k.to(tl.float32)
    qf = q.to(tl.float32)
    rk = tl.rsqrt(tl.sum(kf * kf, axis=1) + 1e-6)
    rq = tl.rsqrt(tl.sum(qf * qf, axis=1) + 1e-6) * scale
    k = k.to(DOT_DT)
    q = q.to(DOT_DT)
    tl.store(gc_ptr + srow, gc, mask=mask_t)
    tl.store(qs_ptr + srow, rq * tl.exp(gc), mask=mask_t)
    tl.store(ks_ptr + srow, rk, mask=mask_t)

    lower_eq = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(lower_eq, gc[:, None] - gc[None, :], 0.0))  # exponent <= 0 where used

    # --- intra-chunk attention Aqk = (q^ k^T) * decay, lower triangle with the diagonal ---
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    aqk = tl.where(lower_eq, qk * rq[:, None] * rk[None, :] * decay, 0.0)
    tl.store(aqk_ptr + srow[:, None] * C + rows[None, :], aqk.to(aqk_ptr.dtype.element_ty), mask=mask_t[:, None])

    # --- M = strictly lower (beta_i k^_i . k^_j decay_ij) ---
    kkt = tl.dot(k, tl.trans(k), input_precision=DOT_PREC)
    m = tl.where(rows[:, None] > rows[None, :], kkt * (beta * rk)[:, None] * rk[None, :] * decay, 0.0)

    # --- T = (I + M)^-1, blocked (see module docstring) ---
    same_block = (rows[:, None] // S) == (rows[None, :] // S)
    d = _diag_block_inverse(m, C, S)
    n = tl.dot(d, tl.where(same_block, 0.0, m), input_precision=SOLVE_PREC)  # N = D M_off, N^4 = 0
    n2 = tl.dot(n, n, input_precision=SOLVE_PREC)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    inv_n = tl.dot(eye - n, eye + n2, input_precision=SOLVE_PREC)  # (I + N)^-1 = (I - N)(I + N^2)
    t = tl.dot(inv_n, d, input_precision=SOLVE_PREC)

    # --- w = T diag(beta exp(gc) rk) k,  u = T diag(beta) v: the diagonals scale T's columns ---
    w = tl.dot((t * (beta * tl.exp(gc) * rk)[None, :]).to(DOT_DT), k, input_precision=DOT_PREC)
    tl.store(w_ptr + srow[:, None] * DK + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_tk)
    offs_v = tl.arange(0, BVF)
    mask_tv = mask_t[:, None] & (offs_v < DV)[None, :]
    v = tl.load(v_ptr + tok[:, None] * stride_vt + i_h * stride_vh + offs_v[None, :], mask=mask_tv, other=0.0)
    u = tl.dot((t * beta[None, :]).to(DOT_DT), v.to(DOT_DT), input_precision=DOT_PREC)
    tl.store(u_ptr + srow[:, None] * DV + offs_v[None, :], u.to(u_ptr.dtype.element_ty), mask=mask_tv)


@triton.jit
def _gdn_chunk_step(
    state, i_c, i_h, i_hk, offs_k, offs_v, mask_k, mask_v,
    q_ptr, k_ptr, w_ptr, u_ptr, aqk_ptr, gc_ptr, qs_ptr, ks_ptr, out_ptr, ssm_ptr,
    chunk_start_ptr, chunk_len_ptr, chunk_ckpt_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_s_slot, stride_s_head, stride_s_k,
    total_tokens,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One chunk of the state pass: returns the state after the chunk."""
    tok0 = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    length = tl.load(chunk_len_ptr + i_c)
    ckpt = tl.load(chunk_ckpt_ptr + i_c).to(tl.int64)
    rows = tl.arange(0, C)
    mask_t = rows < length
    tok = tok0 + rows
    srow = i_h.to(tl.int64) * total_tokens + tok
    mask_tk = mask_t[:, None] & mask_k[None, :]
    mask_tv = mask_t[:, None] & mask_v[None, :]

    gc = tl.load(gc_ptr + srow, mask=mask_t, other=0.0)
    gc_last = tl.load(gc_ptr + i_h.to(tl.int64) * total_tokens + tok0 + length - 1)
    q_scale = tl.load(qs_ptr + srow, mask=mask_t, other=0.0)  # rsqrt(|q|^2) Dk^-0.5 exp(gc)
    k_scale = tl.load(ks_ptr + srow, mask=mask_t, other=0.0) * tl.exp(gc_last - gc)  # rsqrt(|k|^2) exp(..)
    # The tiles feed the dots as loaded (raw q/k: exact operands; the norms are applied as row scales).
    w = tl.load(w_ptr + srow[:, None] * DK + offs_k[None, :], mask=mask_tk, other=0.0).to(DOT_DT)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + i_hk * stride_qh + offs_k[None, :], mask=mask_tk, other=0.0)
    k = tl.load(k_ptr + tok[:, None] * stride_kt + i_hk * stride_kh + offs_k[None, :], mask=mask_tk, other=0.0)
    aqk = tl.load(aqk_ptr + srow[:, None] * C + rows[None, :], mask=mask_t[:, None], other=0.0).to(DOT_DT)
    u = tl.load(u_ptr + srow[:, None] * DV + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)

    # The products accumulate into their fp32 consumers (acc=): fewer live register tiles.
    state_op = state.to(DOT_DT)
    v_new = u - tl.dot(w, state_op, input_precision=DOT_PREC)
    o = tl.dot(q.to(DOT_DT), state_op, input_precision=DOT_PREC) * q_scale[:, None]
    o = tl.dot(aqk, v_new.to(DOT_DT), acc=o, input_precision=DOT_PREC)
    p_o = out_ptr + tok[:, None] * stride_ot + i_h * stride_oh + offs_v[None, :]
    tl.store(p_o, o.to(out_ptr.dtype.element_ty), mask=mask_tv)

    # S <- exp(gc_last) S + k^T diag(k_scale) v_new
    state = tl.dot(tl.trans(k.to(DOT_DT)), (v_new * k_scale[:, None]).to(DOT_DT), acc=state * tl.exp(gc_last),
                   input_precision=DOT_PREC)
    # A checkpoint ends exactly at this chunk: store the state there too. A branch, not a masked store: the
    # store converts the accumulator's layout through shared memory, which every chunk would pay otherwise.
    if ckpt >= 0:
        p_ckpt = (ssm_ptr + ckpt * stride_s_slot + i_h * stride_s_head
                  + offs_k[:, None] * stride_s_k + offs_v[None, :])
        tl.store(p_ckpt, state, mask=mask_k[:, None] & mask_v[None, :])
    return state


@triton.jit
def _gdn_chunk_state_kernel(
    q_ptr, k_ptr, w_ptr, u_ptr, aqk_ptr, gc_ptr, qs_ptr, ks_ptr, out_ptr, ssm_ptr, slots_ptr, has_init_ptr,
    seq_chunk_ptr, chunk_start_ptr, chunk_len_ptr, chunk_ckpt_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_s_slot, stride_s_head, stride_s_k,
    total_tokens,
    HV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, C: tl.constexpr, DOT_DT: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_h = i_nh % HV
    i_hk = i_h // GROUP
    slot = tl.load(slots_ptr + i_n).to(tl.int64)
    has_init = tl.load(has_init_ptr + i_n) != 0

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_s = mask_k[:, None] & mask_v[None, :]
    p_state = ssm_ptr + slot * stride_s_slot + i_h * stride_s_head + offs_k[:, None] * stride_s_k + offs_v[None, :]
    state = tl.load(p_state, mask=mask_s & has_init, other=0.0)

    c_begin = tl.load(seq_chunk_ptr + i_n)
    c_end = tl.load(seq_chunk_ptr + i_n + 1)
    if INTERPRET:
        # The interpreter cannot take a runtime range bound (numpy >= 2.4); same steps as the loop below.
        i_c = c_begin
        while i_c < c_end:
            state = _gdn_chunk_step(
                state, i_c, i_h, i_hk, offs_k, offs_v, mask_k, mask_v,
                q_ptr, k_ptr, w_ptr, u_ptr, aqk_ptr, gc_ptr, qs_ptr, ks_ptr, out_ptr, ssm_ptr,
                chunk_start_ptr, chunk_len_ptr, chunk_ckpt_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                stride_s_slot, stride_s_head, stride_s_k, total_tokens,
                DK, DV, C, DOT_DT, DOT_PREC,
            )
            i_c += 1
    else:
        # A for loop, so that Triton pipelines the next chunk's loads under this chunk's dots. (Loading the
        # next chunk's start/length one iteration ahead by hand made the H100 pass slower: 369 -> 391 us.)
        for i_c in range(c_begin, c_end):
            state = _gdn_chunk_step(
                state, i_c, i_h, i_hk, offs_k, offs_v, mask_k, mask_v,
                q_ptr, k_ptr, w_ptr, u_ptr, aqk_ptr, gc_ptr, qs_ptr, ks_ptr, out_ptr, ssm_ptr,
                chunk_start_ptr, chunk_len_ptr, chunk_ckpt_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                stride_s_slot, stride_s_head, stride_s_k, total_tokens,
                DK, DV, C, DOT_DT, DOT_PREC,
            )
    tl.store(p_state, state, mask=mask_s)


def prefill_config(num_seqs: int, num_v_heads: int, v_dim: int, num_sms: int = 132) -> dict[str, int]:
    """Launch parameters of the two prefill kernels (a starting point; ``kernels/bench_gdn.py --sweep`` tunes).

    The state pass has one program per (sequence, value head, V-block) and is sequential over chunks; it
    takes ~255 registers and 64-74 KiB of shared memory per stage at 4 warps, so 2 programs fit per SM with
    one stage and 1 with two (the second stage prefetches the next chunk). Prefer the widest V-block that
    still gives ~one program per SM (wider blocks re-read w, q, k and Aqk fewer times). Two stages always:
    on the H100 they beat one stage even with several waves of programs (397B, 4 x 2K tokens: 820 vs 900 us;
    ``kernels/results/gdn_h100.json``), and BV=32 with one stage faults there (illegal address, Triton 3.6).
    """
    for block_v in (64, 32, 16):
        programs = num_seqs * num_v_heads * triton.cdiv(v_dim, block_v)
        if programs >= 0.75 * num_sms:
            break
    return {
        "block_v": min(block_v, triton.next_power_of_2(v_dim)),
        "state_warps": 4,
        "state_stages": 2,
        "prep_warps": 4,
    }


def _as_list(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.tolist()]
    try:
        return [int(v) for v in x]
    except TypeError as exc:
        raise ValueError(f"{name} must be a tensor or a sequence of ints") from exc


def _plan_chunks(
    seq_lens: list[int], checkpoints: list[tuple[int, int, int]], chunk: int,
    splits: list[tuple[int, int]] = (),
) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Lays the chunks out on the host.

    Returns (chunk_start, chunk_len, chunk_ckpt, seq_chunk_ptr, zero_ckpts, dup_ckpts): chunk_start is
    relative to the packed batch, chunk_ckpt is the slot that receives the state after the chunk (-1: none),
    zero_ckpts are (seq, dest) checkpoints taken before any token, dup_ckpts (src_dest, dest) extra
    checkpoints at an offset that already has one (copied after the launch). ``splits``: (seq, offset) where
    a chunk must end although no state is stored there, as if a checkpoint were taken.
    """
    per_seq: list[dict[int, int]] = [{} for _ in seq_lens]
    zero_ckpts: list[tuple[int, int]] = []
    dup_ckpts: list[tuple[int, int]] = []
    for seq, offset, dest in checkpoints:
        if not 0 <= seq < len(seq_lens):
            raise ValueError(f"checkpoint sequence index {seq} out of range [0, {len(seq_lens)})")
        if not 0 <= offset <= seq_lens[seq]:
            raise ValueError(f"checkpoint offset {offset} outside sequence {seq} of length {seq_lens[seq]}")
        if offset == 0:
            zero_ckpts.append((seq, dest))
        elif offset in per_seq[seq]:
            dup_ckpts.append((per_seq[seq][offset], dest))
        else:
            per_seq[seq][offset] = dest
    for seq, offset in splits:
        if not 0 <= seq < len(seq_lens) or not 0 <= offset <= seq_lens[seq]:
            raise ValueError(f"split ({seq}, {offset}) outside the batch's sequences {seq_lens}")
        if offset:
            per_seq[seq].setdefault(offset, -1)
    chunk_start: list[int] = []
    chunk_len: list[int] = []
    chunk_ckpt: list[int] = []
    seq_chunk_ptr = [0]
    seq_start = 0
    for seq, seq_len in enumerate(seq_lens):
        piece_start = 0
        for end in sorted(set(per_seq[seq]) | {seq_len}):
            for start in range(piece_start, end, chunk):
                length = min(chunk, end - start)
                chunk_start.append(seq_start + start)
                chunk_len.append(length)
                chunk_ckpt.append(per_seq[seq].get(start + length, -1) if start + length == end else -1)
            piece_start = end
        seq_start += seq_len
        seq_chunk_ptr.append(len(chunk_start))
    return chunk_start, chunk_len, chunk_ckpt, seq_chunk_ptr, zero_ckpts, dup_ckpts


@dataclass(frozen=True)
class GdnPrefillPlan:
    """Host-side layout of one prefill batch: build it once per forward pass with :func:`plan_gdn_prefill` and
    pass it to every GDN layer (``gdn_prefill(..., plan=plan)``), so the host work and the one small
    host-to-device copy happen once rather than per layer."""

    total_tokens: int
    num_seqs: int
    num_chunks: int
    has_init: tuple[bool, ...]
    zero_ckpts: tuple[tuple[int, int], ...]  # (sequence, destination slot): state before any token
    dup_ckpts: tuple[tuple[int, int], ...]  # (source slot, destination slot): copies after the launch
    chunk_start: torch.Tensor  # [num_chunks] int32, token index in the packed batch
    chunk_len: torch.Tensor  # [num_chunks] int32, 1..CHUNK
    chunk_ckpt: torch.Tensor  # [num_chunks] int32, slot receiving the state after the chunk, -1: none
    seq_chunk_ptr: torch.Tensor  # [num_seqs + 1] int32, chunks of sequence n: [ptr[n], ptr[n+1])
    has_init_dev: torch.Tensor  # [num_seqs] int32
    # The plan's inputs on the device, for the conv kernel of the same layers (conv1d_prefill takes them as
    # tensors): copying host lists per layer would be a synchronising pageable copy each time.
    cu_seqlens_dev: torch.Tensor  # [num_seqs + 1] int32
    checkpoints_dev: torch.Tensor  # [num_checkpoints, 3] int32: (sequence, offset, destination slot)


def plan_gdn_prefill(
    cu_seqlens: torch.Tensor | Sequence[int],
    has_initial_state: torch.Tensor | Sequence[bool],
    checkpoints: torch.Tensor | Sequence[tuple[int, int, int]] | None,
    device: torch.device | str,
    splits: Sequence[tuple[int, int]] = (),
) -> GdnPrefillPlan:
    """Chunk tables for :func:`gdn_prefill` (reads its arguments on the host: pass lists or CPU tensors).
    ``splits``: (sequence index, token offset) where a chunk ends without storing the state there, so that
    a sequence is computed in the same pieces whether or not a checkpoint could be taken at that offset."""
    cu = _as_list(cu_seqlens, "cu_seqlens")
    num_seqs = len(cu) - 1
    if num_seqs < 0 or cu[0] != 0 or any(x > y for x, y in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0, got {cu}")
    has_init = tuple(bool(x) for x in _as_list(has_initial_state, "has_initial_state"))
    if len(has_init) != num_seqs:
        raise ValueError(f"has_initial_state must have {num_seqs} entries, got {len(has_init)}")
    if checkpoints is None:
        ckpts: list[tuple[int, int, int]] = []
    else:
        flat = checkpoints.tolist() if isinstance(checkpoints, torch.Tensor) else list(checkpoints)
        ckpts = [(int(s), int(o), int(d)) for s, o, d in flat]
    seq_lens = [y - x for x, y in zip(cu, cu[1:], strict=False)]
    split_points = [(int(seq), int(offset)) for seq, offset in splits]
    chunk_start, chunk_len, chunk_ckpt, seq_chunk_ptr, zero_ckpts, dup_ckpts = _plan_chunks(
        seq_lens, ckpts, CHUNK, split_points
    )
    n = len(chunk_start)
    # One host->device copy for all the tables (pinned and asynchronous: a pageable copy would wait for the
    # stream to drain).
    ckpt_flat = [v for triple in ckpts for v in triple]
    meta = torch.tensor(chunk_start + chunk_len + chunk_ckpt + seq_chunk_ptr + [int(x) for x in has_init] + cu
                        + ckpt_flat, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        meta = meta.pin_memory()
    meta = meta.to(device, non_blocking=True)
    bounds = [0, n, 2 * n, 3 * n, 3 * n + num_seqs + 1, 3 * n + 2 * num_seqs + 1, 3 * n + 3 * num_seqs + 2]
    tables = [meta[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    return GdnPrefillPlan(
        total_tokens=cu[-1], num_seqs=num_seqs, num_chunks=n, has_init=has_init,
        zero_ckpts=tuple(zero_ckpts), dup_ckpts=tuple(dup_ckpts),
        chunk_start=tables[0], chunk_len=tables[1], chunk_ckpt=tables[2], seq_chunk_ptr=tables[3],
        has_init_dev=tables[4], cu_seqlens_dev=tables[5], checkpoints_dev=meta[bounds[-1]:].view(-1, 3),
    )


def gdn_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    state_slots: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
    has_initial_state: torch.Tensor | Sequence[bool] | None,
    checkpoints: torch.Tensor | Sequence[tuple[int, int, int]] | None = None,
    *,
    plan: GdnPrefillPlan | None = None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    state_warps: int | None = None,
    state_stages: int | None = None,
    state_maxnreg: int | None = None,
    prep_warps: int | None = None,
    prep_maxnreg: int | None = None,
) -> torch.Tensor:
    """Chunked GDN over packed variable-length sequences, states read from and written to pool slots.

    ``q, k [T_total, Hk, Dk]``, ``v [T_total, Hv, Dv]`` (post-conv, not normalised; any token/head strides,
    last dim contiguous), ``a, b [T_total, Hv]`` raw projections, ``A_log, dt_bias [Hv]`` fp32, ``ssm_states``
    the pool view of one layer ``[num_slots, Hv, Dk, Dv]`` fp32 (any slot stride, slots contiguous),
    ``state_slots [B]`` int slot per sequence (distinct), ``cu_seqlens [B+1]``, ``has_initial_state [B]``
    (False: start from zeros). ``checkpoints``: (sequence index, token offset in the sequence, destination
    slot) triples or an int tensor ``[n, 3]``; the state after exactly ``offset`` tokens (any offset in
    ``[0, len]``) is written to the destination slot, which must not be any sequence's slot in this batch.
    Writes each sequence's final state to its slot and returns ``o [T_total, Hv, Dv]`` in v's dtype (written
    into ``out`` if given).

    ``cu_seqlens``, ``has_initial_state`` and ``checkpoints`` are read on the host (pass lists or CPU tensors
    to avoid a sync); or pass ``plan=plan_gdn_prefill(...)`` built once for all layers (then those three
    arguments are ignored and may be None). The other keyword-only arguments override :func:`prefill_config`
    (``*_maxnreg`` caps registers per thread, trading spills for more resident programs per SM).
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[0] != q.shape[0]:
        raise ValueError(f"expected q, k [T, Hk, Dk] and v [T, Hv, Dv], got {q.shape}, {k.shape}, {v.shape}")
    total, num_k_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[1], v.shape[2]
    if num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    if a.shape != (total, num_v_heads) or b.shape != a.shape:
        raise ValueError(f"a and b must be [T, Hv] = {(total, num_v_heads)}, got {a.shape}, {b.shape}")
    if A_log.shape != (num_v_heads,) or dt_bias.shape != (num_v_heads,):
        raise ValueError(f"A_log and dt_bias must be [{num_v_heads}], got {A_log.shape}, {dt_bias.shape}")
    if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
        raise ValueError("A_log and dt_bias must be fp32")
    if not (A_log.is_contiguous() and dt_bias.is_contiguous()):
        raise ValueError("A_log and dt_bias must be contiguous")
    if ssm_states.dim() != 4 or ssm_states.shape[1:] != (num_v_heads, k_dim, v_dim):
        raise ValueError(f"ssm_states must be [slots, {num_v_heads}, {k_dim}, {v_dim}], got {ssm_states.shape}")
    if ssm_states.dtype != torch.float32:
        raise ValueError(f"ssm_states must be fp32, got {ssm_states.dtype}")
    if ssm_states.stride()[1:] != (k_dim * v_dim, v_dim, 1):
        raise ValueError(f"each slot of ssm_states must be contiguous, got strides {ssm_states.stride()}")
    for name, t in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")
    # fp16 is refused: the decay factors folded into the 16-bit dot operands (exp(gc) over a chunk) can
    # underflow its exponent range; bf16 has fp32's.
    if not (q.dtype == k.dtype == v.dtype) or v.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"q, k, v must share dtype bf16 or fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k_dim < 16 or v_dim < 16:
        raise ValueError("head dims must be >= 16 (tensor-core tile)")
    if len({t.device for t in (q, k, v, a, b, A_log, dt_bias, ssm_states, state_slots)}) != 1:
        raise ValueError("all tensors must be on the same device")
    if plan is None:
        plan = plan_gdn_prefill(cu_seqlens, has_initial_state, checkpoints, v.device)
    if plan.total_tokens != total:
        raise ValueError(f"cu_seqlens ends at {plan.total_tokens}, but there are {total} tokens")
    num_seqs = plan.num_seqs
    if state_slots.shape != (num_seqs,) or state_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slots must be int32/int64 [{num_seqs}], got {state_slots.dtype} {state_slots.shape}")
    if out is None:
        out = torch.empty(total, num_v_heads, v_dim, dtype=v.dtype, device=v.device)
    elif out.shape != v.shape or out.dtype != v.dtype or out.stride(-1) != 1 or out.device != v.device:
        raise ValueError(f"out must be {tuple(v.shape)} {v.dtype} on {v.device}, contiguous in its last dim")
    if num_seqs == 0:
        return out

    num_sms = torch.cuda.get_device_properties(v.device).multi_processor_count if v.is_cuda else 132
    cfg = prefill_config(num_seqs, num_v_heads, v_dim, num_sms)
    block_v = block_v or cfg["block_v"]
    dot_dt, dot_prec, solve_prec = _dot_types(v.dtype)
    group = num_v_heads // num_k_heads
    bk = triton.next_power_of_2(k_dim)
    # Widths of the N dimension of the prep kernel's w / u dots and of the state pass's dots.
    prep_bk, bvf = bk, triton.next_power_of_2(v_dim)
    if v.dtype == torch.bfloat16:
        # Narrow 16-bit wgmma tiles misbehave on H100 with Triton 3.6 (the indexing is in bounds: checked under
        # the interpreter). The prep kernel alone, Dv=32 (u = T v: an m64n32k16 wgmma whose A operand is the
        # solve's tf32 accumulator), faulted with "illegal memory access"; it was correct at Dv 64/128, with
        # BVF padded to 128, or with u as a tf32 dot. With a correct prep, the state pass at BV=16 (m64n16k16)
        # gave wrong or NaN outputs, and BV=32 did too with Dv=32. Pad those tiles (the masks cover the extra
        # columns); the real shapes (Dk = Dv = 128, BV 32/64) are unchanged.
        prep_bk, bvf = max(prep_bk, _MIN_PREP_N), max(bvf, _MIN_PREP_N)
        block_v = max(block_v, _MIN_STATE_BV if v_dim >= 64 else _MIN_STATE_BV_NARROW_HEADS)
        if block_v < 64 and state_stages == 1:
            # measured on H100 (Dv 128, BV 32, 4 or 8 warps): "illegal memory access"; two stages are correct
            raise ValueError("state_stages=1 needs block_v >= 64 for bf16 (narrower tiles fault on sm_90)")
    # Checkpoints before any token: the initial state itself (read before the kernel overwrites the slot).
    for seq, dest in plan.zero_ckpts:
        if plan.has_init[seq]:
            ssm_states[dest].copy_(ssm_states.index_select(0, state_slots[seq : seq + 1])[0])
        else:
            ssm_states[dest].zero_()

    if plan.num_chunks:
        # Scratch in the activation dtype (16-bit operands of the state pass's dots). The interpreter rounds
        # fp32 -> bf16 by truncation (biased, unlike the GPU's round-to-nearest), so it keeps fp32 scratch.
        scratch_dtype = torch.float32 if is_interpreting() else v.dtype
        w = torch.empty(num_v_heads, total, k_dim, dtype=scratch_dtype, device=v.device)
        u = torch.empty(num_v_heads, total, v_dim, dtype=scratch_dtype, device=v.device)
        aqk = torch.empty(num_v_heads, total, CHUNK, dtype=scratch_dtype, device=v.device)
        # per (head, token) fp32 row data: cumulative log-decay, q and k row scales
        gc, q_scale, k_scale = torch.empty(3, num_v_heads, total, dtype=torch.float32, device=v.device)
        _gdn_chunk_prep_kernel[(plan.num_chunks, num_v_heads)](
            q, k, v, a, b, A_log, dt_bias, plan.chunk_start, plan.chunk_len,
            w, u, aqk, gc, q_scale, k_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            total, k_dim**-0.5,
            GROUP=group, DK=k_dim, DV=v_dim, BK=prep_bk, BVF=bvf,
            C=CHUNK, S=SUB, DOT_DT=dot_dt, DOT_PREC=dot_prec, SOLVE_PREC=solve_prec,
            PREFETCH=v.dtype == torch.bfloat16 and v_dim % 64 == 0 and not is_interpreting(),
            num_warps=prep_warps or cfg["prep_warps"], maxnreg=prep_maxnreg,
        )
    else:  # only empty sequences: the state pass still moves initial states (or zeros) into the slots
        w = u = aqk = out
        gc = q_scale = k_scale = ssm_states
    _gdn_chunk_state_kernel[(triton.cdiv(v_dim, block_v), num_seqs * num_v_heads)](
        q, k, w, u, aqk, gc, q_scale, k_scale, out, ssm_states, state_slots, plan.has_init_dev,
        plan.seq_chunk_ptr, plan.chunk_start, plan.chunk_len, plan.chunk_ckpt,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2),
        total,
        HV=num_v_heads, GROUP=group, DK=k_dim, DV=v_dim, BK=bk, BV=block_v, C=CHUNK,
        DOT_DT=dot_dt, DOT_PREC=dot_prec, INTERPRET=is_interpreting(),
        num_warps=state_warps or cfg["state_warps"], num_stages=state_stages or cfg["state_stages"],
        maxnreg=state_maxnreg,
    )
    for src, dest in plan.dup_ckpts:
        ssm_states[dest].copy_(ssm_states[src])
    return out

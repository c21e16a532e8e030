"""Paged decode attention (one query token per sequence) as one PDL-chained Triton launch, split over the KV.

flashinfer's decode path runs two kernels per layer (its tensor-core decode, then a merge of the KV splits), both
launched without programmatic dependent launch: at 1K context on the H200 they took 10.5 + 3.6 us a layer for 2 MB
of KV, where streaming those bytes takes ~1 us (``loadtest/bench_decode_floor.py``). Here the grid is
(split, KV head, sequence): each program owns a run of its sequence's pages, attends the GROUP query heads of its
KV head over them with an online softmax (``tl.dot`` on 16-row tiles: a GQA group of 8 padded), and writes its
partial output, max and sum; the program drawing the last ticket of its (sequence, KV head) merges the splits'
partials and writes the output. A sequence whose pages fit one split writes its output directly.

The split size adapts per sequence on the device: at least ``min_pages`` pages a split, at most ``max_splits``
splits, so a graph captured at one batch size serves every context (programs past a sequence's last split only
wait and exit). Reads: the page table (written by host copies before the step) may be read before the PDL wait;
the queries and the new token's K/V (written by the QK-norm/RoPE kernel just before, or by the fused kernel
itself) only after it.

``decode_attention_fused`` starts from the qkv projection's row instead of q: each program normalises and rotates
its group's queries (as ``kernels.triton.qk_norm_rope`` does, into a scratch q it reads back after a barrier), the
split owning the last page stores the new token's K/V in its slot first (no other split reads that page), and the
output leaves multiplied by the sigmoid of its gate: the attention layer's block between its projections in one
launch.

fp8 KV: the pages are converted to the query dtype (exact for e4m3 into bf16), ``k_scale`` folds into the
softmax scale and ``v_scale`` multiplies the output, as flashinfer does.

The page loop runs as a ``while`` loop with L2 prefetches of the next tile (``num_stages=0``, and always under
the interpreter) or software-pipelined by Triton (``num_stages``: the gathers of later tiles in flight into
shared memory while one is used; Triton gives them ``num_stages - 3`` buffers, the page ids taking a stage of
their own).

In the engine only as an opt-in (``decode_attention=triton``: ``kernels/triton_attention.py`` runs the fused
block), not yet measured there (planned). Against flashinfer's decode + merge as the engine runs them
(``kernels/bench_decode_attention.py``, ``kernels/results/decode_attention_h200.json``, us a layer, one request):
the unpipelined loop with 16-32 splits of 4 pages wins at short contexts (7.7 / 10.3 at 1K, 13.2 / 16.2 at 4K)
and loses from 32K (49 / 33); the pipelined loop with 64 splits of at least 8 pages is at parity from 32K up
(33.8 / 33.2 at 32K, 79.7 / 79.6 at 128K) but loses its edge at 1K (10.0). A decode graph serves every context
with one compiled kernel, so the gain of that one configuration is 1.6 us a layer at 4K and 0.3 at 1K; the fused
block (above) also saves the QK-norm/RoPE launch, flashinfer's merge and the gate multiply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention import fp8_multiplier, is_fp8
from kernels.triton.gemv import prefetch_l2
from kernels.triton.moe import upcast_dot
from kernels.triton.norm import round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait
from kernels.triton.qk_norm_rope import _norm_rope_heads, store_new_kv

MERGE_CHUNK = tl.constexpr(16)  # splits merged per unrolled step (see _merge_splits)


@triton.jit
def _decode_attention_kernel(
    q_ptr, kv_ptr, indptr_ptr, indices_ptr, last_len_ptr, out_ptr, part_o_ptr, part_ml_ptr, ticket_ptr,
    qkv_ptr, q_w_ptr, k_w_ptr, cos_sin_ptr, pos_ptr, slot_ptr,
    sm_scale, v_scale, eps, k_multiplier, v_multiplier,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_qkv, stride_cos_sin,
    stride_page, stride_kv, stride_tok, stride_head,
    num_kv_heads,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, TILE_PAGES: tl.constexpr, PREFETCH_PAGES: tl.constexpr, LINE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FUSED: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    pdl_trigger(PDL)
    first_page = tl.load(indptr_ptr + seq)
    num_pages = tl.load(indptr_ptr + seq + 1) - first_page
    per_split = tl.maximum(MIN_PAGES, tl.cdiv(num_pages, MAX_SPLITS))
    live = tl.cdiv(num_pages, per_split)
    begin = split * per_split
    end = tl.minimum(num_pages, begin + per_split)
    if PREFETCH_PAGES > 0 and split < live:
        # Ask L2 for the split's first pages under the previous kernel: the page table is written before the
        # step, and a line prefetched before the new token's K/V is stored into it stays coherent (L2 is where
        # the store lands). The loop below asks for the next tile's pages at each tile it reads.
        ahead = tl.arange(0, PREFETCH_PAGES)
        _prefetch_pages(kv_ptr, indices_ptr + first_page, tl.minimum(begin + ahead, num_pages - 1),
                        kv_head, stride_page, stride_kv, stride_tok, stride_head, HEAD_DIM, PAGE, LINE)
    # Every program waits, so that the kernel completes only after its predecessor (see kernels/triton/pdl.py).
    pdl_wait(PDL)
    if split < live:
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        heads = kv_head * GROUP + g
        if FUSED:  # the layer's QK-norm, RoPE and K/V store, from the qkv projection row (see decode_attention_fused)
            _prepare_fused(qkv_ptr + seq * stride_qkv, q_w_ptr, k_w_ptr, cos_sin_ptr, pos_ptr, slot_ptr, seq, heads,
                           q_ptr + seq * stride_qb + heads * stride_qh, g_mask, kv_head, num_kv_heads,
                           split == live - 1, kv_ptr, stride_cos_sin, stride_page, stride_kv, stride_tok, stride_head,
                           eps, k_multiplier, v_multiplier, GROUP, HEAD_DIM, BLOCK_D, PAGE, HALF, BLOCK_HALF,
                           BLOCK_PASS, KV_FP8)
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        kv_len = (num_pages - 1) * PAGE + tl.load(last_len_ptr + seq)
        tok = tl.arange(0, TILE_PAGES * PAGE)  # the tile's tokens: TILE_PAGES pages, gathered
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        kv_cols = kv_head * stride_head + d[None, :]
        if NUM_STAGES > 0:  # software-pipelined: the next tiles' gathers in flight while this one is used
            for i in tl.range(begin, end, TILE_PAGES, num_stages=NUM_STAGES):
                m, l_sum, acc = _attend_tile(
                    q, kv_ptr, indices_ptr + first_page, i, end, kv_len, kv_cols, tok, d_mask, m, l_sum, acc,
                    sm_scale, stride_page, stride_kv, stride_tok, PAGE, TILE_PAGES, DOT_PRECISION, UPCAST_DOT)
        else:
            i = begin
            while i < end:  # (a while loop: the interpreter cannot take a runtime range bound)
                if PREFETCH_PAGES > 0:
                    ahead = tl.minimum(i + TILE_PAGES + tl.arange(0, TILE_PAGES), end - 1)
                    _prefetch_pages(kv_ptr, indices_ptr + first_page, ahead, kv_head, stride_page, stride_kv,
                                    stride_tok, stride_head, HEAD_DIM, PAGE, LINE)
                m, l_sum, acc = _attend_tile(
                    q, kv_ptr, indices_ptr + first_page, i, end, kv_len, kv_cols, tok, d_mask, m, l_sum, acc,
                    sm_scale, stride_page, stride_kv, stride_tok, PAGE, TILE_PAGES, DOT_PRECISION, UPCAST_DOT)
                i += TILE_PAGES
        out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        out_mask = g_mask[:, None] & d_mask[None, :]
        # FUSED: the output gate, per head after its query in the projection row.
        gate_rows = qkv_ptr + seq * stride_qkv + (heads * 2 * HEAD_DIM + HEAD_DIM)[:, None] + d[None, :]
        if live == 1:
            _store_output(out_rows, acc / l_sum[:, None] * v_scale, out_mask, gate_rows, FUSED)
        else:
            pair = seq * num_kv_heads + kv_head
            part = pair * MAX_SPLITS + split
            # Only the group's rows (the tile's padding rows are never read: half the merge's bytes at 8 of 16).
            tl.store(part_o_ptr + (part * GROUP + g[:, None]) * BLOCK_D + d[None, :], acc, mask=g_mask[:, None])
            tl.store(part_ml_ptr + (part * GROUP + g) * 2, m, mask=g_mask)
            tl.store(part_ml_ptr + (part * GROUP + g) * 2 + 1, l_sum, mask=g_mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + pair, 1, sem="acq_rel")
            if ticket == live - 1:
                merged = _merge_splits(part_o_ptr, part_ml_ptr, pair, live, g_mask, v_scale, GROUP, BLOCK_G, BLOCK_D,
                                       MAX_SPLITS)
                _store_output(out_rows, merged, out_mask, gate_rows, FUSED)
                tl.atomic_xchg(ticket_ptr + pair, 0)  # ready for the next launch


@triton.jit
def _store_output(out_rows, o, out_mask, gate_rows, GATE: tl.constexpr):
    """The attention output rounded to the output dtype; GATE: then times sigmoid(gate) as the model computes
    it (the sigmoid rounded to the dtype, the product rounded once: ``out * torch.sigmoid(gate)``)."""
    dtype = out_rows.dtype.element_ty
    o = round_to(o, dtype)  # (round_to, not the cast: Triton's interpreter truncates on a cast to bf16)
    if GATE:
        g32 = tl.load(gate_rows, mask=out_mask, other=0.0).to(tl.float32)
        gate = round_to(1.0 / (1.0 + tl.exp(-g32)), dtype)
        o = round_to(o * gate, dtype)
    tl.store(out_rows, o.to(dtype), mask=out_mask)


@triton.jit
def _prepare_fused(row, q_w_ptr, k_w_ptr, cos_sin_ptr, pos_ptr, slot_ptr, seq, heads, q_rows, g_mask, kv_head,
                   num_kv_heads,
                   stores_kv, kv_ptr, stride_cos_sin, stride_page, stride_kv, stride_tok, stride_head, eps,
                   k_multiplier, v_multiplier, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAGE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
                   KV_FP8: tl.constexpr):
    """QK-norm and RoPE of the group's query heads from the projection ``row`` into ``q_rows`` (every split of
    the (sequence, KV head) writes the same values), and where ``stores_kv`` (the split that owns the last page:
    the only one that reads the new token) the new token's K (normed, roped) and V into its cache slot, all as
    ``kernels.triton.qk_norm_rope`` computes and stores them; then a barrier, so the program reads them back."""
    dtype = row.dtype.element_ty
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    r = tl.arange(0, BLOCK_HALF)
    cos = round_to(tl.load(cos_sin_ptr + pos * stride_cos_sin + r, mask=r < HALF, other=0.0).to(tl.float32),
                   dtype)[None, :]
    sin = round_to(tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + r, mask=r < HALF, other=0.0).to(tl.float32),
                   dtype)[None, :]
    _norm_rope_heads(row + heads * (2 * HEAD_DIM), q_rows, q_w_ptr, g_mask, cos, sin, eps, 1.0, HEAD_DIM, HALF,
                     BLOCK_HALF, BLOCK_PASS, False)
    if stores_kv:
        num_heads = num_kv_heads * GROUP
        kh = kv_head + tl.arange(0, 1)
        k_in = row + num_heads * 2 * HEAD_DIM + kh * HEAD_DIM
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        page = slot // PAGE
        k_dst = kv_ptr + page * stride_page + (slot - page * PAGE) * stride_tok + kh * stride_head
        store_new_kv(k_in, k_dst, k_w_ptr, kh < num_kv_heads, cos, sin, eps, k_multiplier, v_multiplier,
                     num_kv_heads * HEAD_DIM, stride_kv, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_PASS, BLOCK_D, KV_FP8)
    tl.debug_barrier()


@triton.jit
def _attend_tile(q, kv_ptr, seq_indices_ptr, i, end, kv_len, kv_cols, tok, d_mask, m, l_sum, acc, sm_scale,
                 stride_page, stride_kv, stride_tok, PAGE: tl.constexpr, TILE_PAGES: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One tile of the online softmax: the sequence's pages ``i .. i + TILE_PAGES`` (those before ``end``),
    gathered; returns the updated running max, sum and output."""
    dtype = q.dtype
    page_pos = i + tok // PAGE
    t_mask = (page_pos < end) & (page_pos * PAGE + tok % PAGE < kv_len)
    page = tl.load(seq_indices_ptr + page_pos, mask=page_pos < end, other=0).to(tl.int64)
    rows = kv_ptr + page[:, None] * stride_page + (tok % PAGE)[:, None] * stride_tok + kv_cols
    k = tl.load(rows, mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(dtype)
    v = tl.load(rows + stride_kv, mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(dtype)
    if UPCAST_DOT:  # interpreter only, see kernels.triton.moe.upcast_dot
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = tl.where(t_mask[None, :], s * sm_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    if UPCAST_DOT:
        pv = tl.dot(p.to(dtype).to(tl.float32), v.to(tl.float32))
    else:
        pv = tl.dot(p.to(dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_sum, acc * alpha[:, None] + pv


@triton.jit
def _prefetch_pages(kv_ptr, seq_indices_ptr, page_numbers, kv_head, stride_page, stride_kv, stride_tok, stride_head,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetches of the K and V rows of one KV head in the sequence's pages ``page_numbers`` (a 1-D tensor
    of positions in its page list, all valid): one per LINE elements (128 bytes) of a row."""
    pages = tl.load(seq_indices_ptr + page_numbers).to(tl.int64)
    t = tl.arange(0, PAGE)
    kv = tl.arange(0, 2)
    lines = tl.arange(0, (HEAD_DIM + LINE - 1) // LINE) * LINE
    rows = (pages[:, None, None] * stride_page + kv[None, :, None] * stride_kv + t[None, None, :] * stride_tok
            + kv_head * stride_head)
    prefetch_l2(kv_ptr + rows[:, :, :, None] + lines[None, None, None, :])


@triton.jit
def _merge_splits(part_o_ptr, part_ml_ptr, pair, live, g_mask, v_scale, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """The output of one (sequence, KV head), fp32, from its ``live`` splits' partials: weights exp(m_s - max m), the
    sums and outputs added up with them. The partials were written by other programs of the launch: read
    through L2 (.cg). One pass, MERGE_CHUNK splits at a time: a chunk's loads are unrolled and masked (no
    branches: issued together), and the running max rescales what earlier chunks added, so up to MERGE_CHUNK
    splits cost one round of L2 latency. (All splits unrolled cost registers the attention loop needs -- 255
    and spills against 211 at 64 -- and minutes of compilation at 128; a pass for the max and another for the
    sums cost 3 us a layer at 16 splits.)"""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    base = pair * MAX_SPLITS
    m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    o = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    c = 0
    while c < live:
        m_chunk = m_run
        for j in tl.static_range(MERGE_CHUNK):
            live_j = g_mask & (c + j < live)
            m_j = tl.load(part_ml_ptr + ((base + c + j) * GROUP + g) * 2, mask=live_j, other=float("-inf"),
                          cache_modifier=".cg")
            m_chunk = tl.maximum(m_chunk, m_j)
        # What the earlier chunks added, rescaled to the new max (0 before the first; padding rows stay 0).
        rescale = tl.where(m_chunk == float("-inf"), 0.0, tl.exp(m_run - m_chunk))
        total *= rescale
        o *= rescale[:, None]
        for j in tl.static_range(MERGE_CHUNK):
            part = (base + c + j) * GROUP + g
            live_j = g_mask & (c + j < live)
            m_j = tl.load(part_ml_ptr + part * 2, mask=live_j, other=float("-inf"), cache_modifier=".cg")
            l_j = tl.load(part_ml_ptr + part * 2 + 1, mask=live_j, other=0.0, cache_modifier=".cg")
            w_j = tl.where(live_j, tl.exp(m_j - m_chunk), 0.0)  # 0 past the live splits and in padding rows
            total += w_j * l_j
            o += w_j[:, None] * tl.load(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], mask=live_j[:, None],
                                        other=0.0, cache_modifier=".cg")
        m_run = m_chunk
        c += MERGE_CHUNK
    return o / total[:, None] * v_scale


@dataclass
class DecodeAttentionScratch:
    """The kernel's split partials and per-(sequence, KV head) tickets for up to ``max_batch`` sequences; owned by
    one attention backend (one stream) and reused by every layer and step (the tickets return to 0)."""

    part_o: torch.Tensor
    part_ml: torch.Tensor
    tickets: torch.Tensor
    max_splits: int

    @classmethod
    def new(cls, max_batch: int, num_kv_heads: int, group: int, head_dim: int, max_splits: int,
            device: torch.device) -> DecodeAttentionScratch:
        if max_splits < 1 or max_splits & (max_splits - 1):
            raise ValueError(f"max_splits must be a power of two, got {max_splits}")
        rows = max_batch * num_kv_heads * max_splits * group  # the group's rows of each split (not the tile's)
        return cls(torch.empty(rows * triton.next_power_of_2(head_dim), dtype=torch.float32, device=device),
                   torch.empty(rows * 2, dtype=torch.float32, device=device),
                   torch.zeros(max_batch * num_kv_heads, dtype=torch.int32, device=device), max_splits)


def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))  # tl.dot's smallest M


@dataclass(frozen=True)
class DecodeShape:
    """How the kernel splits and walks the pages (see decode_attention): at least ``min_pages`` pages a split,
    ``tile_pages`` pages a loop step, L2 prefetches ``prefetch_pages`` ahead or a ``num_stages``-deep pipeline."""

    min_pages: int = 4
    tile_pages: int = 4
    num_warps: int = 8
    prefetch_pages: int = 4
    num_stages: int = 0


def decode_attention(
    q: torch.Tensor, kv_cache_layer: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
    last_page_len: torch.Tensor, scale: float, scratch: DecodeAttentionScratch, *, k_scale: float = 1.0,
    v_scale: float = 1.0, min_pages: int = 4, tile_pages: int = 4, num_warps: int = 8, prefetch_pages: int = 4,
    num_stages: int = 0,
) -> torch.Tensor:
    """``q [B, heads, head_dim]`` (one token per sequence, at the end of its keys) over the pages of each
    sequence: ``indptr [B+1]``, ``indices`` (page ids, sequence after sequence) and ``last_page_len [B]`` as
    flashinfer takes them (int32, on the device; every sequence has at least one token, as a graph's padding rows
    do). ``kv_cache_layer [pages, 2, page_size, kv_heads, head_dim]``.
    Returns a new ``[B, heads, head_dim]`` in q's dtype. No host synchronisation: capturable in a CUDA graph.
    ``tile_pages`` (a power of two): pages gathered into one tile of the attention loop; ``prefetch_pages``
    (non-zero: on, not under Triton's interpreter, which has no prefetch): each program asks L2 for its first
    pages before the PDL wait and for the next tile's pages at each tile. ``num_stages`` (non-zero: on, not under
    the interpreter): the page loop software-pipelined that deep (Triton's ``tl.range``), its gathers in flight
    ahead of their use instead of the loop-ahead L2 prefetches."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"expected q [B, heads, D] with unit last stride, got {tuple(q.shape)}")
    shape = DecodeShape(min_pages, tile_pages, num_warps, prefetch_pages, num_stages)
    return _launch(q, q, None, kv_cache_layer, indptr, indices, last_page_len, scale, scratch, k_scale, v_scale,
                   shape)


@dataclass(frozen=True)
class FusedInputs:
    """What the layer's QK-norm/RoPE kernel would take (kernels.triton.qk_norm_rope): the qkv projection rows
    ``[B, heads*2*D + 2*kv_heads*D]`` (per head [q | gate], then k, then v; unit last stride), the q/k norm weights
    ``[D]``, the cos/sin cache ``[max_pos, rotary_dim]``, the tokens' positions ``[B]``, their KV slots ``[B]``
    (page * page_size + offset) and the norm's eps."""

    qkv: torch.Tensor
    q_norm_weight: torch.Tensor
    k_norm_weight: torch.Tensor
    cos_sin_cache: torch.Tensor
    positions: torch.Tensor
    kv_slot_ids: torch.Tensor
    eps: float


def decode_attention_fused(
    inputs: FusedInputs, num_heads: int, kv_cache_layer: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
    last_page_len: torch.Tensor, scale: float, scratch: DecodeAttentionScratch, *, k_scale: float = 1.0,
    v_scale: float = 1.0, shape: DecodeShape = DecodeShape(),
) -> torch.Tensor:
    """A gated attention layer's decode step from its qkv projection in one launch: QK-norm, RoPE, the new
    token's K/V stored in its slot (an fp8 cache: divided by the scales), as ``qk_norm_rope(...,
    kv_cache=...)`` does, then the attention of ``decode_attention``, then the output gate. Returns the gated
    output ``[B, heads, D]`` (``attention * sigmoid(gate)``, each rounded as the model rounds them), ready for
    o_proj. The page tables already include the new token (its slot is the last of its sequence's keys)."""
    qkv = inputs.qkv
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [B, features] with unit last stride, got {tuple(qkv.shape)}")
    batch = qkv.shape[0]
    num_kv_heads, head_dim = kv_cache_layer.shape[3], kv_cache_layer.shape[4]
    if qkv.shape[1] != (2 * num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv has {qkv.shape[1]} features; {num_heads} heads and {num_kv_heads} KV heads of "
                         f"{head_dim} take {(2 * num_heads + 2 * num_kv_heads) * head_dim}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if kv_cache_layer.dtype != qkv.dtype and not is_fp8(kv_cache_layer.dtype):
        raise ValueError(f"the KV cache must hold qkv's {qkv.dtype} or fp8, got {kv_cache_layer.dtype}")
    if kv_cache_layer.stride(4) != 1 or (is_fp8(kv_cache_layer.dtype) and not (k_scale > 0 and v_scale > 0)):
        raise ValueError("the KV cache needs a unit last stride, and an fp8 one positive scales")
    cos_sin = inputs.cos_sin_cache
    rotary_dim = cos_sin.shape[1] if cos_sin.dim() == 2 else 0
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_sin.stride(1) != 1 or not cos_sin.is_floating_point():
        raise ValueError(f"the cos/sin cache must be a float [max_pos, rotary_dim <= {head_dim}], rotary_dim even, "
                         f"unit last stride; got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    tensors = (qkv, inputs.q_norm_weight, inputs.k_norm_weight, cos_sin, inputs.positions, inputs.kv_slot_ids,
               kv_cache_layer, indptr, indices, last_page_len)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all tensors must be on one device")
    for name, t in (("positions", inputs.positions), ("kv_slot_ids", inputs.kv_slot_ids)):
        if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32/int64 [{batch}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("q_norm_weight", inputs.q_norm_weight), ("k_norm_weight", inputs.k_norm_weight)):
        if t.shape != (head_dim,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{head_dim}], got {tuple(t.shape)}")
    q = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # written by the kernel
    return _launch(q, qkv, inputs, kv_cache_layer, indptr, indices, last_page_len, scale, scratch, k_scale, v_scale,
                   shape)


def _launch(q: torch.Tensor, like: torch.Tensor, fused: FusedInputs | None, kv_cache_layer: torch.Tensor,
            indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, scale: float,
            scratch: DecodeAttentionScratch, k_scale: float, v_scale: float, shape: DecodeShape) -> torch.Tensor:
    """The checks both entry points share, and the launch; ``like``: what q is read from (q, or qkv)."""
    if kv_cache_layer.dim() != 5 or kv_cache_layer.shape[1] != 2:
        raise ValueError(f"expected a KV layer [pages, 2, page, kv_heads, D], got {tuple(kv_cache_layer.shape)}")
    batch, heads, head_dim = q.shape
    num_kv_heads = kv_cache_layer.shape[3]
    if kv_cache_layer.shape[4] != head_dim or heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the KV layer {tuple(kv_cache_layer.shape)}")
    if indptr.shape != (batch + 1,) or last_page_len.shape != (batch,):
        raise ValueError(f"indptr must be [{batch + 1}] and last_page_len [{batch}]")
    page_size = kv_cache_layer.shape[2]
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"pages of a power of two >= 16 tokens (a tl.dot tile), got {page_size}")
    group = heads // num_kv_heads
    block_g, block_d = _block_g(group), triton.next_power_of_2(head_dim)
    if scratch.tickets.numel() < batch * num_kv_heads or scratch.part_ml.numel() < (
            batch * num_kv_heads * scratch.max_splits * group * 2):
        raise ValueError(f"the scratch holds fewer than {batch} sequences of {num_kv_heads} KV heads")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kv_fp8 = is_fp8(kv_cache_layer.dtype)
    if fused is not None:
        inputs = (fused.qkv, fused.q_norm_weight, fused.k_norm_weight, fused.cos_sin_cache, fused.positions,
                  fused.kv_slot_ids)
        multipliers = (fp8_multiplier(k_scale), fp8_multiplier(v_scale)) if kv_fp8 else (1.0, 1.0)
        half = fused.cos_sin_cache.shape[1] // 2
        strides = (fused.qkv.stride(0), fused.cos_sin_cache.stride(0))
        eps = float(fused.eps)
    else:
        inputs, multipliers, half, strides, eps = (like,) * 4 + (indptr, indptr), (1.0, 1.0), 1, (0, 0), 0.0
    _decode_attention_kernel[(scratch.max_splits, num_kv_heads, batch)](
        q, kv_cache_layer, indptr, indices, last_page_len, out, scratch.part_o, scratch.part_ml, scratch.tickets,
        *inputs,
        float(scale * k_scale), float(v_scale), eps, *multipliers,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides,
        *kv_cache_layer.stride()[:4],
        num_kv_heads,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page_size,
        MAX_SPLITS=scratch.max_splits, MIN_PAGES=shape.min_pages,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST_DOT=upcast_dot(q.dtype),
        TILE_PAGES=shape.tile_pages, PREFETCH_PAGES=0 if interpreted else shape.prefetch_pages,
        LINE=128 // kv_cache_layer.element_size(), NUM_STAGES=0 if interpreted else shape.num_stages,
        FUSED=fused is not None, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(max(head_dim - 2 * half, 1)), KV_FP8=kv_fp8 and fused is not None,
        num_warps=shape.num_warps, **pdl_launch_args(q.device),
    )
    return out

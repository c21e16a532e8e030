"""Causal depthwise conv1d + SiLU for the GDN input, with the last K-1 inputs kept as a per-slot state.

Reference: ``kernels.conv1d`` (``causal_conv1d_update`` for decode, ``causal_conv1d_prefill`` per sequence).
State layout per slot: ``[D, K-1]`` (oldest input first) in the conv-state pool dtype; the pool view of one
layer is ``[num_slots, D, K-1]`` with an arbitrary slot stride.

The conv is memory bound (K=4 multiply-adds per element), so the kernels are plain tiles over
(tokens, channels) with the K taps unrolled; products and sums run in fp32 (the reference multiplies in
the weight dtype, so bf16 results differ by rounding only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait


@triton.jit
def conv_update_channels(
    x, offs_d, mask_d, w_ptr, stride_wd, state_ptr, stride_s_d, K: tl.constexpr, KP: tl.constexpr,
):
    """One decode step of channels ``offs_d`` of one token: ``silu(conv)`` as fp32 from their inputs ``x``
    (``[len(offs_d)]``, in the activation dtype); shifts x into the state rows at ``state_ptr`` (one slot).
    Shared by the conv update kernel and the in_proj epilogue (kernels.triton.gemv.rms_norm_linear)."""
    cols = tl.arange(0, KP)  # state columns, padded to a power of two
    mask_c = mask_d[:, None] & (cols < K - 1)[None, :]
    p_state = state_ptr + offs_d[:, None] * stride_s_d + cols[None, :]
    state = tl.load(p_state, mask=mask_c, other=0.0)
    # The new state is the old one shifted by one column with x appended: read the shifted view now, before
    # any thread of the program stores.
    shifted = tl.load(p_state + 1, mask=mask_c & (cols < K - 2)[None, :], other=0.0)
    w_state = tl.load(w_ptr + offs_d[:, None] * stride_wd + cols[None, :], mask=mask_c, other=0.0)
    w_x = tl.load(w_ptr + offs_d * stride_wd + (K - 1), mask=mask_d, other=0.0)
    acc = tl.sum(state.to(tl.float32) * w_state.to(tl.float32), axis=1) + x.to(tl.float32) * w_x.to(tl.float32)
    new_state = tl.where((cols == K - 2)[None, :], x.to(state_ptr.dtype.element_ty)[:, None], shifted)
    tl.debug_barrier()  # all reads of this slot's state happen before the first write
    tl.store(p_state, new_state, mask=mask_c)
    return acc / (1.0 + tl.exp(-acc))


@triton.jit
def _conv1d_update_kernel(
    x_ptr, w_ptr, state_ptr, slots_ptr, out_ptr,
    stride_xb, stride_wd, stride_s_slot, stride_s_d, stride_ob,
    dim,
    K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < dim
    slot = tl.load(slots_ptr + i_b).to(tl.int64)
    x = tl.load(x_ptr + i_b * stride_xb + offs_d, mask=mask_d, other=0.0)
    out = conv_update_channels(x, offs_d, mask_d, w_ptr, stride_wd, state_ptr + slot * stride_s_slot, stride_s_d,
                               K, KP)
    tl.store(out_ptr + i_b * stride_ob + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _conv1d_prefill_kernel(
    x_ptr, w_ptr, cu_ptr, tok_seq_ptr, out_ptr,
    stride_xt, stride_wd, stride_ot,
    total_tokens, dim,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """silu(conv) of every token with inputs before its sequence start taken as zero; the first K-1 tokens of
    sequences with an initial state are recomputed by ``_conv1d_prefill_head_kernel``."""
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    tok = i_t * BT + tl.arange(0, BT)
    mask_t = tok < total_tokens
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < dim
    mask = mask_t[:, None] & mask_d[None, :]
    start = tl.load(cu_ptr + tl.load(tok_seq_ptr + tok, mask=mask_t, other=0), mask=mask_t, other=0)

    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(K):
        src = tok - (K - 1) + j
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xt + offs_d[None, :],
                     mask=mask & (src >= start)[:, None], other=0.0)
        wj = tl.load(w_ptr + offs_d * stride_wd + j, mask=mask_d, other=0.0)
        acc += xv.to(tl.float32) * wj.to(tl.float32)[None, :]
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_ot + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _conv1d_prefill_head_kernel(
    x_ptr, w_ptr, state_ptr, slots_ptr, has_init_ptr, cu_ptr, out_ptr,
    stride_xt, stride_wd, stride_s_slot, stride_s_d, stride_ot,
    dim,
    K: tl.constexpr, BD: tl.constexpr,
):
    """The first K-1 outputs of a sequence that starts from a cached state (their windows reach into it)."""
    i_n = tl.program_id(0)
    i_d = tl.program_id(1)
    offs_d = i_d * BD + tl.arange(0, BD)
    start = tl.load(cu_ptr + i_n).to(tl.int64)
    length = tl.load(cu_ptr + i_n + 1) - start
    active = tl.load(has_init_ptr + i_n) != 0
    mask_d = (offs_d < dim) & active
    slot = tl.load(slots_ptr + i_n).to(tl.int64)
    p_state = state_ptr + slot * stride_s_slot + offs_d * stride_s_d
    for r in tl.static_range(K - 1):  # output row r of the sequence
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(K):
            src = r - (K - 1) + j  # compile-time: the input comes from x (>= 0) or the state (< 0)
            if src >= 0:
                xv = tl.load(x_ptr + (start + src) * stride_xt + offs_d, mask=mask_d & (src < length), other=0.0)
            else:
                xv = tl.load(p_state + (K - 1 + src), mask=mask_d, other=0.0)
            wj = tl.load(w_ptr + offs_d * stride_wd + j, mask=mask_d, other=0.0)
            acc += xv.to(tl.float32) * wj.to(tl.float32)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + (start + r) * stride_ot + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=mask_d & (r < length))


@triton.jit
def _conv1d_state_kernel(
    x_ptr, state_ptr, slots_ptr, has_init_ptr, cu_ptr, wr_seq_ptr, wr_offset_ptr, wr_dest_ptr,
    stride_xt, stride_s_slot, stride_s_d,
    dim,
    K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr,
):
    """State after ``offset`` tokens of sequence ``seq`` -> slot ``dest``: the last K-1 inputs of
    (initial state ++ x[seq]), taken from the initial state where the sequence is shorter than K-1."""
    i_w = tl.program_id(0)
    i_d = tl.program_id(1)
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < dim
    cols = tl.arange(0, KP)
    mask_c = mask_d[:, None] & (cols < K - 1)[None, :]
    seq = tl.load(wr_seq_ptr + i_w)
    offset = tl.load(wr_offset_ptr + i_w)
    dest = tl.load(wr_dest_ptr + i_w).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    has_init = tl.load(has_init_ptr + seq) != 0

    src = offset - (K - 1) + cols  # positions in the sequence of the K-1 inputs kept; < 0: initial state
    in_x = mask_c & (src >= 0)[None, :]
    xv = tl.load(x_ptr + (start + src)[None, :] * stride_xt + offs_d[:, None], mask=in_x, other=0.0)
    in_state = mask_c & ((src < 0) & has_init)[None, :]
    p_src = state_ptr + slot * stride_s_slot + offs_d[:, None] * stride_s_d + (K - 1 + src)[None, :]
    sv = tl.load(p_src, mask=in_state, other=0.0)
    new_state = tl.where(in_x, xv.to(state_ptr.dtype.element_ty), sv)
    tl.debug_barrier()  # dest may be the source slot (final state): read everything first
    p_dst = state_ptr + dest * stride_s_slot + offs_d[:, None] * stride_s_d + cols[None, :]
    tl.store(p_dst, new_state, mask=mask_c)


def _check_common(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, state_slots: torch.Tensor,
                  num_seqs: int) -> int:
    dim = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 2:
        raise ValueError(f"weight must be [D={dim}, K>=2], got {tuple(weight.shape)}")
    kernel = weight.shape[1]
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous in its last dim")
    if conv_states.dim() != 3 or conv_states.shape[1:] != (dim, kernel - 1):
        raise ValueError(f"conv_states must be [slots, {dim}, {kernel - 1}], got {tuple(conv_states.shape)}")
    if conv_states.stride(2) != 1:
        raise ValueError(f"conv_states must be contiguous in its last dim, got strides {conv_states.stride()}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {tuple(x.stride())}")
    if state_slots.shape != (num_seqs,) or state_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slots must be int32/int64 [{num_seqs}], got {state_slots.dtype} {state_slots.shape}")
    if not (x.device == weight.device == conv_states.device == state_slots.device):
        raise ValueError("all tensors must be on the same device")
    return kernel


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1 or out.device != x.device:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype} on {x.device}, contiguous in its last dim")
    return out


def conv1d_update(
    x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, state_slots: torch.Tensor,
    *, out: torch.Tensor | None = None, block_d: int = 256,
) -> torch.Tensor:
    """Decode step: ``x [B, D]`` -> ``silu(conv) [B, D]`` in x's dtype (written into ``out`` if given, which
    may be x itself: each program reads its channels before it writes them);
    ``conv_states [slots, D, K-1]`` (pool view, any slot stride) updated in place at ``state_slots [B]``
    (distinct). No host sync: CUDA-graph safe."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D], got {tuple(x.shape)}")
    batch, dim = x.shape
    kernel = _check_common(x, weight, conv_states, state_slots, batch)
    out = _check_out(out, x)
    if batch == 0:
        return out
    _conv1d_update_kernel[(triton.cdiv(dim, block_d), batch)](
        x, weight, conv_states, state_slots, out,
        x.stride(0), weight.stride(0), conv_states.stride(0), conv_states.stride(1), out.stride(0),
        dim, K=kernel, KP=triton.next_power_of_2(kernel - 1), BD=block_d, num_warps=4, **pdl_launch_args(x.device),
    )
    return out


def _to_int_tensor(x, device, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32)
    try:
        return torch.tensor([int(v) for v in x], dtype=torch.int32).to(device)
    except TypeError as exc:
        raise ValueError(f"{name} must be a tensor or a sequence of ints") from exc


def conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_states: torch.Tensor,
    state_slots: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    has_initial_state: torch.Tensor | Sequence[bool],
    checkpoints: torch.Tensor | Sequence[tuple[int, int, int]] | None = None,
    *,
    out: torch.Tensor | None = None,
    block_t: int = 32,
    block_d: int = 128,
) -> torch.Tensor:
    """Varlen prefill: ``x [T_total, D]`` packed sequences (``cu_seqlens [B+1]``) -> ``silu(conv(x))`` in x's
    dtype. Sequence b starts from ``conv_states[state_slots[b]]`` if ``has_initial_state[b]`` else zeros, and its
    final state (the last K-1 inputs, reaching into the initial state for sequences shorter than K-1) is
    written back to that slot. ``checkpoints``: (sequence index, token offset, destination slot) triples (or
    an int tensor ``[n, 3]``): the state after ``offset`` tokens of the sequence goes to the destination slot,
    which must not be any sequence's slot in this batch. Output written into ``out`` if given. No host sync
    (``cu_seqlens`` may live on the device).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got {tuple(x.shape)}")
    total, dim = x.shape
    cu = _to_int_tensor(cu_seqlens, x.device, "cu_seqlens")
    num_seqs = cu.numel() - 1
    if cu.dim() != 1 or num_seqs < 0:
        raise ValueError(f"cu_seqlens must be [B+1], got shape {tuple(cu.shape)}")
    kernel = _check_common(x, weight, conv_states, state_slots, num_seqs)
    has_init = _to_int_tensor(has_initial_state, x.device, "has_initial_state")
    if has_init.shape != (num_seqs,):
        raise ValueError(f"has_initial_state must have {num_seqs} entries, got {tuple(has_init.shape)}")
    out = _check_out(out, x)
    if num_seqs == 0:
        return out
    lens = cu[1:] - cu[:-1]
    block_d = min(block_d, triton.next_power_of_2(dim))

    if total:
        # token -> sequence index, built on the device (output_size avoids a sync).
        tok_seq = torch.repeat_interleave(
            torch.arange(num_seqs, dtype=torch.int32, device=x.device), lens, output_size=total
        )
        _conv1d_prefill_kernel[(triton.cdiv(total, block_t), triton.cdiv(dim, block_d))](
            x, weight, cu, tok_seq, out,
            x.stride(0), weight.stride(0), out.stride(0),
            total, dim, K=kernel, BT=block_t, BD=block_d, num_warps=4,
        )
        _conv1d_prefill_head_kernel[(num_seqs, triton.cdiv(dim, block_d))](
            x, weight, conv_states, state_slots, has_init, cu, out,
            x.stride(0), weight.stride(0), conv_states.stride(0), conv_states.stride(1), out.stride(0),
            dim, K=kernel, BD=block_d, num_warps=4,
        )

    def write_states(seqs: torch.Tensor, offsets: torch.Tensor, dests: torch.Tensor) -> None:
        _conv1d_state_kernel[(seqs.numel(), triton.cdiv(dim, block_d))](
            x, conv_states, state_slots, has_init, cu, seqs, offsets, dests,
            x.stride(0), conv_states.stride(0), conv_states.stride(1),
            dim, K=kernel, KP=triton.next_power_of_2(kernel - 1), BD=block_d, num_warps=4,
        )

    # Checkpoints first: they may read initial states that the final-state launch overwrites.
    if checkpoints is not None:
        if isinstance(checkpoints, torch.Tensor):
            ckpt = checkpoints.to(device=x.device, dtype=torch.int32).reshape(-1, 3)
        else:
            ckpt = _to_int_tensor([int(v) for triple in checkpoints for v in triple], x.device, "checkpoints")
            ckpt = ckpt.reshape(-1, 3)
        ckpt = ckpt.t().contiguous()
        if ckpt.shape[1]:
            write_states(ckpt[0], ckpt[1], ckpt[2])
    write_states(torch.arange(num_seqs, dtype=torch.int32, device=x.device), lens, state_slots)
    return out

"""The GDN mixer of one decode token in one launch: gated delta rule on the pool state, gated RMSNorm, out_proj.

At one token a GDN layer after its in_proj is two dependent kernels: ``gdn_decode`` (the state update of
every (value head, value block)) and ``gemv.gated_norm_linear`` (per-head gated RMSNorm of the whole output
row, then out_proj), and out_proj needs every head's output. Here one persistent grid (one wave, every
program resident: kernels/triton/persistent.py) runs both with a grid barrier between them:

1. before the PDL wait each program loads what no kernel of the step writes: the state slice of its first
   (head, value block) item and the out_proj rows of its first output tile (into registers; its second tile
   into L2); after the wait it runs the delta
   rule for its items (as ``gdn_decode``: the state written back in place) and stores the output row ``core``;
2. after the barrier every program normalises the whole row itself (as ``gated_norm_linear`` does) and
   computes its output tiles.

Both phases are the two kernels' own code (``gdn_decode.delta_rule_token``, ``gemv.gated_norm_row``) on the
same tiles, so the numbers equal the two-kernel path's. Under Triton's interpreter the phases run as two
launches (``one_launch=False``, also usable on a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.gdn_decode import delta_rule_token
from kernels.triton.gemv import MAX_SINGLE_TILE_K, default_tile, gated_norm_row, load_head_weight_tile, prefetch_l2
from kernels.triton.norm import _TL_DTYPES
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait
from kernels.triton.persistent import check_resident, check_sync, grid_barrier, num_sms


@dataclass(frozen=True)
class GdnOutDecodeConfig:
    """``programs_per_sm`` programs per SM (all resident); ``block_v`` value columns per delta-rule item (0: the
    narrowest of 16/32/64 that gives every program at most one item); ``block_n`` out_proj columns per tile
    (0: as ``gemv.default_tile``)."""

    programs_per_sm: int = 2
    block_v: int = 0
    block_n: int = 0
    num_warps: int = 4

    def __post_init__(self) -> None:
        check_resident(self.programs_per_sm, self.num_warps)
        for name in ("block_v", "block_n"):
            size = getattr(self, name)
            if size < 0 or size & (size - 1):
                raise ValueError(f"GdnOutDecodeConfig.{name} must be 0 or a power of two, got {size}")


@triton.jit
def _state_ptrs(slot_state_ptr, item, num_items, stride_s_head, stride_s_k,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers and mask of item ``item``'s fp32 ``[BK, BV]`` state slice: value head item // blocks, value
    block item % blocks, within one request's ``[Hv, Dk, Dv]`` state."""
    blocks_v: tl.constexpr = (DV + BV - 1) // BV
    offs_k = tl.arange(0, BK)
    offs_v = (item % blocks_v) * BV + tl.arange(0, BV)
    mask = (offs_k < DK)[:, None] & (offs_v < DV)[None, :] & (item < num_items)
    ptrs = slot_state_ptr + (item // blocks_v) * stride_s_head + offs_k[:, None] * stride_s_k + offs_v[None, :]
    return ptrs, mask


@triton.jit
def _delta_rule_item(state, state_ptrs, state_mask, item, q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr,
                     dt_bias_ptr, core_ptr, scale, stride_qh, stride_kh, stride_vh,
                     GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr):
    """The delta rule of one (value head, value block) item on its loaded state: output into ``core
    [Hv, DV]``, the new state back to the pool (as gdn_decode's kernel, one token)."""
    blocks_v: tl.constexpr = (DV + BV - 1) // BV
    i_h = item // blocks_v
    i_hk = i_h // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = (item % blocks_v) * BV + tl.arange(0, BV)
    q = tl.load(q_ptr + i_hk * stride_qh + offs_k, mask=offs_k < DK, other=0.0)
    k = tl.load(k_ptr + i_hk * stride_kh + offs_k, mask=offs_k < DK, other=0.0)
    v = tl.load(v_ptr + i_h * stride_vh + offs_v, mask=offs_v < DV, other=0.0)
    neg_a = -tl.exp(tl.load(a_log_ptr + i_h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)
    o, state = delta_rule_token(state, q, k, v, tl.load(a_ptr + i_h), tl.load(b_ptr + i_h), neg_a, dt_bias, scale)
    tl.store(core_ptr + i_h * DV + offs_v, o.to(core_ptr.dtype.element_ty), mask=offs_v < DV)
    tl.store(state_ptrs, state, mask=state_mask)


@triton.jit
def _gdn_out_decode_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, state_ptr, slot_ptr,
    z_ptr, norm_w_ptr, w_ptr, core_ptr, y_ptr, sync_ptr,
    scale, eps, num_cols,
    stride_qh, stride_kh, stride_vh, stride_s_slot, stride_s_head, stride_s_k, stride_z_h, stride_w,
    HEADS: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PROD_DTYPE: tl.constexpr, PREFETCH: tl.constexpr,
    PHASE: tl.constexpr,  # 0: both phases with a grid barrier; 1, 2: that phase alone
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    pdl_trigger(PDL)
    num_items = HEADS * ((DV + BV - 1) // BV)
    num_tiles = (num_cols + BLOCK_N - 1) // BLOCK_N

    # Before the wait: only data no kernel of the chain writes (the slot id and the state come from before
    # the step, the weights never change; see kernels/triton/pdl.py).
    if PHASE != 2:
        # The state slot id and the state were written before this step's chain began (see gdn_decode).
        slot_state_ptr = state_ptr + tl.load(slot_ptr).to(tl.int64) * stride_s_slot
        state_ptrs, state_mask = _state_ptrs(slot_state_ptr, pid, num_items, stride_s_head, stride_s_k,
                                             DK, DV, BK, BV)
        state = tl.load(state_ptrs, mask=state_mask, other=0.0)
    if PHASE != 1:
        w = load_head_weight_tile(w_ptr, pid * BLOCK_N, num_cols, stride_w, HEADS, DV, BLOCK_H, BLOCK_D, BLOCK_N)
        if PREFETCH:  # the program's second tile into L2 (registers hold one)
            rows = tl.minimum((pid + num_programs) * BLOCK_N + tl.arange(0, BLOCK_N), num_cols - 1)
            lines = tl.arange(0, (HEADS * DV + 63) // 64) * 64  # one prefetch per 128-byte line of a row
            if (pid + num_programs) * BLOCK_N < num_cols:
                prefetch_l2(w_ptr + rows[:, None].to(tl.int64) * stride_w + lines[None, :])
    pdl_wait(PDL)

    # ---- phase 1: the delta rule of items pid, pid + num_programs, ... ------------------------------------
    if PHASE != 2:
        if pid < num_items:
            _delta_rule_item(state, state_ptrs, state_mask, pid, q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr,
                             dt_bias_ptr, core_ptr, scale, stride_qh, stride_kh, stride_vh, GROUP, DK, DV, BK, BV)
        # Grid-stride loops as while loops: the interpreter cannot take a runtime range bound (numpy >= 2.4).
        item = pid + num_programs
        while item < num_items:
            state_ptrs, state_mask = _state_ptrs(slot_state_ptr, item, num_items, stride_s_head, stride_s_k,
                                                 DK, DV, BK, BV)
            state = tl.load(state_ptrs, mask=state_mask, other=0.0)
            _delta_rule_item(state, state_ptrs, state_mask, item, q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr,
                             dt_bias_ptr, core_ptr, scale, stride_qh, stride_kh, stride_vh, GROUP, DK, DV, BK, BV)
            item += num_programs
    if PHASE == 0:
        grid_barrier(sync_ptr, num_programs)

    # ---- phase 2: gated norm of the whole row (every program), out_proj tiles pid, pid + num_programs, ... --
    if PHASE != 1:
        g = gated_norm_row(core_ptr, z_ptr, norm_w_ptr, eps, DV, stride_z_h, HEADS, DV, BLOCK_H, BLOCK_D,
                           PROD_DTYPE, ".cg")
        _out_proj_tile(g, w, y_ptr, pid, num_cols, BLOCK_N)  # masked off past the last tile
        tile = pid + num_programs
        while tile < num_tiles:
            w_next = load_head_weight_tile(w_ptr, tile * BLOCK_N, num_cols, stride_w, HEADS, DV, BLOCK_H, BLOCK_D,
                                           BLOCK_N)
            _out_proj_tile(g, w_next, y_ptr, tile, num_cols, BLOCK_N)
            tile += num_programs


@triton.jit
def _out_proj_tile(g, w, y_ptr, tile, num_cols, BLOCK_N: tl.constexpr):
    """``y[tile's columns] = g.flatten() @ w^T`` (w: that tile's ``[BLOCK_N, heads, head_dim]`` rows)."""
    y = tl.sum(tl.sum(g[None, :, :] * w.to(tl.float32), axis=2), axis=1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < num_cols)


def _default_block_v(v_dim: int, num_v_heads: int, programs: int) -> int:
    for block_v in (16, 32, 64):
        if num_v_heads * triton.cdiv(v_dim, block_v) <= programs:
            return min(block_v, triton.next_power_of_2(v_dim))
    return min(64, triton.next_power_of_2(v_dim))


def gdn_out_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, ssm_states: torch.Tensor, state_slot: torch.Tensor,
    z: torch.Tensor, norm_weight: torch.Tensor, eps: float, out_proj: torch.Tensor, sync: torch.Tensor,
    *, one_launch: bool | None = None, config: GdnOutDecodeConfig | None = None,
) -> torch.Tensor:
    """``gated_norm_linear(gdn_decode(q, k, v, a, b, ...), z, norm_weight, eps, out_proj)`` for one token of one
    request: ``q, k [1, Hk, Dk]``, ``v [1, Hv, Dv]``, ``a, b [1, Hv]``, ``z [1, Hv, Dv]`` (last dims contiguous,
    any head strides: slices of the in_proj row), ``A_log, dt_bias [Hv]`` fp32, ``ssm_states [slots, Hv, Dk,
    Dv]`` fp32 (updated in place at ``state_slot [1]``), ``out_proj [N, Hv * Dv]``. Returns ``[1, N]``.
    ``sync``: int32 ``[2]``, zero before first use, owned by one launch site and stream (the grid barrier's
    words). ``one_launch`` (default: on a GPU) runs both phases in one launch, else as two. No host
    synchronisation: safe to capture in a CUDA graph."""
    if q.dim() != 3 or k.shape != q.shape or q.shape[0] != 1 or v.dim() != 3 or v.shape[0] != 1:
        raise ValueError(f"gdn_out_decode takes one token: q, k [1, Hk, Dk], v [1, Hv, Dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    _, num_k_heads, k_dim = q.shape
    _, num_v_heads, v_dim = v.shape
    if num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    if a.shape != (1, num_v_heads) or b.shape != a.shape or z.shape != v.shape:
        raise ValueError(f"a, b must be [1, {num_v_heads}] and z {tuple(v.shape)}, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(z.shape)}")
    if A_log.shape != (num_v_heads,) or dt_bias.shape != (num_v_heads,) or A_log.dtype != torch.float32 \
            or dt_bias.dtype != torch.float32 or not (A_log.is_contiguous() and dt_bias.is_contiguous()):
        raise ValueError(f"A_log and dt_bias must be contiguous fp32 [{num_v_heads}]")
    if (ssm_states.dim() != 4 or ssm_states.shape[1:] != (num_v_heads, k_dim, v_dim)
            or ssm_states.dtype != torch.float32 or ssm_states.stride()[1:] != (k_dim * v_dim, v_dim, 1)):
        raise ValueError(f"ssm_states must be fp32 [slots, {num_v_heads}, {k_dim}, {v_dim}] with each slot "
                         f"contiguous, got {ssm_states.dtype} {tuple(ssm_states.shape)}")
    if state_slot.shape != (1,) or state_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slot must be int32/int64 [1], got {state_slot.dtype} {tuple(state_slot.shape)}")
    if out_proj.dim() != 2 or out_proj.shape[1] != num_v_heads * v_dim or out_proj.stride(1) != 1 \
            or out_proj.shape[1] > MAX_SINGLE_TILE_K or out_proj.dtype != v.dtype:
        raise ValueError(f"out_proj must be [N, {num_v_heads * v_dim}] (<= {MAX_SINGLE_TILE_K}) in v's dtype with "
                         f"unit last stride, got {out_proj.dtype} {tuple(out_proj.shape)}")
    if norm_weight.shape != (v_dim,):
        raise ValueError(f"norm_weight must be [{v_dim}], got {tuple(norm_weight.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("z", z)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")
    check_sync(sync, q.device)
    if one_launch is None:
        one_launch = q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    config = config or GdnOutDecodeConfig()
    programs = config.programs_per_sm * num_sms(q.device)
    block_v = config.block_v or _default_block_v(v_dim, num_v_heads, programs)
    # out_proj's tile: half gated_norm_linear's, whose whole-K tiles fill the register file on their own; here
    # the state slice is live too. The program's second tile is prefetched into L2 before the wait instead.
    block_n = config.block_n or max(1, default_tile(num_v_heads * v_dim).block_n // 2)

    core = torch.empty(num_v_heads, v_dim, dtype=v.dtype, device=v.device)
    y = torch.empty(1, out_proj.shape[0], dtype=v.dtype, device=v.device)
    prod_dtype = _TL_DTYPES[torch.promote_types(norm_weight.dtype, v.dtype)]
    args = (q, k, v, a, b, A_log, dt_bias, ssm_states, state_slot, z, norm_weight.contiguous(), out_proj, core, y,
            sync, k_dim**-0.5, float(eps), out_proj.shape[0],
            q.stride(1), k.stride(1), v.stride(1), ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2),
            z.stride(1), out_proj.stride(0))
    meta = dict(HEADS=num_v_heads, GROUP=num_v_heads // num_k_heads, DK=k_dim, DV=v_dim,
                BK=triton.next_power_of_2(k_dim), BV=block_v, BLOCK_H=triton.next_power_of_2(num_v_heads),
                BLOCK_D=triton.next_power_of_2(v_dim), BLOCK_N=block_n, PROD_DTYPE=prod_dtype,
                PREFETCH=v.dtype == torch.bfloat16 and (num_v_heads * v_dim) % 64 == 0
                and os.environ.get("TRITON_INTERPRET", "0") != "1",
                num_warps=config.num_warps, **pdl_launch_args(q.device))
    for phase in ((0,) if one_launch else (1, 2)):
        _gdn_out_decode_kernel[(programs,)](*args, PHASE=phase, **meta)
    return y

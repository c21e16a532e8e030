"""Dense projections for decode-sized batches: ``y = x @ W^T`` for a handful of rows, as one Triton kernel.

With one to four rows a linear layer is a weight stream: every weight byte is read once and used for a
few multiply-adds. cuBLAS picks split-K kernels for the tall-K shapes of the model (GDN ``out_proj``, attention
``o_proj``: K = 4096, N = 2048), which write fp32 partials and launch a second reduction kernel. Here each
program owns ``block_n`` output columns for all rows, walks the whole K in ``block_k`` steps with fp32
multiply-adds into a ``[rows, block_n, block_k]`` register tile (reduced once at the end, no cross-lane
reduction in the loop), and writes the rows rounded once to the activation dtype -- what the GEMM computes, up
to summation order. One launch, no partials, the weight tile read once for all rows.

``kernels/bench_gemv.py`` measures it against ``F.linear`` (cuBLAS) on the model's projection shapes and
sweeps the tile; ``linear`` uses it where the measurement says it wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton.conv1d import conv_update_channels
from kernels.triton.norm import _TL_DTYPES, gemma_norm_row, round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Most rows the kernel takes: its register tile grows with the rows, and from about 8 rows on the weight
# tile is worth tensor cores (cuBLAS).
MAX_ROWS = 4
# Most rows ``linear`` sends to the kernel: on the H100 it beat cuBLAS at one row on the model's projections
# but not at two or four (kernels/results/gemv_h100.json).
LINEAR_MAX_ROWS = 1


@dataclass(frozen=True)
class GemvTile:
    """Each program computes ``block_n`` output columns for every row, ``block_k`` weights per row per step;
    ``block_k=0``: the whole K in one step, the program's weight slice loaded at once (before waiting for the
    previous kernel, under PDL: see kernels/triton/pdl.py)."""

    block_n: int = 2
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


# Widest K loaded as one tile: [block_n, K] weights in registers.
MAX_SINGLE_TILE_K = 8192


def default_tile(k: int) -> GemvTile:
    """The GPU default for K: the whole K as one tile, with the rows per program swept on the H100 with PDL
    (``kernels/bench_gemv.py``: 35B-A3B in_proj K=2048 best at 4 rows, 18.7 us vs cuBLAS 20.1; out_proj K=4096
    at 8 rows, 6.5 us vs 10.9); K=8192 keeps 2 rows (24.6 us vs 28.2 for 397B's out_proj). Under Triton's
    interpreter, whose cost is per program, wide tiles (tests also run narrow ones)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return GemvTile(block_n=64, block_k=256)
    if k <= 2048:
        return GemvTile(block_n=4)
    if k <= 4096:
        return GemvTile(block_n=8)
    if k <= MAX_SINGLE_TILE_K:
        return GemvTile(block_n=2)
    return GemvTile(block_n=4, block_k=512)


def _checked(tile: GemvTile) -> GemvTile:
    if tile.block_n < 1 or tile.block_n & (tile.block_n - 1) or (tile.block_k and (
            tile.block_k < 16 or tile.block_k & (tile.block_k - 1))):
        raise ValueError(f"GemvTile block sizes must be powers of two (block_k >= 16, or 0), got {tile}")
    return tile


def default_norm_tile(k: int) -> GemvTile:
    """``rms_norm_linear``'s tile (the norm prologue, the GDN in_proj's conv epilogue): swept on the H200 in
    ``kernels/bench_gemv.py --sections fused`` (``kernels/results/gemv_fused_h200.json``): K=2048 (35B-A3B's
    in_proj / qkv_proj) 4 rows x 2 warps, 16.4 / 11.7 us against 17.0 / 12.1 for 4 x 4; K=4096 (397B) 4 x 4,
    44.1 / 36.3 us against 46.4 / 37.1 for 8 x 4. Elsewhere ``default_tile(k)``. (The gated launchers' best
    tiles were ``default_tile``'s.)"""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        if k <= 2048:
            return GemvTile(block_n=4, num_warps=2)
        if k <= 4096:
            return GemvTile(block_n=4, num_warps=4)
    return default_tile(k)


@triton.jit
def load_weight_tile(w_ptr, col0, num_cols, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` weight rows ``col0 ..`` (whole K, zero padded), in the weight dtype."""
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    return tl.load(w_ptrs, mask=(offs_n < num_cols)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 to fetch the lines at ``ptrs`` (no registers wait for it; must be valid addresses). Inline PTX:
    not for Triton's interpreter."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def gemv_tile(
    x_ptr, w_ptr, col0, num_rows, num_cols, stride_x, stride_w,
    K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """``[ROWS, BLOCK_N]`` fp32 dot products of the x rows with weight rows ``col0 ..``; triggers the next kernel
    and waits for the previous one (PDL), issuing the weight loads before the wait when the whole K is one
    tile (``BLOCK_K >= K``), so the weight stream overlaps the previous kernel."""
    pdl_trigger(PDL)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < num_cols
    rows = tl.arange(0, ROWS)
    row_mask = rows < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    if BLOCK_K >= K:
        w = load_weight_tile(w_ptr, col0, num_cols, stride_w, K, BLOCK_N, BLOCK_K)
        pdl_wait(PDL)
        x = tl.load(x_ptrs, mask=row_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        y = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        pdl_wait(PDL)
        # [ROWS, BLOCK_N, BLOCK_K] partial sums, reduced once at the end: no cross-lane reduction in the loop.
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += x[:, None, :] * w[None, :, :]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=2)
    return y


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr,
    num_rows, num_cols, stride_x, stride_w, stride_y,
    K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    col0 = tl.program_id(0) * BLOCK_N
    y = gemv_tile(x_ptr, w_ptr, col0, num_rows, num_cols, stride_x, stride_w, K, ROWS, BLOCK_N, BLOCK_K, PDL)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows < num_rows)[:, None] & (offs_n < num_cols)[None, :])


@triton.jit
def rms_norm_row(
    x_ptr, res_ptr, norm_w, new_res_ptr, normed_ptr, eps, write,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
    NORM_W_LOADED: tl.constexpr,
):
    """``h = gemma_rms_norm(x + residual)`` of one row as fp32 ``[BLOCK_K]`` (rounded like
    kernels.triton.norm); where ``write`` (one program of the grid), also stores ``x + residual`` at
    ``new_res_ptr`` and, if WRITE_NORMED, ``h`` at ``normed_ptr``. ``norm_w``: the norm's weight, its
    ``[BLOCK_K]`` row already loaded (NORM_W_LOADED, masked lanes 0) or a pointer to it."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_k, mask=k_mask, other=0.0)
        # As kernels.triton.norm: the add in fp32, rounded once to the activation dtype.
        x32 = round_to(x.to(tl.float32) + res.to(tl.float32), dtype)
        tl.store(new_res_ptr + offs_k, x32.to(dtype), mask=k_mask & write)
    else:
        x32 = x.to(tl.float32)
    if NORM_W_LOADED:
        h = gemma_norm_row(x32, norm_w, K, eps, dtype)
    else:
        # Loaded here, after the residual's store (which, for all the compiler knows, may alias it): a second
        # trip to memory after x's. Loading it with x instead cost ~33 registers a thread in the projections
        # (121-124 -> 157), whose weight tiles already fill them; an L2 prefetch of it before the wait (with the
        # conv epilogue's state and weights) changed nothing on the H200 (run 15, NOTES_serving_speed.md).
        h = gemma_norm_row(x32, tl.load(norm_w + offs_k, mask=k_mask, other=0.0), K, eps, dtype)
    if WRITE_NORMED:
        tl.store(normed_ptr + offs_k, h.to(dtype), mask=k_mask & write)
    return h


@triton.jit
def _rms_norm_gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, y_ptr, new_res_ptr, normed_ptr, conv_w_ptr, conv_state_ptr, slot_ptr,
    num_cols, conv_dim, eps,
    stride_w, stride_cw, stride_s_slot, stride_s_d,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr, CONV_K: tl.constexpr, CONV_KP: tl.constexpr,
    ONE_TILE: tl.constexpr, PDL: tl.constexpr,
):
    """One row: ``s = x + residual`` (rounded), ``h = gemma_rms_norm(s)``, ``y = h @ W^T``, BLOCK_N columns per
    tile. Every program normalises the row itself (K elements from L2, next to its BLOCK_N*K weights) and, unless
    ONE_TILE, takes tiles pid, pid + programs, ... with it (the first loaded before the PDL wait); program 0
    also writes ``s`` (the next residual) and, if asked, ``h``. With ``CONV_K > 0`` the columns below
    ``conv_dim`` go through the causal conv update of state slot ``slot_ptr[0]`` (the GDN in_proj epilogue:
    each program owns its columns' conv state)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    pdl_trigger(PDL)
    w = load_weight_tile(w_ptr, pid * BLOCK_N, num_cols, stride_w, K, BLOCK_N, BLOCK_K)
    pdl_wait(PDL)
    h = rms_norm_row(x_ptr, res_ptr, norm_w_ptr, new_res_ptr, normed_ptr, eps, pid == 0,
                     K, BLOCK_K, HAS_RESIDUAL, WRITE_NORMED, False)
    _norm_tile_out(h, w, pid * BLOCK_N, y_ptr, num_cols, conv_dim, conv_w_ptr, conv_state_ptr, slot_ptr, stride_cw,
                   stride_s_slot, stride_s_d, BLOCK_N, CONV_K, CONV_KP)
    if not ONE_TILE:
        # Grid-stride loop as a while loop: the interpreter cannot take a runtime range bound (numpy >= 2.4).
        tile = pid + num_programs
        while tile < (num_cols + BLOCK_N - 1) // BLOCK_N:
            w_next = load_weight_tile(w_ptr, tile * BLOCK_N, num_cols, stride_w, K, BLOCK_N, BLOCK_K)
            _norm_tile_out(h, w_next, tile * BLOCK_N, y_ptr, num_cols, conv_dim, conv_w_ptr, conv_state_ptr,
                           slot_ptr, stride_cw, stride_s_slot, stride_s_d, BLOCK_N, CONV_K, CONV_KP)
            tile += num_programs


@triton.jit
def _norm_tile_out(h, w, col0, y_ptr, num_cols, conv_dim, conv_w_ptr, conv_state_ptr, slot_ptr, stride_cw,
                   stride_s_slot, stride_s_d, BLOCK_N: tl.constexpr, CONV_K: tl.constexpr, CONV_KP: tl.constexpr):
    """``y[col0 ..] = h @ w^T`` for one tile, through the conv update below ``conv_dim`` if CONV_K > 0."""
    y = tl.sum(h[None, :] * w.to(tl.float32), axis=1)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    dtype = y_ptr.dtype.element_ty
    if CONV_K > 0:
        conv_mask = offs_n < conv_dim
        slot = tl.load(slot_ptr).to(tl.int64)
        # The conv reads the projection as the unfused path stores it: rounded to the activation dtype.
        conv = conv_update_channels(y.to(dtype), offs_n, conv_mask, conv_w_ptr, stride_cw,
                                    conv_state_ptr + slot * stride_s_slot, stride_s_d, CONV_K, CONV_KP)
        y = tl.where(conv_mask, conv, y)
    tl.store(y_ptr + offs_n, y.to(dtype), mask=offs_n < num_cols)


@triton.jit
def _gated_gemv_kernel(
    x_ptr, gate_ptr, w_ptr, y_ptr, num_cols, stride_w,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """One row: ``y = (x * gate) @ W^T`` for BLOCK_N columns, the product rounded to x's dtype first (as the
    unfused elementwise multiply stores it)."""
    pdl_trigger(PDL)
    col0 = tl.program_id(0) * BLOCK_N
    w = load_weight_tile(w_ptr, col0, num_cols, stride_w, K, BLOCK_N, BLOCK_K)
    pdl_wait(PDL)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
    gate = tl.load(gate_ptr + offs_k, mask=k_mask, other=0.0)
    h = round_to(x.to(tl.float32) * gate.to(tl.float32), x.dtype)
    y = tl.sum(h[None, :] * w.to(tl.float32), axis=1)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < num_cols)


@triton.jit
def _gated_norm_gemv_kernel(
    core_ptr, z_ptr, norm_w_ptr, w_ptr, y_ptr,
    num_cols, eps,
    stride_core_h, stride_z_h, stride_w,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PROD_DTYPE: tl.constexpr, ONE_TILE: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row: ``g = gated_rms_norm(core, z)`` per head (as kernels.triton.norm.gated_rms_norm, rounding for
    rounding), then ``y = g.flatten() @ W^T``, BLOCK_N columns per tile, tiles pid, pid + programs, ...: each
    program normalises the row once for all its tiles. The first tile is loaded before the PDL wait, the
    second (PREFETCH) asked of L2."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    pdl_trigger(PDL)
    w = load_head_weight_tile(w_ptr, pid * BLOCK_N, num_cols, stride_w, HEADS, HEAD_DIM, BLOCK_H, BLOCK_D, BLOCK_N)
    if PREFETCH:
        next_col0 = (pid + num_programs) * BLOCK_N
        if next_col0 < num_cols:
            rows = tl.minimum(next_col0 + tl.arange(0, BLOCK_N), num_cols - 1)  # valid addresses only
            lines = tl.arange(0, (HEADS * HEAD_DIM + 63) // 64) * 64  # one prefetch per 128-byte line of a row
            prefetch_l2(w_ptr + rows[:, None].to(tl.int64) * stride_w + lines[None, :])
    pdl_wait(PDL)
    g = gated_norm_row(core_ptr, z_ptr, norm_w_ptr, eps, stride_core_h, stride_z_h, HEADS, HEAD_DIM, BLOCK_H,
                       BLOCK_D, PROD_DTYPE)
    store_row_tile(g, w, y_ptr, pid, num_cols, BLOCK_N)  # masked off past the last tile
    # ONE_TILE (a program per tile) compiles without the loop: at 35B's 64 KiB tiles its code alone spills.
    if not ONE_TILE:
        # Grid-stride loop as a while loop: the interpreter cannot take a runtime range bound (numpy >= 2.4).
        tile = pid + num_programs
        while tile < (num_cols + BLOCK_N - 1) // BLOCK_N:
            w_next = load_head_weight_tile(w_ptr, tile * BLOCK_N, num_cols, stride_w, HEADS, HEAD_DIM, BLOCK_H,
                                           BLOCK_D, BLOCK_N)
            store_row_tile(g, w_next, y_ptr, tile, num_cols, BLOCK_N)
            tile += num_programs


@triton.jit
def store_row_tile(g, w, y_ptr, tile, num_cols, BLOCK_N: tl.constexpr):
    """``y[tile's columns] = g.flatten() @ w^T`` for a ``[heads, head_dim]`` row ``g`` and that tile's
    ``[BLOCK_N, heads, head_dim]`` weight rows ``w``."""
    y = tl.sum(tl.sum(g[None, :, :] * w.to(tl.float32), axis=2), axis=1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < num_cols)


@triton.jit
def load_head_weight_tile(w_ptr, col0, num_cols, stride_w, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weight rows ``col0 ..`` as ``[BLOCK_N, heads, head_dim]`` (column h * HEAD_DIM + d of a flattened
    per-head input), zero padded."""
    offs_n = col0 + tl.arange(0, BLOCK_N)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    hd_mask = (heads < HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    cols = heads[:, None] * HEAD_DIM + dims[None, :]
    w_ptrs = w_ptr + offs_n[:, None, None].to(tl.int64) * stride_w + cols[None, :, :]
    return tl.load(w_ptrs, mask=(offs_n < num_cols)[:, None, None] & hd_mask[None, :, :], other=0.0)


@triton.jit
def gated_norm_row(core_ptr, z_ptr, norm_w_ptr, eps, stride_core_h, stride_z_h, HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PROD_DTYPE: tl.constexpr):
    """``gated_rms_norm(core, z)`` of one token as fp32 ``[BLOCK_H, BLOCK_D]``, rounded as
    kernels.triton.norm.gated_rms_norm."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    hd_mask = (heads < HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    core = tl.load(core_ptr + heads[:, None] * stride_core_h + dims[None, :], mask=hd_mask, other=0.0)
    z = tl.load(z_ptr + heads[:, None] * stride_z_h + dims[None, :], mask=hd_mask, other=0.0).to(tl.float32)
    nw = tl.load(norm_w_ptr + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
    c32 = core.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(c32 * c32, axis=1) / HEAD_DIM + eps)
    normed = round_to(c32 * rstd[:, None], core.dtype)
    scaled = round_to(normed * nw[None, :], PROD_DTYPE)
    return round_to(scaled * (z / (1.0 + tl.exp(-z))), core.dtype)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so grid-stride loops take several tiles each
    return torch.cuda.get_device_properties(device).multi_processor_count


def capped_grid(tiles: int, programs_per_sm: int, device: torch.device) -> int:
    """Programs for ``tiles`` column tiles at most ``programs_per_sm`` per SM (0: one program per tile)."""
    return min(tiles, programs_per_sm * num_sms(device)) if programs_per_sm else tiles


def can_fuse_prologue(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``rms_norm_linear`` / ``gated_norm_linear`` take this input: one row, the whole K as one tile."""
    return x.shape[0] == 1 and weight.shape[1] <= MAX_SINGLE_TILE_K and weight.stride(1) == 1


def rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    *, write_normed: bool = False, conv_weight: torch.Tensor | None = None, conv_states: torch.Tensor | None = None,
    state_slot: torch.Tensor | None = None, programs_per_sm: int = 0, tile: GemvTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``h, s = gemma_rms_norm_residual(x, residual)`` then ``y = h @ weight^T``, one kernel, for one row
    (``can_fuse_prologue``): returns ``(y, s, h if write_normed else None)``; with ``residual=None``, ``s`` is x.
    x, residual: ``[1, K]`` contiguous; norm_weight ``[K]``; weight ``[N, K]`` with unit last stride.

    With ``conv_weight [D, W]`` (D <= N), ``conv_states [slots, D, W-1]`` and ``state_slot`` (int ``[1]`` on the
    device), ``y[:, :D]`` is ``conv1d_update`` of the projection instead: ``silu(conv)``, with the state slot
    updated in place (the GDN in_proj and its conv in one kernel).

    ``programs_per_sm``: 0 (the default, measured on the H100/H200) launches one program per column tile, each
    normalising the row; n > 0 caps the grid at n programs per SM, each normalising the row once for several
    tiles (what made gated_norm_linear 1.64x faster at 397B; here it tied or lost on the H200 except at 35B's
    qkv_proj, 11.6 vs 12.3 us at 4 per SM: kernels/results/gemv_h200.json).

    ``tile``: rows per program and warps (``block_k`` is not used: the whole K is one tile); by default
    ``default_norm_tile(K)``."""
    if x.dim() != 2 or not can_fuse_prologue(x, weight) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"rms_norm_linear takes x [1, K <= {MAX_SINGLE_TILE_K}] and weight [N, K], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}")
    if weight.dtype != x.dtype or norm_weight.shape != (x.shape[1],):
        raise ValueError("weight must have x's dtype and norm_weight shape [K]")
    k = x.shape[1]
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    conv_dim = conv_taps = 0
    if conv_weight is not None:
        conv_dim, conv_taps = conv_weight.shape
        if (conv_states is None or state_slot is None or conv_dim > weight.shape[0] or conv_taps < 2
                or conv_states.shape[1:] != (conv_dim, conv_taps - 1) or conv_states.stride(2) != 1
                or conv_weight.stride(1) != 1 or state_slot.numel() != 1):
            raise ValueError(f"conv needs conv_weight [D <= {weight.shape[0]}, W >= 2], conv_states [slots, D, W-1] "
                             f"(unit last stride) and one state_slot; got {tuple(conv_weight.shape)}, "
                             f"{None if conv_states is None else tuple(conv_states.shape)}")
    x, norm_weight = x.contiguous(), norm_weight.contiguous()
    residual = residual.contiguous() if residual is not None else None
    new_res = torch.empty_like(x) if residual is not None else x
    normed = torch.empty_like(x) if write_normed else None
    conv_args = (conv_weight, conv_states, state_slot) if conv_dim else (y, y, y)
    conv_strides = (conv_weight.stride(0), conv_states.stride(0), conv_states.stride(1)) if conv_dim else (0, 0, 0)
    tile = _checked(tile or default_norm_tile(k))
    tiles = triton.cdiv(weight.shape[0], tile.block_n)
    programs = capped_grid(tiles, programs_per_sm, x.device)
    _rms_norm_gemv_kernel[(programs,)](
        x, residual if residual is not None else x, norm_weight, weight, y, new_res,
        normed if normed is not None else y, *conv_args, weight.shape[0], conv_dim, float(eps), weight.stride(0),
        *conv_strides,
        K=k, BLOCK_N=tile.block_n, BLOCK_K=triton.next_power_of_2(k),
        HAS_RESIDUAL=residual is not None, WRITE_NORMED=write_normed, CONV_K=conv_taps,
        CONV_KP=triton.next_power_of_2(max(conv_taps - 1, 1)), ONE_TILE=programs == tiles,
        num_warps=tile.num_warps, **pdl_launch_args(x.device),
    )
    return y, new_res, normed


def gated_linear(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *,
                 tile: GemvTile | None = None) -> torch.Tensor:
    """``(x * gate) @ weight^T``, one kernel, for one row (``can_fuse_prologue``): the gated attention output
    into o_proj. x, gate: ``[1, K]`` contiguous, same dtype as weight ``[N, K]`` (unit last stride). ``tile``
    as in ``rms_norm_linear``."""
    if (x.dim() != 2 or gate.shape != x.shape or not can_fuse_prologue(x, weight) or x.shape[1] != weight.shape[1]
            or not x.is_contiguous() or not gate.is_contiguous()):
        raise ValueError(f"gated_linear takes contiguous x, gate [1, K <= {MAX_SINGLE_TILE_K}] and weight [N, K], "
                         f"got {tuple(x.shape)}, {tuple(gate.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype or gate.dtype != x.dtype:
        raise ValueError(f"x, gate and weight must share a dtype, got {x.dtype}, {gate.dtype}, {weight.dtype}")
    k = x.shape[1]
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    tile = _checked(tile or default_tile(k))
    _gated_gemv_kernel[(triton.cdiv(weight.shape[0], tile.block_n),)](
        x, gate, weight, y, weight.shape[0], weight.stride(0),
        K=k, BLOCK_N=tile.block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=tile.num_warps,
        **pdl_launch_args(x.device),
    )
    return y


def gated_norm_linear(core: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, *, programs_per_sm: int = 2, tile: GemvTile | None = None) -> torch.Tensor:
    """``gated_rms_norm(core, z, norm_weight)`` flattened, then ``@ weight^T``, one kernel, for one token:
    core, z ``[1, heads, head_dim]`` (unit stride in the last dim, any head stride), weight
    ``[N, heads * head_dim]``. Returns ``[1, N]``. At most ``programs_per_sm`` programs per SM, each taking
    several column tiles where there are more (0: one program per tile): the gated norm of the whole row is
    computed once per program, not once per tile (at 397B's 8192-wide row it cost as much as the tile).
    ``tile`` as in ``rms_norm_linear``."""
    if core.dim() != 3 or z.shape != core.shape or core.shape[0] != 1:
        raise ValueError(f"core and z must be [1, heads, head_dim], got {tuple(core.shape)} and {tuple(z.shape)}")
    _, heads, head_dim = core.shape
    if weight.dim() != 2 or weight.shape[1] != heads * head_dim or not can_fuse_prologue(core, weight):
        raise ValueError(f"weight must be [N, {heads * head_dim}] (<= {MAX_SINGLE_TILE_K}), got {tuple(weight.shape)}")
    if core.stride(2) != 1 or z.stride(2) != 1 or weight.dtype != core.dtype or norm_weight.shape != (head_dim,):
        raise ValueError("core and z need unit last stride, weight core's dtype, norm_weight [head_dim]")
    y = torch.empty(1, weight.shape[0], dtype=core.dtype, device=core.device)
    tile = _checked(tile or default_tile(heads * head_dim))
    tiles = triton.cdiv(weight.shape[0], tile.block_n)
    programs = capped_grid(tiles, programs_per_sm, core.device)
    prod_dtype = _TL_DTYPES[torch.promote_types(norm_weight.dtype, core.dtype)]
    _gated_norm_gemv_kernel[(programs,)](
        core, z, norm_weight.contiguous(), weight, y, weight.shape[0], float(eps),
        core.stride(1), z.stride(1), weight.stride(0),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=tile.block_n, PROD_DTYPE=prod_dtype,
        ONE_TILE=programs == tiles,
        PREFETCH=(programs < tiles and core.dtype == torch.bfloat16 and (heads * head_dim) % 64 == 0
                  and os.environ.get("TRITON_INTERPRET", "0") != "1"),
        num_warps=tile.num_warps, **pdl_launch_args(core.device),
    )
    return y


def block_k_for(tile: GemvTile, k: int) -> int:
    """The kernel's BLOCK_K for a tile: ``block_k``, or the whole K (padded to a power of two) for 0."""
    return tile.block_k or triton.next_power_of_2(k)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, tile: GemvTile | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T`` -> new ``[M, N]`` in x's dtype, for ``M <= MAX_ROWS``.

    Both operands need unit stride in the last dimension (any row stride) and the same dtype and device.
    fp32 inputs are multiplied in full fp32. No host synchronisation: safe to capture in a CUDA graph.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {tuple(t.stride())}")
    rows, k = x.shape
    cols = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    tile = _checked(tile or default_tile(k))
    if not tile.block_k and k > MAX_SINGLE_TILE_K:
        raise ValueError(f"block_k=0 (one tile) takes K <= {MAX_SINGLE_TILE_K}, got {k}")
    y = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    if rows == 0 or cols == 0:
        return y
    if k == 0:
        return y.zero_()
    _gemv_kernel[(triton.cdiv(cols, tile.block_n),)](
        x, weight, y, rows, cols, x.stride(0), weight.stride(0), y.stride(0),
        K=k, ROWS=triton.next_power_of_2(rows), BLOCK_N=tile.block_n, BLOCK_K=block_k_for(tile, k),
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl_launch_args(x.device),
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the matrix-vector kernel for decode-sized inputs (2-D, at most ``LINEAR_MAX_ROWS``
    rows, no bias), cuBLAS otherwise."""
    if bias is None and x.dim() == 2 and 0 < x.shape[0] <= LINEAR_MAX_ROWS and x.stride(1) == 1:
        return gemv(x, weight)
    return F.linear(x, weight, bias)

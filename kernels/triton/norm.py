"""Triton RMSNorm kernels for Qwen3.5: Gemma-style norm (optionally fused with the residual add) and the GDN
output norm gated by SiLU(z).

Each public function is a thin launcher that validates shapes, dtypes and strides, then launches one kernel.
Numerics follow the torch references in ``kernels/norm.py`` step by step, including every rounding to the
activation dtype, so that bf16 outputs agree to (almost always) the last bit:

* ``gemma_rms_norm``: ``(x / rms(x)) * (1 + w)`` in fp32, one rounding to x's dtype at the end.
* ``gemma_rms_norm_residual``: ``s = x + residual`` rounded to x's dtype (as torch's add does), then the norm of s.
* ``gated_rms_norm``: ``n = x / rms(x)`` in fp32 rounded to x's dtype; ``n * w`` rounded to the promoted dtype of
  (w, x); times ``silu(gate)`` in fp32; rounded to x's dtype.

The only differences from the references are the reduction order of ``sum(x^2)`` and ``rsqrt``'s last-ulp
behaviour, both far below bf16 resolution and ~1e-7 relative in fp32.

Rows are processed ``BLOCK_R`` at a time in a ``[BLOCK_R, BLOCK_D]`` register tile (one pass, no re-read): for
wide rows (hidden 2048/4096) one row per program, for narrow ones (GDN heads of 128) several rows per program
so each program still moves a few KB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_DIM = 32768  # one register tile per row; wider rows would need a two-pass kernel
_TILE_ELEMENTS = 4096  # elements per program tile; sets rows per program for narrow rows
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` (round-to-nearest-even) and return it as fp32.

    Used wherever the torch reference materialises an intermediate in the activation dtype. bf16 rounding is
    done with integer ops rather than ``.to(tl.bfloat16)`` because Triton's CPU interpreter truncates on that
    cast while the GPU rounds to nearest even; the bit trick gives the GPU's result on both, so interpreter
    tests check the same numerics the GPU runs. (It maps NaNs with payload only in the low 16 bits to inf;
    arithmetic NaNs are canonical and stay NaN.)
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_weight(weight: torch.Tensor, dim: int, device: torch.device) -> None:
    _check_float("weight", weight)
    if weight.shape != (dim,):
        raise ValueError(f"weight must have shape ({dim},), got {tuple(weight.shape)}")
    if weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device}, expected {device}")


def _as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., D]`` as ``[rows, D]`` without copying; the row stride may be anything, the last must be 1."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension")
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {tuple(x.stride())}")
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as err:
        raise ValueError(f"{name} with shape {tuple(x.shape)} and strides {tuple(x.stride())} cannot be viewed "
                         "as rows without a copy") from err


def _launch_geometry(num_rows: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for a row-wise kernel."""
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(num_rows)))
    tile = block_r * block_d
    num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    return block_r, block_d, num_warps


@triton.jit
def gemma_norm_row(x32, w, dim, eps, dtype: tl.constexpr):
    """Gemma RMSNorm of one fp32 row held in registers (its masked lanes 0): ``(x * rstd) * (1 + w)`` in fp32,
    rounded once to ``dtype``, as ``_gemma_rms_norm_kernel`` computes it. The weight row ``w`` comes loaded
    (masked lanes 0), so that callers issue its load with their others."""
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
    return round_to((x32 * rstd) * (1.0 + w.to(tl.float32)), dtype)


@triton.jit
def _gemma_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    num_rows, dim, stride_x, stride_res, stride_out, stride_new_res, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)  # rows * stride can exceed 2^31 for long prefill batches
    mask = (rows < num_rows)[:, None] & (cols < dim)[None, :]
    # The weight before the wait: loaded after the residual's store (which may alias it, for all the compiler
    # knows), it was a second trip to memory after x's (sm_90 PTX).
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    pdl_wait(PDL)

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # torch adds in fp32 and rounds once to the activation dtype; do exactly that.
        summed = round_to(x.to(tl.float32) + res.to(tl.float32), x.dtype).to(x.dtype)
        tl.store(new_res_ptr + rows64[:, None] * stride_new_res + cols[None, :], summed, mask=mask)
        x = summed
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=1) / dim + eps)
    out = round_to((x32 * rstd[:, None]) * (1.0 + w[None, :]), out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _gemma_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    _check_float("x", x)
    x2 = _as_rows("x", x)
    dim = x2.shape[1]
    if dim > _MAX_DIM:
        raise ValueError(f"rows wider than {_MAX_DIM} are not supported (got {dim})")
    _check_weight(weight, dim, x.device)
    res2 = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
        res2 = _as_rows("residual", residual)

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out, new_res
    out2 = out.view(-1, dim)
    new_res2 = new_res.view(-1, dim) if new_res is not None else out2  # dummy pointer when there is no residual
    block_r, block_d, num_warps = _launch_geometry(num_rows, dim)
    _gemma_rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x2, res2 if res2 is not None else x2, weight, out2, new_res2,
        num_rows, dim, x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0), new_res2.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
        **pdl_launch_args(x.device),
    )
    return out, new_res


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x / rms(x)) * (1 + weight)`` over the last dim, in fp32, returned (new, contiguous) in x's dtype.

    x: ``[..., D]`` with unit stride in the last dim (any row stride if 2-D); weight: ``[D]``, any float dtype.
    """
    out, _ = _gemma_launch(x, None, weight, eps)
    return out


def gemma_rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + Gemma RMSNorm: returns ``(norm(x + residual), x + residual)``, both new tensors.

    The add is rounded to x's dtype before the norm, like the unfused reference. With ``residual=None`` the
    second result is ``x`` itself (not a copy), exactly as the reference returns it.
    """
    out, new_res = _gemma_launch(x, residual, weight, eps)
    return out, (x if new_res is None else new_res)


@triton.jit
def gated_rms_norm_rows(x, g32, w32, dim, eps, PROD_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``gated_rms_norm`` of the rows of ``x [R, D]`` (the model dtype, masked lanes 0) with the fp32 gate
    ``g32 [R, D]`` and weight ``w32 [1, D]``: fp32 values rounded to OUT_DTYPE. As the reference: the normed row
    rounded to x's dtype, times the weight rounded to the promoted dtype, times silu(gate) in fp32."""
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=1) / dim + eps)
    normed = round_to(x32 * rstd[:, None], x.dtype)
    scaled = round_to(normed * w32, PROD_DTYPE)
    silu = g32 / (1.0 + tl.exp(-g32))  # torch's silu formula
    return round_to(scaled * silu, OUT_DTYPE)


@triton.jit
def _gated_rms_norm_kernel(
    x_ptr, g_ptr, w_ptr, out_ptr,
    num_rows, heads, dim,
    stride_xt, stride_xh, stride_gt, stride_gh, eps,
    PROD_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (token, head) index
    cols = tl.arange(0, BLOCK_D)
    tok = (rows // heads).to(tl.int64)
    head = (rows % heads).to(tl.int64)
    mask = (rows < num_rows)[:, None] & (cols < dim)[None, :]

    x = tl.load(x_ptr + (tok * stride_xt + head * stride_xh)[:, None] + cols[None, :], mask=mask, other=0.0)
    g = tl.load(g_ptr + (tok * stride_gt + head * stride_gh)[:, None] + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0)

    out = gated_rms_norm_rows(x, g.to(tl.float32), w.to(tl.float32)[None, :], dim, eps, PROD_DTYPE,
                              out_ptr.dtype.element_ty)
    out_rows = rows.to(tl.int64) * dim
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GDN output norm ``(weight * (x / rms(x))) * silu(gate)`` over the last dim; new contiguous tensor.

    x, gate: ``[T, Hv, Dv]`` with unit stride in the last dim; any token/head strides (gate is usually a
    strided view of the in_proj output). weight: ``[Dv]``. Output: ``[T, Hv, Dv]`` in x's dtype.
    """
    _check_float("x", x)
    _check_float("gate", gate)
    if x.dim() != 3:
        raise ValueError(f"x must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    if gate.shape != x.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} differs from x shape {tuple(x.shape)}")
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device}, x on {x.device}")
    for name, t in (("x", x), ("gate", gate)):
        if t.stride(2) != 1 and t.shape[2] != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {tuple(t.stride())}")
    tokens, heads, dim = x.shape
    if dim > _MAX_DIM:
        raise ValueError(f"head_dim wider than {_MAX_DIM} is not supported (got {dim})")
    _check_weight(weight, dim, x.device)

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = tokens * heads
    if num_rows == 0:
        return out
    prod_dtype = _TL_DTYPES[torch.promote_types(weight.dtype, x.dtype)]
    block_r, block_d, num_warps = _launch_geometry(num_rows, dim)
    _gated_rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x, gate, weight, out,
        num_rows, heads, dim,
        x.stride(0), x.stride(1), gate.stride(0), gate.stride(1), float(eps),
        PROD_DTYPE=prod_dtype, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, **pdl_launch_args(x.device),
    )
    return out

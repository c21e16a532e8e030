"""Attention over the paged KV cache in plain torch (SDPA), the CPU path and the reference for flashinfer.

KV cache of one layer: ``[num_pages, 2, page_size, kv_heads, head_dim]`` (K then V inside a page), so one
page of one layer is a single contiguous region that a transfer can move in one piece.

An FP8 cache (``torch.float8_e4m3fn``) stores ``k / k_scale`` and ``v / v_scale`` with one scalar scale per
layer for K and one for V (vLLM's convention: the checkpoint's ``k_scale`` is what the stored value is
multiplied by to get K back). Values are saturated at the e4m3 range (+-448) when written: an unsaturated
cast of a larger value gives NaN, which would poison every later token of the sequence. Reading, the fp8
values are exact in bf16 and fp32, so attention runs on them as they are and folds the scales in where
flashinfer does: ``k_scale`` into the softmax scale, ``v_scale`` onto the output.
"""

import struct

import torch
import torch.nn.functional as F

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def round_to_fp32(value: float) -> float:
    """The nearest fp32 number, as a Python float (scales are fp32 wherever they are used)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def fp8_multiplier(scale: float) -> float:
    """``1 / scale`` rounded to fp32: what a value is multiplied by before its cast to fp8. The Triton kernel
    gets the same fp32 number, so both write the same bytes (a division would round differently there).
    Plain Python (no tensor): it runs on the host once per attention layer of every eager step."""
    return round_to_fp32(1.0 / scale)


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` as e4m3 (in fp32, then saturated at +-448, then rounded to nearest even)."""
    scaled = x.float() * fp8_multiplier(scale)
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ``quantize_fp8`` stored, back in ``dtype``: ``x * scale``."""
    return (x.float() * scale).to(dtype)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_ids: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store new tokens' ``k, v [T, kv_heads, head_dim]`` at flat token slots ``page_id * page_size + offset``
    (quantized with ``k_scale`` / ``v_scale`` into an fp8 cache; the scales mean nothing to any other)."""
    num_pages, _, page_size = kv_cache.shape[:3]
    pages = torch.div(slot_ids, page_size, rounding_mode="floor")
    offsets = slot_ids - pages * page_size
    if is_fp8(kv_cache.dtype):
        # Indexed through uint8 views: the same bytes, and index kernels exist for uint8 on every device and
        # torch version (not all have them for fp8).
        kv_cache = kv_cache.view(torch.uint8)
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, page_ids: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``kv_len`` tokens of one sequence as contiguous ``k, v [kv_len, kv_heads, head_dim]``, as
    stored (fp8 values are not rescaled)."""
    if is_fp8(kv_cache.dtype):  # as in write_kv
        pages = kv_cache.view(torch.uint8).index_select(0, page_ids).view(kv_cache.dtype)
    else:
        pages = kv_cache.index_select(0, page_ids)  # [P, 2, page_size, H, D]
    k = pages[:, 0].flatten(0, 1)[:kv_len]
    v = pages[:, 1].flatten(0, 1)[:kv_len]
    return k, v


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: list[torch.Tensor],
    query_lens: list[int],
    kv_lens: list[int],
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached prefix plus themselves.

    ``q [T, heads, head_dim]`` holds the sequences' queries back to back; query i of a sequence with
    ``kv_len`` tokens sits at absolute position ``kv_len - query_len + i`` and sees keys up to it.
    ``k_scale`` / ``v_scale``: an fp8 cache's scales (ignored for any other cache).
    """
    num_heads = q.shape[1]
    num_kv_heads = kv_cache.shape[3]
    if not is_fp8(kv_cache.dtype):
        k_scale = v_scale = 1.0
    out = torch.empty_like(q)
    start = 0
    for page_ids, q_len, kv_len in zip(page_table, query_lens, kv_lens, strict=True):
        k, v = gather_kv(kv_cache, page_ids, kv_len)
        q_seq = q[start : start + q_len].transpose(0, 1)  # [H, q, D]
        k = k.transpose(0, 1).to(q.dtype).repeat_interleave(num_heads // num_kv_heads, dim=0)
        v = v.transpose(0, 1).to(q.dtype).repeat_interleave(num_heads // num_kv_heads, dim=0)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q_seq, k, v, attn_mask=mask, scale=scale * k_scale)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    if v_scale != 1.0:
        out *= v_scale
    return out

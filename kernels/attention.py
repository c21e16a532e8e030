"""Attention over the paged KV cache in plain torch (SDPA), the CPU path and the reference for flashinfer.

KV cache of one layer: ``[num_pages, 2, page_size, kv_heads, head_dim]`` (K then V inside a page), so one
page of one layer is a single contiguous region that a transfer can move in one piece.
"""

import torch
import torch.nn.functional as F


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_ids: torch.Tensor) -> None:
    """Store new tokens' ``k, v [T, kv_heads, head_dim]`` at flat token slots ``page_id * page_size + offset``."""
    num_pages, _, page_size = kv_cache.shape[:3]
    pages = torch.div(slot_ids, page_size, rounding_mode="floor")
    offsets = slot_ids - pages * page_size
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, page_ids: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``kv_len`` tokens of one sequence as contiguous ``k, v [kv_len, kv_heads, head_dim]``."""
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
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached prefix plus themselves.

    ``q [T, heads, head_dim]`` holds the sequences' queries back to back; query i of a sequence with
    ``kv_len`` tokens sits at absolute position ``kv_len - query_len + i`` and sees keys up to it.
    """
    num_heads = q.shape[1]
    num_kv_heads = kv_cache.shape[3]
    out = torch.empty_like(q)
    start = 0
    for page_ids, q_len, kv_len in zip(page_table, query_lens, kv_lens, strict=True):
        k, v = gather_kv(kv_cache, page_ids, kv_len)
        q_seq = q[start : start + q_len].transpose(0, 1)  # [H, q, D]
        k = k.transpose(0, 1).to(q.dtype).repeat_interleave(num_heads // num_kv_heads, dim=0)
        v = v.transpose(0, 1).to(q.dtype).repeat_interleave(num_heads // num_kv_heads, dim=0)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q_seq, k, v, attn_mask=mask, scale=scale)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out

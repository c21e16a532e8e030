"""Partial rotary position embedding (NeoX "rotate half" style on the first ``rotary_dim`` dims)."""

import torch


def rope_cos_sin_cache(rotary_dim: int, max_positions: int, theta: float, device=None) -> torch.Tensor:
    """fp32 table ``[max_positions, rotary_dim]`` holding ``cat(cos, sin)`` of each position's half-angles."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_partial_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x`` ``[tokens, heads, head_dim]``; the rest pass through.

    cos/sin are cast to x's dtype before the multiply, as the reference model does.
    """
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos = torch.cat([cos_sin[:, :half]] * 2, dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat([cos_sin[:, half:]] * 2, dim=-1).unsqueeze(1).to(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)

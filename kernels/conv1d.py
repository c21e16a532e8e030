"""Causal depthwise conv1d with SiLU over a sequence, carrying the last ``kernel-1`` inputs as state.

State layout per sequence: ``[conv_dim, kernel - 1]`` (oldest input first), as in HF and causal-conv1d.
"""

import torch
import torch.nn.functional as F


def causal_conv1d_prefill(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``x [L, D]``, ``weight [D, K]``, ``conv_state [D, K-1]`` or None for a fresh sequence.

    Returns ``(silu(conv(x)) [L, D], new_state [D, K-1])``; the conv runs in the weight dtype.
    """
    seq_len, dim = x.shape
    kernel = weight.shape[1]
    if conv_state is None:
        conv_state = x.new_zeros(dim, kernel - 1)
    padded = torch.cat([conv_state.to(x.dtype), x.t()], dim=-1).to(weight.dtype)  # [D, K-1+L]
    out = F.conv1d(padded.unsqueeze(0), weight.unsqueeze(1), groups=dim)[0]  # [D, L]
    new_state = padded[:, -(kernel - 1) :]
    return F.silu(out).t().to(x.dtype), new_state


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor) -> torch.Tensor:
    """One decode step for a batch: ``x [B, D]``, ``conv_states [B, D, K-1]`` updated in place."""
    window = torch.cat([conv_states.to(weight.dtype), x.unsqueeze(-1).to(weight.dtype)], dim=-1)  # [B, D, K]
    conv_states.copy_(window[:, :, 1:])
    out = (window * weight.unsqueeze(0)).sum(-1)
    return F.silu(out).to(x.dtype)

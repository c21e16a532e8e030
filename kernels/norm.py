"""RMSNorm variants used by Qwen3.5, as plain torch (the reference every fused kernel is tested against).

Qwen3.5 uses the Gemma convention ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` for the residual-stream and
QK norms (weights are stored zero-centred), and a plain-weight RMSNorm gated by SiLU(z) on the GDN output.
Dtype handling mirrors HF transformers so that bf16 runs round the same way.
"""

import torch
import torch.nn.functional as F


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x / rms(x)) * (1 + weight)``, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).to(x.dtype)


def gemma_rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then norm: returns (norm(x + residual), x + residual).

    The add happens in the activation dtype, as in the reference model, so the residual stream rounds
    identically whether or not the add is fused.
    """
    summed = x if residual is None else x + residual
    return gemma_rms_norm(summed, weight, eps), summed


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GDN output norm: ``weight * (x / rms(x)) * silu(gate)`` over the last dim (one value head)."""
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(dtype)
    return (out * F.silu(gate.float())).to(dtype)

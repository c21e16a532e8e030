"""Mixture-of-experts routing and expert computation in plain torch.

Expert weights are stacked: ``w13 [E, 2*I, H]`` (gate rows then up rows, as HF's ``gate_up_proj``) and
``w2 [E, H, I]``.
"""

import torch
import torch.nn.functional as F


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in fp32, keep the top_k; returns ``(weights [T, k] fp32, expert_ids [T, k])``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` with SwiGLU experts, grouping tokens by expert."""
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    weights = weights.to(x.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        tokens = token_of[start : start + count]
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        y = y * weights.flatten()[rows, None]
        out.index_add_(0, tokens, y.float())
        start += count
    return out.to(x.dtype)

"""The kernel set a model runs with, chosen once per engine: the plain-torch references (CPU, tests, the
source of truth) or the Triton and flashinfer kernels (CUDA). Both sets have the same signatures, so the
model code is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import attention as torch_attention
from kernels import moe as torch_moe
from kernels import norm as torch_norm
from kernels.rope import apply_partial_rope


def qk_norm_rope_torch(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads, num_kv_heads,
                       head_dim, eps):
    """Reference for kernels.triton.qk_norm_rope: ``(q, k, v, sigmoid(gate))``."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim * 2, num_kv_heads * head_dim
    q_gate, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q_gate = q_gate.view(num_tokens, num_heads, 2 * head_dim)
    q, gate = q_gate[..., :head_dim], q_gate[..., head_dim:]
    q = torch_norm.gemma_rms_norm(q, q_norm_weight, eps)
    k = torch_norm.gemma_rms_norm(k.reshape(num_tokens, num_kv_heads, head_dim), k_norm_weight, eps)
    q = apply_partial_rope(q, positions, cos_sin_cache)
    k = apply_partial_rope(k, positions, cos_sin_cache)
    return q, k, v.reshape(num_tokens, num_kv_heads, head_dim), torch.sigmoid(gate.reshape(num_tokens, -1))


def route_topk_torch(x, router_weight, top_k, renormalize):
    """Router and shared-expert gate in one GEMM (``router_weight`` is ``[experts + 1, hidden]``, the last
    row the shared-expert gate): ``(weights fp32 [T, k], expert ids [T, k], sigmoid(shared gate) [T, 1])``."""
    logits = F.linear(x, router_weight)
    weights, ids = torch_moe.topk_softmax(logits[:, :-1], top_k, renormalize)
    return weights, ids, torch.sigmoid(logits[:, -1:])


class TorchAttention:
    """kernels.attention behind the plan/run interface of kernels.flashinfer_attention."""

    def plan(self, query_lens: list[int], kv_lens: list[int], page_tables: list[torch.Tensor], scale: float) -> None:
        self._args = (page_tables, query_lens, kv_lens, scale)

    def run(self, q: torch.Tensor, kv_cache_layer: torch.Tensor) -> torch.Tensor:
        page_tables, query_lens, kv_lens, scale = self._args
        return torch_attention.paged_attention(q, kv_cache_layer, page_tables, query_lens, kv_lens, scale)


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm_residual: Callable
    gated_rms_norm: Callable
    qk_norm_rope: Callable
    route_topk: Callable
    fused_experts: Callable
    make_attention: Callable  # (num_qo_heads, num_kv_heads, head_dim, page_size, dtype, device) -> backend


def torch_ops() -> Ops:
    return Ops(
        name="torch",
        rms_norm_residual=torch_norm.gemma_rms_norm_residual,
        gated_rms_norm=torch_norm.gated_rms_norm,
        qk_norm_rope=qk_norm_rope_torch,
        route_topk=route_topk_torch,
        fused_experts=torch_moe.fused_experts,
        make_attention=lambda *args: TorchAttention(),
    )


def gpu_ops() -> Ops:
    from kernels.flashinfer_attention import FlashInferAttention
    from kernels.triton import moe as triton_moe
    from kernels.triton import norm as triton_norm
    from kernels.triton.qk_norm_rope import qk_norm_rope

    def route_topk(x, router_weight, top_k, renormalize):
        return triton_moe.route_topk(x, router_weight, None, top_k, renormalize, fused_shared_gate=True)

    return Ops(
        name="triton+flashinfer",
        rms_norm_residual=triton_norm.gemma_rms_norm_residual,
        gated_rms_norm=triton_norm.gated_rms_norm,
        qk_norm_rope=qk_norm_rope,
        route_topk=route_topk,
        fused_experts=triton_moe.fused_experts,
        make_attention=FlashInferAttention,
    )


def select_ops(kernels: str, device: torch.device) -> Ops:
    """``auto``: the GPU kernels on CUDA, the torch references elsewhere."""
    if kernels == "auto":
        kernels = "gpu" if device.type == "cuda" else "torch"
    if kernels == "torch":
        return torch_ops()
    if kernels == "gpu":
        if device.type != "cuda":
            raise ValueError("the gpu kernel set needs a CUDA device")
        return gpu_ops()
    raise ValueError(f"kernels must be auto, torch or gpu, got {kernels!r}")

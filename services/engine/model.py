"""Qwen3.5 hybrid model (Gated DeltaNet + gated full attention, MoE or dense MLP) over packed tokens.

Parameters are stored fused where that saves a GEMM (q/k/v, the four GDN input projections, gate/up),
and the loader (``loader.py``) maps HF checkpoint tensors into those slices. Layers read and write the
KV pages and GDN state slots through the ForwardBatch indices; they keep no per-request state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.norm import gemma_rms_norm
from kernels.rope import rope_cos_sin_cache

from .forward_batch import ForwardBatch
from .model_config import FULL_ATTENTION, ModelConfig
from .ops import Ops
from .state_cache import KVCache, StateCache


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(x, self.weight, self.eps)


def _weight(norm: GemmaRMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight


def _eps(norm: GemmaRMSNorm | None) -> float:
    return 0.0 if norm is None else norm.eps


class GatedAttention(nn.Module):
    """Full attention with QK RMSNorm, partial RoPE, GQA and a sigmoid output gate."""

    def __init__(self, cfg: ModelConfig, attn_index: int, dtype: torch.dtype, device, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.eps = cfg.rms_norm_eps
        self.attn_index = attn_index  # position of this layer's KV among the full-attention layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim * 2  # query and gate, interleaved per head
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = _param(self.q_size + 2 * self.kv_size, cfg.hidden_size, dtype=dtype, device=device)
        qkv_rows = self.q_size + 2 * self.kv_size
        self.qkv_bias = _param(qkv_rows, dtype=dtype, device=device) if cfg.attention_bias else None
        self.o_proj = _param(cfg.hidden_size, self.num_heads * self.head_dim, dtype=dtype, device=device)
        self.o_bias = _param(cfg.hidden_size, dtype=dtype, device=device) if cfg.attention_bias else None
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: GemmaRMSNorm | None,
                batch: ForwardBatch, kv_cache: KVCache, cos_sin: torch.Tensor, attention
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input norm (with the residual add; ``norm`` None: x is already normed) and attention;
        returns ``(output, residual)``. ``attention``: the step's planned attention backend (see
        Ops.make_attention)."""
        num_tokens = x.shape[0]
        qkv, residual = self.ops.norm_linear(x, residual, _weight(norm), _eps(norm), self.qkv_proj, self.qkv_bias)
        # QK RMSNorm, partial RoPE, the output gate split off (already passed through a sigmoid), and the
        # new K/V stored in the layer's pages (an fp8 cache: quantized with the layer's scales).
        layer_kv = kv_cache.layer(self.attn_index)
        k_scale, v_scale = kv_cache.scales(self.attn_index)
        if getattr(attention, "fused_decode", False):
            # A decode step on the Triton backend: QK-norm, RoPE, the K/V store, the attention and the gate in
            # one launch from the qkv rows (kernels/triton_attention.py).
            out = attention.run_fused(qkv, self.q_norm.weight, self.k_norm.weight, cos_sin, batch.positions,
                                      batch.kv_slot_ids, self.eps, layer_kv, k_scale, v_scale)
            return self.ops.linear(out.reshape(num_tokens, -1), self.o_proj, self.o_bias), residual
        q, gate = self.ops.qk_norm_rope_store_kv(
            qkv, self.q_norm.weight, self.k_norm.weight, cos_sin, batch.positions, self.num_heads,
            self.num_kv_heads, self.head_dim, self.eps, layer_kv, batch.kv_slot_ids, k_scale, v_scale,
        )
        out = attention.run(q, layer_kv, k_scale, v_scale)
        return self.ops.gated_linear(out.reshape(num_tokens, -1), gate, self.o_proj, self.o_bias), residual


class GatedDeltaNet(nn.Module):
    """Linear attention layer: causal conv1d + gated delta rule, with its state in a StateCache slot."""

    def __init__(self, cfg: ModelConfig, gdn_index: int, dtype: torch.dtype, device, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.gdn_index = gdn_index  # position of this layer's state among the GDN layers
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.k_dim = cfg.linear_key_head_dim
        self.v_dim = cfg.linear_value_head_dim
        self.key_size = cfg.gdn_key_dim
        self.value_size = cfg.gdn_value_dim
        self.conv_dim = cfg.gdn_conv_dim
        self.eps = cfg.rms_norm_eps
        # in_proj rows: [q | k | v] (the conv input), then z (output gate), then b (beta), then a (decay)
        in_rows = self.conv_dim + self.value_size + 2 * self.num_v_heads
        self.in_proj = _param(in_rows, cfg.hidden_size, dtype=dtype, device=device)
        self.conv_weight = _param(self.conv_dim, cfg.linear_conv_kernel_dim, dtype=dtype, device=device)
        # The decay parameters stay fp32: the reference computes the gate in fp32 from them.
        self.A_log = _param(self.num_v_heads, dtype=torch.float32, device=device)
        self.dt_bias = _param(self.num_v_heads, dtype=torch.float32, device=device)
        self.norm_weight = _param(self.v_dim, dtype=dtype, device=device)
        self.out_proj = _param(cfg.hidden_size, self.value_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: GemmaRMSNorm | None,
                batch: ForwardBatch, state_cache: StateCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input norm (with the residual add; ``norm`` None: x is already normed) and the GDN mixer;
        returns ``(output, residual)``."""
        num_tokens = x.shape[0]
        conv_states = state_cache.conv_layer(self.gdn_index)
        if batch.is_decode:  # the conv update runs with in_proj (in its epilogue on the GPU)
            projected, residual = self.ops.norm_linear_conv(x, residual, _weight(norm), _eps(norm), self.in_proj,
                                                            self.conv_weight, conv_states, batch.state_slots)
        else:
            projected, residual = self.ops.norm_linear(x, residual, _weight(norm), _eps(norm), self.in_proj)
        mixed_qkv, z, b, a = projected.split(
            [self.conv_dim, self.value_size, self.num_v_heads, self.num_v_heads], dim=-1
        )
        z = z.reshape(num_tokens, self.num_v_heads, self.v_dim)
        out, gated = self.ops.gdn(self, mixed_qkv, a, b, batch, conv_states, state_cache.ssm_layer(self.gdn_index),
                                  z)
        if gated:  # the kernel applied the gated RMSNorm with z
            return self.ops.linear(out.flatten(1), self.out_proj), residual
        # Gated RMSNorm per head, then out_proj.
        return self.ops.gated_norm_linear(out, z, self.norm_weight, self.eps, self.out_proj), residual

    def split_heads(self, mixed: torch.Tensor, num_tokens: int):
        q, k, v = mixed.split([self.key_size, self.key_size, self.value_size], dim=-1)
        return (
            q.reshape(num_tokens, self.num_k_heads, self.k_dim),
            k.reshape(num_tokens, self.num_k_heads, self.k_dim),
            v.reshape(num_tokens, self.num_v_heads, self.v_dim),
        )


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = _param(2 * intermediate, hidden, dtype=dtype, device=device)
        self.down_proj = _param(hidden, intermediate, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


class SparseMoE(nn.Module):
    """Top-k softmax-routed experts plus a sigmoid-gated shared expert.

    When the shared expert has the experts' shape (``cfg.shared_expert_in_experts``) it is expert ``E`` of
    ``w13``/``w2`` (rows ``[0, E)`` are the routed experts); otherwise it is a separate ``DenseMLP``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        # The experts' router and the shared expert's gate share one GEMM: rows [0, E) route, row E gates. Its
        # storage has zero rows up to a multiple of 8 after them (kernels.triton.moe.padded_router_rows): with 257
        # rows (35B-A3B) cuBLAS picks an align-1 sm75 kernel, with 264 an aligned one.
        rows = cfg.num_experts + 1
        padded = torch.zeros(-(-rows // 8) * 8, h, dtype=dtype, device=device)
        self.router = nn.Parameter(padded[:rows], requires_grad=False)
        stacked = cfg.num_experts + int(cfg.shared_expert_in_experts)
        self.w13 = _param(stacked, 2 * i, h, dtype=dtype, device=device)
        self.w2 = _param(stacked, h, i, dtype=dtype, device=device)
        self.shared_expert = None
        if not cfg.shared_expert_in_experts:
            self.shared_expert = DenseMLP(h, cfg.shared_expert_intermediate_size, dtype, device)
        # Scratch of the single-launch router kernel (kept at 0 between launches; see Ops.route_topk).
        self.register_buffer("route_ticket", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: GemmaRMSNorm,
                then_norm: GemmaRMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The post-attention norm (with the residual add) and the experts; returns ``(output, residual,
        normed)``: where the kernels applied ``then_norm`` (the next norm, see Ops.norm_moe_with_shared_expert)
        ``normed`` is True and the output is already through it and its residual add."""
        if self.shared_expert is None:
            return self.ops.norm_moe_with_shared_expert(x, residual, norm.weight, norm.eps, self.router, self.w13,
                                                        self.w2, self.top_k, self.renormalize, self.route_ticket,
                                                        then_norm)
        h, residual = self.ops.rms_norm_residual(x, residual, norm.weight, norm.eps)
        weights, expert_ids, shared_gate = self.ops.route_topk(h, self.router, self.top_k, self.renormalize,
                                                               self.route_ticket)
        routed = self.ops.fused_experts(h, self.w13, self.w2, weights, expert_ids)
        return routed + shared_gate.to(h.dtype) * self.shared_expert(h), residual, False


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, device, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.is_attention = cfg.layer_types[layer] == FULL_ATTENTION
        if self.is_attention:
            self.mixer = GatedAttention(cfg, cfg.attention_layers.index(layer), dtype, device, ops)
        else:
            self.mixer = GatedDeltaNet(cfg, cfg.gdn_layers.index(layer), dtype, device, ops)
        self.is_moe = cfg.layer_is_moe(layer)
        if self.is_moe:
            self.mlp = SparseMoE(cfg, dtype, device, ops)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        normed: bool,
        batch: ForwardBatch,
        kv_cache: KVCache,
        state_cache: StateCache,
        cos_sin: torch.Tensor,
        attention,
        next_norm: GemmaRMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``normed``: the previous layer already applied this layer's input norm and its residual add to x.
        ``next_norm``: the norm after this layer (the next one's input norm, or the final norm), which the
        experts' kernels may apply; returns ``(x, residual, normed)`` for the next layer."""
        input_norm = None if normed else self.input_layernorm
        if self.is_attention:
            h, residual = self.mixer(x, residual, input_norm, batch, kv_cache, cos_sin, attention)
        else:
            h, residual = self.mixer(x, residual, input_norm, batch, state_cache)
        norm = self.post_attention_layernorm
        if self.is_moe:
            return self.mlp(h, residual, norm, next_norm)
        h, residual = self.ops.rms_norm_residual(h, residual, norm.weight, norm.eps)
        return self.mlp(h), residual, False


class Qwen35ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, ops: Ops,
                 page_size: int, kv_dtype: torch.dtype | None = None) -> None:
        """``kv_dtype``: what the KV cache holds (default ``dtype``; float8_e4m3fn for an fp8 cache)."""
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.ops = ops
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device, ops) for i in range(cfg.num_hidden_layers))
        # One attention backend for all layers: the page table is planned once per step.
        self.attention = ops.make_attention(
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, page_size, dtype, torch.device(device),
            kv_dtype or dtype,
        )
        self.attention_scale = cfg.head_dim**-0.5
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        max_positions = cfg.max_position_embeddings
        self.register_buffer(
            "cos_sin", rope_cos_sin_cache(cfg.rotary_dim, max_positions, cfg.rope_theta, device), persistent=False
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache, state_cache: StateCache, attention=None) -> torch.Tensor:
        """Run the packed batch, update KV pages and state slots, return fp32 logits of ``logits_indices``.

        ``attention``: a backend already planned for this batch (CUDA graphs plan outside the capture)."""
        x = F.embedding(batch.input_ids, self.embed_tokens)
        if attention is None:
            attention = self.attention
            if self.config.attention_layers:
                attention.plan(batch.query_lens, batch.kv_lens, batch.page_tables, self.attention_scale)
        if self.config.gdn_layers:
            batch.gdn_plan = self.ops.plan_gdn(batch)
        residual, normed = None, False
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, residual, normed = layer(x, residual, normed, batch, kv_cache, state_cache, self.cos_sin, attention,
                                        next_norm)
        if not normed:
            x, _ = self.ops.rms_norm_residual(x, residual, self.norm.weight, self.norm.eps)
        x = x.index_select(0, batch.logits_indices)
        return self.ops.linear(x, self.lm_head).float()

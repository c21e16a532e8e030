"""GPU/CPU memory for per-request state: paged KV of the full-attention layers and fixed-size GDN
state slots. Layouts are chosen for the PD hand-over: one page of one layer, and one slot's conv or SSM
state across all GDN layers, are each a single contiguous region (see DESIGN.md).
"""

from __future__ import annotations

import torch

from kernels.attention import is_fp8

from .model_config import ModelConfig


class KVCache:
    """``[attn_layers, num_pages, 2 (K, V), page_size, kv_heads, head_dim]`` in the model dtype or fp8 (e4m3).

    An fp8 cache stores ``k / k_scale`` and ``v / v_scale`` with one pair of scalar scales per attention layer
    (``kernels.attention``); the scales are part of what the pages mean, so they live here with them (a prefill
    pod and a decode pod must agree on them as on the dtype). Any other cache has scales 1.0, unused."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device,
                 k_scales: list[float] | None = None, v_scales: list[float] | None = None) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        num_layers = len(cfg.attention_layers)
        self.k_scales = list(k_scales) if k_scales is not None else [1.0] * num_layers
        self.v_scales = list(v_scales) if v_scales is not None else [1.0] * num_layers
        if len(self.k_scales) != num_layers or len(self.v_scales) != num_layers:
            raise ValueError(f"{len(self.k_scales)} k and {len(self.v_scales)} v scales for {num_layers} attention "
                             f"layers")
        if not is_fp8(dtype) and (set(self.k_scales) | set(self.v_scales)) - {1.0}:
            raise ValueError(f"KV scales other than 1.0 mean nothing to a {dtype} cache")
        shape = (num_layers, num_pages, 2, page_size, cfg.num_key_value_heads, cfg.head_dim)
        # Never read before written: attention only gathers tokens below each sequence's length.
        self.buffer = torch.empty(shape, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def layer(self, attn_index: int) -> torch.Tensor:
        return self.buffer[attn_index]

    def scales(self, attn_index: int) -> tuple[float, float]:
        """``(k_scale, v_scale)`` of one attention layer."""
        return self.k_scales[attn_index], self.v_scales[attn_index]

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        per_layer = 2 * page_size * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
        return per_layer * len(cfg.attention_layers)


class StateCache:
    """GDN states by slot: conv ``[slots, gdn_layers, conv_dim, kernel-1]`` in the model dtype and SSM
    ``[slots, gdn_layers, v_heads, k_dim, v_dim]`` in fp32 (the recurrence accumulates in fp32)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device) -> None:
        self.num_slots = num_slots
        num_gdn = len(cfg.gdn_layers)
        self.conv = torch.zeros(
            num_slots, num_gdn, cfg.gdn_conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device
        )
        self.ssm = torch.zeros(
            num_slots,
            num_gdn,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
            dtype=torch.float32,
            device=device,
        )

    def conv_layer(self, gdn_index: int) -> torch.Tensor:
        return self.conv[:, gdn_index]

    def ssm_layer(self, gdn_index: int) -> torch.Tensor:
        return self.ssm[:, gdn_index]

    def copy_slot(self, src: int, dst: int) -> None:
        self.conv[dst].copy_(self.conv[src])
        self.ssm[dst].copy_(self.ssm[src])

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype) -> int:
        num_gdn = len(cfg.gdn_layers)
        conv = cfg.gdn_conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype.itemsize
        ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        return num_gdn * (conv + ssm)

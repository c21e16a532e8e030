"""GPU/CPU memory for per-request state: paged KV of the full-attention layers and fixed-size GDN
state slots. Layouts are chosen for the PD hand-over: one page of one layer, and one slot's conv or SSM
state across all GDN layers, are each a single contiguous region (see DESIGN.md).
"""

from __future__ import annotations

import torch

from .model_config import ModelConfig


class KVCache:
    """``[attn_layers, num_pages, 2 (K, V), page_size, kv_heads, head_dim]`` in the model dtype."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (len(cfg.attention_layers), num_pages, 2, page_size, cfg.num_key_value_heads, cfg.head_dim)
        # Never read before written: attention only gathers tokens below each sequence's length.
        self.buffer = torch.empty(shape, dtype=dtype, device=device)

    def layer(self, attn_index: int) -> torch.Tensor:
        return self.buffer[attn_index]

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

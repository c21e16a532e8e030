"""An attention backend whose decode steps run the gated attention layer's whole block in one Triton launch.

``kernels.triton.decode_attention.decode_attention_fused`` takes the qkv projection's rows and does the QK-norm,
RoPE, the new token's K/V store, the paged attention and the output gate: where the other backends need the
QK-norm/RoPE kernel before them and the gate multiply after (and flashinfer a merge kernel of its own). Steps that
are not decodes (prefill chunks, prompts on a cached prefix) go to ``inner``: flashinfer on the GPU, the torch
reference under Triton's interpreter. The model asks ``fused_decode`` after the step's plan and then calls
``run_fused`` instead of its QK-norm/RoPE op and ``run``.

Graph mode (``graph_batch_size``): a decode-only backend of one CUDA graph, its page tables in static device
buffers that ``plan_graph_decode`` refills before each replay (as flashinfer's graph backend). The kernel's split
partials are scratch that one backend owns; the graphs' backends share one (one graph replays at a time).
The split shape is the pipelined one that was at parity with flashinfer from 1K to 128K on the H200
(``kernels/results/decode_attention_h200.json``).
"""

from __future__ import annotations

import torch

from kernels.flashinfer_attention import GraphPageTables, _indptr
from kernels.triton.decode_attention import DecodeAttentionScratch, DecodeShape, FusedInputs, decode_attention_fused

MAX_SPLITS = 64
SHAPE = DecodeShape(min_pages=8, tile_pages=4, prefetch_pages=0, num_stages=5)


class TritonDecodeAttention:
    def __init__(self, inner, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device: torch.device, graph_batch_size: int = 0, graph_max_pages: int = 0,
                 scratch: DecodeAttentionScratch | None = None) -> None:
        """``inner``: the backend of the other steps (None for a graph's decode-only backend). ``scratch``: the
        kernel's (``new_scratch``), shared by backends that run one at a time; by default one that grows with
        the decode steps planned (outside graphs)."""
        self.inner = inner
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.device = page_size, device
        self.scratch = scratch
        self.graph_tables = (GraphPageTables(graph_batch_size, graph_max_pages, page_size, device)
                             if graph_batch_size else None)
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this step's, on the device
        self._scale = 1.0
        self.fused_decode = False  # whether the last plan was a decode step (then run_fused, not run)

    def plan(self, query_lens: list[int], kv_lens: list[int], page_tables: list[list[int]], scale: float) -> None:
        """As the other backends' plan; decode steps stay here, the rest go to ``inner``."""
        self._scale = scale
        self.fused_decode = all(q == 1 for q in query_lens)
        if not self.fused_decode:
            self.inner.plan(query_lens, kv_lens, page_tables, scale)
            return
        if self.scratch is None or self.scratch.tickets.numel() < len(query_lens) * self.num_kv_heads:
            self.scratch = self.new_scratch(1 << (len(query_lens) - 1).bit_length())
        indptr = _indptr([len(t) for t in page_tables])
        indices = torch.tensor([p for t in page_tables for p in t], dtype=torch.int32)
        last = torch.tensor([(n - 1) % self.page_size + 1 for n in kv_lens], dtype=torch.int32)
        self._tables = tuple(t.to(self.device, non_blocking=True) for t in (indptr, indices, last))

    def plan_graph_decode(self, kv_lens: list[int], page_tables: list[torch.Tensor], scale: float) -> None:
        """A graph backend's decode step: ``page_tables`` int32 CPU tensors, one per row (padding included)."""
        self.graph_tables.fill(kv_lens, page_tables)
        tables = self.graph_tables
        self._tables = (tables.indptr, tables.indices, tables.last_page_len)
        self._scale, self.fused_decode = scale, True

    def new_scratch(self, max_batch: int) -> DecodeAttentionScratch:
        """Split partials and tickets for decode steps of up to ``max_batch`` sequences."""
        return DecodeAttentionScratch.new(max_batch, self.num_kv_heads, self.num_qo_heads // self.num_kv_heads,
                                          self.head_dim, MAX_SPLITS, self.device)

    def run(self, q: torch.Tensor, kv_cache_layer: torch.Tensor, k_scale: float = 1.0,
            v_scale: float = 1.0) -> torch.Tensor:
        """A step that is not a decode: ``inner``'s attention."""
        if self.fused_decode:
            raise RuntimeError("a decode step runs run_fused, from the qkv rows")
        return self.inner.run(q, kv_cache_layer, k_scale, v_scale)

    def run_fused(self, qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                  cos_sin_cache: torch.Tensor, positions: torch.Tensor, kv_slot_ids: torch.Tensor, eps: float,
                  kv_cache_layer: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """The decode step's attention block from the qkv rows (what ``Ops.qk_norm_rope_store_kv`` takes): the
        new K/V stored, and the gated output ``[B, heads, head_dim]`` for o_proj."""
        indptr, indices, last = self._tables
        inputs = FusedInputs(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, kv_slot_ids, eps)
        return decode_attention_fused(inputs, self.num_qo_heads, kv_cache_layer, indptr, indices, last, self._scale,
                                      self.scratch, k_scale=k_scale, v_scale=v_scale, shape=SHAPE)

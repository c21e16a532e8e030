"""Paged attention on the KV pool with flashinfer (GPU), behind the same call as kernels.attention.

Baton's per-layer KV pool ``[num_pages, 2, page_size, kv_heads, head_dim]`` is flashinfer's "NHD" paged
layout with K and V in one tensor, so layers are passed as they are. The page table is the same for
every attention layer of a step, so it is planned once per step (``plan``) and each layer only ``run``s.
An fp8 KV cache (``kv_dtype`` float8_e4m3fn, queries in the model dtype) is planned with that KV dtype; its
per-layer scales go to ``run``, where flashinfer folds ``k_scale`` into the softmax scale and multiplies the
output by ``v_scale`` (as kernels.attention does; a scale of exactly 1.0 costs nothing).
Decode steps (one query token per sequence) use the decode kernel with tensor cores (GQA groups of 8 make
the query tile worth it). A prefill step -- fresh prompts, later chunks of a long prompt, prompts on top of a
cached prefix -- uses the ragged prefill kernel on each sequence's whole K/V (prefix included) gathered out of
the pages into contiguous tensors, causal with the queries aligned to the end of their keys: on the H200
flashinfer's paged prefill (page-table gathers in the main loop) reaches ~460 TFLOP/s at head_dim 256 where the
contiguous one loads whole tiles; the gather costs one read of the step's K/V per layer (0.1 GB for 50K tokens of
35B-A3B: ~50 us against ~44 ms of attention). The gather grows with the keys, not the queries, so a step whose
keys outnumber its queries more than ``_RAGGED_MAX_KV_PER_QUERY`` times (decodes riding along with a short
prefill), or whose keys exceed ``_RAGGED_MAX_KV_TOKENS``, stays on the paged prefill kernel. Over an fp8 cache the
ragged step gathers the fp8 K/V and dequantizes them to the model dtype (fp8 -> bf16 is exact; the scale multiply
rounds once, ~2^-9 relative, and not at all for power-of-two scales), so it attends over the same values as the
paged fp8 kernels and later decode steps do (SGLang instead attends over the unquantized K/V of new tokens there);
flashinfer's paged fp8 prefill is its FA2 kernel, about half the ragged one's speed at head_dim 256 on the H200.
"""

from __future__ import annotations

import torch

from kernels.attention import is_fp8

_WORKSPACE_BYTES = 256 << 20
# Ragged prefill gathers every key of the step, one layer at a time: at most this many (35B-A3B: 2 KB of bf16 K+V
# per token and layer, 512 MB), and at most this many per query token (a 128K prompt's last 8K chunk is 16;
# 64 decodes of 4K riding along with a 1K-token follow-up would be ~250: those steps stay paged).
_RAGGED_MAX_KV_TOKENS = 1 << 18
_RAGGED_MAX_KV_PER_QUERY = 32


class FlashInferAttention:
    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, kv_dtype: torch.dtype | None = None, graph_batch_size: int = 0,
                 graph_max_pages: int = 0, workspace: torch.Tensor | None = None) -> None:
        """``dtype``: the queries' and the output's; ``kv_dtype``: the cache's (default ``dtype``).
        ``graph_batch_size``: a decode-only backend for a CUDA graph of that batch size, whose page-table
        buffers are static (``graph_max_pages`` entries) and re-filled by ``plan_graph_decode`` before each
        replay. ``workspace``: flashinfer's scratch (``new_workspace``), shared by backends that run one at a
        time on one stream -- each plan rewrites it before its run, as SGLang shares one for all its graphs."""
        import flashinfer  # GPU only: imported here so CPU installs never need it

        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.kv_dtype = kv_dtype or dtype
        self.kv_fp8 = is_fp8(self.kv_dtype)
        self.workspace = workspace if workspace is not None else new_workspace(device)
        if graph_batch_size:
            self.graph_tables = GraphPageTables(graph_batch_size, graph_max_pages, page_size, device)
            tables = self.graph_tables
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=tables.indptr, paged_kv_indices_buffer=tables.indices,
                paged_kv_last_page_len_buffer=tables.last_page_len,
            )
            self.prefill = self.ragged = None
            self._graph_planned = False
            self._fast_plan = _fast_decode_plan()  # looked up once, not on every decode step
        else:
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
            self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        self._wrapper = None
        # For a ragged step: each key's (page, offset) in the pool, sequence by sequence (set by plan).
        self._token_pages: torch.Tensor | None = None
        self._token_offsets: torch.Tensor | None = None

    @property
    def mode(self) -> str | None:
        """What the last plan chose: "decode", "prefill" (paged) or "ragged"; None before any plan."""
        for name in ("decode", "prefill", "ragged"):
            if self._wrapper is not None and self._wrapper is getattr(self, name):
                return name
        return None

    def plan(self, query_lens: list[int], kv_lens: list[int], page_tables: list[list[int]], scale: float) -> None:
        """Describe this step's sequences (same for every layer); page tables are host lists.

        The offsets go to flashinfer as device tensors on purpose: its ``plan`` copies them back to the host, and
        that synchronisation is what keeps the host from planning the next step into flashinfer's pinned plan
        buffer while this step's asynchronous copy out of it is still queued (the next chunk of a long prompt is
        planned without waiting for this one's tokens). Host tensors there saved ~2 ms of GPU idle time before a
        32K prompt's first layer, within the noise of the prefill time, and opened that race (mini-sglang and
        vLLM hit the same one); they were taken out again."""
        common = dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype, sm_scale=scale)
        decode = all(q == 1 for q in query_lens)
        if not decode and self._ragged_fits(query_lens, kv_lens):
            # Each sequence's keys (prefix included) read out of the pages once per layer; causal, the queries
            # being the last query_len of them.
            qo_indptr, kv_token_indptr = _indptr(query_lens), _indptr(kv_lens)
            pages_used = [-(-n // self.page_size) for n in kv_lens]
            positions = torch.cat([torch.arange(n) for n in kv_lens])
            tables = torch.cat([torch.tensor(t[:used], dtype=torch.long)
                                for t, used in zip(page_tables, pages_used, strict=True)])
            first_page = torch.tensor([0, *pages_used[:-1]]).cumsum(0)
            page_index = first_page.repeat_interleave(torch.tensor(kv_lens)) + positions // self.page_size
            self._token_pages = tables[page_index].to(self.device, non_blocking=True)
            self._token_offsets = (positions % self.page_size).to(self.device, non_blocking=True)
            self.ragged.plan(qo_indptr.to(self.device), kv_token_indptr.to(self.device), self.num_qo_heads,
                             self.num_kv_heads, self.head_dim, causal=True,
                             **{**common, "kv_data_type": self.dtype})  # an fp8 cache's K/V dequantized in run
            self._wrapper = self.ragged
            return
        # The paged kernels read the page tables themselves.
        kv_indptr = _indptr([len(t) for t in page_tables])
        kv_indices = torch.tensor([p for t in page_tables for p in t], dtype=torch.int32).to(self.device)
        last_page_len = torch.tensor([(n - 1) % self.page_size + 1 for n in kv_lens], dtype=torch.int32)
        if decode:
            self.decode.plan(
                kv_indptr.to(self.device), kv_indices, last_page_len.to(self.device), self.num_qo_heads,
                self.num_kv_heads, self.head_dim, self.page_size, **common,
            )
            self._wrapper = self.decode
        else:
            qo_indptr = _indptr(query_lens)
            self.prefill.plan(
                qo_indptr.to(self.device), kv_indptr.to(self.device), kv_indices, last_page_len.to(self.device),
                self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size, causal=True, **common,
            )
            self._wrapper = self.prefill

    def _ragged_fits(self, query_lens: list[int], kv_lens: list[int]) -> bool:
        """Whether a (non-decode) step's keys are few enough to gather: see the module docstring."""
        if self.ragged is None:
            return False
        keys = sum(kv_lens)
        return keys <= _RAGGED_MAX_KV_TOKENS and keys <= _RAGGED_MAX_KV_PER_QUERY * sum(query_lens)

    def plan_graph_decode(self, kv_lens: list[int], page_tables: list[torch.Tensor], scale: float) -> None:
        """Decode step of a CUDA-graph backend: ``page_tables`` are int32 CPU tensors, one per sequence
        (padding rows included, so ``len(kv_lens)`` is the graph's batch size).

        After the first plan, replans use flashinfer's ``fast_decode_plan`` (as SGLang does): the same
        scheduling call on the host, without re-validating everything or copying into the buffers, which we
        fill ourselves. On the long-context single-request step this is most of the host time."""
        indptr, indices, last_page_len = self.graph_tables.fill(kv_lens, page_tables)
        args = (indptr, indices, last_page_len, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size)
        kwargs = dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype, sm_scale=scale)
        if self._graph_planned and self._fast_plan is not None:
            self._fast_plan(self.decode, *args, **kwargs, non_blocking=True, global_override_indptr_cpu=indptr)
        else:
            self.decode.plan(*args, **kwargs)
            self._graph_planned = True
        self._wrapper = self.decode

    def run(self, q: torch.Tensor, kv_cache_layer: torch.Tensor, k_scale: float = 1.0,
            v_scale: float = 1.0) -> torch.Tensor:
        """``q [T, heads, head_dim]`` -> ``[T, heads, head_dim]`` over the planned page tables; ``k_scale`` /
        ``v_scale``: the layer's fp8 scales (ignored for any other cache). Python floats: under a CUDA graph
        they are captured as kernel arguments, constants like the model's weights."""
        if self.ragged is not None and self._wrapper is self.ragged:
            k = kv_cache_layer[self._token_pages, 0, self._token_offsets]
            v = kv_cache_layer[self._token_pages, 1, self._token_offsets]
            if self.kv_fp8:
                k, v = _dequantize(k, k_scale, q.dtype), _dequantize(v, v_scale, q.dtype)
            return self.ragged.run(q, k, v)
        if not self.kv_fp8:
            return self._wrapper.run(q, kv_cache_layer)
        return self._wrapper.run(q, kv_cache_layer, k_scale=float(k_scale), v_scale=float(v_scale))


class GraphPageTables:
    """A decode graph's page tables in flashinfer's form (``indptr``, ``indices``, ``last_page_len``, int32), in
    device buffers the graph reads; ``fill`` writes each step's into them with one async copy apiece from pinned
    host staging (reused only once the last step's copies ran: see DecodeGraphs.run)."""

    def __init__(self, batch_size: int, max_pages: int, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.last_page_len = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._indptr_host = torch.zeros(batch_size + 1, dtype=torch.int32, pin_memory=True)
        self._indices_host = torch.zeros(max_pages, dtype=torch.int32, pin_memory=True)
        self._last_page_len_host = torch.zeros(batch_size, dtype=torch.int32, pin_memory=True)

    def fill(self, kv_lens: list[int], page_tables: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``page_tables``: int32 CPU tensors, one per row (padding rows included); returns the host staging
        (indptr, indices, last_page_len) whose copies to the device buffers are queued."""
        counts = [t.numel() for t in page_tables]
        total = sum(counts)
        indptr = self._indptr_host
        indptr[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
        last_page_len = self._last_page_len_host
        last_page_len.copy_(torch.tensor([(n - 1) % self.page_size + 1 for n in kv_lens], dtype=torch.int32))
        indices = self._indices_host[:total]
        torch.cat(page_tables, out=indices)
        self.indptr.copy_(indptr, non_blocking=True)
        self.last_page_len.copy_(last_page_len, non_blocking=True)
        self.indices[:total].copy_(indices, non_blocking=True)
        return indptr, indices, last_page_len


def _indptr(lengths: list[int]) -> torch.Tensor:
    """flashinfer's CSR offsets of consecutive runs of these lengths: int32 ``[0, l0, l0 + l1, ...]`` on the host."""
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return offsets


def _dequantize(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 cache values -> ``dtype``: ``values * scale``, the product rounded once (exact for a scale of 1.0).
    In place on the converted copy: torch multiplies bf16 by a scalar in fp32 and rounds once, so this equals an
    fp32 product rounded to bf16 without an fp32 temporary (512 MB for 256K keys of 35B-A3B)."""
    converted = values.to(dtype)
    return converted if scale == 1.0 else converted.mul_(float(scale))


def new_workspace(device: torch.device) -> torch.Tensor:
    """flashinfer's scratch for one backend, or for several that never run concurrently."""
    return torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _fast_decode_plan():
    """flashinfer's ``fast_decode_plan`` where this flashinfer has it (0.5+), else None."""
    try:
        from flashinfer.decode import fast_decode_plan
    except ImportError:
        return None
    return fast_decode_plan

"""CUDA graphs for decode steps: one graph per batch size, captured once, replayed every step.

A decode step is dozens of small kernels per layer; launching them one by one leaves the GPU waiting on
the host. Captured, the whole forward pass is one launch. What changes between steps lives in static
buffers that the graph reads (token ids, positions, KV write slots, state slots) plus flashinfer's page
tables, which its plan() fills on the host before each replay. A batch of B requests replays the graph
of the smallest captured size >= B; the padding rows point at a scratch page and a scratch state slot
that no request owns, so they cannot touch anyone's memory (their results are discarded).
"""

from __future__ import annotations

import logging
import time

import torch

from .forward_batch import ForwardBatch

log = logging.getLogger(__name__)

_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int) -> None:
        from kernels.flashinfer_attention import FlashInferAttention

        self.runner = runner
        self.enabled = isinstance(runner.model.attention, FlashInferAttention)
        if not self.enabled:  # the torch attention plans per sequence on the host: not capturable
            log.info("CUDA graphs off: the %s kernels have no graph-capturable attention", runner.ops.name)
            return
        cfg, device = runner.model_config, runner.device
        self.sizes = sorted({s for s in _SIZES if s <= max_batch} | {max_batch})
        max_bs = self.sizes[-1]
        # A sequence can hold every page of the pool, but a batch's pages are distinct: bound by the pool.
        max_pages = runner.num_pages + 1
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.kv_slot_ids = torch.full((max_bs,), runner.scratch_page * runner.page_size, dtype=torch.long,
                                      device=device)
        self.state_slots = torch.full((max_bs,), runner.scratch_slot, dtype=torch.long, device=device)
        self.logits_indices = torch.arange(max_bs, device=device)
        self.attention = {
            bs: FlashInferAttention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, runner.page_size,
                                    runner.dtype, device, graph_batch_size=bs, graph_max_pages=max_pages + bs)
            for bs in self.sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._capture(bs, pool)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1fs", self.sizes, time.monotonic() - started)

    def _batch(self, bs: int, kv_lens: list[int], page_tables: list[list[int]]) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], query_lens=[1] * bs, kv_lens=kv_lens,
            page_tables=page_tables, kv_slot_ids=self.kv_slot_ids[:bs], state_slots=self.state_slots[:bs],
            has_initial_state=[True] * bs, logits_indices=self.logits_indices[:bs],
        )

    def _plan(self, bs: int, kv_lens: list[int], page_tables: list[list[int]]) -> None:
        padding = bs - len(kv_lens)
        self.attention[bs].plan(
            [1] * bs, kv_lens + [1] * padding, page_tables + [[self.runner.scratch_page]] * padding,
            self.runner.model.attention_scale,
        )

    def _capture(self, bs: int, pool) -> None:
        runner = self.runner
        batch = self._batch(bs, [1] * bs, [[runner.scratch_page]] * bs)
        self._plan(bs, [], [])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and autotune the kernels outside the capture
                runner.model(batch, runner.kv_cache, runner.state_cache, attention=self.attention[bs])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits[bs] = runner.model(batch, runner.kv_cache, runner.state_cache, attention=self.attention[bs])
        self.graphs[bs] = graph

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.enabled and batch.is_decode and batch.num_seqs <= self.sizes[-1]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.kv_slot_ids[:n].copy_(batch.kv_slot_ids, non_blocking=True)
        self.state_slots[:n].copy_(batch.state_slots, non_blocking=True)
        # Rows n..bs keep pointing at the scratch page and slot (the buffers' resting values).
        self.kv_slot_ids[n:bs].fill_(self.runner.scratch_page * self.runner.page_size)
        self.state_slots[n:bs].fill_(self.runner.scratch_slot)
        self._plan(bs, batch.kv_lens, batch.page_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:n]

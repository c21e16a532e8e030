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
from .page_tables import PageTableMirror

log = logging.getLogger(__name__)

_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int) -> None:
        from kernels.flashinfer_attention import FlashInferAttention, new_workspace
        from kernels.triton_attention import TritonDecodeAttention

        self.runner = runner
        triton_decode = isinstance(runner.model.attention, TritonDecodeAttention)
        self.enabled = triton_decode or isinstance(runner.model.attention, FlashInferAttention)
        if not self.enabled:  # the torch attention plans per sequence on the host: not capturable
            log.info("CUDA graphs off: the %s kernels have no graph-capturable attention", runner.ops.name)
            return
        cfg, device = runner.model_config, runner.device
        self.sizes = sorted({s for s in _SIZES if s <= max_batch} | {max_batch})
        max_bs = self.sizes[-1]
        # A sequence can hold every page of the pool, but a batch's pages are distinct: bound by the pool.
        max_pages = runner.num_pages + 1
        # Rows: input ids, positions, KV write slots, state slots. One pinned staging block and one async
        # copy per step fill all four; padding rows rest on the scratch page and the scratch slot.
        self.inputs = torch.zeros(4, max_bs, dtype=torch.long, device=device)
        self.inputs_host = torch.zeros(4, max_bs, dtype=torch.long, pin_memory=True)
        self.inputs_host[2].fill_(runner.scratch_page * runner.page_size)
        self.inputs_host[3].fill_(runner.scratch_slot)
        self.inputs.copy_(self.inputs_host)
        self.input_ids, self.positions, self.kv_slot_ids, self.state_slots = self.inputs.unbind(0)
        self.logits_indices = torch.arange(max_bs, device=device)
        self.scratch_table = torch.tensor([runner.scratch_page], dtype=torch.int32)
        # One flashinfer workspace (or one Triton scratch) for all the graphs: one graph replays at a time, on one
        # stream, right after its plan rewrote the workspace (20 graphs with a workspace each took 5 GiB from the
        # KV pool).
        heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, runner.page_size)
        if triton_decode:
            scratch = runner.model.attention.new_scratch(max_bs)
            self.attention = {bs: TritonDecodeAttention(None, *heads, device, graph_batch_size=bs,
                                                        graph_max_pages=max_pages + bs, scratch=scratch)
                              for bs in self.sizes}
        else:
            workspace = new_workspace(device)
            self.attention = {bs: FlashInferAttention(*heads, runner.dtype, device, kv_dtype=runner.kv_dtype,
                                                      graph_batch_size=bs, graph_max_pages=max_pages + bs,
                                                      workspace=workspace)
                              for bs in self.sizes}
        # Recorded once a step's host staging (ours and flashinfer's plan buffers) has been copied to the
        # device: with steps launched ahead of the host, the next step must not overwrite pinned memory
        # whose copy has not run yet.
        self._staging_copied: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._capture(bs, pool)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1fs", self.sizes, time.monotonic() - started)

    def _batch(self, bs: int) -> ForwardBatch:
        """The batch the graph of size ``bs`` was captured with: static buffers, host fields for the capture."""
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], query_lens=[1] * bs, kv_lens=[1] * bs,
            page_tables=[[self.runner.scratch_page]] * bs, kv_slot_ids=self.kv_slot_ids[:bs],
            state_slots=self.state_slots[:bs], has_initial_state=[True] * bs, logits_indices=self.logits_indices[:bs],
        )

    def _capture(self, bs: int, pool) -> None:
        runner = self.runner
        batch = self._batch(bs)
        self.attention[bs].plan_graph_decode([1] * bs, [self.scratch_table] * bs, runner.model.attention_scale)
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

    def can_run(self, seqs) -> bool:
        """A decode step: every sequence adds one token to an existing state and samples (the graph's logits
        rows are the sequences), and a graph is big enough."""
        return (self.enabled and len(seqs) <= self.sizes[-1]
                and all(s.num_new_tokens == 1 and s.start > 0 and s.samples for s in seqs))

    def run(self, seqs, page_tables: PageTableMirror, input_ids_on_device: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the graph for a decode step of ``seqs`` (``ScheduledSeq``); logits ``[len(seqs), V]``.

        Built straight from the requests, without a ForwardBatch: this is the per-token host path of every
        decode step, so it does only what the graph needs. ``input_ids_on_device``: the input tokens where
        the last step sampled them (a step launched before the host knows them)."""
        runner, page_size = self.runner, self.runner.page_size
        n = len(seqs)
        bs = next(s for s in self.sizes if s >= n)
        padding = bs - n
        if self._staging_copied is not None:
            self._staging_copied.synchronize()  # normally long done: it is the start of the step in flight
        input_ids, positions, kv_slot_ids, state_slots, kv_lens, tables = [], [], [], [], [], []
        for seq in seqs:
            request, position = seq.request, seq.start
            input_ids.append(0 if input_ids_on_device is not None else request.token_at(position))
            positions.append(position)
            kv_slot_ids.append(request.page_ids[position // page_size] * page_size + position % page_size)
            state_slots.append(request.state_slot)
            kv_lens.append(position + 1)
            tables.append(page_tables.pages(request.request_id, request.page_ids, position // page_size + 1))
        self.inputs_host[:, :bs] = torch.tensor([
            input_ids + [0] * padding,
            positions + [0] * padding,
            kv_slot_ids + [runner.scratch_page * page_size] * padding,
            state_slots + [runner.scratch_slot] * padding,
        ])
        self.inputs.copy_(self.inputs_host, non_blocking=True)
        if input_ids_on_device is not None:
            self.input_ids[:n].copy_(input_ids_on_device)
        self.attention[bs].plan_graph_decode(kv_lens + [1] * padding, tables + [self.scratch_table] * padding,
                                             runner.model.attention_scale)
        if self._staging_copied is None:
            self._staging_copied = torch.cuda.Event()
        self._staging_copied.record()
        self.graphs[bs].replay()
        return self.logits[bs][:n]

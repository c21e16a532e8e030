"""Owns the model, its memory (KV pages, GDN state slots) and the sampler; turns scheduled requests into
one forward pass and returns the sampled tokens."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from kernels.attention import is_fp8

from .config import EngineConfig
from .forward_batch import ForwardBatch
from .loader import init_dummy_weights, load_kv_scales, load_weights
from .model import Qwen35ForCausalLM
from .model_config import ModelConfig
from .ops import select_ops
from .page_tables import PageTableMirror
from .prefix_cache import resume_boundary
from .sampler import SampledTokens, Sampler
from .scheduler import ScheduledSeq
from .state_cache import KVCache, StateCache

log = logging.getLogger(__name__)

_MiB = 1 << 20
# Headroom for activations of one step, kept out of the cache budget on GPUs: at least 2 GiB, and more for large
# steps. A prefill step's peak above the static memory was 0.63 / 1.26 / 2.52 / 3.84 / 10.07 GiB at 8K / 16K /
# 32K / 64K / 128K tokens on 35B-A3B dims (hidden 2048; loadtest/results/prefill_*h200.json): up to ~40 bytes per
# token per hidden unit; 44 keeps a margin of ~10%.
_ACTIVATION_RESERVE_MIN_BYTES = 2 << 30
_ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 44


def activation_reserve_bytes(max_num_batched_tokens: int, hidden_size: int) -> int:
    """GPU memory kept free for one step's activations when the cache is sized from free memory."""
    per_token = hidden_size * _ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN
    return max(_ACTIVATION_RESERVE_MIN_BYTES, max_num_batched_tokens * per_token)


def token_positions_and_slots(starts: list[int], lengths: list[int], pages: list[int], page_offsets: list[int],
                              page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each new token's position and KV slot, sequence after sequence: sequence i's tokens are positions
    ``starts[i] .. starts[i] + lengths[i] - 1``, and position p lies in page ``pages[page_offsets[i] + p //
    page_size]`` at offset ``p % page_size`` (``pages`` holds only the pages the new tokens touch)."""
    lengths_np = np.asarray(lengths, dtype=np.int64)
    seq_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths_np)
    first_token = np.cumsum(lengths_np) - lengths_np
    positions = (np.arange(seq_of_token.size, dtype=np.int64) - first_token[seq_of_token]
                 + np.asarray(starts, dtype=np.int64)[seq_of_token])
    page_index = positions // page_size + np.asarray(page_offsets, dtype=np.int64)[seq_of_token]
    kv_slot_ids = np.asarray(pages, dtype=np.int64)[page_index] * page_size + positions % page_size
    return positions, kv_slot_ids


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_torch_dtype  # the full-attention KV pages only; GDN states keep theirs
        self.page_size = config.page_size

        started = time.monotonic()
        self.ops = select_ops(config.kernels, self.device, config.decode_attention)
        self.model = Qwen35ForCausalLM(model_config, self.dtype, self.device, self.ops, config.page_size,
                                       self.kv_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, Path(config.model))
        log.info("model ready in %.1fs (%s, %s, %s, %s kernels, %s decode attention)", time.monotonic() - started,
                 model_config.family, self.dtype, self.device, self.ops.name, config.decode_attention)
        k_scales, v_scales = self._kv_scales()

        # State slots: one working slot per running request, then the prefix cache's checkpoint slots.
        self.num_working_slots = config.max_num_seqs
        self.num_checkpoint_slots, self.num_pages = self._size_pools()
        num_slots = self.num_working_slots + self.num_checkpoint_slots
        # One more page and one more slot than the allocators hand out: scratch space that the padding rows
        # of a CUDA graph batch write into, so they never touch a request's memory.
        self.scratch_page, self.scratch_slot = self.num_pages, num_slots
        self.kv_cache = KVCache(model_config, self.num_pages + 1, self.page_size, self.kv_dtype, self.device,
                                k_scales, v_scales)
        self.state_cache = StateCache(model_config, num_slots + 1, self.dtype, self.device)
        log.info(
            "cache: %d pages of %d tokens (%s KV, %.1f KiB per page), %d working + %d checkpoint state slots "
            "(%.1f MiB per slot)",
            self.num_pages, self.page_size, str(self.kv_dtype).removeprefix("torch."),
            KVCache.bytes_per_page(model_config, self.page_size, self.kv_dtype) / 1024, self.num_working_slots,
            self.num_checkpoint_slots, StateCache.bytes_per_slot(model_config, self.dtype) / _MiB,
        )
        self.sampler = Sampler(self.device, config.seed)
        self.page_tables = PageTableMirror()
        self.graphs = None
        if self.device.type == "cuda" and config.cuda_graph_max_batch > 0:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, config.cuda_graph_max_batch)

    def _kv_scales(self) -> tuple[list[float] | None, list[float] | None]:
        """An fp8 cache's per-layer scales: the checkpoint's where it has them, else 1.0 (said once, here)."""
        if not is_fp8(self.kv_dtype) or not self.model_config.attention_layers:
            return None, None
        scales = None if self.config.load_format == "dummy" else load_kv_scales(self.config.model, self.model_config)
        if scales is None:
            log.info("fp8 KV cache: no k/v scales (none in the checkpoint, or dummy weights): 1.0, K and V "
                     "stored as they are, saturated at +-448")
            return None, None
        k_scales, v_scales = scales
        log.info("fp8 KV cache: k/v scales from the checkpoint (k %.4g-%.4g, v %.4g-%.4g over %d layers)",
                 min(k_scales), max(k_scales), min(v_scales), max(v_scales), len(k_scales))
        return k_scales, v_scales

    def _size_pools(self) -> tuple[int, int]:
        """(checkpoint slots, KV pages) from the cache memory budget, after the working slots."""
        cfg, config = self.model_config, self.config
        if config.cache_memory_mb:
            budget = config.cache_memory_mb * _MiB
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = activation_reserve_bytes(config.max_num_batched_tokens, cfg.hidden_size)
            budget = free - int(total * (1 - config.gpu_memory_utilization)) - reserve
        else:
            budget = 256 * _MiB
        slot_bytes = StateCache.bytes_per_slot(cfg, self.dtype)
        budget -= self.num_working_slots * slot_bytes
        if not config.enable_prefix_cache:
            checkpoints = 0
        elif config.num_checkpoint_slots:
            checkpoints = config.num_checkpoint_slots
        else:  # twice the running requests, but never more than half of what is left
            checkpoints = max(1, min(2 * config.max_num_seqs, budget // 2 // max(1, slot_bytes)))
        budget -= checkpoints * slot_bytes
        # Page bytes from the KV dtype: an fp8 cache gets twice the pages of a bf16 one from the same memory.
        num_pages = config.num_pages or budget // max(1, KVCache.bytes_per_page(cfg, self.page_size, self.kv_dtype))
        if num_pages < 1:
            raise MemoryError(
                f"no memory left for KV pages after {self.num_working_slots + checkpoints} state slots; lower "
                f"max_num_seqs / num_checkpoint_slots or raise cache_memory_mb / gpu_memory_utilization"
            )
        return int(checkpoints), int(num_pages)

    def forget(self, request_id: str) -> None:
        """The request is gone: drop what the runner keeps per request."""
        self.sampler.forget(request_id)
        self.page_tables.forget(request_id)

    def build_batch(self, seqs: list[ScheduledSeq], input_ids_on_device: torch.Tensor | None = None) -> ForwardBatch:
        """``input_ids_on_device``: a decode step's input tokens, still on the device where the last step
        sampled them (one per sequence); the requests do not know them yet."""
        page_size = self.page_size
        input_ids: list[int] = []
        starts: list[int] = []
        lengths: list[int] = []
        pages: list[int] = []  # the pages the steps' new tokens land in, sequence after sequence
        page_offsets: list[int] = []
        logits_indices: list[int] = []
        page_tables: list[list[int]] = []
        gdn_splits: list[list[int]] = []
        num_tokens = 0
        for seq in seqs:
            req = seq.request
            start, end = seq.start, seq.start + seq.num_new_tokens
            boundary = resume_boundary(req.num_tokens, page_size)
            gdn_splits.append([boundary - start] if start < boundary < end else [])
            if input_ids_on_device is None:
                input_ids.extend(req.token_ids_between(start, end))
            starts.append(start)
            lengths.append(seq.num_new_tokens)
            first_page, end_page = start // page_size, -(-end // page_size)
            touched = req.page_ids[first_page:end_page]
            if len(touched) != end_page - first_page:  # (the layout below would not notice)
                raise RuntimeError(f"request {req.request_id} has {len(req.page_ids)} pages, too few for "
                                   f"tokens [{start}, {end})")
            page_offsets.append(len(pages) - first_page)
            pages.extend(touched)
            num_tokens += seq.num_new_tokens
            if seq.samples:
                logits_indices.append(num_tokens - 1)
            page_tables.append(req.page_ids[:end_page])
        positions, kv_slot_ids = token_positions_and_slots(starts, lengths, pages, page_offsets, page_size)

        pin = self.device.type == "cuda"

        def as_tensor(values: list[int] | np.ndarray) -> torch.Tensor:
            # Pinned host memory and an async copy: the host goes on preparing while the copy runs. From numpy
            # arrays: a 32K-token prompt's lists took ~10 ms of host time to convert while the GPU waited.
            host = torch.from_numpy(np.asarray(values, dtype=np.int64))
            return (host.pin_memory() if pin else host).to(self.device, non_blocking=True)

        return ForwardBatch(
            input_ids=as_tensor(input_ids) if input_ids_on_device is None else input_ids_on_device,
            positions=as_tensor(positions),
            query_lens=lengths,
            kv_lens=[s.start + s.num_new_tokens for s in seqs],
            page_tables=page_tables,
            kv_slot_ids=as_tensor(kv_slot_ids),
            state_slots=as_tensor([s.request.state_slot for s in seqs]),
            has_initial_state=[s.start > 0 for s in seqs],
            logits_indices=as_tensor(logits_indices),
            # Offset-0 snapshots are copies made before the step (execute), not the model's business.
            snapshots=[[x for x in s.snapshots if x[0]] for s in seqs] if any(s.snapshots for s in seqs) else None,
            gdn_splits=gdn_splits if any(gdn_splits) else None,
        )

    def execute(
        self, seqs: list[ScheduledSeq], input_ids_on_device: torch.Tensor | None = None
    ) -> SampledTokens | None:
        """Launch one step. Returns the tokens sampled by the sequences that sample (in ``seqs`` order), still
        on the device with their copy to the host under way; None if no sequence samples. Nothing here waits
        for the device, so the caller can prepare the next step while this one runs.

        ``input_ids_on_device``: a decode step whose input tokens are still on the device (see build_batch)."""
        for seq in seqs:
            if seq.copy_state_from is not None:  # copy-on-write: never write a shared checkpoint
                self.state_cache.copy_slot(seq.copy_state_from, seq.request.state_slot)
            for offset, snapshot_slot in seq.snapshots:
                if offset == 0:  # the state the step starts from (a prefill pod's hand-over snapshot)
                    self.state_cache.copy_slot(seq.request.state_slot, snapshot_slot)
        if self.graphs is not None and self.graphs.can_run(seqs):
            logits = self.graphs.run(seqs, self.page_tables, input_ids_on_device)
            is_decode = True
        else:
            batch = self.build_batch(seqs, input_ids_on_device)
            logits = self.model(batch, self.kv_cache, self.state_cache)
            is_decode = batch.is_decode
        if is_decode:
            # A decode snapshot is the state after the step (all GDN layers of a slot are contiguous).
            for seq in seqs:
                for _, snapshot_slot in seq.snapshots:
                    self.state_cache.copy_slot(seq.request.state_slot, snapshot_slot)
        sampling = [s.request for s in seqs if s.samples]
        return self.sampler(logits, sampling) if sampling else None

"""What a prefill pod writes where in a decode pod's memory: the state layout both sides must agree on,
and the (source, destination, length) regions of one hand-over. Pure arithmetic over the pool layouts
of services/engine/state_cache.py:

- KV: ``[attn_layers, num_pages, page]`` with one page of one layer contiguous (``kv_page_bytes``),
- conv and SSM states: ``[num_slots, slot]`` with one slot (all GDN layers) contiguous.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kernels.attention import is_fp8
from services.common.protos import pd_pb2
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.transfer.engine import TransferConfig, TransferEngine


@dataclass(frozen=True)
class PoolRegions:
    """Where one pod's pools live, and their geometry."""

    kv_base: int
    kv_num_pages: int
    kv_page_bytes: int  # one page of one layer
    num_attn_layers: int
    conv_base: int
    conv_slot_bytes: int
    ssm_base: int
    ssm_slot_bytes: int
    num_slots: int

    def kv_page_address(self, layer: int, page_id: int) -> int:
        return self.kv_base + (layer * self.kv_num_pages + page_id) * self.kv_page_bytes


def local_regions(engine: Engine) -> PoolRegions:
    kv = engine.runner.kv_cache.buffer
    states = engine.runner.state_cache
    return PoolRegions(
        kv_base=kv.data_ptr(),
        kv_num_pages=kv.shape[1],
        kv_page_bytes=kv[0, 0].numel() * kv.element_size(),
        num_attn_layers=kv.shape[0],
        conv_base=states.conv.data_ptr(),
        conv_slot_bytes=states.conv[0].numel() * states.conv.element_size(),
        ssm_base=states.ssm.data_ptr(),
        ssm_slot_bytes=states.ssm[0].numel() * states.ssm.element_size(),
        num_slots=states.conv.shape[0],
    )


def remote_regions(memory: pd_pb2.MemoryRegions, layout: pd_pb2.StateLayout) -> PoolRegions:
    """The decode pod's regions, as its handshake described them (geometry from the agreed layout)."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}

    def nbytes(shape, dtype: str) -> int:
        count = 1
        for dim in shape:
            count *= dim
        return count * itemsize[dtype]

    return PoolRegions(
        kv_base=memory.kv_base,
        kv_num_pages=memory.kv_num_pages,
        kv_page_bytes=nbytes(layout.kv_page_shape, layout.kv_dtype),
        num_attn_layers=len(layout.attention_layers),
        conv_base=memory.conv_base,
        conv_slot_bytes=nbytes(layout.conv_state_shape, layout.conv_dtype),
        ssm_base=memory.ssm_base,
        ssm_slot_bytes=nbytes(layout.ssm_state_shape, layout.ssm_dtype),
        num_slots=memory.num_slots,
    )


def page_runs(src_page_ids: list[int], dst_page_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(first source page, first destination page, pages)`` of the runs of pages consecutive on both sides
    (in source order): each is one descriptor per attention layer instead of one per page and layer."""
    if len(src_page_ids) != len(dst_page_ids):
        raise ValueError(f"{len(src_page_ids)} source pages for {len(dst_page_ids)} destination pages")
    runs: list[list[int]] = []
    for s, d in sorted(zip(src_page_ids, dst_page_ids, strict=True)):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [(s, d, n) for s, d, n in runs]


def handover_regions(
    src: PoolRegions, dst: PoolRegions, src_page_ids: list[int], dst_page_ids: list[int],
    slots: list[tuple[int, int]],
) -> tuple[list[int], list[int], list[int]]:
    """Every page of every attention layer, then the conv and SSM state of each ``(source, destination)``
    slot pair (the final state, and the state at the prompt's resume boundary when the decode pod wants it).
    Pages consecutive on both sides come as one descriptor per layer: building and coalescing one per page
    cost more than a tenth of a 32K-token hand-over's time on the host."""
    runs = page_runs(src_page_ids, dst_page_ids)
    src_addrs, dst_addrs, lengths = [], [], []
    for layer in range(src.num_attn_layers):
        for s, d, n in runs:
            src_addrs.append(src.kv_page_address(layer, s))
            dst_addrs.append(dst.kv_page_address(layer, d))
            lengths.append(n * src.kv_page_bytes)
    for src_slot, dst_slot in slots:
        src_addrs += [src.conv_base + src_slot * src.conv_slot_bytes, src.ssm_base + src_slot * src.ssm_slot_bytes]
        dst_addrs += [dst.conv_base + dst_slot * dst.conv_slot_bytes, dst.ssm_base + dst_slot * dst.ssm_slot_bytes]
        lengths += [src.conv_slot_bytes, src.ssm_slot_bytes]
    return src_addrs, dst_addrs, lengths


def register_pools(engine: Engine, transfer: TransferEngine) -> None:
    """Register the KV and state pools with Mooncake once, at start (both pods: each is the other's peer)."""
    transfer.register(engine.runner.kv_cache.buffer)
    transfer.register(engine.runner.state_cache.conv)
    transfer.register(engine.runner.state_cache.ssm)


def load_pod_engines(engine_config: EngineConfig, transfer_config: TransferConfig, record_cache_events: bool,
                     remote_prefill: bool = False) -> tuple[Engine, TransferEngine]:
    """The slow part of a pod's start (either role): weights, memory pools, their registration with Mooncake."""
    engine = Engine(engine_config, remote_prefill=remote_prefill, record_cache_events=record_cache_events)
    transfer = TransferEngine(transfer_config)
    register_pools(engine, transfer)
    return engine, transfer


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the loaded weights (a few values of every tensor): two pods with the same
    architecture but different checkpoints must not exchange state."""
    digest = hashlib.blake2b(digest_size=8)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def state_layout(engine: Engine) -> pd_pb2.StateLayout:
    cfg = engine.model_config
    kv_cache = engine.runner.kv_cache
    kv = kv_cache.buffer
    states = engine.runner.state_cache
    # The same fp8 bytes with other scales would be other values: the pods must agree on them too.
    kv_scales = [s for pair in zip(kv_cache.k_scales, kv_cache.v_scales, strict=True) for s in pair]
    arch = hashlib.blake2b(repr(sorted(cfg.describe().items())).encode(), digest_size=6).hexdigest()
    return pd_pb2.StateLayout(
        model_id=f"{cfg.family}:{arch}:{weights_fingerprint(engine.runner.model)}",
        num_layers=cfg.num_hidden_layers,
        attention_layers=cfg.attention_layers,
        gdn_layers=cfg.gdn_layers,
        page_size=engine.config.page_size,
        kv_dtype=_dtype_name(kv.dtype),
        kv_page_shape=list(kv.shape[2:]),
        conv_dtype=_dtype_name(states.conv.dtype),
        conv_state_shape=list(states.conv.shape[1:]),
        ssm_dtype=_dtype_name(states.ssm.dtype),
        ssm_state_shape=list(states.ssm.shape[1:]),
        kv_scales=kv_scales if is_fp8(kv.dtype) else [],
    )


def layout_mismatches(ours: pd_pb2.StateLayout, theirs: pd_pb2.StateLayout,
                      sides: tuple[str, str] = ("ours", "theirs")) -> list[str]:
    """Human-readable differences, empty when the two pods can exchange state. ``sides`` names the two layouts
    in the messages (a prefill pod's refusal is read on the decode pod: "prefill ..., decode ..." says whose is
    whose there)."""
    problems = []
    for field in pd_pb2.StateLayout.DESCRIPTOR.fields:
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        if not isinstance(a, str | int | float):  # repeated fields
            a, b = list(a), list(b)
        if a != b:
            hint = " (prefill and decode pods need the same --kv-cache-dtype)" if field.name == "kv_dtype" else ""
            problems.append(f"{field.name}: {sides[0]} {a}, {sides[1]} {b}{hint}")
    return problems

"""The MoE block of one decode token in one launch: post-attention norm, router + top-k, gate/up, down.

At one token the MoE block is three dependent kernels (``moe.norm_route_topk``, then the matrix-vector
gate/up and down+sum kernels of ``moe.fused_experts``) whose weights all depend on the routing, so PDL can
prefetch none of them; each boundary costs a launch's ramp-up and its predecessor's tail, and the router's
last-block tail (one program routes after all have stored their logits) is serial. Here one persistent grid
(at most one wave: every program resident) runs the three phases with a grid-wide barrier between them:

1. every program normalises the row itself (``x + residual``, as ``gemv.rms_norm_linear`` does; program 0
   writes the new residual) and computes a few router rows; logits go to a scratch row; the normed row stays
   in the program's registers for phase 2. The shared expert (expert E of the stacks, weight
   sigmoid(shared-gate logit)) needs no routing: its gate/up tiles are done here too, the first one loaded
   before the PDL wait (``MoeDecodeConfig.shared_first``), SwiGLU into row k of a scratch ``act [k+1, I]``;
2. every program reads all logits and computes the same top-k (no serial tail), then a grid-stride share of
   the (pair, column tile) gate/up products of the k routed experts, SwiGLU into rows 0..k-1 of ``act``;
3. a grid-stride share of the output column tiles: the down projection of every pair and their k-sum.

Every step rounds as the three-kernel path does (logits, gate, up, silu, silu*up, the down product, the
routing weight and weight*y in the activation dtype; the k-sum in fp32), so the two paths give the same
numbers. Under Triton's interpreter (CPU tests), which runs programs one after another, a barrier would wait
forever: there the phases are three launches of the same kernel (``one_launch=False``, also usable on a GPU).

The grid barrier (``grid_barrier``): arrive on a counter (acq_rel), the last program to arrive resets it and
bumps a generation word; the others spin until the generation moves. It is safe only if all programs are
resident at once: the grid is the SMs times at most 8 warps' worth of programs per SM (resident whatever
the register count; ``MoeDecodeConfig``), and under PDL the kernel after this one starts only once every
program here has called the trigger, so it can never take the place of one of ours. The two int32 words
live per MoE layer (``SparseMoE.moe_sync[1:3]``) and are back at 0 and an arbitrary generation between
launches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.gemv import MAX_SINGLE_TILE_K, load_weight_tile, prefetch_l2, rms_norm_row
from kernels.triton.moe import topk_of_logits
from kernels.triton.norm import round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait


@dataclass(frozen=True)
class MoeDecodeConfig:
    """Grid and tiles: ``programs_per_sm`` programs per SM (all resident), ``gate_up_n`` columns of each of gate
    and up per work item (the whole K at once), ``down_n`` output columns per down item."""

    programs_per_sm: int = 2
    gate_up_n: int = 2
    down_n: int = 4
    num_warps: int = 4
    # Before its gate/up tiles, each program asks L2 for the down-projection rows of its phase-3 tiles (the
    # routing is known by then), so phase 3 reads L2 instead of waiting on HBM (GPU, bf16, I % 64 == 0).
    prefetch_down: bool = False
    # The shared expert's gate/up in phase 1: it needs no routing, so each program loads its first shared
    # tile before the PDL wait (the load overlaps the kernel in front) and phase 2 has only the routed pairs.
    shared_first: bool = True

    def __post_init__(self) -> None:
        # Every program must be resident at once (the grid barrier waits for all of them). At most 8 warps per
        # SM guarantees it whatever the kernel's register count: 8 x 32 threads x 255 registers fit an SM's
        # 64K registers (and 256 threads, a few KiB of shared memory, are far from the other limits).
        if self.programs_per_sm < 1 or self.programs_per_sm * self.num_warps > 8:
            raise ValueError(f"programs_per_sm * num_warps must be in [1, 8] (all programs resident), got {self}")
        for name in ("gate_up_n", "down_n"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"MoeDecodeConfig.{name} must be a power of two, got {size}")


@triton.jit
def grid_barrier(sync_ptr, num_programs):
    """Every program of the launch waits here until all have arrived; stores before it are visible to loads
    after it in every program (read such data with .cg: this SM's L1 may hold an older line).
    ``sync_ptr[0]``: arrivals (0 between barriers), ``sync_ptr[1]``: generation."""
    tl.debug_barrier()  # all threads of this program have stored
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")  # ordered before the release below
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        while current == generation:
            current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _swiglu_store(h, w_gate, w_up, act_ptr, col0, INTER: tl.constexpr, GATE_UP_N: tl.constexpr):
    """``silu(h @ w_gate^T) * (h @ w_up^T)`` of GATE_UP_N columns from col0, rounded as the reference, stored."""
    dtype = act_ptr.dtype.element_ty
    gate = round_to(tl.sum(h[None, :] * w_gate.to(tl.float32), axis=1), dtype)
    up = round_to(tl.sum(h[None, :] * w_up.to(tl.float32), axis=1), dtype)
    act = round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up, dtype)
    cols = col0 + tl.arange(0, GATE_UP_N)
    tl.store(act_ptr + cols, act.to(dtype), mask=cols < INTER)


@triton.jit
def _moe_decode_kernel(
    x_ptr, res_ptr, norm_w_ptr, router_ptr, w13_ptr, w2_ptr,
    out_ptr, new_res_ptr, logits_ptr, act_ptr, topk_w_ptr, topk_ids_ptr, sync_ptr,
    eps, num_experts,
    stride_router, stride_w13_e, stride_w13_n, stride_w2_e, stride_w2_n,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TK: tl.constexpr,
    ROUTER_N: tl.constexpr, GATE_UP_N: tl.constexpr, DOWN_N: tl.constexpr, PREFETCH_DOWN: tl.constexpr,
    SHARED_FIRST: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PHASE: tl.constexpr,  # 0: all three phases with grid barriers; 1, 2, 3: that phase alone
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    pdl_trigger(PDL)

    tiles_n: tl.constexpr = (INTER + GATE_UP_N - 1) // GATE_UP_N
    w_shared = w13_ptr + tl.cast(num_experts, tl.int64) * stride_w13_e  # the shared expert is expert E
    # ---- phase 1: norm (every program), router rows [pid * ROUTER_N, ...), shared gate/up if SHARED_FIRST ---
    if PHASE == 0 or PHASE == 1:
        row0 = pid * ROUTER_N
        w_router = load_weight_tile(router_ptr, row0, num_experts + 1, stride_router, HIDDEN, ROUTER_N, BLOCK_H)
        if SHARED_FIRST:  # tile ``pid`` (masked off past the last), loaded before the wait
            ws_gate = load_weight_tile(w_shared, pid * GATE_UP_N, INTER, stride_w13_n, HIDDEN, GATE_UP_N, BLOCK_H)
            ws_up = load_weight_tile(w_shared + INTER * stride_w13_n, pid * GATE_UP_N, INTER, stride_w13_n, HIDDEN,
                                     GATE_UP_N, BLOCK_H)
        pdl_wait(PDL)
        h = rms_norm_row(x_ptr, res_ptr, norm_w_ptr, new_res_ptr, new_res_ptr, eps, pid == 0,
                         HIDDEN, BLOCK_H, HAS_RESIDUAL, False)
        rows = row0 + tl.arange(0, ROUTER_N)
        # The reference's F.linear returns the logits in the activation dtype: round them so.
        logits = round_to(tl.sum(h[None, :] * w_router.to(tl.float32), axis=1), dtype)
        tl.store(logits_ptr + rows, logits, mask=rows < num_experts + 1)
        if SHARED_FIRST:
            shared_act = act_ptr + TOP_K * INTER
            _swiglu_store(h, ws_gate, ws_up, shared_act, pid * GATE_UP_N, INTER, GATE_UP_N)
            item = pid + num_programs  # tiles beyond one per program (wide experts, small grids)
            while item < tiles_n:
                col0 = item * GATE_UP_N
                w_gate = load_weight_tile(w_shared, col0, INTER, stride_w13_n, HIDDEN, GATE_UP_N, BLOCK_H)
                w_up = load_weight_tile(w_shared + INTER * stride_w13_n, col0, INTER, stride_w13_n, HIDDEN,
                                        GATE_UP_N, BLOCK_H)
                _swiglu_store(h, w_gate, w_up, shared_act, col0, INTER, GATE_UP_N)
                item += num_programs
    else:
        pdl_wait(PDL)
    if PHASE == 0:
        grid_barrier(sync_ptr, num_programs)

    # ---- routing, every program of phases 2 and 3: pairs 0..k-1 routed, pair k the shared expert E -------
    pair = tl.arange(0, BLOCK_TK)
    if PHASE != 1:
        top_w, top_i = topk_of_logits(logits_ptr, num_experts, TOP_K, BLOCK_E, BLOCK_TK, SOFTMAX, RENORMALIZE)
        shared_logit = tl.load(logits_ptr + num_experts, cache_modifier=".cg")
        shared_gate = round_to(1.0 / (1.0 + tl.exp(-shared_logit)), dtype)
        pair_w = tl.where(pair == TOP_K, shared_gate, top_w)
        pair_e = tl.where(pair == TOP_K, num_experts, top_i)

    # ---- phase 2: gate/up of (pair, column tile) items ---------------------------------------------------
    if PHASE == 0 or PHASE == 2:
        if pid == 0:
            tl.store(topk_w_ptr + pair, pair_w, mask=pair <= TOP_K)
            tl.store(topk_ids_ptr + pair, pair_e, mask=pair <= TOP_K)
        if PHASE == 2:
            # A launch of its own: the normed row again, from the new residual program 0 stored in phase 1 (what
            # rms_norm_row computed there). In one launch each program still holds its phase-1 ``h``.
            offs_h = tl.arange(0, BLOCK_H)
            h_mask = offs_h < HIDDEN
            s = tl.load(new_res_ptr + offs_h, mask=h_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(s * s, axis=0) / HIDDEN + eps)
            norm_w = tl.load(norm_w_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
            h = round_to((s * rstd) * (1.0 + norm_w), dtype)
        if PREFETCH_DOWN:
            lines = tl.arange(0, BLOCK_I // 64) * 64  # one prefetch per 128-byte line of a weight row
            tile = pid
            while tile < (HIDDEN + DOWN_N - 1) // DOWN_N:
                down_rows = tl.minimum(tile * DOWN_N + tl.arange(0, DOWN_N), HIDDEN - 1)  # valid addresses only
                for j in tl.static_range(TOP_K + 1):
                    down_expert = tl.sum(tl.where(pair == j, pair_e, 0), axis=0).to(tl.int64)
                    prefetch_l2(w2_ptr + down_expert * stride_w2_e + down_rows[:, None].to(tl.int64) * stride_w2_n
                                + lines[None, :])
                tile += num_programs
        num_pairs: tl.constexpr = TOP_K if SHARED_FIRST else TOP_K + 1  # the shared expert is pair TOP_K
        # Grid-stride loops as while loops: the interpreter cannot take a runtime range bound (numpy >= 2.4).
        item = pid
        while item < num_pairs * tiles_n:
            p = item // tiles_n
            expert = tl.sum(tl.where(pair == p, pair_e, 0), axis=0).to(tl.int64)
            col0 = (item % tiles_n) * GATE_UP_N
            w_expert = w13_ptr + expert * stride_w13_e
            w_gate = load_weight_tile(w_expert, col0, INTER, stride_w13_n, HIDDEN, GATE_UP_N, BLOCK_H)
            w_up = load_weight_tile(w_expert + INTER * stride_w13_n, col0, INTER, stride_w13_n, HIDDEN, GATE_UP_N,
                                    BLOCK_H)
            _swiglu_store(h, w_gate, w_up, act_ptr + p * INTER, col0, INTER, GATE_UP_N)
            item += num_programs
    if PHASE == 0:
        grid_barrier(sync_ptr, num_programs)

    # ---- phase 3: down projection of every pair and the k-sum, per output column tile --------------------
    if PHASE == 0 or PHASE == 3:
        offs_i = tl.arange(0, BLOCK_I)
        tile = pid
        while tile < (HIDDEN + DOWN_N - 1) // DOWN_N:
            col0 = tile * DOWN_N
            total = tl.zeros([DOWN_N], dtype=tl.float32)
            for j in tl.static_range(TOP_K + 1):
                expert = tl.sum(tl.where(pair == j, pair_e, 0), axis=0).to(tl.int64)
                routing = round_to(tl.sum(tl.where(pair == j, pair_w, 0.0), axis=0), dtype)
                w = load_weight_tile(w2_ptr + expert * stride_w2_e, col0, HIDDEN, stride_w2_n, INTER, DOWN_N, BLOCK_I)
                a = tl.load(act_ptr + j * INTER + offs_i, mask=offs_i < INTER, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
                y = round_to(tl.sum(a[None, :] * w.to(tl.float32), axis=1), dtype)
                total += round_to(y * routing, dtype)
            cols = col0 + tl.arange(0, DOWN_N)
            tl.store(out_ptr + cols, round_to(total, dtype).to(dtype), mask=cols < HIDDEN)
            tile += num_programs


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the grid-stride loops take several items each
    return torch.cuda.get_device_properties(device).multi_processor_count


def norm_moe_decode(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool,
    sync: torch.Tensor, *, scoring: str = "softmax", one_launch: bool | None = None,
    config: MoeDecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h, s = gemma_rms_norm_residual(x, residual)``, then the experts of ``route_topk(h)`` with the shared
    expert stored as expert ``E`` of the stacks (``router_weight [E+1, H]``, last row its gate; ``w13
    [E+1, 2I, H]``, ``w2 [E+1, H, I]``), for one token. Returns ``(out [1, H], s, weights fp32 [1, k+1], ids
    int32 [1, k+1])``, the last column the shared expert (id E, weight its sigmoid gate); ``s`` is x itself
    without a residual. ``sync``: int32 ``[2]`` on the device, zero before first use, owned by one stream
    (the grid barrier's words). ``one_launch`` (default: on a GPU) runs the three phases in one launch with
    grid barriers, else as three launches. No host synchronisation: safe to capture in a CUDA graph."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous() or x.shape[1] > MAX_SINGLE_TILE_K:
        raise ValueError(f"norm_moe_decode takes one contiguous token [1, H <= {MAX_SINGLE_TILE_K}], got "
                         f"{tuple(x.shape)}")
    hidden = x.shape[1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    if norm_weight.shape != (hidden,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be a contiguous [{hidden}] tensor")
    if router_weight.dim() != 2 or router_weight.shape[1] != hidden or router_weight.stride(1) != 1:
        raise ValueError(f"router_weight must be [E+1, {hidden}] with unit last stride, got "
                         f"{tuple(router_weight.shape)}")
    num_experts = router_weight.shape[0] - 1
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != num_experts + 1 or w13.shape[2] != hidden:
        raise ValueError(f"w13 must be [{num_experts + 1}, 2I, {hidden}], got {tuple(w13.shape)}")
    inter = w13.shape[1] // 2
    if w13.shape[1] % 2 or tuple(w2.shape) != (num_experts + 1, hidden, inter) or inter > MAX_SINGLE_TILE_K:
        raise ValueError(f"w2 must be [{num_experts + 1}, {hidden}, {inter}] (I <= {MAX_SINGLE_TILE_K}), got "
                         f"{tuple(w2.shape)}")
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("w13 and w2 need unit stride in their last dimension")
    if len({t.dtype for t in (x, router_weight, w13, w2)}) != 1:
        raise ValueError("x, router_weight, w13 and w2 must share a dtype")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if sync.shape != (2,) or sync.dtype != torch.int32 or sync.device != x.device:
        raise ValueError(f"sync must be an int32 [2] tensor on {x.device}")
    if one_launch is None:
        one_launch = x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    config = config or MoeDecodeConfig()
    programs = config.programs_per_sm * _num_sms(x.device)
    router_n = triton.next_power_of_2(triton.cdiv(num_experts + 1, programs))

    out = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else x
    logits = torch.empty(num_experts + 1, dtype=torch.float32, device=x.device)
    act = torch.empty(top_k + 1, inter, dtype=x.dtype, device=x.device)
    weights = torch.empty(1, top_k + 1, dtype=torch.float32, device=x.device)
    ids = torch.empty(1, top_k + 1, dtype=torch.int32, device=x.device)
    args = (x, residual if residual is not None else x, norm_weight, router_weight, w13, w2,
            out, new_res, logits, act, weights, ids, sync, float(eps), num_experts,
            router_weight.stride(0), w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1))
    meta = dict(
        HIDDEN=hidden, INTER=inter, BLOCK_H=triton.next_power_of_2(hidden), BLOCK_I=triton.next_power_of_2(inter),
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_TK=triton.next_power_of_2(top_k + 1),
        ROUTER_N=router_n, GATE_UP_N=config.gate_up_n, DOWN_N=config.down_n,
        PREFETCH_DOWN=(config.prefetch_down and x.dtype == torch.bfloat16 and inter % 64 == 0
                       and os.environ.get("TRITON_INTERPRET", "0") != "1"),
        SHARED_FIRST=config.shared_first,
        SOFTMAX=scoring == "softmax", RENORMALIZE=renormalize, HAS_RESIDUAL=residual is not None,
        num_warps=config.num_warps, **pdl_launch_args(x.device),
    )
    for phase in ((0,) if one_launch else (1, 2, 3)):
        _moe_decode_kernel[(programs,)](*args, PHASE=phase, **meta)
    return out, new_res, weights, ids

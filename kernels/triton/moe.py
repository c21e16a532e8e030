"""Triton MoE: router top-k and SwiGLU experts as a grouped GEMM over expert-sorted token blocks.

Routing (``route_topk``): one cuBLAS GEMM gives the router logits and the shared-expert gate logit together
(weights concatenated once at load time with ``concat_router_weights``); one Triton kernel then does, per token,
the fp32 softmax (or sigmoid scoring), the top-k by a sorting network (``tl.topk``), the optional
renormalisation and the sigmoid of the shared gate.

Experts (``fused_experts``), the approach of vLLM's / SGLang's ``fused_moe`` Triton kernels:

1. ``moe_align_block_size``: the T*k (token, slot) pairs are sorted by expert, and each expert's run is padded
   to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to exactly one expert. Padding slots hold the
   sentinel ``T*k`` and are masked out. For decode-sized batches this is one single-program Triton kernel
   (histogram + cumsum + bitonic sort of ``expert * 2^n + pair`` keys, so the order is the stable order of the
   torch reference), many programs up to 4096 pairs; for larger batches two blocked Triton passes around a few
   torch ops on a per-block histogram (no host sync either way, so it can be captured in a CUDA graph).
2. ``_moe_gate_up_kernel``: for each block, ``x[tokens] @ w13[e, :I]^T`` and ``x[tokens] @ w13[e, I:]^T`` as two
   accumulators of the same N columns, with the SwiGLU epilogue ``silu(gate) * up``, written per pair.
3. ``_moe_down_kernel``: ``act @ w2[e]^T`` times the pair's routing weight, written per pair.
4. ``_moe_sum_kernel``: sum over the k pairs of each token in fp32 (deterministic, no atomics); given
   ``then_norm``, also the residual add and the next Gemma RMSNorm (one program a token: a norm launch less).

Prefill chunks in bf16 on sm90/sm100 (more than ``_ALIGN_TRITON_MAX_PAIRS`` pairs): gate/up writes each pair's
activations at its slot of the expert-sorted, block-padded order (padding rows as zeros), so that the down
projection is one CUTLASS grouped GEMM (``torch._grouped_mm``, groups ending at each expert's padded end) with no
row gather; the k-sum then reads each pair's row through its slot and applies the routing weight there. On the
H200 that down GEMM runs at 455-470 TFLOP/s where the Triton kernel, which gathers its rows through the pair ids,
runs at 300-360 (``kernels/bench_moe_prefill.py``). The prefill gate/up kernel loads its weight tiles through a
TMA descriptor (the rows of x stay gathered loads): 5-10% faster than per-thread loads there. Above
``_ALIGN_TRITON_MAX_PAIRS`` pairs the alignment itself is ``_moe_align_blocked`` (two Triton passes over blocks of
pairs): 48 / 110 / 180 us a layer at 8K / 32K / 64K tokens of 35B-A3B on the H200 against 148 / 221 / 305 for the
same result from torch's stable argsort (``_moe_align_torch``, kept as the reference the tests compare with).

Decode-sized batches (at most ``_GEMV_MAX_PAIRS`` pairs) skip the sort: with about one token per expert a
BLOCK_M block is one real row and fifteen padding rows, and the alignment kernel is a launch of its own.
Instead one program per (pair, N tile) reads its expert id straight from ``topk_ids`` and computes gate/up with
fp32 multiply-adds (``_moe_gate_up_gemv_kernel``); then one program per (token, N tile) computes the down
projection of all the token's pairs and sums them in registers (``_moe_down_sum_gemv_kernel``): two kernels
instead of four, every program streaming weight tiles, no per-pair output in memory. The expert weights are
loaded ``evict_first``: each is read once per token from stacks far larger than L2 (1.6 GB per 35B-A3B layer),
so their lines should go first and leave L2 to what is read again (on the H200 the one-token decode step went
from 763 to 770 tok/s with it; the same policy on the dense projections' weights too gave that back:
NOTES_fused.md).

Weight traffic: each program reads one expert's weight tile for its block. An expert with at most BLOCK_M
routed pairs has exactly one block, so at decode only the selected experts' weights are read, each once;
experts nobody picked are never touched (their blocks do not exist).

Rounding follows ``kernels.moe.fused_experts``: gate/up, silu, silu*up, the down projection, the routing
weight (cast to the activation dtype) and weight*y are each rounded to the activation dtype; the k-sum is fp32.
For fp32 inputs the dots run in full fp32 (``input_precision="ieee"``, no tf32), like torch's default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton import gemv as gemv_tk
from kernels.triton.gemv import gemv_tile, load_weight_tile, rms_norm_row
from kernels.triton.norm import gemma_norm_row, round_to
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest number of (token, expert) pairs aligned by the one-pass Triton kernels; beyond it, the blocked
# alignment (_moe_align_blocked).
_ALIGN_TRITON_MAX_PAIRS = 4096
# Up to this many pairs one program aligns them all (a bitonic sort); beyond, the pairs are spread over programs
# of _ALIGN_PAIRS_PER_PROGRAM. On the H200 the one-program sort took 77 us per MoE layer at 2,304 pairs (batched
# decode of 256 tokens of 35B-A3B with the shared expert: 3.1 of the step's 36.9 ms; 10 us at 576 pairs).
_ALIGN_ONE_PROGRAM_MAX_PAIRS = 256
_ALIGN_PAIRS_PER_PROGRAM = 64
# torch._grouped_mm refuses 1024 groups or more.
_GROUPED_MM_MAX_GROUPS = 1024
# Pairs per program of the blocked alignment for prefill-sized batches (_moe_align_blocked).
_ALIGN_BLOCKED_PAIRS = 1024
_MAX_EXPERTS = 4096  # route_topk and the alignment keep one [next_pow2(E)] tile in registers
# Most (token, expert) pairs for the matrix-vector path (no sort) when no config is given: on the H100 it
# beat the best grouped tiles at 1, 2 and 4 tokens of 35B-A3B (9 pairs each with the shared expert; 26.5 vs
# 31.6, 43.1 vs 49.6, 74.2 vs 80.5 us: kernels/results/moe_tune_gemv_h100.json).
_GEMV_MAX_PAIRS = 36
# Warps of the k-sum that also applies the next norm: one program holds a token's whole row, so a decode batch has
# few programs. H200, 35B-A3B, batch 8 at 4K: 6.86 / 6.80 / 6.78 / 6.78 ms a step at 4 / 8 / 16 / 32 warps
# (loadtest/results/norm_sum_warps/).
_NORM_SUM_WARPS = 16
# Tokens routed by the single-launch router (logits and top-k in one kernel); its register tile grows with them.
_ROUTER_GEMV_MAX_TOKENS = 4
# Router rows per program: 65 programs of 4 x 4 KB for 35B-A3B's 257 rows. On the H200 in the MoE block
# (kernels/bench_moe_block.py) 4 rows x 4 warps beat 2 x 4 by ~0.8 us at 35B-A3B and ~1 us at 397B.
_ROUTER_BLOCK_N = 4


# ----------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------


def padded_router_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, H]`` seen with its rows padded to a multiple of 8, when its storage holds those rows right
    after it (the model allocates its router that way, the pad rows zero); else ``weight`` itself. cuBLAS runs an
    align-1 sm75 kernel for an odd number of output columns (35B-A3B's 257: ~55 TFLOP/s over an 8K-token prefill
    chunk on the H200) and an aligned one for 264; the logits' extra columns are not read."""
    rows = -(-weight.shape[0] // 8) * 8
    needed = (weight.storage_offset() + rows * weight.stride(0)) * weight.element_size()
    if rows == weight.shape[0] or not weight.is_contiguous() or weight.untyped_storage().nbytes() < needed:
        return weight
    return weight.as_strided((rows, weight.shape[1]), weight.stride())


def concat_router_weights(router_weight: torch.Tensor, shared_gate_weight: torch.Tensor) -> torch.Tensor:
    """``[E, H]`` router + ``[1, H]`` shared-expert gate -> one ``[E+1, H]`` weight (do this once, at load)."""
    if router_weight.dim() != 2 or shared_gate_weight.shape != (1, router_weight.shape[1]):
        raise ValueError(f"expected router [E, H] and shared gate [1, H], got {tuple(router_weight.shape)} and "
                         f"{tuple(shared_gate_weight.shape)}")
    return torch.cat([router_weight, shared_gate_weight.to(router_weight.dtype)], dim=0).contiguous()


@triton.jit
def _route_token(
    row, token, weights_ptr, ids_ptr, shared_ptr, num_experts, dtype: tl.constexpr,
    TOP_K: tl.constexpr, OUT_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_AS_EXPERT: tl.constexpr,
):
    """Top-k of one token from its logits at ``row`` (experts, then the shared gate's logit if HAS_SHARED);
    ``dtype`` is the activation dtype the shared gate is rounded to."""
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    # .cg: in the fused router the logits were written by other programs of the same launch; read them from
    # L2, never from a line this SM's L1 might hold.
    logits = tl.load(row + e, mask=valid, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
    if HAS_SHARED:
        # The shared gate's logit, issued with the others: loaded after the top-k's stores (which, for all the
        # compiler knows, may alias the row), it was one more L2 trip at the router's end, on the MoE layer's
        # critical path (sm_90 PTX).
        g = tl.load(row + num_experts, cache_modifier=".cg").to(tl.float32)
    if SOFTMAX:
        # kernels.moe.topk_softmax: softmax in fp32 over all experts, top-k on the probabilities.
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = tl.where(valid, p, 0.0)
        scores = p / tl.sum(p, axis=0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    scores = tl.where(valid, scores, -1.0)  # scores are >= 0: padding lanes can never be picked

    k = tl.arange(0, BLOCK_K)
    if BLOCK_K == 1:  # (tl.topk needs k >= 2)
        best, idx = tl.max(scores, axis=0, return_indices=True, return_indices_tie_break_left=True)
        top_w = tl.zeros([BLOCK_K], dtype=tl.float32) + best
        top_i = tl.zeros([BLOCK_K], dtype=tl.int32) + idx.to(tl.int32)
    else:
        # One sorting network rather than TOP_K dependent argmax rounds (each a reduction across the warps):
        # int64 keys of the score's bits over the reversed expert id, so that equal scores rank the lower id
        # first. Scores >= 0 order like their int32 bits; padding lanes (-1) are negative and rank last.
        # tl.topk returns the BLOCK_K largest keys in descending order, like torch.topk. On the H200 this
        # took the one-token decode step from 752 to 763 tok/s (35B-A3B, 20 layers: NOTES_fused.md).
        keys = (scores.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)
        top = tl.topk(keys, BLOCK_K)
        top_i = (BLOCK_E - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
        top_w = tl.where(k < TOP_K, (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)  # lanes >= TOP_K are zero
    tl.store(weights_ptr + token * OUT_K + k, top_w, mask=k < TOP_K)
    tl.store(ids_ptr + token * OUT_K + k, top_i, mask=k < TOP_K)

    if HAS_SHARED:
        # Shared-expert gate: torch.sigmoid of the logit in the activation dtype (fp32 math, one rounding).
        gate = round_to(1.0 / (1.0 + tl.exp(-g)), dtype)
        if SHARED_AS_EXPERT:  # column k: expert id E (the shared expert) with its gate as the weight
            tl.store(weights_ptr + token * OUT_K + TOP_K, gate)
            tl.store(ids_ptr + token * OUT_K + TOP_K, num_experts)
        else:
            tl.store(shared_ptr + token, gate.to(dtype))


@triton.jit
def _route_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, shared_ptr,
    num_experts, stride_logits,
    TOP_K: tl.constexpr, OUT_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_AS_EXPERT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    _route_token(logits_ptr + token * stride_logits, token, weights_ptr, ids_ptr, shared_ptr, num_experts,
                 logits_ptr.dtype.element_ty, TOP_K, OUT_K, BLOCK_E, BLOCK_K, SOFTMAX, RENORMALIZE, HAS_SHARED,
                 SHARED_AS_EXPERT)


@triton.jit
def _router_gemv_topk_kernel(
    x_ptr, w_ptr, logits_ptr, ticket_ptr, weights_ptr, ids_ptr, shared_ptr,
    res_ptr, norm_w_ptr, new_res_ptr, normed_ptr, eps,
    num_tokens, num_rows, num_experts, stride_x, stride_w,
    HIDDEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TOP_K: tl.constexpr, OUT_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TK: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_AS_EXPERT: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    """Router logits and top-k in one launch for a few tokens: every program computes BLOCK_N logit columns
    of all tokens (a matrix-vector product, like kernels.triton.gemv), and the program that finishes last --
    the one drawing the last ticket -- routes the tokens from the complete logits and resets the ticket.

    The ticket is the classic "last block" reduction: the program's stores, then a barrier (all its threads
    have stored), then an acq_rel atomic, which releases those stores to the program that later acquires the
    same counter.

    NORM (one token, ``BLOCK_K >= HIDDEN``): the input is ``gemma_rms_norm(x + residual)``, computed by every
    program from x (as kernels.triton.gemv.rms_norm_linear does); program 0 writes the new residual and the
    normed row, which the experts read."""
    col0 = tl.program_id(0) * BLOCK_N
    if NORM:
        pdl_trigger(PDL)
        w = load_weight_tile(w_ptr, col0, num_rows, stride_w, HIDDEN, BLOCK_N, BLOCK_K)
        # The norm's weight too: loaded after the wait, it came after the residual's store, a second trip to
        # memory behind x's (sm_90 PTX) on the MoE layer's critical path.
        offs_h = tl.arange(0, BLOCK_K)
        norm_w = tl.load(norm_w_ptr + offs_h, mask=offs_h < HIDDEN, other=0.0)
        pdl_wait(PDL)
        h = rms_norm_row(x_ptr, res_ptr, norm_w, new_res_ptr, normed_ptr, eps, tl.program_id(0) == 0,
                         HIDDEN, BLOCK_K, HAS_RESIDUAL, True, True)
        y = tl.sum(h[None, :] * w.to(tl.float32), axis=1)[None, :]
    else:
        y = gemv_tile(x_ptr, w_ptr, col0, num_tokens, num_rows, stride_x, stride_w, HIDDEN, ROWS, BLOCK_N, BLOCK_K,
                      PDL)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < num_rows
    rows = tl.arange(0, ROWS)
    row_mask = rows < num_tokens
    dtype = x_ptr.dtype.element_ty
    # The reference's F.linear returns the logits in the activation dtype: round them so.
    logits = round_to(y, dtype)
    tl.store(logits_ptr + rows[:, None] * num_rows + offs_n[None, :], logits,
             mask=row_mask[:, None] & n_mask[None, :])
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        token = 0
        while token < num_tokens:  # (a while loop: the interpreter cannot take a runtime range bound)
            _route_token(logits_ptr + token * num_rows, token, weights_ptr, ids_ptr, shared_ptr, num_experts,
                         dtype, TOP_K, OUT_K, BLOCK_E, BLOCK_TK, SOFTMAX, RENORMALIZE, HAS_SHARED,
                         SHARED_AS_EXPERT)
            token += 1
        tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch


def route_topk(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    shared_gate_weight: torch.Tensor | None,
    top_k: int,
    renormalize: bool,
    *,
    fused_shared_gate: bool = False,
    shared_as_expert: bool = False,
    scoring: str = "softmax",
    ticket: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor, float] | None = None,
    router_tile: gemv_tk.GemvTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router GEMM + top-k: returns ``(topk_weights fp32 [T, k], topk_ids int32 [T, k], shared_gate [T, 1])``.

    Three ways to pass the weights:
      * ``fused_shared_gate=True``: ``router_weight`` is ``concat_router_weights(router, shared_gate)``
        ``[E+1, H]`` (its last row is the shared-expert gate) and ``shared_gate_weight`` must be None. One GEMM.
        This is the serving path.
      * ``router_weight [E, H]`` and ``shared_gate_weight [1, H]``: concatenated here on every call (an extra
        copy of the router weight per call; fine for tests, use the fused form in the model).
      * ``router_weight [E, H]`` and ``shared_gate_weight=None``: no shared expert; the third result is None.

    ``scoring="softmax"`` (Qwen): fp32 softmax over all E experts, top-k, then ``w / sum(w)`` if
    ``renormalize`` -- the same as ``kernels.moe.topk_softmax``. ``scoring="sigmoid"``: scores
    ``sigmoid(logits)`` in fp32, top-k on the scores, optional renormalisation (no expert bias / group limit).
    ``shared_gate`` is ``sigmoid(logit)`` in hidden's dtype. Weights are in descending order; ties pick the
    lower expert id.

    ``shared_as_expert=True`` (with a shared gate): the shared expert is expert ``E`` of the weight stacks, so
    it is returned as a (k+1)-th column instead: ids ``[T, k+1]`` ending in ``E``, weights ending in the gate
    (its bf16 value, as fp32); the third result is None. ``fused_experts`` then computes it with the rest.

    ``ticket``: an int32 ``[1]`` tensor holding 0, owned by the caller and used by one stream at a time. With
    it, up to ``_ROUTER_GEMV_MAX_TOKENS`` tokens are routed by one kernel (logits and top-k,
    ``_router_gemv_topk_kernel``), which leaves the ticket at 0 again; otherwise cuBLAS computes the logits and
    a second kernel routes.

    ``norm=(residual, norm_weight, eps)`` (with a ticket, one token, hidden <= 8192): ``hidden`` is the
    un-normed layer output and the kernel routes ``gemma_rms_norm(hidden + residual)``; use
    ``norm_route_topk``, which also returns the normed row and the new residual.

    ``router_tile``: the single-launch router's rows per program and warps (its ``block_k`` is not used; by
    default ``_ROUTER_BLOCK_N`` rows and ``default_tile``'s warps).
    """
    if hidden.dim() != 2 or hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be a float [T, H] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if router_weight.dim() != 2 or router_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"router_weight must be [E, {hidden.shape[1]}], got {tuple(router_weight.shape)}")
    if router_weight.dtype != hidden.dtype:
        raise ValueError(f"router_weight dtype {router_weight.dtype} differs from hidden dtype {hidden.dtype}")
    if fused_shared_gate:
        if shared_gate_weight is not None:
            raise ValueError("fused_shared_gate=True: pass the concatenated weight and shared_gate_weight=None")
        weight = router_weight
        num_experts = router_weight.shape[0] - 1
    elif shared_gate_weight is not None:
        weight = concat_router_weights(router_weight, shared_gate_weight)
        num_experts = router_weight.shape[0]
    else:
        weight = router_weight
        num_experts = router_weight.shape[0]
    has_shared = weight.shape[0] > num_experts
    if shared_as_expert and not has_shared:
        raise ValueError("shared_as_expert=True needs the shared-expert gate (fused_shared_gate or shared_gate_weight)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if num_experts > _MAX_EXPERTS:
        raise ValueError(f"at most {_MAX_EXPERTS} experts (one register tile per token), got {num_experts}")
    if weight.device != hidden.device:
        raise ValueError(f"router weight is on {weight.device}, hidden on {hidden.device}")

    if ticket is not None and (ticket.shape != (1,) or ticket.dtype != torch.int32 or ticket.device != hidden.device):
        raise ValueError(f"ticket must be an int32 [1] tensor on {hidden.device}")

    tokens = hidden.shape[0]
    out_k = top_k + int(shared_as_expert)
    topk_weights = torch.empty(tokens, out_k, dtype=torch.float32, device=hidden.device)
    topk_ids = torch.empty(tokens, out_k, dtype=torch.int32, device=hidden.device)
    shared = None
    if has_shared and not shared_as_expert:
        shared = torch.empty(tokens, 1, dtype=hidden.dtype, device=hidden.device)
    if tokens == 0:
        return topk_weights, topk_ids, shared
    block_e = triton.next_power_of_2(num_experts)
    if norm is not None and (ticket is None or tokens != 1 or hidden.shape[1] > gemv_tk.MAX_SINGLE_TILE_K):
        raise ValueError("norm needs a ticket, one token and hidden <= "
                         f"{gemv_tk.MAX_SINGLE_TILE_K}, got {tokens} tokens of {hidden.shape[1]}")
    if ticket is not None and tokens <= _ROUTER_GEMV_MAX_TOKENS and hidden.stride(1) == 1:
        num_rows = weight.shape[0]
        logits = torch.empty(tokens, num_rows, dtype=torch.float32, device=hidden.device)
        residual, norm_weight, eps = norm if norm is not None else (None, hidden, 0.0)
        normed = torch.empty_like(hidden) if norm is not None else hidden
        new_res = torch.empty_like(hidden) if residual is not None else hidden
        tile = router_tile or gemv_tk.default_tile(hidden.shape[1])
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        block_n = tile.block_n if router_tile is not None or interpret else _ROUTER_BLOCK_N
        _router_gemv_topk_kernel[(triton.cdiv(num_rows, block_n),)](
            hidden, weight, logits, ticket, topk_weights, topk_ids, shared if shared is not None else hidden,
            residual if residual is not None else hidden, norm_weight, new_res, normed, float(eps),
            tokens, num_rows, num_experts, hidden.stride(0), weight.stride(0),
            HIDDEN=hidden.shape[1], ROWS=triton.next_power_of_2(tokens), BLOCK_N=block_n,
            BLOCK_K=triton.next_power_of_2(hidden.shape[1]) if norm is not None else gemv_tk.block_k_for(
                tile, hidden.shape[1]),
            NORM=norm is not None, HAS_RESIDUAL=residual is not None,
            TOP_K=top_k, OUT_K=out_k, BLOCK_E=block_e, BLOCK_TK=triton.next_power_of_2(top_k),
            SOFTMAX=scoring == "softmax", RENORMALIZE=renormalize, HAS_SHARED=has_shared,
            SHARED_AS_EXPERT=shared_as_expert, num_warps=tile.num_warps, **pdl_launch_args(hidden.device),
        )
        if norm is not None:
            return topk_weights, topk_ids, shared, normed, new_res
        return topk_weights, topk_ids, shared

    # [T, E(+1)] in hidden's dtype, like the reference's F.linear, through the padded weight when there is one.
    # (cuBLAS runs an align-1 sm75 kernel for 35B-A3B's 257 rows, 5-12 us per layer on the H200; writing into
    # output rows padded to 8 did not change that, 8.3 -> 8.1 us at 8 tokens: kernels/bench_moe_parts.py,
    # loadtest/results/moe_parts_h200.json; a weight of 264 rows is not measured yet.)
    logits = F.linear(hidden, padded_router_rows(weight))[:, : weight.shape[0]]
    _route_topk_kernel[(tokens,)](
        # The gate's dtype comes from the pointer: with shared_as_expert, logits stand in (hidden's dtype).
        logits, topk_weights, topk_ids, shared if shared is not None else logits,
        num_experts, logits.stride(0),
        TOP_K=top_k, OUT_K=out_k, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        SOFTMAX=scoring == "softmax", RENORMALIZE=renormalize, HAS_SHARED=has_shared,
        SHARED_AS_EXPERT=shared_as_expert,
        num_warps=1 if block_e <= 256 else 2 if block_e <= 512 else 4, **pdl_launch_args(hidden.device),
    )
    return topk_weights, topk_ids, shared


def norm_route_topk(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    router_weight: torch.Tensor, top_k: int, renormalize: bool, ticket: torch.Tensor, *,
    shared_as_expert: bool = True, router_tile: gemv_tk.GemvTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The post-attention norm and the routing of one token in one kernel: ``h, s =
    gemma_rms_norm_residual(x, residual)``, then ``route_topk(h, router_weight, ...)`` with the fused shared
    gate. Returns ``(topk_weights, topk_ids, shared_gate, h, s)`` (``s`` is x itself without a residual)."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"norm_route_topk routes one contiguous token [1, H], got {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    if norm_weight.shape != (x.shape[1],) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be a contiguous [{x.shape[1]}] tensor")
    weights, ids, shared, normed, new_res = route_topk(
        x, router_weight, None, top_k, renormalize, fused_shared_gate=True, shared_as_expert=shared_as_expert,
        ticket=ticket, norm=(residual, norm_weight, eps), router_tile=router_tile,
    )
    return weights, ids, shared, normed, (new_res if residual is not None else x)


# ----------------------------------------------------------------------------------------------------------
# Sorting token-expert pairs into expert blocks
# ----------------------------------------------------------------------------------------------------------


def _padded_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Upper bounds (no device sync): each non-empty expert pads fewer than block_m slots."""
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return max_padded, triton.cdiv(max_padded, block_m)


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, shift_ptr,
    num_pairs, num_experts, max_padded, max_blocks,
    BLOCK_M: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_FILL: tl.constexpr,
):
    """One program: every pair's slot in the expert-sorted, block-padded order."""
    i = tl.arange(0, BLOCK_PAIRS)
    valid = i < num_pairs
    ids = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)

    counts = tl.histogram(ids, BLOCK_E, mask=valid)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    count_end = tl.cumsum(counts, axis=0)
    e = tl.arange(0, BLOCK_E)
    # The j-th pair of expert e in sorted order (sorted position count_start[e] + j) goes to padded_start[e] + j.
    tl.store(shift_ptr + e, (padded_end - padded) - (count_end - counts), mask=e < num_experts)
    tl.store(num_post_ptr, tl.sum(padded, axis=0))

    # Padding slots hold the sentinel num_pairs; blocks past the end (never read) get expert 0.
    # (while rather than range(): not performance critical, and Triton 3.6's interpreter cannot iterate a
    # range() over a runtime bound with numpy >= 2.4.)
    start = 0
    while start < max_padded:
        f = start + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + f, tl.full([BLOCK_FILL], 0, tl.int32) + num_pairs, mask=f < max_padded)
        tl.store(expert_ids_ptr + f, tl.zeros([BLOCK_FILL], dtype=tl.int32), mask=f < max_blocks)
        start += BLOCK_FILL
    tl.debug_barrier()  # the shift table and the sentinel fill are visible to every thread from here on

    # Stable sort by expert: key = expert * BLOCK_PAIRS + pair index (invalid lanes sort last).
    keys = tl.where(valid, ids, num_experts) * BLOCK_PAIRS + i
    keys = tl.sort(keys)
    expert = keys // BLOCK_PAIRS
    pair = keys % BLOCK_PAIRS
    dest = i + tl.load(shift_ptr + expert, mask=valid, other=0)
    tl.store(sorted_ids_ptr + dest, pair, mask=valid)
    # Every block of an expert's padded run holds at least one real pair, so this covers all live blocks.
    tl.store(expert_ids_ptr + dest // BLOCK_M, expert, mask=valid)


@triton.jit
def _moe_align_parallel_kernel(
    ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, num_experts, max_padded, max_blocks,
    BLOCK_M: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_EP: tl.constexpr, BLOCK_FILL: tl.constexpr,
):
    """Many programs, the same result as ``_moe_align_kernel``. Each program recomputes the experts' padded
    offsets from all pairs (a histogram of a few thousand ids), then writes, with no ordering between programs
    (their slots are disjoint): its BLOCK_P pairs at ``padded_start[expert] + rank``, the rank being the number of
    pairs of the same expert at lower indices (the stable order; no loop over earlier pairs, whose dependent loads
    kept the last program at 34 us for 2,304 pairs on the H200); the padding slots of its share of the experts
    (groups of BLOCK_EP); and its share of the tail past the last live block."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    a = tl.arange(0, BLOCK_ALL)
    all_ids = tl.load(ids_ptr + a, mask=a < num_pairs, other=0).to(tl.int32)
    counts = tl.histogram(all_ids, BLOCK_E, mask=a < num_pairs)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    padded_start = tl.cumsum(padded, axis=0) - padded
    total = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(num_post_ptr, total)

    i = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = i < num_pairs
    mine = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)
    # Rank = pairs of the same expert in earlier programs' blocks (a histogram of the ids already in registers,
    # masked to those pairs) + earlier pairs of the same expert within this block.
    before = tl.histogram(all_ids, BLOCK_E, mask=a < pid * BLOCK_P)
    same = (mine[:, None] == mine[None, :]) & (i[None, :] < i[:, None])
    rank = tl.gather(before, mine, 0) + tl.sum(same.to(tl.int32), axis=1)
    dest = tl.gather(padded_start, mine, 0) + rank
    tl.store(sorted_ids_ptr + dest, i, mask=valid)
    tl.store(expert_ids_ptr + dest // BLOCK_M, mine, mask=valid)

    # Padding slots: [padded_start + count, padded_start + padded) of this program's experts, BLOCK_EP at a time.
    r = tl.arange(0, BLOCK_M)
    e0 = pid * BLOCK_EP
    while e0 < num_experts:
        ex = e0 + tl.arange(0, BLOCK_EP)
        exc = tl.minimum(ex, BLOCK_E - 1)
        filled = tl.gather(padded_start, exc, 0) + tl.gather(counts, exc, 0)
        padding = tl.gather(padded - counts, exc, 0)
        pad_mask = (ex < num_experts)[:, None] & (r[None, :] < padding[:, None])
        sentinel = tl.full([BLOCK_EP, BLOCK_M], 0, tl.int32) + num_pairs
        tl.store(sorted_ids_ptr + filled[:, None] + r[None, :], sentinel, mask=pad_mask)
        e0 += num_programs * BLOCK_EP

    # The tail past the last live block: sentinels, and expert 0 for its blocks (never read).
    f0 = total + pid * BLOCK_FILL
    while f0 < max_padded:
        f = f0 + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + f, tl.full([BLOCK_FILL], 0, tl.int32) + num_pairs, mask=f < max_padded)
        f0 += num_programs * BLOCK_FILL
    b0 = total // BLOCK_M + pid * BLOCK_FILL
    while b0 < max_blocks:
        b = b0 + tl.arange(0, BLOCK_FILL)
        tl.store(expert_ids_ptr + b, tl.zeros([BLOCK_FILL], dtype=tl.int32), mask=b < max_blocks)
        b0 += num_programs * BLOCK_FILL


@triton.jit
def _moe_align_count_kernel(ids_ptr, hist_ptr, num_pairs, num_programs, BLOCK: tl.constexpr,
                            BLOCK_E: tl.constexpr):
    """hist[e, program] = how many of the program's BLOCK pairs go to expert e. (Expert-major, so that the
    running count over programs is a scan along rows: torch's scan over the outer dimension of [programs, E]
    took 55 us at 32K tokens of 35B-A3B on the H200, a quarter of the whole alignment.)"""
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < num_pairs, other=0).to(tl.int32)
    counts = tl.histogram(ids, BLOCK_E, mask=i < num_pairs)
    tl.store(hist_ptr + tl.arange(0, BLOCK_E) * num_programs + pid, counts)


@triton.jit
def _moe_align_scatter_kernel(
    ids_ptr, before_ptr, padded_start_ptr, sorted_ids_ptr, expert_ids_ptr, slots_ptr, num_pairs, num_experts,
    num_programs, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Each program's BLOCK pairs to their slots: ``padded_start[e]`` + the pairs of e in earlier programs
    (``before[e, program]``) + the pair's rank among the program's pairs of e (an in-program sort by expert, then
    index: the stable order)."""
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    i = pid * BLOCK + local
    valid = i < num_pairs
    ids = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)
    counts = tl.histogram(ids, BLOCK_E, mask=valid)
    block_start = tl.cumsum(counts, axis=0) - counts  # where each expert's run begins in the sorted block
    keys = tl.sort(tl.where(valid, ids, num_experts) * BLOCK + local)  # invalid lanes sort last
    expert = keys // BLOCK
    pair = pid * BLOCK + keys % BLOCK
    live = local < num_pairs - pid * BLOCK
    e = tl.minimum(expert, BLOCK_E - 1)  # (the invalid lanes' expert id may be BLOCK_E; they store nothing)
    rank = local - tl.gather(block_start, e, 0)
    dest = tl.load(padded_start_ptr + e, mask=live, other=0) + tl.load(before_ptr + e * num_programs + pid,
                                                                          mask=live, other=0) + rank
    tl.store(sorted_ids_ptr + dest, pair.to(tl.int32), mask=live)
    tl.store(slots_ptr + pair, dest.to(tl.int32), mask=live)
    tl.store(expert_ids_ptr + dest // BLOCK_M, expert.to(tl.int32), mask=live)


def _moe_align_blocked(
    flat_ids: torch.Tensor, block_m: int, num_experts: int, max_padded: int, max_blocks: int,
    block_pairs: int = _ALIGN_BLOCKED_PAIRS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_moe_align_torch``'s result (bit for bit) from two Triton passes over programs of ``block_pairs`` pairs and
    a few torch ops on an [experts, programs] table, for prefill-sized batches (no host sync)."""
    device = flat_ids.device
    num_pairs = flat_ids.numel()
    block_e = triton.next_power_of_2(num_experts)
    programs = triton.cdiv(num_pairs, block_pairs)
    hist = torch.empty(block_e, programs, dtype=torch.int32, device=device)
    _moe_align_count_kernel[(programs,)](flat_ids, hist, num_pairs, programs, BLOCK=block_pairs, BLOCK_E=block_e,
                                         num_warps=4)
    before = torch.cumsum(hist, 1, dtype=torch.int32) - hist
    counts = hist.sum(1, dtype=torch.int32)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0, dtype=torch.int32)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.zeros(max_blocks, dtype=torch.int32, device=device)
    slots = torch.empty(num_pairs, dtype=torch.int32, device=device)
    _moe_align_scatter_kernel[(programs,)](
        flat_ids, before, padded_end - padded, sorted_ids, expert_ids, slots, num_pairs, num_experts, programs,
        BLOCK=block_pairs, BLOCK_E=block_e, BLOCK_M=block_m, num_warps=8,
    )
    group_ends = padded_end[:num_experts]
    return sorted_ids, expert_ids, group_ends[-1:], group_ends, slots


def _moe_align_torch(
    flat_ids: torch.Tensor, block_m: int, num_experts: int, max_padded: int, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as ``_moe_align_kernel`` with torch ops (the reference the blocked alignment is tested and
    timed against; the engine no longer calls it); also returns
    ``group_ends`` (int32 [E], the end of each expert's padded run: the offsets of a grouped GEMM over the
    sorted rows) and ``slots`` (int32 [T*k], each pair's slot in the sorted order)."""
    device = flat_ids.device
    num_pairs = flat_ids.numel()
    ids = flat_ids.long()
    # scatter_add_ rather than bincount: bincount syncs with the host to size its output.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    count_end = torch.cumsum(counts, 0)
    shift = (padded_end - padded) - (count_end - counts)
    order = torch.argsort(ids, stable=True)
    expert = ids[order]
    dest = torch.arange(num_pairs, device=device) + shift[expert]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    expert_ids = torch.zeros(max_blocks, dtype=torch.int32, device=device)
    expert_ids[dest // block_m] = expert.to(torch.int32)
    slots = torch.empty(num_pairs, dtype=torch.int32, device=device)
    slots[order] = dest.to(torch.int32)
    group_ends = padded_end.to(torch.int32)
    return sorted_ids, expert_ids, group_ends[-1:], group_ends, slots


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, parallel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k (token, slot) pairs by expert into BLOCK_M-row blocks of one expert each.

    Returns ``(sorted_pair_ids int32 [max_padded], block_expert_ids int32 [max_blocks], num_post_padded int32
    [1])`` with ``max_padded = T*k + min(E, T*k) * (block_m - 1)``. ``sorted_pair_ids`` holds flat pair indices
    ``t*k + j`` (stable order within an expert) and the sentinel ``T*k`` in padding slots; entries at or past
    ``num_post_padded`` are padding, and so are the blocks starting there. ``topk_ids`` values must lie in
    ``[0, num_experts)`` (not checked on the device). ``parallel``: up to 4096 pairs, the many-program kernel
    (True) or the one-program one (False); None: by the number of pairs.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be an int32/int64 [T, k] tensor, got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}")
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_pairs = flat.numel()
    max_padded, max_blocks = _padded_sizes(num_pairs, num_experts, block_m)
    if num_pairs > _ALIGN_TRITON_MAX_PAIRS:
        return _moe_align_blocked(flat, block_m, num_experts, max_padded, max_blocks)[:3]

    device = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    block_pairs = max(16, triton.next_power_of_2(num_pairs))
    block_e = triton.next_power_of_2(num_experts)
    if parallel is None:
        parallel = num_pairs > _ALIGN_ONE_PROGRAM_MAX_PAIRS
    if parallel:
        _moe_align_parallel_kernel[(triton.cdiv(num_pairs, _ALIGN_PAIRS_PER_PROGRAM),)](
            flat, sorted_ids, expert_ids, num_post, num_pairs, num_experts, max_padded, max_blocks,
            BLOCK_M=block_m, BLOCK_ALL=block_pairs, BLOCK_E=block_e, BLOCK_P=_ALIGN_PAIRS_PER_PROGRAM,
            BLOCK_EP=8, BLOCK_FILL=256, num_warps=4,
        )
        return sorted_ids, expert_ids, num_post
    shift = torch.empty(num_experts, dtype=torch.int32, device=device)  # scratch
    _moe_align_kernel[(1,)](
        flat, sorted_ids, expert_ids, num_post, shift,
        num_pairs, num_experts, max_padded, max_blocks,
        BLOCK_M=block_m, BLOCK_PAIRS=block_pairs, BLOCK_E=block_e, BLOCK_FILL=1024,
        num_warps=4 if block_pairs <= 1024 else 8,
    )
    return sorted_ids, expert_ids, num_post


# ----------------------------------------------------------------------------------------------------------
# Expert GEMMs
# ----------------------------------------------------------------------------------------------------------


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether to feed tl.dot fp32 copies of the operands: only under Triton's CPU interpreter with bf16.

    Triton 3.6's interpreter keeps bf16 values as raw uint16 bits and its tl.dot multiplies those bits as
    integers. Upcasting first gives exact bf16 products accumulated in fp32 -- what the GPU's bf16 MMA computes
    (up to summation order). The compiled GPU kernels never take this path.
    """
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class GemmTile:
    """Tile shape and schedule of one of the two expert GEMMs."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 1  # M blocks per group in the program order (L2 reuse of weight tiles across M blocks)
    # Weight tiles through a TMA descriptor instead of per-thread loads (gate/up only; needs I % block_n == 0).
    tma: bool = False


@dataclass(frozen=True)
class MoeConfig:
    """Launch configuration of ``fused_experts``; ``block_m`` is shared by the alignment and both GEMMs.

    ``gate_up.block_n`` counts columns of *each* of gate and up (the tile reads 2 * block_n weight rows).
    """

    block_m: int
    gate_up: GemmTile
    down: GemmTile
    # The down projection as torch's CUTLASS grouped GEMM on activations stored in sorted order (None: where it
    # runs, i.e. bf16 on sm90/sm100, and for more than _ALIGN_TRITON_MAX_PAIRS pairs; the module docstring).
    down_grouped_mm: bool | None = None


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration of the matrix-vector path: each gate/up program owns ``block_n`` output columns of
    one pair (``block_n`` of each of gate and up) and walks K in ``block_k`` steps (0: the whole K at once);
    each down program owns ``down_block_n`` columns of one token (None: ``block_n``)."""

    block_n: int = 2
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    down_block_n: int | None = None
    down_num_warps: int | None = None  # None: num_warps


def default_gemv_config(inter: int, tokens: int = 1) -> GemvConfig:
    """The measured GPU default for expert width ``inter``; under Triton's interpreter (CPU tests), whose
    cost is per program, wide tiles (the same kernel code with other constexprs: the tests also run narrow
    explicit configs).

    Swept on the H200 as the engine runs the block (norm + router, then gate/up, then down+sum, PDL-chained,
    the shared expert's weights loaded before the wait: ``python -m kernels.bench_moe_block``,
    ``kernels/results/moe_block_h200.json``): gate/up 2 columns x the whole K x 4 warps; the down kernel wants
    single-warp programs of ~1K weights per expert, 1 column at I=512 (35B-A3B: 24.0 us per block against
    28.0 for the earlier 2 x 512 x 4 warps for both) and 2 at I=1024 (397B: 73.9 against 90.5). Many small
    down programs start as soon as gate/up's retire, and each has little to do after its wait.

    2 to 4 tokens at I <= 512 (measured on 35B-A3B only: ``python -m kernels.tune_moe --tokens 2,4 --sweep
    gemv``, ``kernels/results/moe_tune_gemv_h200.json``): gate/up 4 columns and down 2 columns, 30.7 / 50.0 us
    against 32.1 / 54.5 for the one-token tiles."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return GemvConfig(block_n=64, block_k=256)
    if tokens >= 2 and inter <= 512:
        return GemvConfig(block_n=4, block_k=0, num_warps=4, down_block_n=2, down_num_warps=1)
    return GemvConfig(block_n=2, block_k=0, num_warps=4, down_block_n=1 if inter <= 512 else 2, down_num_warps=1)


def default_moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """Heuristic configuration by pairs per active expert; the starting point for per-GPU tuning (NOTES_fused.md).

    Decode (about one pair per expert): BLOCK_M=16 (the smallest tl.dot M) and narrow N tiles, so that the
    few selected experts still spread their weight reads over many programs. Prefill: larger M tiles for
    weight reuse, grouped program order for L2 reuse.
    """
    pairs = num_tokens * top_k
    per_expert = pairs / max(1, min(num_experts, pairs))  # mean pairs per routed-to expert
    if per_expert <= 8:
        return MoeConfig(16, GemmTile(32, 128, num_warps=4, num_stages=4), GemmTile(64, 128, num_warps=4, num_stages=4))
    if per_expert <= 32:
        return MoeConfig(32, GemmTile(64, 64, num_warps=4, num_stages=4), GemmTile(128, 64, num_warps=4, num_stages=4))
    if per_expert <= 96:
        return MoeConfig(64, GemmTile(64, 64, num_warps=4, num_stages=4, group_m=8),
                         GemmTile(128, 64, num_warps=4, num_stages=4, group_m=8))
    # Prefill chunks: gate/up 128 columns of each of gate and up, swept on the H200 at 8K and 50K tokens
    # (``python -m kernels.tune_moe --sweep prefill``, kernels/results/moe_tune_prefill_h200.json): 6.9 against
    # 7.1-7.3 ms at 50K (~410 TFLOP/s), even at 8K; BLOCK_M 64 and the other tiles were slower. Its weight tiles
    # through TMA: 5-10% faster at 8K-64K tokens (``python -m kernels.bench_moe_prefill --sweep-tma``,
    # kernels/results/moe_prefill_tma*_h200.json; used where the shapes allow, see _experts_grouped).
    return MoeConfig(128, GemmTile(128, 64, num_warps=8, num_stages=3, group_m=8, tma=True),
                     GemmTile(128, 64, num_warps=8, num_stages=3, group_m=8))


def _check_config(cfg: MoeConfig) -> None:
    sizes = {"block_m": cfg.block_m, "gate_up.block_n": cfg.gate_up.block_n, "gate_up.block_k": cfg.gate_up.block_k,
             "down.block_n": cfg.down.block_n, "down.block_k": cfg.down.block_k}
    for name, size in sizes.items():
        if size < 16 or size & (size - 1):  # tl.dot needs every dimension >= 16
            raise ValueError(f"MoeConfig.{name} must be a power of two >= 16, got {size}")
    for name, tile in (("gate_up", cfg.gate_up), ("down", cfg.down)):
        if tile.group_m < 1 or tile.num_warps not in (1, 2, 4, 8, 16) or tile.num_stages < 1:
            raise ValueError(f"MoeConfig.{name} has an invalid schedule: {tile}")


@triton.jit
def _block_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (M block, N block), GROUP_M M blocks at a time (the Triton matmul tutorial's order)."""
    group_size_total = GROUP_M * num_n
    first_m = (pid // group_size_total) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size_total) % group_m
    pid_n = (pid % group_size_total) // group_m
    return pid_m, pid_n


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, w13_desc, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, max_padded,
    stride_x, stride_we, stride_wn, stride_act,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, SORTED_OUT: tl.constexpr,
    WEIGHT_TMA: tl.constexpr,
):
    """SORTED_OUT: act rows are the sorted slots (padding rows written as zeros), else the pairs. WEIGHT_TMA: the
    weight tiles come through ``w13_desc`` (block ``[1, BLOCK_N, BLOCK_K]``; K past the end reads zeros)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), tl.cdiv(max_padded, BLOCK_M), tl.cdiv(INTER, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return  # past the last live block (the grid is sized for the worst case)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)  # int64: E * 2I * H exceeds 2^31 for big models

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]
    # Weight tiles [BLOCK_K, BLOCK_N] of w13[e]: gate rows offs_n, up rows inter + offs_n (contiguous along K).
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):  # constexpr bounds: a pipelined loop with a known trip count
        if WEIGHT_TMA:
            e32 = expert.to(tl.int32)
            n0 = pid_n * BLOCK_N
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < HIDDEN - k0), other=0.0)
            g = w13_desc.load([e32, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            u = w13_desc.load([e32, INTER + n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < HIDDEN - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only, see upcast_dot
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    # SwiGLU with the reference's roundings: F.linear output, silu(gate), silu(gate) * up, each in the dtype.
    dtype = act_ptr.dtype.element_ty
    gate = round_to(acc_g, dtype)
    up = round_to(acc_u, dtype)
    act = round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up, dtype)
    if SORTED_OUT:  # padding rows (zero inputs, so zeros) too: the grouped GEMM reads every row of a group
        out_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :]
        tl.store(out_ptrs, act.to(dtype), mask=n_mask[None, :])
    else:
        out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_act + offs_n[None, :]
        tl.store(out_ptrs, act.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr, w2_ptr, y_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, max_padded,
    stride_act, stride_we, stride_wn, stride_y,
    HIDDEN: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, pid_n = _block_coords(tl.program_id(0), tl.cdiv(max_padded, BLOCK_M), tl.cdiv(HIDDEN, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_pairs
    pair64 = pair.to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair64[:, None] * stride_act + offs_k[None, :]
    w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < INTER - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # Reference: y = F.linear(...) in the dtype; y * weights.to(dtype), rounded.
    dtype = y_ptr.dtype.element_ty
    routing = round_to(tl.load(topk_w_ptr + pair64, mask=row_mask, other=0.0).to(tl.float32), dtype)
    y = round_to(round_to(acc, dtype) * routing[:, None], dtype)
    y_ptrs = y_ptr + pair64[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, y.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_gate_up_gemv_kernel(
    x_ptr, w13_ptr, act_ptr, ids_ptr, shared_expert,
    stride_x, stride_we, stride_wn, stride_act,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SHARED_LAST: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    """act[pair, n] = silu(x[token] . w13[e, n]) * (x[token] . w13[e, I + n]) for one pair and BLOCK_N columns.

    SHARED_LAST: every token's last pair is expert ``shared_expert`` (the shared expert, whatever ``ids``
    says), so its programs need no routing: they load their whole ``[2, BLOCK_N, HIDDEN]`` weight tile
    before the PDL wait, while the router still runs."""
    pdl_trigger(PDL)
    pair = tl.program_id(0).to(tl.int64)
    token = pair // TOP_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < INTER
    if SHARED_LAST:
        is_shared = pair % TOP_K == TOP_K - 1
    else:
        is_shared = False
    if is_shared:
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = n_mask[:, None] & (offs_h < HIDDEN)[None, :]
        # (Names of their own in this branch: the compiler wants a name bound in both branches to have one type.)
        shared_ptrs = (w13_ptr + shared_expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
                       + offs_h[None, :])
        shared_g = tl.load(shared_ptrs, mask=h_mask, other=0.0, eviction_policy="evict_first")
        shared_u = tl.load(shared_ptrs + INTER * stride_wn, mask=h_mask, other=0.0, eviction_policy="evict_first")
        pdl_wait(PDL)
        x_row = tl.load(x_ptr + token * stride_x + offs_h, mask=offs_h < HIDDEN, other=0.0).to(tl.float32)
        gate_sum = tl.sum(shared_g.to(tl.float32) * x_row[None, :], axis=1)
        up_sum = tl.sum(shared_u.to(tl.float32) * x_row[None, :], axis=1)
    else:
        pdl_wait(PDL)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token * stride_x + offs_k
        g_ptrs = w13_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        u_ptrs = g_ptrs + INTER * stride_wn
        # [BLOCK_N, BLOCK_K] partial sums, reduced once at the end: no cross-lane reduction inside the loop.
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k_mask = offs_k < HIDDEN - k0
            a = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w_mask = n_mask[:, None] & k_mask[None, :]
            g = tl.load(g_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            u = tl.load(u_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            acc_g += g * a[None, :]
            acc_u += u * a[None, :]
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        gate_sum = tl.sum(acc_g, axis=1)
        up_sum = tl.sum(acc_u, axis=1)
    dtype = act_ptr.dtype.element_ty
    gate = round_to(gate_sum, dtype)
    up = round_to(up_sum, dtype)
    act = round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up, dtype)
    tl.store(act_ptr + pair * stride_act + offs_n, act.to(dtype), mask=n_mask)


@triton.jit
def _down_pair(act_ptr, pair, stride_act, w_ptrs, n_mask, INTER: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """act[pair] . w2[e, n] for BLOCK_N columns (``w_ptrs``: the ``[BLOCK_N, BLOCK_K]`` pointers of the first
    K step of the pair's expert), in fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair * stride_act + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, INTER, BLOCK_K):
        k_mask = offs_k < INTER - k0
        a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * a[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return tl.sum(acc, axis=1)


@triton.jit
def _moe_down_sum_gemv_kernel(
    act_ptr, w2_ptr, out_ptr, topk_w_ptr, ids_ptr, shared_expert,
    stride_act, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SHARED_LAST: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr,
):
    """out[t, n] = sum_j weight[t, j] * (act[t*k + j] . w2[e_j, n]) for one token and BLOCK_N columns: the down
    projection of all of the token's pairs and their k-sum in one program (no per-pair y in memory).

    SHARED_LAST: the last pair is expert ``shared_expert``, whose ``[BLOCK_N, INTER]`` weight tile is loaded
    before the PDL wait."""
    pdl_trigger(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w2_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if SHARED_LAST:
        offs_i = tl.arange(0, BLOCK_I)
        w_shared = tl.load(w_cols + shared_expert.to(tl.int64) * stride_we + offs_i[None, :],
                           mask=n_mask[:, None] & (offs_i < INTER)[None, :], other=0.0, eviction_policy="evict_first")
    pdl_wait(PDL)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        if SHARED_LAST and j == TOP_K - 1:
            a = tl.load(act_ptr + pair * stride_act + offs_i, mask=offs_i < INTER, other=0.0).to(tl.float32)
            y = tl.sum(w_shared.to(tl.float32) * a[None, :], axis=1)
        else:
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            y = _down_pair(act_ptr, pair, stride_act, w_cols + expert * stride_we + offs_k[None, :], n_mask, INTER,
                           BLOCK_N, BLOCK_K)
        # Round like the reference's per-pair y = weight * (act @ w2^T), then sum in fp32 in pair order.
        routing = round_to(tl.load(topk_w_ptr + pair).to(tl.float32), dtype)
        total += round_to(round_to(y, dtype) * routing, dtype)
    tl.store(out_ptr + token * stride_out + offs_n, round_to(total, dtype).to(dtype), mask=n_mask)


@triton.jit
def _moe_sum_kernel(y_ptr, out_ptr, slots_ptr, topk_w_ptr, res_ptr, norm_w_ptr, new_res_ptr, hidden, eps,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, SLOTS: tl.constexpr, NORM: tl.constexpr):
    """out[t] = sum_j y[t*k + j] in fp32, rounded once to the dtype. SLOTS: pair t*k + j's row of y is
    ``slots[t*k + j]`` and its routing weight is applied here, rounded as ``_moe_down_kernel`` rounds it.
    NORM (one program holds the whole row): then the residual add and the Gemma RMSNorm that follow the
    experts, rounded as ``kernels.triton.norm``'s kernel rounds them: ``new_res = out + res`` and
    ``out = norm(new_res)``."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    if NORM:
        # The residual and the norm's weight with the pairs' rows: the weight's load after the residual's store
        # (which may alias it, for all the compiler knows) would be one more trip to memory at the end.
        res = tl.load(res_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        if SLOTS:
            row = tl.load(slots_ptr + pair).to(tl.int64)
            y = tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            routing = round_to(tl.load(topk_w_ptr + pair).to(tl.float32), dtype)
            acc += round_to(y * routing, dtype)
        else:
            acc += tl.load(y_ptr + pair * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    summed = round_to(acc, dtype)
    if NORM:
        summed = round_to(summed + res, dtype)
        tl.store(new_res_ptr + token * hidden + cols, summed.to(dtype), mask=mask)
        summed = gemma_norm_row(summed, norm_w, hidden, eps, dtype)
    tl.store(out_ptr + token * hidden + cols, summed.to(dtype), mask=mask)


@dataclass(frozen=True)
class ResidualNorm:
    """The residual add and Gemma RMSNorm that follow the experts (the next layer's input norm, or the model's
    final one), for ``fused_experts`` to apply in its k-sum: ``(norm(out + residual), out + residual)``."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoeConfig | GemvConfig | None = None,
    shared_last: bool = False,
    then_norm: ResidualNorm | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` with SwiGLU experts; new ``[T, H]``.

    x: ``[T, H]`` (unit last stride); w13: ``[E, 2I, H]`` gate rows then up rows; w2: ``[E, H, I]`` (both with
    unit last stride, same dtype as x); topk_weights: ``[T, k]`` float; topk_ids: ``[T, k]`` int32/int64 in
    ``[0, E)`` (not checked on the device). ``config``: a ``MoeConfig`` (grouped GEMM path) or a
    ``GemvConfig`` (matrix-vector path); by default the matrix-vector path for at most ``_GEMV_MAX_PAIRS``
    pairs, else the grouped path with ``default_moe_config``.

    ``shared_last``: every token's last column is the shared expert, the last of the stacks (``E - 1``), as
    ``route_topk(..., shared_as_expert=True)`` returns it; the matrix-vector path then loads its weights
    before waiting for the router (PDL), and takes the expert id of that column as ``E - 1`` without reading it.

    ``then_norm``: where the grouped path runs (more than ``_GEMV_MAX_PAIRS`` pairs, or a ``MoeConfig``), its
    k-sum also applies this residual add and norm and ``(norm(out + residual), out + residual)`` is returned
    (one kernel less: the norm would be a launch of its own); elsewhere it is ignored and ``out`` returned (the
    one-row projections take the norm in their prologue). Callers tell the two apart by the type.
    """
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float [T, H] tensor, got {x.dtype} {tuple(x.shape)}")
    tokens, hidden = x.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    if w13_hidden != hidden or two_inter % 2 or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, {hidden}]), "
                         f"w2 {tuple(w2.shape)} (want [E, {hidden}, I])")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"weights must have x's dtype {x.dtype}, got w13 {w13.dtype}, w2 {w2.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {tuple(t.stride())}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both "
                         f"be [{tokens}, k]")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
    top_k = topk_ids.shape[1]
    if then_norm is not None:
        residual, norm_weight = then_norm.residual, then_norm.weight
        if (residual.shape != (tokens, hidden) or residual.dtype != x.dtype or not residual.is_contiguous()
                or residual.device != x.device):
            raise ValueError(f"the residual must be a contiguous {x.dtype} {(tokens, hidden)} on {x.device}, got "
                             f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        if norm_weight.shape != (hidden,) or not norm_weight.is_contiguous() or norm_weight.device != x.device:
            raise ValueError(f"the norm weight must be a contiguous [{hidden}] on {x.device}, got "
                             f"{tuple(norm_weight.shape)} on {norm_weight.device}")
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0 or top_k == 0:
        return out.zero_()

    if isinstance(config, GemvConfig) or (config is None and tokens * top_k <= _GEMV_MAX_PAIRS):
        _experts_gemv(x, w13, w2, topk_weights, topk_ids, config or default_gemv_config(inter, tokens), out,
                      shared_last)
        return out
    y, slots = _experts_grouped(x, w13, w2, topk_weights, topk_ids, config)
    if then_norm is None:
        block_h = min(1024, triton.next_power_of_2(hidden))
        _moe_sum_kernel[(tokens, triton.cdiv(hidden, block_h))](
            y, out, y if slots is None else slots, topk_weights.contiguous(), y, y, y, hidden, 0.0, TOP_K=top_k,
            BLOCK_H=block_h, SLOTS=slots is not None, NORM=False, num_warps=4,
        )
        return out
    residual = then_norm.residual
    new_residual = torch.empty_like(out)
    _moe_sum_kernel[(tokens, 1)](
        y, out, y if slots is None else slots, topk_weights.contiguous(), residual, then_norm.weight, new_residual,
        hidden, float(then_norm.eps), TOP_K=top_k, BLOCK_H=triton.next_power_of_2(hidden), SLOTS=slots is not None,
        NORM=True, num_warps=_NORM_SUM_WARPS,
    )
    return out, new_residual


def _experts_gemv(x, w13, w2, topk_weights, topk_ids, cfg: GemvConfig, out: torch.Tensor, shared_last: bool) -> None:
    """``out [T, H]`` = the k-sum of the routed expert outputs: one program per (pair, N tile) for gate/up, then
    one per (token, N tile) for the down projection and the sum."""
    down_block_n = cfg.down_block_n or cfg.block_n
    if any(n < 1 or n & (n - 1) for n in (cfg.block_n, down_block_n)) or (cfg.block_k and (
            cfg.block_k < 16 or cfg.block_k & (cfg.block_k - 1))):
        raise ValueError(f"GemvConfig block sizes must be powers of two (block_k >= 16, or 0), got {cfg}")
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    num_pairs = tokens * top_k
    ids = topk_ids.contiguous().view(-1)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    shared_expert = w13.shape[0] - 1
    _moe_gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, cfg.block_n))](
        x, w13, act, ids, shared_expert, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k or triton.next_power_of_2(hidden), SHARED_LAST=shared_last,
        BLOCK_H=triton.next_power_of_2(hidden),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_args(x.device),
    )
    _moe_down_sum_gemv_kernel[(tokens, triton.cdiv(hidden, down_block_n))](
        act, w2, out, topk_weights.contiguous().view(-1), ids, shared_expert, act.stride(0), w2.stride(0),
        w2.stride(1), out.stride(0),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter, BLOCK_N=down_block_n,
        BLOCK_K=cfg.block_k or triton.next_power_of_2(inter), SHARED_LAST=shared_last,
        BLOCK_I=triton.next_power_of_2(inter),
        num_warps=cfg.down_num_warps or cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_args(x.device),
    )


def grouped_mm_down_supported(x: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch's CUTLASS grouped GEMM runs the down projection here: bf16 on sm90/sm100 (the architectures
    its kernels are built for), rows 16-byte aligned, fewer experts than it takes groups."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w2.shape[1] % 8 == 0 and w2.shape[2] % 8 == 0
            and w2.shape[0] < _GROUPED_MM_MAX_GROUPS and torch.cuda.get_device_capability(x.device)[0] in (9, 10))


def _gate_up_tma_supported(x: torch.Tensor, w13: torch.Tensor, tile: GemmTile) -> bool:
    """16-bit stacks whose gate half is a whole number of tiles (a tile must not run into the up rows), with
    16-byte rows and a 16-byte-aligned start, as the TMA descriptor needs; fp32 (the exactness tests) keeps pointer
    loads."""
    return (x.dtype in (torch.bfloat16, torch.float16) and (w13.shape[1] // 2) % tile.block_n == 0
            and (w13.shape[2] * w13.element_size()) % 16 == 0 and w13.is_contiguous() and w13.data_ptr() % 16 == 0)


def _experts_grouped(x, w13, w2, topk_weights, topk_ids, config: MoeConfig | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-pair expert outputs from the expert-sorted grouped GEMMs: ``(y [T*k, H] with the routing weights
    applied, None)``, or with the grouped_mm down ``(y [max_padded, H] in sorted order without them, slots)``."""
    tokens = x.shape[0]
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    num_pairs = tokens * top_k
    cfg = config or default_moe_config(tokens, top_k, num_experts)
    if config is None and cfg.gate_up.tma and not _gate_up_tma_supported(x, w13, cfg.gate_up):
        cfg = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, tma=False))
    if config is None and x.dtype == torch.float32:
        # fp32 tiles are twice the bytes: 4 pipeline stages overflow the H100's 227 KB of shared memory
        # (measured: 278 KB for the decode tile); 2 stages fit. fp32 is the exactness-test path only.
        cfg = dataclasses.replace(
            cfg,
            gate_up=dataclasses.replace(cfg.gate_up, num_stages=min(2, cfg.gate_up.num_stages)),
            down=dataclasses.replace(cfg.down, num_stages=min(2, cfg.down.num_stages)),
        )
    _check_config(cfg)
    grouped_mm = cfg.down_grouped_mm
    if grouped_mm is None:
        grouped_mm = num_pairs > _ALIGN_TRITON_MAX_PAIRS and grouped_mm_down_supported(x, w2)
    elif grouped_mm and x.is_cuda and not grouped_mm_down_supported(x, w2):
        raise ValueError(f"MoeConfig.down_grouped_mm: torch's grouped GEMM needs bf16 on sm90/sm100, H and I "
                         f"multiples of 8 and fewer than {_GROUPED_MM_MAX_GROUPS} experts; got {x.dtype} on "
                         f"{torch.cuda.get_device_name(x.device)}, w2 {tuple(w2.shape)}")
    if not grouped_mm:
        sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg.block_m, num_experts)
        act = _grouped_gate_up(x, w13, sorted_ids, expert_ids, num_post, cfg, top_k)
        return _grouped_down(act, w2, topk_weights, sorted_ids, expert_ids, num_post, cfg), None
    max_padded, max_blocks = _padded_sizes(num_pairs, num_experts, cfg.block_m)
    sorted_ids, expert_ids, num_post, group_ends, slots = _moe_align_blocked(
        topk_ids.reshape(-1).contiguous(), cfg.block_m, num_experts, max_padded, max_blocks)
    act = _grouped_gate_up(x, w13, sorted_ids, expert_ids, num_post, cfg, top_k, sorted_out=True)
    # Rows past the last group's end (never live) come out unspecified; the k-sum reads live slots only.
    return torch._grouped_mm(act, w2.transpose(1, 2), offs=group_ends), slots


def _dot_args(dtype: torch.dtype) -> dict:
    # tf32 only ever applies to fp32 operands; the interpreter upcasts (see upcast_dot).
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", "UPCAST_DOT": upcast_dot(dtype)}


def _grouped_gate_up(x, w13, sorted_ids, expert_ids, num_post, cfg: MoeConfig, top_k: int,
                     sorted_out: bool = False) -> torch.Tensor:
    """SwiGLU of each pair's gate/up projection: ``act [T*k, I]`` in pair order, or with ``sorted_out``
    ``[max_padded, I]`` in the sorted order (padding rows zero, rows past the live blocks unwritten)."""
    tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    num_pairs = tokens * top_k
    max_padded = sorted_ids.numel()
    act = torch.empty(max_padded if sorted_out else num_pairs, inter, dtype=x.dtype, device=x.device)
    t = cfg.gate_up
    desc = None
    if t.tma:
        if not _gate_up_tma_supported(x, w13, t):
            raise ValueError(f"GemmTile.tma needs 16-bit, contiguous, 16-byte-aligned stacks with 16-byte rows and "
                             f"I % block_n == 0; got {x.dtype}, I={inter}, {t}, w13 {tuple(w13.shape)} strides "
                             f"{w13.stride()}")
        # A host-side descriptor (no device allocation); built per call: a few microseconds against milliseconds.
        desc = TensorDescriptor(w13, list(w13.shape), list(w13.stride()), [1, t.block_n, t.block_k])
    _moe_gate_up_kernel[(triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(inter, t.block_n),)](
        x, w13, desc, act, sorted_ids, expert_ids, num_post,
        num_pairs, max_padded,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter,
        BLOCK_M=cfg.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, EVEN_K=hidden % t.block_k == 0,
        SORTED_OUT=sorted_out, WEIGHT_TMA=t.tma, num_warps=t.num_warps, num_stages=t.num_stages,
        **_dot_args(x.dtype),
    )
    return act


def _grouped_down(act, w2, topk_weights, sorted_ids, expert_ids, num_post, cfg: MoeConfig) -> torch.Tensor:
    """Per-pair expert outputs ``y [T*k, H]`` in pair order, the routing weight applied."""
    num_pairs, inter = act.shape
    hidden = w2.shape[1]
    max_padded = sorted_ids.numel()
    y = torch.empty(num_pairs, hidden, dtype=act.dtype, device=act.device)
    t = cfg.down
    _moe_down_kernel[(triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(hidden, t.block_n),)](
        act, w2, y, topk_weights.contiguous(), sorted_ids, expert_ids, num_post,
        num_pairs, max_padded,
        act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        HIDDEN=hidden, INTER=inter,
        BLOCK_M=cfg.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, EVEN_K=inter % t.block_k == 0,
        num_warps=t.num_warps, num_stages=t.num_stages, **_dot_args(act.dtype),
    )
    return y

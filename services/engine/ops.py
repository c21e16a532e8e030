"""The kernel set a model runs with, chosen once per engine: the plain-torch references (CPU, tests, the
source of truth) or the Triton and flashinfer kernels (CUDA). Both sets have the same signatures, so the
model code is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import attention as torch_attention
from kernels import conv1d as torch_conv
from kernels import gdn as torch_gdn
from kernels import moe as torch_moe
from kernels import norm as torch_norm
from kernels.rope import apply_partial_rope


def qk_norm_rope_torch(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads, num_kv_heads,
                       head_dim, eps):
    """Reference for kernels.triton.qk_norm_rope: ``(q, k, v, sigmoid(gate))``."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim * 2, num_kv_heads * head_dim
    q_gate, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q_gate = q_gate.view(num_tokens, num_heads, 2 * head_dim)
    q, gate = q_gate[..., :head_dim], q_gate[..., head_dim:]
    q = torch_norm.gemma_rms_norm(q, q_norm_weight, eps)
    k = torch_norm.gemma_rms_norm(k.reshape(num_tokens, num_kv_heads, head_dim), k_norm_weight, eps)
    q = apply_partial_rope(q, positions, cos_sin_cache)
    k = apply_partial_rope(k, positions, cos_sin_cache)
    return q, k, v.reshape(num_tokens, num_kv_heads, head_dim), torch.sigmoid(gate.reshape(num_tokens, -1))


def qk_norm_rope_store_kv_torch(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads, num_kv_heads,
                                head_dim, eps, kv_cache_layer, kv_slot_ids, k_scale=1.0, v_scale=1.0):
    """Reference for kernels.triton.qk_norm_rope with a KV cache: ``(q, sigmoid(gate))``, k and v stored at
    the tokens' slots of ``kv_cache_layer`` (quantized with the scales into an fp8 cache)."""
    q, k, v, gate = qk_norm_rope_torch(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads,
                                       num_kv_heads, head_dim, eps)
    torch_attention.write_kv(kv_cache_layer, k, v, kv_slot_ids, k_scale, v_scale)
    return q, gate


def norm_linear_torch(x, residual, norm_weight, eps, weight, bias=None):
    """The input norm of a mixer (with the residual add) and its first projection: ``(y, residual)``.
    ``norm_weight`` None: x is already normed (the previous layer's experts applied this norm) and the residual
    passes through."""
    if norm_weight is None:
        return F.linear(x, weight, bias), residual
    h, residual = torch_norm.gemma_rms_norm_residual(x, residual, norm_weight, eps)
    return F.linear(h, weight, bias), residual


def norm_linear_conv_torch(x, residual, norm_weight, eps, weight, conv_weight, conv_states, state_slots):
    """The GDN input norm and in_proj of a decode step (one token per sequence), with the causal conv update
    applied to the first ``D = conv_weight.shape[0]`` columns (the q|k|v part) and the conv states of
    ``state_slots`` updated in place: ``(y, residual)``. ``norm_weight`` None: as in ``norm_linear_torch``."""
    y, residual = norm_linear_torch(x, residual, norm_weight, eps, weight)
    conv_dim = conv_weight.shape[0]
    conv_in = conv_states[state_slots]
    y[:, :conv_dim] = torch_conv.causal_conv1d_update(y[:, :conv_dim], conv_weight, conv_in)
    conv_states[state_slots] = conv_in
    return y, residual


def gated_linear_torch(x, gate, weight, bias=None):
    """The gated attention output into o_proj: ``linear(x * gate)``."""
    return F.linear(x * gate, weight, bias)


def gated_norm_linear_torch(core, z, norm_weight, eps, weight):
    """GDN output: gated RMSNorm per head (``core, z [T, heads, head_dim]``), flattened, then out_proj."""
    return F.linear(torch_norm.gated_rms_norm(core, z, norm_weight, eps).flatten(1), weight)


def route_topk_torch(x, router_weight, top_k, renormalize, ticket=None):
    """Router and shared-expert gate in one GEMM (``router_weight`` is ``[experts + 1, hidden]``, the last
    row the shared-expert gate): ``(weights fp32 [T, k], expert ids [T, k], sigmoid(shared gate) [T, 1])``."""
    logits = F.linear(x, router_weight)
    weights, ids = torch_moe.topk_softmax(logits[:, :-1], top_k, renormalize)
    return weights, ids, torch.sigmoid(logits[:, -1:])


def moe_with_shared_expert_torch(x, router_weight, w13, w2, top_k, renormalize):
    """Routed experts plus the sigmoid-gated shared expert stored as expert ``E`` (the last) of w13/w2."""
    weights, ids, shared_gate = route_topk_torch(x, router_weight, top_k, renormalize)
    routed = torch_moe.fused_experts(x, w13, w2, weights, ids)  # ids < E: the shared expert is never routed
    gate, up = F.linear(x, w13[-1]).chunk(2, dim=-1)
    shared = F.linear(F.silu(gate) * up, w2[-1])
    return routed + shared_gate.to(x.dtype) * shared


def norm_moe_with_shared_expert_torch(x, residual, norm_weight, eps, router_weight, w13, w2, top_k, renormalize,
                                      ticket=None, then_norm=None):
    """The post-attention norm (with the residual add), then ``moe_with_shared_expert_torch``:
    ``(output, residual, False)``: the reference never applies ``then_norm`` (the next layer's input norm, which
    the GPU kernels may; see Ops)."""
    h, residual = torch_norm.gemma_rms_norm_residual(x, residual, norm_weight, eps)
    return moe_with_shared_expert_torch(h, router_weight, w13, w2, top_k, renormalize), residual, False


def gdn_torch(layer, mixed_qkv, a, b, batch, conv_states, ssm_states, z=None) -> tuple[torch.Tensor, bool]:
    """``(core, False)``: the reference never applies the gated norm with ``z`` (see Ops.gdn)."""
    return _gdn_core_torch(layer, mixed_qkv, a, b, batch, conv_states, ssm_states), False


def _gdn_core_torch(layer, mixed_qkv, a, b, batch, conv_states, ssm_states) -> torch.Tensor:
    """The GDN layer's conv + gated delta rule on the state slots, plain torch: batched recurrent form for
    decode steps (whose conv ran in ``norm_linear_conv``: ``mixed_qkv`` is its output), per sequence
    otherwise, split at checkpoint offsets so the state exists there (decode snapshots, the state after the
    step, are copied by the model runner). Returns ``core [T, v_heads, v_dim]``."""
    num_tokens = mixed_qkv.shape[0]
    beta = b.sigmoid()
    g = -layer.A_log.exp() * F.softplus(a.float() + layer.dt_bias)
    if batch.is_decode:
        slots = batch.state_slots
        q, k, v = layer.split_heads(mixed_qkv, num_tokens)
        core, new_ssm = torch_gdn.recurrent_gated_delta_rule(
            q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], ssm_states[slots]
        )
        ssm_states[slots] = new_ssm
        return core[:, 0]
    core = torch.empty(num_tokens, layer.num_v_heads, layer.v_dim, dtype=mixed_qkv.dtype, device=mixed_qkv.device)
    snapshots = batch.snapshots or [[]] * batch.num_seqs
    splits = batch.gdn_splits or [[]] * batch.num_seqs
    for start, q_len, slot, has_state, snaps, seq_splits in zip(
        batch.query_starts, batch.query_lens, batch.state_slots.tolist(), batch.has_initial_state, snapshots,
        splits, strict=True,
    ):
        conv_state = conv_states[slot] if has_state else None
        ssm_state = ssm_states[slot][None] if has_state else None
        ends = sorted({offset for offset, _ in snaps if 0 < offset < q_len}
                      | {offset for offset in seq_splits if 0 < offset < q_len} | {q_len})
        piece_start = 0
        for piece_end in ends:
            rows = slice(start + piece_start, start + piece_end)
            length = piece_end - piece_start
            mixed, conv_state = torch_conv.causal_conv1d_prefill(mixed_qkv[rows], layer.conv_weight, conv_state)
            q, k, v = layer.split_heads(mixed, length)
            rule = torch_gdn.recurrent_gated_delta_rule if length == 1 else torch_gdn.chunk_gated_delta_rule
            out, ssm_state = rule(q[None], k[None], v[None], g[rows][None], beta[rows][None], ssm_state)
            core[rows] = out[0]
            for offset, snapshot_slot in snaps:
                if offset == piece_end:
                    conv_states[snapshot_slot] = conv_state
                    ssm_states[snapshot_slot] = ssm_state[0]
            piece_start = piece_end
        conv_states[slot] = conv_state
        ssm_states[slot] = ssm_state[0]
    return core


class TorchAttention:
    """kernels.attention behind the plan/run interface of kernels.flashinfer_attention."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def plan(self, query_lens: list[int], kv_lens: list[int], page_tables: list[list[int]], scale: float) -> None:
        tables = [torch.tensor(t, dtype=torch.long, device=self.device) for t in page_tables]
        self._args = (tables, query_lens, kv_lens, scale)

    def run(self, q: torch.Tensor, kv_cache_layer: torch.Tensor, k_scale: float = 1.0,
            v_scale: float = 1.0) -> torch.Tensor:
        page_tables, query_lens, kv_lens, scale = self._args
        return torch_attention.paged_attention(q, kv_cache_layer, page_tables, query_lens, kv_lens, scale, k_scale,
                                               v_scale)


@dataclass(frozen=True)
class Ops:
    name: str
    linear: Callable  # F.linear's signature
    rms_norm_residual: Callable
    # (x, residual, norm_weight, eps, weight, bias=None) -> (y, residual); norm_weight None: x is already normed
    # and the residual passes through
    norm_linear: Callable
    # (x, residual, norm_weight, eps, weight, conv_weight, conv_states, state_slots) -> (y, residual): decode
    # steps' GDN in_proj with the conv update on its q|k|v columns; norm_weight None as for norm_linear
    norm_linear_conv: Callable
    gated_linear: Callable  # (x, gate, weight, bias=None) -> linear(x * gate, weight, bias)
    gated_norm_linear: Callable  # (core, z, norm_weight, eps, weight) -> y
    # (qkv, q_norm_w, k_norm_w, cos_sin, positions, heads, kv_heads, head_dim, eps, kv_cache_layer, kv_slot_ids,
    # k_scale, v_scale) -> (q, sigmoid(gate)), with k and v stored in the cache (an fp8 one: divided by the scales)
    qk_norm_rope_store_kv: Callable
    # route_topk and norm_moe_with_shared_expert take a last argument ``ticket``: an int32 [1] zero tensor per
    # layer, the scratch of the single-launch router kernel (the torch references ignore it).
    route_topk: Callable  # (x, router [E+1, H], k, renorm, ticket) -> (weights, ids, shared gate)
    fused_experts: Callable
    # (x, residual, norm_weight, eps, router [E+1, H], w13 [E+1, 2I, H], w2 [E+1, H, I], k, renorm, ticket,
    # then_norm=None) -> (output, residual, normed): the post-attention norm, then the experts with the shared one
    # stored as expert E; ``then_norm`` (a GemmaRMSNorm: the next layer's input norm or the final one) may be
    # applied with its residual add by the experts' last kernel: then ``normed`` is True, ``output`` is
    # norm(experts + residual) and ``residual`` is experts + residual
    norm_moe_with_shared_expert: Callable
    # (num_qo_heads, num_kv_heads, head_dim, page_size, dtype, device, kv_dtype) -> backend with plan(query_lens,
    # kv_lens, page_tables, scale) and run(q, kv_cache_layer, k_scale, v_scale)
    make_attention: Callable
    plan_gdn: Callable  # (batch) -> per-step plan for ``gdn``, or None
    # (layer, mixed_qkv, a, b, batch, conv_states, ssm_states, z=None) -> (out [T, v_heads, v_dim], gated): on
    # decode steps mixed_qkv is already through the conv (norm_linear_conv); given z, the kernels may apply the
    # output's gated RMSNorm (layer.norm_weight, layer.eps) themselves: then ``gated`` is True and ``out`` is
    # through it, else ``out`` is the core output
    gdn: Callable


def torch_ops() -> Ops:
    return Ops(
        name="torch",
        linear=F.linear,
        rms_norm_residual=torch_norm.gemma_rms_norm_residual,
        norm_linear=norm_linear_torch,
        norm_linear_conv=norm_linear_conv_torch,
        gated_linear=gated_linear_torch,
        gated_norm_linear=gated_norm_linear_torch,
        qk_norm_rope_store_kv=qk_norm_rope_store_kv_torch,
        route_topk=route_topk_torch,
        fused_experts=torch_moe.fused_experts,
        norm_moe_with_shared_expert=norm_moe_with_shared_expert_torch,
        make_attention=lambda *args: TorchAttention(args[5]),
        plan_gdn=lambda batch: None,
        gdn=gdn_torch,
    )


# Decode batches whose GDN decode kernel applies the output's gated RMSNorm (one program per value head, BV = Dv).
# On the H200 at 35B-A3B, batch 8: the kernel 12.5 us a layer against 11.9 with its tuned BV, where the separate
# norm kernel it replaces took 3.3 (kernels/results/gdn_decode_sweep_h200_35b.json, the batch profiles); a step
# 6.86 against 6.95 ms, and faster at 2, 4 and 16 too (loadtest/results/gated_norm_ab/); at 64 the one-head
# programs lost (85 against 77 us). One request keeps the norm in the out_proj's prologue: with it in the kernel
# a step took 2.32 / 2.50 ms against 2.29 / 2.47 at 1K / 32K, two alternating rounds (run16_gated1_ab/).
_GATED_NORM_DECODE_BATCHES = range(2, 17)


def gpu_ops(flashinfer: bool = True, triton_decode_attention: bool = False) -> Ops:
    """The Triton kernels, with flashinfer attention (``flashinfer``) or the torch one (the ``triton`` set,
    which runs under Triton's interpreter on CPU, so CI exercises this glue); ``triton_decode_attention``: decode
    steps on the fused Triton attention block instead (kernels/triton_attention.py)."""
    from kernels.flashinfer_attention import FlashInferAttention
    from kernels.triton import conv1d as triton_conv
    from kernels.triton import gemv as triton_gemv
    from kernels.triton import moe as triton_moe
    from kernels.triton import norm as triton_norm
    from kernels.triton.gdn_chunk import gdn_prefill, plan_gdn_prefill
    from kernels.triton.gdn_decode import gdn_decode
    from kernels.triton.qk_norm_rope import qk_norm_rope
    from kernels.triton_attention import TritonDecodeAttention

    def norm_linear(x, residual, norm_weight, eps, weight, bias=None):
        if norm_weight is None:  # normed by the previous layer's k-sum
            return triton_gemv.linear(x, weight, bias), residual
        # One row (a single decode request): the norm runs inside the projection kernel.
        if bias is None and x.dim() == 2 and triton_gemv.can_fuse_prologue(x, weight):
            y, residual, _ = triton_gemv.rms_norm_linear(x, residual, norm_weight, eps, weight)
            return y, residual
        h, residual = triton_norm.gemma_rms_norm_residual(x, residual, norm_weight, eps)
        return triton_gemv.linear(h, weight, bias), residual

    def norm_linear_conv(x, residual, norm_weight, eps, weight, conv_weight, conv_states, state_slots):
        # One request: the conv runs in the projection's epilogue (each program owns its columns' conv state).
        if norm_weight is not None and x.dim() == 2 and triton_gemv.can_fuse_prologue(x, weight):
            y, residual, _ = triton_gemv.rms_norm_linear(x, residual, norm_weight, eps, weight,
                                                         conv_weight=conv_weight, conv_states=conv_states,
                                                         state_slot=state_slots)
            return y, residual
        y, residual = norm_linear(x, residual, norm_weight, eps, weight)
        conv_qkv = y[:, :conv_weight.shape[0]]
        triton_conv.conv1d_update(conv_qkv, conv_weight, conv_states, state_slots, out=conv_qkv)
        return y, residual

    def gated_linear(x, gate, weight, bias=None):
        if bias is None and triton_gemv.can_fuse_prologue(x, weight) and x.is_contiguous() and gate.is_contiguous():
            return triton_gemv.gated_linear(x, gate, weight)
        return triton_gemv.linear(x * gate, weight, bias)

    def gated_norm_linear(core, z, norm_weight, eps, weight):
        if triton_gemv.can_fuse_prologue(core, weight):
            return triton_gemv.gated_norm_linear(core, z, norm_weight, eps, weight)
        return triton_gemv.linear(triton_norm.gated_rms_norm(core, z, norm_weight, eps).flatten(1), weight)

    def qk_norm_rope_store_kv(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads, num_kv_heads,
                              head_dim, eps, kv_cache_layer, kv_slot_ids, k_scale=1.0, v_scale=1.0):
        q, _, _, gate = qk_norm_rope(qkv, q_norm_weight, k_norm_weight, cos_sin_cache, positions, num_heads,
                                     num_kv_heads, head_dim, eps, kv_cache=kv_cache_layer, kv_slot_ids=kv_slot_ids,
                                     k_scale=k_scale, v_scale=v_scale)
        return q, gate

    def route_topk(x, router_weight, top_k, renormalize, ticket):
        return triton_moe.route_topk(x, router_weight, None, top_k, renormalize, fused_shared_gate=True,
                                     ticket=ticket)

    def moe_with_shared_expert(x, router_weight, w13, w2, top_k, renormalize, ticket, then_norm=None):
        # The shared expert rides along as a (k+1)-th expert of every token: one routing kernel and one grouped
        # GEMM pair compute it with the routed experts, and the fp32 sum adds it.
        weights, ids, _ = triton_moe.route_topk(x, router_weight, None, top_k, renormalize, fused_shared_gate=True,
                                                shared_as_expert=True, ticket=ticket)
        return triton_moe.fused_experts(x, w13, w2, weights, ids, shared_last=True, then_norm=then_norm)

    def norm_moe_with_shared_expert(x, residual, norm_weight, eps, router_weight, w13, w2, top_k, renormalize,
                                    ticket, then_norm=None):
        # One token: the norm runs inside the routing kernel, which also writes the normed row for the experts
        # (and the next layer's norm runs in its projection's prologue: then_norm is not applied here).
        if (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] <= triton_gemv.MAX_SINGLE_TILE_K and x.is_contiguous()
                and (residual is None or residual.is_contiguous())):
            weights, ids, _, h, residual = triton_moe.norm_route_topk(x, residual, norm_weight, eps, router_weight,
                                                                      top_k, renormalize, ticket)
            return triton_moe.fused_experts(h, w13, w2, weights, ids, shared_last=True), residual, False
        h, residual = triton_norm.gemma_rms_norm_residual(x, residual, norm_weight, eps)
        # Batches: the experts' k-sum applies the next norm where it runs (the grouped path), one launch less.
        then = None if then_norm is None else triton_moe.ResidualNorm(residual, then_norm.weight, then_norm.eps)
        out = moe_with_shared_expert(h, router_weight, w13, w2, top_k, renormalize, ticket, then)
        if isinstance(out, tuple):
            return out[0], out[1], True
        return out, residual, False

    def make_attention(num_qo_heads, num_kv_heads, head_dim, page_size, dtype, device, kv_dtype=None):
        # flashinfer has no fp32 kernels (fp32 is for exactness tests) and only the usual head sizes.
        if not flashinfer or dtype == torch.float32 or head_dim not in (64, 128, 256):
            inner = TorchAttention(device)
        else:
            inner = FlashInferAttention(num_qo_heads, num_kv_heads, head_dim, page_size, dtype, device, kv_dtype)
        if not triton_decode_attention:
            return inner
        return TritonDecodeAttention(inner, num_qo_heads, num_kv_heads, head_dim, page_size, device)

    def plan_gdn(batch):
        if batch.is_decode:
            return None
        return plan_gdn_prefill(batch.cu_seqlens, batch.has_initial_state, batch.checkpoints, batch.input_ids.device,
                                batch.splits)

    def gdn(layer, mixed_qkv, a, b, batch, conv_states, ssm_states, z=None):
        num_tokens = mixed_qkv.shape[0]
        slots = batch.state_slots
        if batch.is_decode:
            q, k, v = layer.split_heads(mixed_qkv, num_tokens)
            # Small batches: the decode kernel applies the output's gated norm itself, one launch less (one
            # request: the out_proj's one-row prologue takes it instead).
            gated = z is not None and num_tokens in _GATED_NORM_DECODE_BATCHES
            norm = (z[:, None], layer.norm_weight, layer.eps) if gated else None
            out = gdn_decode(q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], layer.A_log, layer.dt_bias,
                             ssm_states, slots, gated_norm=norm)
            return out[:, 0], gated
        plan = batch.gdn_plan  # the batch's tables, on the device once per forward pass
        mixed = triton_conv.conv1d_prefill(mixed_qkv, layer.conv_weight, conv_states, slots, plan.cu_seqlens_dev,
                                           plan.has_init_dev, plan.checkpoints_dev)
        q, k, v = layer.split_heads(mixed, num_tokens)
        return gdn_prefill(q, k, v, a, b, layer.A_log, layer.dt_bias, ssm_states, slots, batch.cu_seqlens,
                           batch.has_initial_state, batch.checkpoints, plan=batch.gdn_plan), False

    return Ops(
        name="triton+flashinfer" if flashinfer else "triton",
        linear=triton_gemv.linear,
        rms_norm_residual=triton_norm.gemma_rms_norm_residual,
        norm_linear=norm_linear,
        norm_linear_conv=norm_linear_conv,
        gated_linear=gated_linear,
        gated_norm_linear=gated_norm_linear,
        qk_norm_rope_store_kv=qk_norm_rope_store_kv,
        route_topk=route_topk,
        fused_experts=triton_moe.fused_experts,
        norm_moe_with_shared_expert=norm_moe_with_shared_expert,
        make_attention=make_attention,
        plan_gdn=plan_gdn,
        gdn=gdn,
    )


def select_ops(kernels: str, device: torch.device, decode_attention: str = "auto") -> Ops:
    """``auto``: the GPU kernels on CUDA, the torch references elsewhere. ``triton``: the Triton kernels with
    torch attention (on CPU only under TRITON_INTERPRET=1, for tests). ``decode_attention``: ``auto`` (the set's
    own attention) or ``triton`` (decode steps on the fused Triton attention block; the gpu and triton sets)."""
    if decode_attention not in ("auto", "triton"):
        raise ValueError(f"decode_attention must be auto or triton, got {decode_attention!r}")
    if kernels == "auto":
        kernels = "gpu" if device.type == "cuda" else "torch"
    if kernels == "torch":
        if decode_attention == "triton":
            raise ValueError("decode_attention=triton needs the gpu or triton kernel set, not the torch references")
        return torch_ops()
    triton_decode = decode_attention == "triton"
    if kernels == "gpu":
        if device.type != "cuda":
            raise ValueError("the gpu kernel set needs a CUDA device")
        return gpu_ops(triton_decode_attention=triton_decode)
    if kernels == "triton":
        return gpu_ops(flashinfer=False, triton_decode_attention=triton_decode)
    raise ValueError(f"kernels must be auto, torch, gpu or triton, got {kernels!r}")

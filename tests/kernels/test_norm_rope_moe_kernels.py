"""Triton norm, fused QK-norm/RoPE/gate and MoE kernels against the plain-torch references.

Runs the compiled kernels on a GPU and Triton's interpreter on CPU (tests/kernels/conftest.py). Every kernel
output is allocated poisoned (NaN, or a garbage integer) so anything a kernel forgets to write fails the test.
Shapes: small odd ones, plus the real Qwen3.5-35B-A3B / 397B head and hidden sizes (MoE expert counts cut
down for the CPU's sake; the benchmark covers the full expert counts on the GPU).

Tolerances: fp32 ~1e-5 (the kernels compute in fp32 with full-precision dots, no tf32); bf16 1e-2 relative
(the kernels round at the same steps as the references, so under the interpreter most outputs are bit-equal;
on the GPU exp/rsqrt and the GEMM summation order may move a value by one bf16 ulp).
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kernels import attention as attn_ref
from kernels import moe as moe_ref
from kernels import norm as norm_ref
from kernels.rope import apply_partial_rope, rope_cos_sin_cache
from kernels.triton import moe as moe_tk
from kernels.triton import norm as norm_tk
from kernels.triton.gemv import GemvTile
from kernels.triton.qk_norm_rope import qk_norm_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


@contextlib.contextmanager
def poisoned_outputs():
    """Make every ``torch.empty`` inside the block come back filled with NaN (floats) or -999_999 (ints)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-999_999)
        return t

    with mock.patch.object(torch, "empty", empty):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "kernel left unwritten (NaN) or non-finite outputs"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ------------------------------------------------------------------------------------------------ norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 2048), (3, 4096), (7, 100)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gemma_rms_norm_residual(dtype, tokens, hidden, with_residual):
    gen = _gen(tokens * hidden)
    x = _randn(tokens, hidden, gen=gen, dtype=dtype, scale=3.0)
    residual = _randn(tokens, hidden, gen=gen, dtype=dtype, scale=3.0) if with_residual else None
    weight = _randn(hidden, gen=gen, dtype=dtype, scale=0.2)
    with poisoned_outputs():
        normed, new_res = norm_tk.gemma_rms_norm_residual(x, residual, weight, EPS)
    ref_normed, ref_res = norm_ref.gemma_rms_norm_residual(x, residual, weight, EPS)
    _close(normed, ref_normed, dtype)
    # The residual stream must round exactly like the unfused add (it is carried through every layer).
    assert torch.equal(new_res, ref_res)
    if not with_residual:
        assert new_res is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_rms_norm_strided_rows_and_3d(dtype):
    gen = _gen(1)
    base = _randn(5, 3000, gen=gen, dtype=dtype)
    x = base[:, 100:100 + 2048]  # row stride 3000
    weight = _randn(2048, gen=gen, dtype=torch.float32, scale=0.2)  # fp32 weight with bf16 x is allowed
    with poisoned_outputs():
        out = norm_tk.gemma_rms_norm(x, weight, EPS)
    _close(out, norm_ref.gemma_rms_norm(x, weight, EPS), dtype)
    x3 = _randn(2, 3, 24, gen=gen, dtype=dtype)
    w3 = _randn(24, gen=gen, dtype=dtype)
    with poisoned_outputs():
        out3 = norm_tk.gemma_rms_norm(x3, w3, EPS)
    _close(out3, norm_ref.gemma_rms_norm(x3, w3, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,dim", [(3, 32, 128), (2, 64, 128), (5, 3, 40)])
@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
def test_gated_rms_norm(dtype, tokens, heads, dim, weight_dtype):
    gen = _gen(tokens * heads * dim)
    x = _randn(tokens, heads, dim, gen=gen, dtype=dtype, scale=2.0)
    # The gate is a strided view of a wider projection output, as in GatedDeltaNet.forward.
    proj = _randn(tokens, heads * dim + 37, gen=gen, dtype=dtype, scale=2.0)
    gate = proj[:, 5:5 + heads * dim].reshape(tokens, heads, dim)
    weight = _randn(dim, gen=gen, dtype=dtype if weight_dtype == "same" else torch.float32)
    with poisoned_outputs():
        out = norm_tk.gated_rms_norm(x, gate, weight, EPS)
    _close(out, norm_ref.gated_rms_norm(x, gate, weight, EPS), dtype)


def test_norm_argument_checks():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm_tk.gemma_rms_norm(x, torch.zeros(8, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="unit stride"):
        norm_tk.gemma_rms_norm(x.t(), torch.zeros(4, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual dtype"):
        norm_tk.gemma_rms_norm_residual(x, x.double(), torch.zeros(16, device=DEVICE), EPS)
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\]"):
        norm_tk.gated_rms_norm(x, x, torch.zeros(16, device=DEVICE), EPS)


# ------------------------------------------------------------------------------------- QK norm + RoPE


def _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, sigmoid_gate):
    """The unfused sequence of GatedAttention.forward (services/engine/model.py)."""
    tokens = qkv.shape[0]
    q_size, kv_size = heads * head_dim * 2, kv_heads * head_dim
    q_gate, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q_gate = q_gate.view(tokens, heads, 2 * head_dim)
    q, gate = q_gate[..., :head_dim], q_gate[..., head_dim:]
    q = norm_ref.gemma_rms_norm(q, q_w, EPS)
    k = norm_ref.gemma_rms_norm(k.reshape(tokens, kv_heads, head_dim), k_w, EPS)
    v = v.reshape(tokens, kv_heads, head_dim)
    q = apply_partial_rope(q, positions, cos_sin)
    k = apply_partial_rope(k, positions, cos_sin)
    gate = gate.reshape(tokens, -1)
    return q, k, v, torch.sigmoid(gate) if sigmoid_gate else gate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim,rotary_dim,per_program",
    [
        (2, 16, 2, 256, 64, None),  # Qwen3.5-35B-A3B
        (1, 32, 2, 256, 64, 8),  # Qwen3.5-397B, several heads per program (the prefill layout)
        (3, 3, 1, 40, 12, 2),  # odd: head_dim and pass-through width not powers of two, partial head block
        (4, 4, 2, 32, 32, 4),  # rotary over the whole head (no pass-through part)
    ],
)
def test_qk_norm_rope(dtype, tokens, heads, kv_heads, head_dim, rotary_dim, per_program):
    gen = _gen(tokens * heads * head_dim + rotary_dim)
    width = heads * 2 * head_dim + 2 * kv_heads * head_dim
    qkv = _randn(tokens, width + 24, gen=gen, dtype=dtype, scale=3.0)[:, 8:8 + width]  # row stride != width
    q_w = _randn(head_dim, gen=gen, dtype=dtype, scale=0.3)
    k_w = _randn(head_dim, gen=gen, dtype=dtype, scale=0.3)
    cos_sin = rope_cos_sin_cache(rotary_dim, 4096, 1e7, device=DEVICE)
    positions = torch.randint(0, 4096, (tokens,), generator=_gen(7)).to(DEVICE)
    with poisoned_outputs():
        q, k, v, gate = qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, EPS,
                                     heads_per_program=per_program)
    ref = _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, True)
    for name, got, want in zip(("q", "k", "v", "gate"), (q, k, v, gate), ref, strict=True):
        assert got.shape == want.shape, name
        _close(got, want, dtype)
    assert q.is_contiguous() and k.is_contiguous() and gate.is_contiguous()
    # v is a zero-copy view into qkv.
    assert v.data_ptr() == qkv.data_ptr() + (heads * 2 * head_dim + kv_heads * head_dim) * qkv.element_size()


def test_qk_norm_rope_raw_gate_and_int32_positions():
    gen = _gen(11)
    heads, kv_heads, head_dim, tokens = 2, 1, 64, 3
    qkv = _randn(tokens, heads * 2 * head_dim + 2 * kv_heads * head_dim, gen=gen, dtype=torch.bfloat16)
    w = _randn(head_dim, gen=gen, dtype=torch.bfloat16)
    cos_sin = rope_cos_sin_cache(16, 64, 1e4, device=DEVICE)
    positions = torch.tensor([0, 63, 5], dtype=torch.int32, device=DEVICE)
    with poisoned_outputs():
        q, k, _, gate = qk_norm_rope(qkv, w, w, cos_sin, positions, heads, kv_heads, head_dim, EPS,
                                     sigmoid_gate=False)
    ref = _reference_attention_prep(qkv, w, w, cos_sin, positions.long(), heads, kv_heads, head_dim, False)
    _close(q, ref[0], torch.bfloat16)
    _close(k, ref[1], torch.bfloat16)
    assert torch.equal(gate, ref[3])


def _qk_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, dtype, gen):
    """A qkv projection output, the q/k norm weights, a RoPE cache and random positions."""
    width = heads * 2 * head_dim + 2 * kv_heads * head_dim
    qkv = _randn(tokens, width, gen=gen, dtype=dtype, scale=3.0)
    q_w = _randn(head_dim, gen=gen, dtype=dtype, scale=0.3)
    k_w = _randn(head_dim, gen=gen, dtype=dtype, scale=0.3)
    cos_sin = rope_cos_sin_cache(rotary_dim, 4096, 1e7, device=DEVICE)
    positions = torch.randint(0, 4096, (tokens,), generator=_gen(3)).to(DEVICE)
    return qkv, q_w, k_w, cos_sin, positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,rotary_dim,page_size", [
    (3, 16, 2, 256, 64, 16),  # Qwen3.5-35B-A3B
    (5, 3, 1, 40, 12, 4),  # odd sizes, tokens spread over pages
])
def test_qk_norm_rope_stores_kv(dtype, tokens, heads, kv_heads, head_dim, rotary_dim, page_size):
    """With a KV cache, k and v land in the pages exactly where kernels.attention.write_kv puts them, and
    nothing else in the cache changes; q and the gate are as without it."""
    gen = _gen(tokens * head_dim + page_size)
    qkv, q_w, k_w, cos_sin, positions = _qk_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, dtype, gen)
    num_pages = 6
    cache = _randn(num_pages, 2, page_size, kv_heads, head_dim, gen=gen, dtype=dtype)
    slots = torch.randperm(num_pages * page_size, generator=_gen(5))[:tokens].to(DEVICE)
    want_cache = cache.clone()
    q_ref, k_ref, v_ref, gate_ref = _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads,
                                                              head_dim, True)
    attn_ref.write_kv(want_cache, k_ref, v_ref, slots)
    with poisoned_outputs():
        q, k, v, gate = qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, EPS,
                                     kv_cache=cache, kv_slot_ids=slots)
    assert k is None and v is None
    _close(q, q_ref, dtype)
    _close(gate, gate_ref, dtype)
    _close(cache, want_cache, dtype)
    written = torch.zeros(num_pages * page_size, dtype=torch.bool)
    written[slots.cpu()] = True
    untouched = ~written.view(num_pages, 1, page_size).expand(num_pages, 2, page_size)
    assert torch.equal(cache[untouched.to(DEVICE)], want_cache[untouched.to(DEVICE)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.037, 0.5), (0.004, 0.003)])  # the last saturates
def test_qk_norm_rope_stores_fp8_kv(dtype, k_scale, v_scale):
    """Into an fp8 cache, k and v are quantized as kernels.attention.write_kv quantizes them: ``x * fp32(1 /
    scale)``, saturated at +-448 (never NaN), rounded to nearest even. The same bytes under the interpreter; on
    the GPU a k rounded one model-dtype ulp apart (rsqrt) may land on the neighbouring fp8 code."""
    tokens, heads, kv_heads, head_dim, rotary_dim, page_size = 5, 16, 2, 256, 64, 16
    qkv, q_w, k_w, cos_sin, positions = _qk_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, dtype,
                                                   _gen(int(1 / k_scale)))
    num_pages = 4
    cache = torch.zeros(num_pages, 2, page_size, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    slots = torch.randperm(num_pages * page_size, generator=_gen(5))[:tokens].to(DEVICE)
    want_cache = cache.clone()
    _, k_ref, v_ref, _ = _reference_attention_prep(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, True)
    attn_ref.write_kv(want_cache, k_ref, v_ref, slots, k_scale, v_scale)
    qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, EPS, kv_cache=cache,
                 kv_slot_ids=slots, k_scale=k_scale, v_scale=v_scale)
    got, want = cache.view(torch.uint8), want_cache.view(torch.uint8)
    assert not torch.isnan(cache.float()).any()
    if k_scale == 0.004:
        assert (cache.float().abs() == 448).sum() > 100, "this case must saturate"
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:
        assert (got.int() - want.int()).abs().max() <= 1
        assert (got != want).float().mean() < 0.01


def test_qk_norm_rope_argument_checks():
    qkv = torch.randn(2, 2 * 2 * 8 + 2 * 8, device=DEVICE)
    w = torch.zeros(8, device=DEVICE)
    cos_sin = rope_cos_sin_cache(4, 16, 1e4, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 3, 1, 8, EPS)
    with pytest.raises(ValueError, match="rotary_dim"):
        qk_norm_rope(qkv, w, w, rope_cos_sin_cache(16, 16, 1e4, device=DEVICE), pos, 2, 1, 8, EPS)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(qkv, w, w, cos_sin, pos.float(), 2, 1, 8, EPS)
    cache = torch.zeros(4, 2, 4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="go together"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 2, 1, 8, EPS, kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache must be"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 2, 1, 8, EPS, kv_cache=cache[:, :1], kv_slot_ids=pos)
    with pytest.raises(ValueError, match="kv_slot_ids"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 2, 1, 8, EPS, kv_cache=cache, kv_slot_ids=pos[:1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 2, 1, 8, EPS, kv_cache=cache.half(), kv_slot_ids=pos)
    with pytest.raises(ValueError, match="positive"):
        qk_norm_rope(qkv, w, w, cos_sin, pos, 2, 1, 8, EPS, kv_cache=cache.to(torch.float8_e4m3fn), kv_slot_ids=pos,
                     k_scale=0.0)


# ----------------------------------------------------------------------------------------------- routing


def _reference_route(logits, top_k, renormalize, scoring):
    """Reference routing of given logits. The tests feed it the very GEMM output route_topk computes
    (``F.linear`` with the same weight), so that a last-bit difference between two cuBLAS calls on the GPU
    cannot flip a near-tie; the GEMM itself is not what is under test."""
    if scoring == "softmax":
        weights, ids = moe_ref.topk_softmax(logits, top_k, renormalize)
        scores = torch.softmax(logits.float(), dim=-1)
    else:  # the sigmoid-scoring variant (DeepSeek-V3 style, without bias or groups)
        scores = torch.sigmoid(logits.float())
        weights, ids = torch.topk(scores, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids, scores


def _check_route(weights, ids, ref_weights, ref_scores, top_k, renormalize, tol=None):
    """Tie-tolerant: the chosen experts must carry the reference's top-k scores (in descending order)."""
    tol = tol or dict(rtol=1e-5, atol=1e-6)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.isfinite(weights).all()
    assert ((ids >= 0) & (ids < ref_scores.shape[1])).all()
    assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert was picked twice"
    picked = ref_scores.gather(1, ids.long())
    expected = torch.topk(ref_scores, top_k, dim=-1).values
    torch.testing.assert_close(picked, expected, **tol)
    torch.testing.assert_close(weights, ref_weights, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,hidden,experts,top_k,scoring,renormalize,shared",
    [
        (3, 2048, 256, 8, "softmax", True, "fused"),  # Qwen3.5-35B-A3B
        (2, 4096, 512, 10, "softmax", True, "fused"),  # Qwen3.5-397B
        (5, 72, 60, 7, "softmax", False, "separate"),
        (4, 64, 33, 5, "sigmoid", True, "none"),
        (3, 64, 16, 4, "sigmoid", False, "fused"),
        (2, 64, 16, 1, "softmax", False, "none"),  # k = 1: a single argmax (tl.topk needs k >= 2)
        (3, 64, 20, 2, "sigmoid", True, "fused"),
    ],
)
def test_route_topk(dtype, tokens, hidden, experts, top_k, scoring, renormalize, shared):
    gen = _gen(tokens * experts + top_k)
    x = _randn(tokens, hidden, gen=gen, dtype=dtype)
    router = _randn(experts, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    shared_gate = None if shared == "none" else _randn(1, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    concat = router if shared == "none" else moe_tk.concat_router_weights(router, shared_gate)
    args = (concat, None) if shared == "fused" else (router, shared_gate)
    with poisoned_outputs():
        weights, ids, gate = moe_tk.route_topk(x, *args, top_k, renormalize, scoring=scoring,
                                               fused_shared_gate=shared == "fused")
    logits = F.linear(x, concat)
    ref_w, _, scores = _reference_route(logits[:, :experts], top_k, renormalize, scoring)
    _check_route(weights, ids, ref_w, scores, top_k, renormalize)
    if shared == "none":
        assert gate is None
    else:
        assert gate.shape == (tokens, 1)
        _close(gate, torch.sigmoid(logits[:, experts:]), dtype)
        _close(gate, torch.sigmoid(F.linear(x, shared_gate)), torch.bfloat16)  # the unfused gate, loosely


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,hidden,experts,top_k,scoring,shared_as_expert",
    [
        (1, 2048, 256, 8, "softmax", True),  # Qwen3.5-35B-A3B decode, as the engine routes it
        (4, 4096, 512, 10, "softmax", False),  # Qwen3.5-397B, the most tokens of the single launch
        (3, 72, 61, 7, "sigmoid", True),  # odd sizes: rows not a multiple of the program's rows
        (5, 64, 16, 4, "softmax", True),  # more tokens than the single launch takes: the two-kernel path
    ],
)
def test_route_topk_single_launch(dtype, tokens, hidden, experts, top_k, scoring, shared_as_expert):
    """With a ticket, logits and top-k come from one kernel (up to 4 tokens); the last program routes and
    leaves the ticket at 0, so calls can follow each other (checked over three calls with new inputs)."""
    gen = _gen(tokens * experts + hidden)
    router = _randn(experts + 1, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)  # last row: shared gate
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out_k = top_k + int(shared_as_expert)
    for _ in range(3):
        x = _randn(tokens, hidden, gen=gen, dtype=dtype)
        with poisoned_outputs():
            weights, ids, gate = moe_tk.route_topk(x, router, None, top_k, True, scoring=scoring,
                                                   fused_shared_gate=True, shared_as_expert=shared_as_expert,
                                                   ticket=ticket)
        assert int(ticket.item()) == 0
        logits = F.linear(x, router)
        ref_w, _, scores = _reference_route(logits[:, :experts], top_k, True, scoring)
        assert weights.shape == ids.shape == (tokens, out_k)
        # The kernel's own GEMM may round a logit one bf16 ulp away from cuBLAS/torch: bf16 tolerance there.
        tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        _check_route(weights[:, :top_k], ids[:, :top_k], ref_w, scores, top_k, True, tol)
        want_gate = torch.sigmoid(logits[:, experts:])
        if shared_as_expert:
            assert gate is None
            assert (ids[:, top_k] == experts).all()
            _close(weights[:, top_k:], want_gate.float(), dtype)
        else:
            _close(gate, want_gate, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,experts,top_k,with_residual,router_tile", [
    (2048, 256, 8, True, None),
    (72, 61, 7, False, None),
    (2048, 256, 8, True, GemvTile(block_n=4, block_k=0, num_warps=1)),  # one warp per program: a sweep point
    (72, 61, 7, False, GemvTile(block_n=8, block_k=0, num_warps=2)),
])
def test_norm_route_topk(dtype, hidden, experts, top_k, with_residual, router_tile):
    """Post-attention norm + routing of one token in one kernel: the normed row and the new residual come out
    as the norm kernel writes them, the routing as route_topk of the normed row."""
    gen = _gen(hidden + experts)
    x = _randn(1, hidden, gen=gen, dtype=dtype)
    residual = _randn(1, hidden, gen=gen, dtype=dtype) if with_residual else None
    norm_weight = _randn(hidden, gen=gen, dtype=dtype, scale=0.1)
    router = _randn(experts + 1, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with poisoned_outputs():
        weights, ids, gate, h, new_res = moe_tk.norm_route_topk(x, residual, norm_weight, EPS, router, top_k, True,
                                                                 ticket, router_tile=router_tile)
    assert int(ticket.item()) == 0 and gate is None
    want_h, want_res = norm_ref.gemma_rms_norm_residual(x, residual, norm_weight, EPS)
    assert torch.equal(new_res, want_res)
    _close(h, want_h, dtype)
    logits = F.linear(want_h, router)
    ref_w, _, scores = _reference_route(logits[:, :experts], top_k, True, "softmax")
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    _check_route(weights[:, :top_k], ids[:, :top_k], ref_w, scores, top_k, True, tol)
    assert (ids[:, top_k] == experts).all()
    _close(weights[:, top_k:], torch.sigmoid(logits[:, experts:]).float(), dtype)


@pytest.mark.parametrize("ticket", [False, True])
def test_route_topk_ties_pick_the_lowest_ids(ticket):
    """Equal scores rank the lower expert id first (as the sort keys promise): with identical router rows all
    logits tie, so the picks are experts 0..k-1 with equal weights; and a later expert that beats the rest wins."""
    experts, hidden, top_k = 40, 32, 6
    x = torch.ones(1, hidden, device=DEVICE)
    router = torch.full((experts + 1, hidden), 0.01, device=DEVICE)
    router[33] = 0.02  # expert 33 scores highest, then the ties
    kwargs = dict(ticket=torch.zeros(1, dtype=torch.int32, device=DEVICE)) if ticket else {}
    weights, ids, _ = moe_tk.route_topk(x, router, None, top_k, True, fused_shared_gate=True, **kwargs)
    assert ids.tolist() == [[33, 0, 1, 2, 3, 4]]
    assert weights[0, 0] > weights[0, 1] and torch.equal(weights[0, 1:], weights[0, 1:2].expand(top_k - 1))


def test_route_topk_through_a_router_padded_to_eight_rows():
    """A router stored with rows up to a multiple of 8 after it (as the model allocates it: 257 -> 264 rows at
    35B-A3B, for an aligned cuBLAS kernel) routes as the same weight without them, whatever the pad rows hold; a
    weight whose storage holds no such rows, or whose row count is already a multiple of 8, is used as it is."""
    experts, hidden, top_k, tokens = 40, 32, 4, 9  # 41 rows -> 48; more tokens than the single-launch router
    gen = torch.Generator().manual_seed(5)
    plain = torch.randn(experts + 1, hidden, generator=gen).to(DEVICE)
    storage = torch.full((48, hidden), float("nan"), device=DEVICE)  # pad rows never read into results
    storage[: experts + 1] = plain
    padded = storage[: experts + 1]
    view = moe_tk.padded_router_rows(padded)
    assert view.shape == (48, hidden) and view.data_ptr() == padded.data_ptr()
    assert moe_tk.padded_router_rows(plain) is plain and moe_tk.padded_router_rows(storage) is storage
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    weights, ids, gate = moe_tk.route_topk(x, plain, None, top_k, True, fused_shared_gate=True)
    padded_weights, padded_ids, padded_gate = moe_tk.route_topk(x, padded, None, top_k, True, fused_shared_gate=True)
    # A GEMM of another width may block its sums differently: equal up to rounding, the same experts.
    assert torch.equal(padded_ids, ids)
    torch.testing.assert_close(padded_weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_gate, gate, rtol=1e-5, atol=1e-6)


def test_route_topk_argument_checks():
    x = torch.randn(2, 16, device=DEVICE)
    router = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        moe_tk.route_topk(x, router, None, 9, True)
    with pytest.raises(ValueError, match="shared_gate_weight=None"):
        moe_tk.route_topk(x, router, router[:1], 2, True, fused_shared_gate=True)
    with pytest.raises(ValueError, match="scoring"):
        moe_tk.route_topk(x, router, None, 2, True, scoring="relu")
    with pytest.raises(ValueError, match="ticket"):
        moe_tk.route_topk(x, router, None, 2, True, ticket=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="one contiguous token"):
        moe_tk.norm_route_topk(x, None, torch.zeros(16, device=DEVICE), EPS, router, 2, True,
                               torch.zeros(1, dtype=torch.int32, device=DEVICE))


# ----------------------------------------------------------------------------------- block alignment


def _check_alignment(topk_ids, block_m, experts, sorted_ids, expert_ids, num_post):
    num_pairs = topk_ids.numel()
    flat = topk_ids.flatten().long().cpu()
    sorted_ids, expert_ids = sorted_ids.long().cpu(), expert_ids.long().cpu()
    total = int(num_post.item())
    counts = torch.bincount(flat, minlength=experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert total <= sorted_ids.numel() and total % block_m == 0
    live = sorted_ids[:total]
    real = live[live < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs)), "every pair exactly once"
    assert (live[live >= num_pairs] == num_pairs).all() and (sorted_ids[total:] == num_pairs).all()
    for block in range(total // block_m):
        rows = live[block * block_m:(block + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert rows.numel() > 0, "a live block without pairs"
        assert (flat[rows] == expert_ids[block]).all(), "a block mixes experts"
    # Stable order: the torch reference's argsort(stable=True).
    assert torch.equal(real, torch.argsort(flat, stable=True))


@pytest.mark.parametrize(
    "tokens,top_k,experts,block_m",
    [(1, 8, 256, 16), (4, 10, 512, 16), (37, 3, 11, 32), (64, 8, 16, 64), (600, 8, 64, 64), (64, 9, 257, 16),
     (256, 9, 257, 32), (29, 9, 257, 16)],
)
def test_moe_align_block_size(tokens, top_k, experts, block_m):
    """The Triton paths (one program up to 256 pairs, many up to 4096: batched decode of 35B-A3B with its shared
    expert is 9 pairs a token) and the blocked one (larger: 4,800 pairs here) against the invariants and against
    the torch alignment, the reference."""
    gen = _gen(tokens * top_k)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_ids = topk_ids.to(torch.int32).to(DEVICE)
    with poisoned_outputs():
        result = moe_tk.moe_align_block_size(topk_ids, block_m, experts)
    _check_alignment(topk_ids, block_m, experts, *result)
    num_pairs = topk_ids.numel()
    max_padded, max_blocks = moe_tk._padded_sizes(num_pairs, experts, block_m)
    other = moe_tk._moe_align_torch(topk_ids.flatten(), block_m, experts, max_padded, max_blocks)
    total = int(result[2].item())
    assert torch.equal(result[0], other[0]) and torch.equal(result[2], other[2])
    assert torch.equal(result[1][: total // block_m], other[1][: total // block_m])
    # The blocked Triton alignment for prefill-sized batches (several programs of 256 pairs here) gives the torch
    # alignment's result bit for bit, its extra outputs included.
    blocked = moe_tk._moe_align_blocked(topk_ids.flatten(), block_m, experts, max_padded, max_blocks, block_pairs=256)
    for got, want in zip(blocked, other, strict=True):
        assert torch.equal(got, want)
    # The grouped GEMM's offsets and each pair's slot (the grouped_mm down path).
    group_ends, slots = other[3].long().cpu(), other[4].long().cpu()
    counts = torch.bincount(topk_ids.flatten().long().cpu(), minlength=experts)
    assert torch.equal(group_ends, torch.cumsum((counts + block_m - 1) // block_m * block_m, 0))
    assert torch.equal(other[0].long().cpu()[slots], torch.arange(num_pairs)), "slot of pair p holds p"
    owner = torch.searchsorted(group_ends, slots, right=True)  # the group each slot falls in
    assert torch.equal(owner, topk_ids.flatten().long().cpu()), "each pair's slot lies in its expert's group"


# --------------------------------------------------------------------------------------------- experts


def _expert_inputs(tokens, hidden, inter, experts, top_k, dtype, seed):
    gen = _gen(seed)
    x = _randn(tokens, hidden, gen=gen, dtype=dtype)
    w13 = _randn(experts, 2 * inter, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    w2 = _randn(experts, hidden, inter, gen=gen, dtype=dtype, scale=inter**-0.5)
    logits = torch.randn(tokens, experts, generator=gen).to(DEVICE)
    weights, ids = moe_ref.topk_softmax(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids.to(torch.int32)


# Big tiles keep the interpreter's program count (its main cost) down. They need more shared memory than a
# GPU has (two 128x256 weight tiles per stage), so on a GPU the real shape runs with the default config.
_BIG_TILES = moe_tk.MoeConfig(16, moe_tk.GemmTile(128, 256), moe_tk.GemmTile(256, 256)) if DEVICE == "cpu" else None
_SMALL_TILES = moe_tk.MoeConfig(16, moe_tk.GemmTile(16, 32), moe_tk.GemmTile(32, 16, group_m=4))
# The matrix-vector (decode) path: wide tiles for the interpreter, the default on a GPU.
_GEMV_BIG = moe_tk.GemvConfig(128, 512) if DEVICE == "cpu" else None


@pytest.mark.parametrize(
    "dtype,tokens,hidden,inter,experts,top_k,config",
    [
        # Real expert GEMM shape (Qwen3.5-35B-A3B: hidden 2048, moe_intermediate 512), bf16 only and few experts:
        # the interpreter's cost is per weight element read (the 397B shapes are left to the benchmark).
        (torch.bfloat16, 1, 2048, 512, 3, 2, _BIG_TILES),
        # The same through the matrix-vector path (the default for decode-sized batches).
        (torch.bfloat16, 1, 2048, 512, 3, 2, _GEMV_BIG),
        # Matrix-vector path with odd sizes (partial K and N tiles), default config: 9 pairs.
        (torch.float32, 3, 72, 40, 6, 3, None),
        (torch.bfloat16, 3, 72, 40, 6, 3, None),
        (torch.bfloat16, 3, 72, 40, 6, 3, moe_tk.GemvConfig(8, 32)),
        (torch.bfloat16, 3, 72, 40, 6, 3, moe_tk.GemvConfig(4, 0)),  # the whole K as one tile
        # Odd sizes (K and N not multiples of the tiles) with the default (grouped: 39 pairs) config, both dtypes.
        (torch.float32, 13, 72, 40, 6, 3, None),
        (torch.bfloat16, 13, 72, 40, 6, 3, None),
        # Several blocks per expert, grouped program order, partial N tiles.
        (torch.float32, 40, 64, 48, 4, 2, _SMALL_TILES),
        (torch.bfloat16, 40, 64, 48, 4, 2, _SMALL_TILES),
    ],
)
def test_fused_experts(dtype, tokens, hidden, inter, experts, top_k, config):
    x, w13, w2, weights, ids = _expert_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=tokens * hidden)
    # Experts nobody picked get NaN weights: reading them (or mixing them into a block) poisons the output.
    unused = torch.ones(experts, dtype=torch.bool, device=DEVICE)
    unused[ids.flatten().long()] = False
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    with poisoned_outputs():
        out = moe_tk.fused_experts(x, w13, w2, weights, ids, config=config)
    ref = moe_ref.fused_experts(x, w13, w2, weights, ids.long())
    _close(out, ref, dtype)


def _grouped_mm_config(base: moe_tk.MoeConfig | None) -> moe_tk.MoeConfig:
    return dataclasses.replace(base or moe_tk.default_moe_config(1024, 9, 257), down_grouped_mm=True)


_PREFILL = moe_tk.default_moe_config(65536, 9, 257)  # the prefill-chunk tier
_PREFILL_TMA = dataclasses.replace(_PREFILL, gate_up=dataclasses.replace(_PREFILL.gate_up, tma=True))


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k,config",
    [
        # Several blocks per expert and partial N tiles (H, I multiples of 8, as the grouped GEMM needs).
        (40, 64, 48, 4, 2, _grouped_mm_config(_SMALL_TILES)),
        # An expert nobody routes to (an empty group) among many; BLOCK_M 32.
        (24, 32, 16, 12, 3, _grouped_mm_config(dataclasses.replace(_SMALL_TILES, block_m=32))),
        # Gate/up weight tiles through a TMA descriptor; K (72) not a multiple of the K step (32).
        (40, 72, 48, 4, 2, _grouped_mm_config(dataclasses.replace(
            _SMALL_TILES, gate_up=dataclasses.replace(_SMALL_TILES.gate_up, tma=True)))),
        # 35B-A3B's expert shape with the shared expert as a 9th column of every token: on a GPU with the
        # default configuration, which takes the grouped GEMM by itself above 4096 pairs; under the interpreter
        # with the big tiles, forced, and fewer tokens and experts.
        *([(1024, 2048, 512, 257, 9, None), (1024, 2048, 512, 257, 9, _PREFILL_TMA)] if DEVICE == "cuda" else
          [(6, 2048, 512, 5, 3, _grouped_mm_config(_BIG_TILES))]),
    ],
)
def test_fused_experts_down_as_grouped_mm(tokens, hidden, inter, experts, top_k, config):
    """bf16 prefill chunks: gate/up writes activations in the sorted order, torch's grouped GEMM does the down
    projection, the k-sum applies the routing weights through each pair's slot. Against the reference, and
    on a GPU against the Triton down kernel on the same inputs. Unused experts' weights are NaN."""
    x, w13, w2, weights, ids = _expert_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16,
                                              seed=tokens + experts)
    if top_k == 9:  # the serving layout: 8 routed experts, then the shared one (the stacks' last) for every token
        routed = torch.stack([torch.randperm(experts - 1, generator=_gen(t))[:8] for t in range(tokens)])
        ids = torch.cat([routed, torch.full((tokens, 1), experts - 1)], dim=1).to(torch.int32).to(DEVICE)
    unused = torch.ones(experts, dtype=torch.bool, device=DEVICE)
    unused[ids.flatten().long()] = False
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    if config is None:
        assert moe_tk.grouped_mm_down_supported(x, w2), "the H200/B200 test machines run the grouped GEMM"
    with poisoned_outputs():
        out = moe_tk.fused_experts(x, w13, w2, weights, ids, config=config)
    _close(out, moe_ref.fused_experts(x, w13, w2, weights, ids.long()), torch.bfloat16)
    if DEVICE == "cuda":
        triton_down = dataclasses.replace(config or moe_tk.default_moe_config(tokens, top_k, experts),
                                          down_grouped_mm=False)
        _close(out, moe_tk.fused_experts(x, w13, w2, weights, ids, config=triton_down), torch.bfloat16)
        with pytest.raises(ValueError, match="down_grouped_mm"):
            moe_tk.fused_experts(x.float(), w13.float(), w2.float(), weights, ids,
                                 config=_grouped_mm_config(config))


@pytest.mark.parametrize(
    "dtype,tokens,hidden,inter,experts,top_k,config",
    [
        (torch.float32, 13, 72, 40, 6, 3, None),  # grouped (39 pairs): the k-sum takes the norm; partial lanes
        (torch.bfloat16, 13, 72, 40, 6, 3, None),
        (torch.bfloat16, 40, 64, 48, 4, 2, _grouped_mm_config(_SMALL_TILES)),  # the k-sum through the slots
        (torch.bfloat16, 3, 72, 40, 6, 3, None),  # matrix-vector (9 pairs): no norm, the plain output
    ],
)
def test_fused_experts_then_norm(dtype, tokens, hidden, inter, experts, top_k, config):
    """``then_norm``: the grouped path's k-sum applies the residual add and the next Gemma RMSNorm, bit for bit
    what the norm kernel does to the plain output (and close to the torch reference); the matrix-vector path
    returns the plain output."""
    x, w13, w2, weights, ids = _expert_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=7 * tokens)
    gen = _gen(tokens)
    residual = _randn(tokens, hidden, gen=gen, dtype=dtype)
    norm_weight = _randn(hidden, gen=gen, dtype=dtype, scale=0.1)
    plain = moe_tk.fused_experts(x, w13, w2, weights, ids, config=config)
    with poisoned_outputs():
        got = moe_tk.fused_experts(x, w13, w2, weights, ids, config=config,
                                   then_norm=moe_tk.ResidualNorm(residual, norm_weight, 1e-6))
    if tokens * top_k <= moe_tk._GEMV_MAX_PAIRS:
        assert isinstance(got, torch.Tensor) and torch.equal(got, plain)
        return
    h, new_residual = got
    want_h, want_residual = norm_tk.gemma_rms_norm_residual(plain, residual, norm_weight, 1e-6)
    assert torch.equal(new_residual, want_residual)
    assert torch.equal(h, want_h)
    ref_h, ref_residual = norm_ref.gemma_rms_norm_residual(plain, residual, norm_weight, 1e-6)
    _close(h, ref_h, dtype)
    _close(new_residual, ref_residual, dtype)


@pytest.mark.parametrize(
    "dtype,tokens,hidden,inter,config",
    [
        (torch.bfloat16, 1, 2048, 512, _GEMV_BIG),  # 35B-A3B's expert shape
        (torch.float32, 3, 72, 40, None),  # odd sizes: partial N tiles, K and I below their power-of-two tiles
        (torch.bfloat16, 2, 72, 40, moe_tk.GemvConfig(8, 32, down_block_n=4, down_num_warps=2)),
    ],
)
def test_fused_experts_shared_last(dtype, tokens, hidden, inter, config):
    """``shared_last``: every token's last column is the shared expert (the stacks' last, E - 1), computed from
    weights loaded before the PDL wait and without reading that column's id. The id there is set to an expert
    whose weights are NaN: reading it would poison the output."""
    experts, top_k = 6, 3
    x, w13, w2, weights, ids = _expert_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=hidden + tokens)
    shared = experts - 1
    routed = torch.stack([torch.randperm(shared, generator=_gen(t))[:top_k - 1] for t in range(tokens)])
    ids = torch.cat([routed, torch.full((tokens, 1), shared)], dim=1).to(torch.int32).to(DEVICE)
    unused = torch.ones(experts, dtype=torch.bool, device=DEVICE)
    unused[ids.flatten().long()] = False
    poisoned = int(unused.nonzero()[0])
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    ref = moe_ref.fused_experts(x, w13, w2, weights, ids.long())
    ids_read_elsewhere = ids.clone()
    ids_read_elsewhere[:, -1] = poisoned
    with poisoned_outputs():
        out = moe_tk.fused_experts(x, w13, w2, weights, ids_read_elsewhere, config=config, shared_last=True)
    _close(out, ref, dtype)


def test_fused_experts_after_route_topk_bf16():
    """The serving path end to end on one layer: fused router GEMM + top-k, then the experts."""
    tokens, hidden, inter, experts, top_k = 4, 128, 64, 16, 4
    gen = _gen(5)
    x = _randn(tokens, hidden, gen=gen, dtype=torch.bfloat16)
    router = _randn(experts, hidden, gen=gen, dtype=torch.bfloat16, scale=hidden**-0.5)
    shared_gate = _randn(1, hidden, gen=gen, dtype=torch.bfloat16, scale=hidden**-0.5)
    w13 = _randn(experts, 2 * inter, hidden, gen=gen, dtype=torch.bfloat16, scale=hidden**-0.5)
    w2 = _randn(experts, hidden, inter, gen=gen, dtype=torch.bfloat16, scale=inter**-0.5)
    fused = moe_tk.concat_router_weights(router, shared_gate)
    with poisoned_outputs():
        weights, ids, gate = moe_tk.route_topk(x, fused, None, top_k, True, fused_shared_gate=True)
        out = moe_tk.fused_experts(x, w13, w2, weights, ids)
    logits = F.linear(x, fused)  # the same GEMM route_topk ran (see _reference_route)
    ref_w, ref_ids = moe_ref.topk_softmax(logits[:, :experts], top_k, True)
    ref = moe_ref.fused_experts(x, w13, w2, ref_w, ref_ids)
    _close(out, ref, torch.bfloat16)
    _close(gate, torch.sigmoid(logits[:, experts:]), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_expert_as_expert_e_matches_reference(dtype):
    """The serving path for a shared expert of the experts' shape: route_topk appends it as column k (id E,
    weight = its gate) and fused_experts computes it with the routed experts. Reference: routed experts plus
    the separately computed, sigmoid-gated shared MLP (services.engine.ops.moe_with_shared_expert_torch)."""
    from services.engine.ops import moe_with_shared_expert_torch

    tokens, hidden, inter, experts, top_k = 5, 128, 64, 16, 4
    gen = _gen(11)
    x = _randn(tokens, hidden, gen=gen, dtype=dtype)
    router = _randn(experts + 1, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)  # last row: shared gate
    w13 = _randn(experts + 1, 2 * inter, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5)
    w2 = _randn(experts + 1, hidden, inter, gen=gen, dtype=dtype, scale=inter**-0.5)
    with poisoned_outputs():
        weights, ids, gate = moe_tk.route_topk(x, router, None, top_k, True, fused_shared_gate=True,
                                               shared_as_expert=True)
        out = moe_tk.fused_experts(x, w13, w2, weights, ids)
    assert gate is None and ids.shape == (tokens, top_k + 1) and (ids[:, -1] == experts).all()
    assert (ids[:, :-1] < experts).all()
    logits = F.linear(x, router)
    _close(weights[:, -1], torch.sigmoid(logits[:, -1]).float(), dtype)
    _close(out, moe_with_shared_expert_torch(x, router, w13, w2, top_k, True), dtype)
    with pytest.raises(ValueError, match="shared-expert gate"):
        moe_tk.route_topk(x, router[:-1], None, top_k, True, shared_as_expert=True)


def test_fused_experts_argument_checks():
    x = torch.randn(2, 16, device=DEVICE)
    w13 = torch.randn(4, 2 * 8, 16, device=DEVICE)
    w2 = torch.randn(4, 16, 8, device=DEVICE)
    ids = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    weights = torch.ones(2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe_tk.fused_experts(x, w13, w2.transpose(1, 2), weights, ids)
    with pytest.raises(ValueError, match="dtype"):
        moe_tk.fused_experts(x, w13.double(), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_tk.fused_experts(x, w13, w2, weights[:1], ids)
    with pytest.raises(ValueError, match="block_m"):
        moe_tk.moe_align_block_size(ids, 24, 4)

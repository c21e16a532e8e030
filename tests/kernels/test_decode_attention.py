"""The Triton paged decode attention (kernels.triton.decode_attention) against the torch reference
(kernels.attention.paged_attention): one query token per sequence at the end of its keys, pages scattered through
the pool, sequences whose pages take one split or several (the merge by the last program), fp8 pages with scales,
and the tickets back at 0 after every launch."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import paged_attention, quantize_fp8
from kernels.triton.decode_attention import DecodeAttentionScratch, DecodeShape, decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def _case(kv_lens: list[int], heads: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
          seed: int, fp8: bool = False):
    """Random pages for sequences of ``kv_lens`` tokens, each sequence's pages drawn at random from the pool;
    returns the reference's and the kernel's inputs."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages) + 3
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    tables, start = [], 0
    for count in pages:
        tables.append(order[start:start + count])
        start += count
    cache = torch.randn(num_pages, 2, page_size, kv_heads, head_dim, generator=gen)
    q = torch.randn(len(kv_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    if fp8:
        cache = quantize_fp8(cache, 0.5)
    else:
        cache = cache.to(dtype)
    cache = cache.to(DEVICE)
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    indices = torch.cat(tables).to(DEVICE)
    last = torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32).to(DEVICE)
    return q, cache, [t.to(DEVICE).long() for t in tables], indptr, indices, last


# The software-pipelined page loop on the GPU (the interpreter runs every loop unpipelined).
@pytest.mark.parametrize("num_stages", [0, 5] if DEVICE == "cuda" else [0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_lens,max_splits,min_pages,tile_pages", [
    ([1, 17, 40], 4, 1, 1),  # a one-token sequence, a token into a second page, several splits of one page
    ([33], 1, 4, 4),  # one split: the output written directly; a tile past the last page
    ([200, 5, 64], 8, 2, 2),  # long and short sequences in one launch; a full last page
    ([130, 129], 2, 1, 4),  # more pages than splits: the split size grows with the sequence
    ([600, 20], 32, 1, 1),  # 19 splits: the merge runs past its first chunk of 16, rescaling it
])
def test_decode_attention_matches_the_reference(dtype, kv_lens, max_splits, min_pages, tile_pages, num_stages):
    heads, kv_heads, head_dim, page_size = 8, 2, 32, 16
    q, cache, tables, indptr, indices, last = _case(kv_lens, heads, kv_heads, head_dim, page_size, dtype,
                                                    seed=sum(kv_lens) + max_splits)
    scratch = DecodeAttentionScratch.new(len(kv_lens), kv_heads, heads // kv_heads, head_dim, max_splits, q.device)
    scale = head_dim**-0.5
    want = paged_attention(q.float(), cache.float(), tables, [1] * len(kv_lens), kv_lens, scale)
    for _ in range(2):  # the tickets are back at 0 for the next launch
        got = decode_attention(q, cache, indptr, indices, last, scale, scratch, min_pages=min_pages,
                               tile_pages=tile_pages, num_stages=num_stages)
        assert got.shape == q.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **TOL[dtype])
        assert int(scratch.tickets.abs().sum()) == 0


@pytest.mark.parametrize("hot_token", [599, 0])
def test_merge_rescales_what_earlier_chunks_added(hot_token):
    """19 splits, merged 16 at a time: a key matching every query of its group at the last token (the second
    chunk raises the running max, so the first chunk's sums must be rescaled) or at the first (it does not)."""
    kv_lens, heads, kv_heads, head_dim, page_size = [600], 8, 2, 32, 16
    q, cache, tables, indptr, indices, last = _case(kv_lens, heads, kv_heads, head_dim, page_size, torch.float32,
                                                    seed=11)
    group = heads // kv_heads
    page = int(tables[0][hot_token // page_size])
    cache[page, 0, hot_token % page_size] = 2 * q[0].unflatten(0, (kv_heads, group)).sum(1)
    scratch = DecodeAttentionScratch.new(1, kv_heads, group, head_dim, 32, q.device)
    scale = head_dim**-0.5
    got = decode_attention(q, cache, indptr, indices, last, scale, scratch, min_pages=2, tile_pages=1)
    want = paged_attention(q, cache, tables, [1], kv_lens, scale)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_decode_attention_over_fp8_pages_with_scales():
    """k_scale folds into the softmax scale and v_scale scales the output: the reference over the same fp8 pages
    with the same scales (Qwen3.5's head_dim 256 and a GQA group of 8, as in 35B-A3B)."""
    kv_lens, heads, kv_heads, head_dim = [50, 7], 16, 2, 256
    q, cache, tables, indptr, indices, last = _case(kv_lens, heads, kv_heads, head_dim, 16, torch.bfloat16, seed=3,
                                                    fp8=True)
    scratch = DecodeAttentionScratch.new(2, kv_heads, heads // kv_heads, head_dim, 2, q.device)
    scale = head_dim**-0.5
    got = decode_attention(q, cache, indptr, indices, last, scale, scratch, k_scale=0.5, v_scale=0.25, min_pages=1)
    want = paged_attention(q.float(), cache, tables, [1, 1], kv_lens, scale, k_scale=0.5, v_scale=0.25)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


def test_decode_attention_argument_checks():
    q = torch.zeros(2, 8, 32, device=DEVICE)
    cache = torch.zeros(4, 2, 16, 2, 32, device=DEVICE)
    indptr = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    last = torch.ones(2, dtype=torch.int32, device=DEVICE)
    scratch = DecodeAttentionScratch.new(1, 2, 4, 32, 2, q.device)
    with pytest.raises(ValueError, match="fewer than 2 sequences"):
        decode_attention(q, cache, indptr, indptr[:2], last, 1.0, scratch)
    with pytest.raises(ValueError, match="power of two >= 16"):
        decode_attention(q, torch.zeros(4, 2, 8, 2, 32, device=DEVICE), indptr, indptr[:2], last, 1.0, scratch)
    with pytest.raises(ValueError, match="indptr"):
        decode_attention(q, cache, indptr[:2], indptr[:2], last, 1.0, scratch)
    with pytest.raises(ValueError, match="max_splits"):
        DecodeAttentionScratch.new(1, 2, 4, 32, 3, q.device)


def test_decode_attention_fused_argument_checks():
    """The fused entry refuses, before any launch, what the QK-norm/RoPE kernel would refuse."""
    from kernels.triton.decode_attention import FusedInputs, decode_attention_fused

    heads, kv_heads, d = 8, 2, 32
    cache = torch.zeros(4, 2, 16, kv_heads, d, device=DEVICE)
    indptr = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    last = torch.ones(2, dtype=torch.int32, device=DEVICE)
    scratch = DecodeAttentionScratch.new(2, kv_heads, heads // kv_heads, d, 2, cache.device)
    w, ids = torch.zeros(d, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE)
    qkv = torch.zeros(2, (2 * heads + 2 * kv_heads) * d, device=DEVICE)
    cos_sin = torch.zeros(8, 16, device=DEVICE)

    def call(qkv=qkv, cache=cache, cos_sin=cos_sin, positions=ids, k_scale=1.0):
        decode_attention_fused(FusedInputs(qkv, w, w, cos_sin, positions, ids, 1e-6), heads, cache, indptr,
                               indptr[:2], last, 1.0, scratch, k_scale=k_scale)

    with pytest.raises(ValueError, match="features"):
        call(qkv=qkv[:, :-d])
    with pytest.raises(ValueError, match="qkv's torch.float32 or fp8"):
        call(cache=cache.bfloat16())
    with pytest.raises(ValueError, match="positive scales"):
        call(cache=cache.to(torch.float8_e4m3fn), k_scale=0.0)
    with pytest.raises(ValueError, match="cos/sin cache"):
        call(cos_sin=torch.zeros(8, 3, device=DEVICE))
    with pytest.raises(ValueError, match="positions"):
        call(positions=ids[:1])


# On the GPU also the engine's pipelined shape (the interpreter runs every loop unpipelined).
@pytest.mark.parametrize("num_stages", [0, 5] if DEVICE == "cuda" else [0])
@pytest.mark.parametrize("dtype,fp8,kv_lens,max_splits", [
    (torch.float32, False, [1, 40, 200], 8),  # a first token; a new token starting a page; several splits
    (torch.bfloat16, False, [33, 16], 4),  # a new token on a full last page; one split
    (torch.bfloat16, True, [70, 9], 4),  # an fp8 cache: K/V quantized with the scales on the way in
    (torch.bfloat16, False, [900, 300], 32),  # up to 29 splits: the merge past its first chunk
])
def test_fused_decode_attention_equals_the_three_kernels(dtype, fp8, kv_lens, max_splits, num_stages):
    """QK-norm, RoPE, the K/V store, the attention and the output gate in one launch: the same cache bytes and
    the same output as the QK-norm/RoPE kernel, then the attention kernel, then ``out * sigmoid(gate)``; and
    close to the torch path (ops.qk_norm_rope_store_kv_torch, paged_attention, the gate)."""
    from kernels.rope import rope_cos_sin_cache
    from kernels.triton.decode_attention import FusedInputs, decode_attention_fused
    from kernels.triton.qk_norm_rope import qk_norm_rope
    from services.engine.ops import qk_norm_rope_store_kv_torch

    heads, kv_heads, head_dim, page_size = 8, 2, 32, 16
    _, cache, tables, indptr, indices, last = _case(kv_lens, heads, kv_heads, head_dim, page_size, dtype, seed=5,
                                                    fp8=fp8)
    gen = torch.Generator().manual_seed(len(kv_lens))
    batch = len(kv_lens)
    qkv = torch.randn(batch, (2 * heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q_w, k_w = ((0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE) for _ in range(2))
    cos_sin = rope_cos_sin_cache(head_dim // 2, 1024, 10000.0, DEVICE)  # partial RoPE: half of each head rotates
    positions = torch.tensor([n - 1 for n in kv_lens], device=DEVICE)
    slots = torch.stack([t[(n - 1) // page_size] * page_size + (n - 1) % page_size
                         for t, n in zip(tables, kv_lens, strict=True)])
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    scale = head_dim**-0.5

    three_cache = cache.clone()
    q, _, _, gate = qk_norm_rope(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, 1e-6,
                                 kv_cache=three_cache, kv_slot_ids=slots, k_scale=k_scale, v_scale=v_scale)
    scratch = DecodeAttentionScratch.new(batch, kv_heads, heads // kv_heads, head_dim, max_splits, q.device)
    attn = decode_attention(q, three_cache, indptr, indices, last, scale, scratch, k_scale=k_scale, v_scale=v_scale,
                            min_pages=1, num_stages=num_stages, prefetch_pages=0 if num_stages else 4)
    want = attn * gate.view(batch, heads, head_dim)

    fused_cache = cache.clone()
    inputs = FusedInputs(qkv, q_w, k_w, cos_sin, positions, slots, 1e-6)
    for _ in range(2):  # the tickets back at 0; storing the same K/V again changes nothing
        got = decode_attention_fused(inputs, heads, fused_cache, indptr, indices, last, scale, scratch,
                                     k_scale=k_scale, v_scale=v_scale,
                                     shape=DecodeShape(min_pages=1, num_stages=num_stages,
                                                       prefetch_pages=0 if num_stages else 4))
        if DEVICE == "cuda" and dtype == torch.float32:
            # On a GPU each kernel reduces a head's sum of squares in the order of its own thread layout (the
            # QK-norm/RoPE kernel's head blocks, the fused kernel's GQA group), and fp32 keeps the last bits
            # that a bf16 rounding of the normed values would absorb: equal to a few ulps, not bit for bit.
            # (The interpreter sums in one order: bit-equal there, as the bf16 and fp8 cases are everywhere.)
            torch.testing.assert_close(fused_cache, three_cache, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(fused_cache.view(torch.uint8), three_cache.view(torch.uint8))
            assert torch.equal(got, want)
        assert int(scratch.tickets.abs().sum()) == 0

    torch_cache = cache.clone()
    q_ref, gate_ref = qk_norm_rope_store_kv_torch(qkv, q_w, k_w, cos_sin, positions, heads, kv_heads, head_dim, 1e-6,
                                                  torch_cache, slots, k_scale, v_scale)
    ref = paged_attention(q_ref.float(), torch_cache if fp8 else torch_cache.float(), tables, [1] * batch, kv_lens,
                          scale, k_scale=k_scale, v_scale=v_scale) * gate_ref.view(batch, heads, head_dim).float()
    torch.testing.assert_close(got.float(), ref, **TOL[dtype])

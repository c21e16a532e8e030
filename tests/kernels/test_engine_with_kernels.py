"""The engine with the Triton kernel set against the torch path: same logits, same greedy tokens, and the
prefix cache's checkpoints (taken inside the kernels) still give exact hits. On CPU the kernels run under
Triton's interpreter, so this covers the glue between model and kernels in CI; on a GPU, the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.request import SamplingParams
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine, rel_err
from tests.hf_models import kv_scales, with_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _engine(checkpoint: str, kernels: str, **kw):
    return cpu_engine(checkpoint, kernels=kernels, device=DEVICE, checkpoint_interval=16, prefill_chunk_size=48, **kw)


def test_triton_kernels_match_torch_path(tiny_checkpoint):
    prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    reference, triton = _engine(tiny_checkpoint, "torch"), _engine(tiny_checkpoint, "triton")
    logits = []
    for engine in (reference, triton):
        seq = DirectSequence(engine)
        logits.append(torch.cat([seq.forward(prompt[:45]), seq.forward(prompt[45:]), seq.forward([7])]))
        seq.close()
    assert rel_err(logits[1], logits[0]) < 1e-4

    params = SamplingParams(max_tokens=4, temperature=0)
    prompts = [prompt, prompt[:40] + [1, 2, 3]]
    expected = [c.token_ids for c in reference.generate(prompts, params)]
    assert [c.token_ids for c in triton.generate(prompts, params)] == expected
    # A follow-up that starts from a checkpoint the kernels wrote.
    follow = prompt + expected[0] + [5, 6, 7]
    [hit] = triton.generate([follow], params)
    [want] = reference.generate([follow], params)
    assert hit.num_cached_tokens >= 64 and hit.token_ids == want.token_ids
    assert_no_leaks(triton)


def test_triton_kernels_match_torch_path_with_fp8_kv(tiny_checkpoint, tmp_path):
    """The fp8 KV cache through the Triton QK-norm/RoPE kernel (quantizing on write, with scales from the
    checkpoint) against the torch path's fp8 cache, over two prefill chunks and a decode step: the same codes in
    the pages and the same logits. The kernel quantizes exactly as the reference (tests/kernels/
    test_norm_rope_moe_kernels.py), but the k and v it quantizes come through the Triton GDN and MoE kernels,
    ~1e-6 away from the torch path's in fp32: now and then one sits on an fp8 rounding boundary and lands on the
    neighbouring code (2 of 18,176 on CPU, in the second attention layer), which a wrong scale, a wrong slot or
    unsaturated values would not resemble."""
    path = with_tensors(Path(tiny_checkpoint), tmp_path / "scaled", kv_scales({3: (0.05, 0.02), 7: (0.5, 0.25)}))
    prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    reference, triton = (_engine(path, kernels, kv_cache_dtype="fp8_e4m3") for kernels in ("torch", "triton"))
    assert triton.runner.kv_cache.k_scales == pytest.approx([0.05, 0.5], rel=1e-7)  # fp32 values
    logits, pages = [], []
    for engine in (reference, triton):
        seq = DirectSequence(engine)
        logits.append(torch.cat([seq.forward(prompt[:45]), seq.forward(prompt[45:]), seq.forward([7])]))
        ids = torch.tensor(seq.request.page_ids, device=engine.runner.device)
        written = engine.runner.kv_cache.buffer[:, ids].transpose(1, 2).flatten(2, 3)[:, :, :len(prompt) + 1]
        pages.append(written.view(torch.uint8).int())  # [layers, K/V, tokens, heads, head_dim]
        seq.close()
    codes = (pages[0] - pages[1]).abs()
    print(f"\nfp8 pages: {int((codes > 0).sum())} of {codes.numel()} codes differ (max by {int(codes.max())}) per "
          f"layer {(codes > 0).flatten(1).sum(1).tolist()}; logits rel err {rel_err(logits[1], logits[0]):.2e}")
    assert codes.max() <= 1 and (codes > 0).float().mean() < 1e-3
    assert rel_err(logits[1], logits[0]) < 1e-4


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_fused_triton_decode_attention_matches_torch_path(tiny_checkpoint, kv_cache_dtype):
    """``decode_attention=triton``: decode steps run the attention layer's QK-norm, RoPE, K/V store, attention and
    gate as one Triton launch from the qkv rows (prefill stays on the set's own attention). Three requests decode
    together (ragged contexts, one crossing a page): the same greedy tokens and logprobs as the torch path. Over
    an fp8 cache against the plain Triton set, which quantizes the same k/v into the same codes (against the torch
    path a code now and then lands on its neighbour: see the fp8 test above)."""
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 15, 33)]
    settings = dict(page_size=16, kv_cache_dtype=kv_cache_dtype)
    reference = _engine(tiny_checkpoint, "torch" if kv_cache_dtype == "auto" else "triton", **settings)
    fused = _engine(tiny_checkpoint, "triton", decode_attention="triton", **settings)
    assert type(fused.runner.model.attention).__name__ == "TritonDecodeAttention"
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=True)
    want, got = reference.generate(prompts, params), fused.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)) < 1e-3
    assert_no_leaks(fused)


def test_fused_triton_decode_attention_needs_triton_kernels(tiny_checkpoint):
    with pytest.raises(ValueError, match="decode_attention=triton needs the gpu or triton kernel set"):
        _engine(tiny_checkpoint, "torch", decode_attention="triton", page_size=16)
    with pytest.raises(ValueError, match="decode_attention must be auto or triton"):
        _engine(tiny_checkpoint, "triton", decode_attention="fast", page_size=16)

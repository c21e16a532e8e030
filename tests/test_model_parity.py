"""Baton's model against HF transformers on random tiny configs of every supported family.

Tolerances (fp32 on CPU): logits within 1e-4 relative error (||ours - hf|| / ||hf||); measured ~5e-6.
Greedy continuations must be token-identical. Prompts (150 tokens) are longer than the engine's prefill
chunk (64) and than the GDN chunk (64), so chunked prefill and carried state are both exercised.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.request import SamplingParams
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine, rel_err
from tests.hf_models import FAMILIES, build_hf_model, save_checkpoint

LOGITS_RTOL = 1e-4
PROMPT_LEN = 150
DECODE_STEPS = 12


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    family = request.param
    model = build_hf_model(family, seed=3)
    path = save_checkpoint(model, tmp_path_factory.mktemp(family))
    return family, model, path


def _prompt(seed: int, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed))


def test_prefill_and_decode_logits_match_hf(family_checkpoint):
    family, hf_model, path = family_checkpoint
    engine = cpu_engine(str(path))
    prompt = _prompt(0)
    with torch.no_grad():
        hf_out = hf_model(prompt[None], use_cache=True)
    seq = DirectSequence(engine)
    # Uneven chunks that straddle pages (size 4) and the GDN's internal 64-token chunks.
    ours = torch.cat([seq.forward(prompt[a:b].tolist()) for a, b in ((0, 37), (37, 101), (101, PROMPT_LEN))])
    assert rel_err(ours, hf_out.logits[0]) < LOGITS_RTOL, family

    # Step by step decode against HF's own cache, feeding HF's greedy choice each time.
    cache, last = hf_out.past_key_values, hf_out.logits[0, -1]
    for step in range(DECODE_STEPS):
        token = int(last.argmax())
        with torch.no_grad():
            hf_step = hf_model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, last = hf_step.past_key_values, hf_step.logits[0, -1]
        ours_step = seq.forward([token])[0]
        assert rel_err(ours_step, last) < LOGITS_RTOL, (family, step)
    seq.close()
    assert_no_leaks(engine)


def test_greedy_continuation_matches_hf(family_checkpoint):
    family, hf_model, path = family_checkpoint
    engine = cpu_engine(str(path))
    prompts = [_prompt(1), _prompt(2, length=9)]
    max_new = 24
    for prompt in prompts:
        with torch.no_grad():
            expected = hf_model.generate(
                prompt[None], max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
            )[0, len(prompt) :].tolist()
        [completion] = engine.generate([prompt.tolist()], SamplingParams(max_tokens=max_new, temperature=0))
        assert completion.token_ids == expected, family
    assert_no_leaks(engine)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_5"])
def test_multimodal_checkpoint_layout_loads_text_model(family, tmp_path):
    """The released checkpoints are *ForConditionalGeneration: text under model.language_model.*, a vision
    tower under model.visual.* that Baton ignores."""
    hf_model = build_hf_model(family, seed=5, multimodal=True)
    path = save_checkpoint(hf_model, tmp_path / "mm")
    engine = cpu_engine(str(path))
    assert engine.model_config.weight_prefix == "model.language_model."
    prompt = _prompt(7, length=40)
    with torch.no_grad():
        expected = hf_model(input_ids=prompt[None]).logits[0]
    seq = DirectSequence(engine)
    assert rel_err(seq.forward(prompt.tolist()), expected) < LOGITS_RTOL
    seq.close()
    assert_no_leaks(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_matches_hf(family, tmp_path):
    """bf16 on CUDA against HF in bf16 on the same GPU. bf16 rounding differs between implementations, so
    the logits tolerance is 3e-2 relative and the greedy check is on the first 8 tokens."""
    from tests.helpers import cuda_engine

    hf_model = build_hf_model(family, seed=3)
    path = save_checkpoint(hf_model, tmp_path / family)
    hf_model = hf_model.to("cuda", torch.bfloat16)
    engine = cuda_engine(str(path))
    prompt = _prompt(0)
    with torch.no_grad():
        expected = hf_model(prompt[None].cuda()).logits[0].float()
    seq = DirectSequence(engine)
    ours = torch.cat([seq.forward(prompt[:70].tolist()), seq.forward(prompt[70:].tolist())])
    assert rel_err(ours, expected) < 3e-2, family
    seq.close()
    with torch.no_grad():
        hf_tokens = hf_model.generate(prompt[None].cuda(), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    [completion] = engine.generate([prompt.tolist()], SamplingParams(max_tokens=8, temperature=0))
    assert completion.token_ids == hf_tokens[0, PROMPT_LEN:].tolist(), family
    assert_no_leaks(engine)

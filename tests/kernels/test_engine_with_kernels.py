"""The engine with the Triton kernel set against the torch path: same logits, same greedy tokens, and the
prefix cache's checkpoints (taken inside the kernels) still give exact hits. On CPU the kernels run under
Triton's interpreter, so this covers the glue between model and kernels in CI; on a GPU, the real ones."""

from __future__ import annotations

import torch

from services.engine.request import SamplingParams
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine, rel_err

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

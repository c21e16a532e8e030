"""The engine on a GPU with its fast path (Triton + flashinfer kernels, CUDA graphs for decode) against the
plain-torch path. bf16 rounding differs between any two implementations, so the yardstick is the torch
path's own bf16 run against the fp32 reference (as in test_model_parity): the fast path may be at most
1.5x (+2e-3) as far from fp32 and must pick the fp32 argmax at least as often (-5 points). CUDA graphs
replay the same kernels as eager execution: on the same batch, greedy tokens and their logprobs from
graph-replayed decode steps must equal the eager fast path's (logprobs within 0.05 up to any divergence, >= 90%
of the tokens equal). The overlap scheduler (each decode step launched before the last one's tokens reach
the host, its input ids read on the device) must not change a token: graphs with it on and off give the
same tokens and logprobs (within 1e-3, for any nondeterministic reduction order)."""

from __future__ import annotations

import pytest
import torch

from services.engine.request import SamplingParams
from tests.helpers import DirectSequence, assert_no_leaks, cuda_engine, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (length + 7 * i,), generator=gen).tolist() for i in range(n)]


def _logits(engine, prompt: list[int]) -> torch.Tensor:
    seq = DirectSequence(engine)
    out = torch.cat([seq.forward(prompt[:50]), seq.forward(prompt[50:])] + [seq.forward([t]) for t in (3, 5, 7)])
    seq.close()
    return out.float()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny test model with head_dim 64: flashinfer's kernels cover 64, 128 and 256."""
    from tests.hf_models import _causal_lm_class, _perturb, hf_config, save_checkpoint

    torch.manual_seed(4)
    model = _causal_lm_class("qwen3_5_moe")(hf_config("qwen3_5_moe", head_dim=64))
    _perturb(model, 4)
    return str(save_checkpoint(model.eval(), tmp_path_factory.mktemp("hd64")))


def test_fast_path_matches_torch_path(checkpoint):
    tiny_checkpoint = checkpoint
    reference = cuda_engine(tiny_checkpoint, dtype="float32", kernels="torch", cuda_graph_max_batch=0)
    torch16 = cuda_engine(tiny_checkpoint, kernels="torch", cuda_graph_max_batch=0)
    fast = cuda_engine(tiny_checkpoint, kernels="gpu", cuda_graph_max_batch=16)
    assert fast.runner.ops.name == "triton+flashinfer" and fast.runner.graphs.enabled
    errors, agreement = {"torch": [], "fast": []}, {"torch": [], "fast": []}
    for prompt in _prompts(4, 90, seed=0):
        ref = _logits(reference, prompt)
        for name, engine in (("torch", torch16), ("fast", fast)):
            logits = _logits(engine, prompt)
            errors[name].append(rel_err(logits, ref))
            agreement[name].append((logits.argmax(-1) == ref.argmax(-1)).float().mean().item())
    err_torch, err_fast = sum(errors["torch"]) / 4, sum(errors["fast"]) / 4
    agree_torch, agree_fast = sum(agreement["torch"]) / 4, sum(agreement["fast"]) / 4
    print(f"\nbf16 vs fp32: torch path rel err {err_torch:.4f} argmax agreement {agree_torch:.3f}; "
          f"fast path rel err {err_fast:.4f} argmax agreement {agree_fast:.3f}")
    assert err_fast < 1.5 * err_torch + 2e-3
    assert agree_fast >= agree_torch - 0.05

    # Decode steps through the CUDA graphs against the same engine without graphs, on the same batch: the
    # same kernels on (nearly) the same shapes, so the tiny model's large bf16 noise (rel err ~0.4 against
    # fp32, above) cancels out. 6 requests replay the graph of 8 (two padding rows); 8 fill it exactly.
    eager = cuda_engine(tiny_checkpoint, kernels="gpu", cuda_graph_max_batch=0)
    sequential = cuda_engine(tiny_checkpoint, kernels="gpu", cuda_graph_max_batch=16, overlap_schedule=False)
    for num_prompts in (6, 8):
        prompts = _prompts(num_prompts, 40, seed=num_prompts)
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=True)
        ahead_before = fast.num_steps_launched_ahead
        graphed, plain = fast.generate(prompts, params), eager.generate(prompts, params)
        assert fast.num_steps_launched_ahead - ahead_before >= 8, "decode steps should have been launched ahead"
        one_by_one = sequential.generate(prompts, params)
        for g, q in zip(graphed, one_by_one, strict=True):
            assert g.token_ids == q.token_ids
            assert max(abs(a - b) for a, b in zip(g.logprobs, q.logprobs, strict=True)) < 1e-3
        agree, total, worst = 0, 0, 0.0
        for g, e in zip(graphed, plain, strict=True):
            for tg, te, lg, le in zip(g.token_ids, e.token_ids, g.logprobs, e.logprobs, strict=True):
                total += 1
                if tg != te:
                    break  # the sequences diverged: later steps see different inputs
                agree += 1
                worst = max(worst, abs(lg - le))
        print(f"graph vs eager, {num_prompts} requests: worst logprob difference {worst:.4f}, "
              f"tokens equal up to divergence {agree}/{num_prompts * 12}")
        assert worst < 0.05
        assert agree >= 0.9 * num_prompts * 12
    for engine in (reference, torch16, fast, eager, sequential):
        assert_no_leaks(engine)

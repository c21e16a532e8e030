"""Sampler semantics on synthetic logits."""

from __future__ import annotations

import math

import torch

from services.engine.request import Request, SamplingParams
from services.engine.sampler import Sampler


def _requests(params: SamplingParams, n: int, prompt=(1, 2), output=()) -> list[Request]:
    reqs = []
    for i in range(n):
        r = Request(f"r{i}", list(prompt), params)
        r.output_token_ids = list(output)
        reqs.append(r)
    return reqs


def _sample(logits_row: list[float], params: SamplingParams, n: int = 1, seed: int = 0, **kw):
    sampler = Sampler(torch.device("cpu"), seed)
    logits = torch.tensor([logits_row] * n, dtype=torch.float32)
    return sampler(logits, _requests(params, n, **kw)).result()


def test_greedy_is_argmax():
    tokens, logprobs = _sample([0.1, 3.0, 2.9, -1.0], SamplingParams(temperature=0))
    assert tokens == [1] and logprobs == [None]


def test_temperature_near_zero_is_argmax():
    """Dividing by 1e-38 made every logit inf and the draw return token 0; the limit is the argmax."""
    for temperature in (1e-38, 1e-30, 1e-6):
        tokens, _ = _sample([0.1, 20.0, 19.5, -1.0], SamplingParams(temperature=temperature, seed=3), n=8)
        assert tokens == [1] * 8, temperature
    # Above the cut the draw is a draw (a near-tie is split), not the argmax.
    tokens, _ = _sample([0.0, 0.0], SamplingParams(temperature=1e-4), n=400)
    assert 0 < sum(tokens) < 400


def test_temperature_sampling_follows_softmax():
    logits = [1.0, 0.0, -1.0, 0.5]
    n = 40000
    tokens, _ = _sample(logits, SamplingParams(temperature=0.7), n=n)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double() / n
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / 0.7, dim=-1)
    assert torch.allclose(counts, probs, atol=0.01), (counts, probs)


def test_top_k_keeps_only_the_k_best():
    tokens, _ = _sample([5.0, 4.0, 3.0, 2.9, 2.8], SamplingParams(temperature=5.0, top_k=2), n=5000)
    assert set(tokens) == {0, 1}


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08])).tolist()
    tokens, _ = _sample(logits, SamplingParams(temperature=1.0, top_p=0.6), n=5000)
    assert set(tokens) == {0, 1}
    tokens, _ = _sample(logits, SamplingParams(temperature=1.0, top_p=0.4), n=2000)
    assert set(tokens) == {0}, "the most likely token always stays"


def test_min_p_drops_tokens_below_fraction_of_the_best():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.14, 0.16])).tolist()
    tokens, _ = _sample(logits, SamplingParams(temperature=1.0, min_p=0.3), n=5000)
    assert set(tokens) == {0, 1, 3}  # 0.14 < 0.3 * 0.5


def test_seeded_rows_do_not_depend_on_neighbours():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    alone = Sampler(torch.device("cpu"), 0)(logits[2:3].clone(), _requests(params, 1)).result()[0]
    mixed_reqs = _requests(SamplingParams(temperature=1.0), 6)
    mixed_reqs[2] = _requests(params, 1)[0]
    mixed = Sampler(torch.device("cpu"), 123)(logits.clone(), mixed_reqs).result()[0]
    assert mixed[2] == alone[0]


def test_repetition_penalty_hf_semantics():
    # token 1 (positive logit, seen) is divided; token 2 (negative, seen) multiplied; token 0 unseen.
    sampler = Sampler(torch.device("cpu"), 0)
    logits = torch.tensor([[2.0, 2.5, -1.0]])
    [req] = _requests(SamplingParams(temperature=0, repetition_penalty=2.0), 1, prompt=(1,), output=(2,))
    tokens, _ = sampler(logits, [req]).result()
    assert tokens == [0]  # 2.5 / 2 = 1.25 < 2.0


def test_presence_and_frequency_penalties():
    sampler = Sampler(torch.device("cpu"), 0)
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.4)
    [req] = _requests(params, 1, output=(0, 0, 1))
    # token 0: 3 - 0.5 - 0.8 = 1.7 ; token 1: 2 - 0.5 - 0.4 = 1.1 ; token 2: 0
    tokens, _ = sampler(logits, [req]).result()
    assert tokens == [0]
    [req] = _requests(params, 1, output=(0, 0, 0, 1))
    tokens, _ = sampler(logits, [req]).result()  # token 0: 3 - 0.5 - 1.2 = 1.3 > 1.1
    assert tokens == [0]
    [req] = _requests(params, 1, output=(0,) * 5)
    tokens, _ = sampler(logits, [req]).result()  # token 0: 3 - 0.5 - 2.0 = 0.5 < 2.0
    assert tokens == [1]


def test_logprobs_are_raw_model_logprobs():
    logits = [2.0, 1.0, 0.5]
    tokens, logprobs = _sample(logits, SamplingParams(temperature=0.5, logprobs=True, seed=3))
    expected = torch.log_softmax(torch.tensor(logits), dim=-1)[tokens[0]].item()
    assert math.isclose(logprobs[0], expected, rel_tol=1e-6)

"""Engine behaviour: continuous batching, chunked prefill, preemption, stops, aborts, bad input, streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.async_engine import AsyncEngine
from services.engine.request import FinishReason, InvalidRequestError, OverloadedError, SamplingParams
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine

GREEDY = SamplingParams(max_tokens=20, temperature=0)


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def alone_outputs(tiny_checkpoint):
    """Greedy outputs of each prompt run by itself: the reference for the batching tests."""
    engine = cpu_engine(tiny_checkpoint)
    prompts = _prompts([5, 17, 40, 150, 3, 90])
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (20, 7, 25, 12, 30, 16)]
    outputs = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    assert_no_leaks(engine)
    return prompts, params, outputs


def test_batch_gives_each_request_its_own_greedy_tokens(tiny_checkpoint, alone_outputs):
    prompts, params, expected = alone_outputs
    # A small token budget forces prompts to be chunked and mixed with other requests' decode steps.
    engine = cpu_engine(tiny_checkpoint, max_num_batched_tokens=48, prefill_chunk_size=24)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == FinishReason.LENGTH for r in results)
    assert_no_leaks(engine)


def test_requests_arriving_mid_flight(tiny_checkpoint, alone_outputs):
    """Requests join while others are mid-prefill or decoding; each still gets its solo greedy tokens."""
    prompts, params, expected = alone_outputs
    engine = cpu_engine(tiny_checkpoint, max_num_batched_tokens=64, prefill_chunk_size=32)
    streamed: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            streamed[out.request_id].extend(out.new_token_ids)

    for prompt, sp in zip(prompts, params, strict=True):
        streamed[engine.add_request(prompt, sp)] = []
        for _ in range(3):
            step()
    while engine.has_unfinished():
        step()
    assert list(streamed.values()) == expected
    assert_no_leaks(engine)


def test_preemption_under_memory_pressure_keeps_outputs(tiny_checkpoint, alone_outputs):
    prompts, params, expected = alone_outputs
    # 48 pages of 4 tokens = 192 tokens: the 150-token prompt fits alone, not next to the others.
    engine = cpu_engine(tiny_checkpoint, num_pages=48, max_num_batched_tokens=64, prefill_chunk_size=32)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    requests = [engine.requests[i] for i in ids]
    while engine.has_unfinished():
        engine.step()
        assert engine.pages.num_used <= 48
    assert [r.output_token_ids for r in requests] == expected
    assert sum(r.num_preemptions for r in requests) > 0, "the test should have forced preemptions"
    assert_no_leaks(engine)


def test_request_that_can_never_fit_is_refused(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, num_pages=8)  # 32 tokens of KV in total
    with pytest.raises(InvalidRequestError, match="exceeds the maximum context of 32 tokens"):
        engine.add_request(list(range(30)), SamplingParams(max_tokens=5))
    [ok] = engine.generate([list(range(20))], SamplingParams(max_tokens=5, temperature=0))
    assert len(ok.token_ids) == 5
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "prompt is empty"), ([1, 2, 99999], "out of range"), ([-1], "out of range")],
)
def test_bad_prompts_are_refused_and_engine_keeps_serving(tiny_checkpoint, prompt, message):
    engine = cpu_engine(tiny_checkpoint)
    good = engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert good not in engine.requests
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_sampling_params_are_named(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_duplicate_request_id_is_refused(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint)
    engine.add_request([1, 2], GREEDY, request_id="a")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([3, 4], GREEDY, request_id="a")
    engine.abort_request("a")
    assert_no_leaks(engine)


def test_stop_token_ends_generation_including_the_token(tiny_checkpoint, alone_outputs):
    prompts, _, expected = alone_outputs
    stop_token = expected[0][6]
    first = expected[0].index(stop_token)
    engine = cpu_engine(tiny_checkpoint)
    [out] = engine.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_token,)))
    assert out.token_ids == expected[0][: first + 1]
    assert out.finish_reason == FinishReason.STOP
    assert_no_leaks(engine)


def test_stop_string_cuts_text_and_streams_consistently(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint)
    prompt = _prompts([12], seed=5)[0]
    [full] = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))
    text = full.text
    # Pick a stop string from the middle of the produced text.
    start = next(i for i in range(len(text) // 3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    expected_text = text[: text.find(stop)]

    rid = engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    streamed, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            streamed += out.new_text
            last = out
    assert last.finished and last.finish_reason == FinishReason.STOP
    assert streamed == expected_text
    assert stop not in streamed
    assert_no_leaks(engine)


def test_max_tokens_and_logprobs(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint)
    prompt = _prompts([30], seed=6)[0]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=True))
    assert len(out.token_ids) == 4 and out.finish_reason == FinishReason.LENGTH
    # Logprob of each chosen token under the model's raw distribution.
    seq = DirectSequence(engine)
    logits = seq.forward(prompt + out.token_ids[:-1])[len(prompt) - 1 :]
    seq.close()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-5)
    assert_no_leaks(engine)


def test_abort_frees_pages_and_slot_mid_prefill_and_mid_decode(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, prefill_chunk_size=16, max_num_batched_tokens=32)
    long_id = engine.add_request(_prompts([120])[0], SamplingParams(max_tokens=10))
    short_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    long_req, short_req = engine.requests[long_id], engine.requests[short_id]
    assert 0 < long_req.num_computed_tokens < 120, "long request should be mid-prefill"
    assert short_req.output_token_ids, "short request should be decoding"
    out = engine.abort_request(long_id)
    assert out.finished and out.finish_reason == FinishReason.ABORT
    engine.step()
    engine.abort_request(short_id)
    assert engine.abort_request("unknown") is None
    assert_no_leaks(engine)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint)
    prompt = _prompts([10], seed=8)[0]
    seeded = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=1234)
    [alone] = engine.generate([prompt], seeded)
    others = [SamplingParams(max_tokens=15, temperature=1.0) for _ in range(3)]
    results = engine.generate(_prompts([7, 20, 3], seed=9) + [prompt], others + [seeded])
    assert results[-1].token_ids == alone.token_ids
    [other_seed] = engine.generate([prompt], SamplingParams(max_tokens=15, temperature=1.0, seed=99))
    assert other_seed.token_ids != alone.token_ids
    assert_no_leaks(engine)


def test_async_stream_delivers_tokens_incrementally_and_cancel_frees(tiny_checkpoint, alone_outputs):
    prompts, params, expected = alone_outputs
    engine = cpu_engine(tiny_checkpoint)
    async_engine = AsyncEngine(engine)

    async def collect(prompt, sp):
        chunks = [out async for out in async_engine.generate(prompt, sp)]
        assert chunks[-1].finished and all(not c.finished for c in chunks[:-1])
        return [t for c in chunks for t in c.new_token_ids], len(chunks)

    async def cancel_after(n):
        stream = async_engine.generate(prompts[3], SamplingParams(max_tokens=200, temperature=0))
        got = 0
        async for out in stream:
            got += len(out.new_token_ids)
            if got >= n:
                break
        await stream.aclose()
        return got

    async def main():
        results = await asyncio.gather(
            *(collect(p, sp) for p, sp in zip(prompts, params, strict=True)), cancel_after(3)
        )
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            async for _ in async_engine.generate([], GREEDY):
                pass
        return results

    results = asyncio.run(main())
    for (tokens, num_chunks), want in zip(results[:-1], expected, strict=True):
        assert tokens == want
        assert num_chunks == len(want), "one output per generated token"
    assert results[-1] >= 3
    usage = async_engine.call(lambda e: e.resource_usage()).result(timeout=30)
    assert usage["pages_used"] == usage["pages_cached"] and usage["slots_used"] == 0, usage
    async_engine.shutdown()
    assert_no_leaks(engine)


def test_overlap_schedule_matches_sequential_steps(tiny_checkpoint):
    """Steps launched ahead (input tokens read on the device, the host a step behind) give the same
    outputs as one-step-at-a-time, through stop tokens and strings, logprobs, seeded draws, penalties,
    a follow-up turn that resumes from the prefix cache, and an abort while a step is in flight."""
    prompts = _prompts([9, 33, 4, 70, 21, 12], seed=11)
    probe = cpu_engine(tiny_checkpoint, overlap_schedule=False)
    [plain] = probe.generate([prompts[0]], SamplingParams(max_tokens=30, temperature=0))
    stop_token = plain.token_ids[9]
    text_stop = next(plain.text[i : i + 2] for i in range(len(plain.text) // 2, len(plain.text) - 2)
                     if "\ufffd" not in plain.text[i : i + 2])
    params = [
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop_token,)),
        SamplingParams(max_tokens=25, temperature=0, logprobs=True),
        SamplingParams(max_tokens=30, temperature=0, stop=(text_stop,)),
        SamplingParams(max_tokens=18, temperature=0.8, top_k=20, seed=5, logprobs=True),
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_tokens=2, temperature=0),
    ]
    prompts[2] = prompts[0]  # the stop string was taken from this prompt's output

    def run(overlap: bool):
        engine = cpu_engine(tiny_checkpoint, overlap_schedule=overlap, max_num_batched_tokens=64,
                            prefill_chunk_size=32)
        first = engine.generate(prompts, params)
        follow_ups = [p + r.token_ids + [3, 1, 4] for p, r in zip(prompts, first, strict=True)]
        second = engine.generate(follow_ups, SamplingParams(max_tokens=14, temperature=0))
        aborted = engine.add_request(prompts[1], SamplingParams(max_tokens=40, temperature=0))
        kept = engine.add_request(prompts[3], SamplingParams(max_tokens=20, temperature=0))
        kept_tokens: list[int] = []
        for _ in range(8):
            for out in engine.step():
                assert out.request_id in (aborted, kept)
                if out.request_id == kept:
                    kept_tokens += out.new_token_ids
        engine.abort_request(aborted)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == kept, "no output for a request aborted while its step was in flight"
                kept_tokens += out.new_token_ids
        assert_no_leaks(engine)
        return engine, first + second, kept_tokens

    on, on_results, on_kept = run(True)
    off, off_results, off_kept = run(False)
    assert on.num_steps_launched_ahead > 20 and off.num_steps_launched_ahead == 0
    assert on.cache.stats.cached_tokens > 0 and on.cache.stats.cached_tokens == off.cache.stats.cached_tokens
    for a, b in zip(on_results, off_results, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        if b.logprobs is not None:
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert on_results[0].finish_reason == FinishReason.STOP and on_results[2].finish_reason == FinishReason.STOP
    assert on_kept == off_kept and len(on_kept) == 20


def test_beyond_capacity_is_refused_at_once_and_accepted_again_later(tiny_checkpoint):
    """max_num_seqs running + max_waiting_requests queued; one more is refused (overload), not queued."""
    engine = cpu_engine(tiny_checkpoint, max_num_seqs=2, max_waiting_requests=1)
    params = SamplingParams(max_tokens=3, temperature=0)
    ids = [engine.add_request([1, 2, 3, i], params) for i in range(3)]
    with pytest.raises(OverloadedError, match="capacity"):
        engine.add_request([4, 5, 6], params)
    assert set(engine.requests) == set(ids), "the refused request left nothing behind"
    while engine.has_unfinished():
        engine.step()
    engine.add_request([4, 5, 6], params)
    while engine.has_unfinished():
        engine.step()
    assert_no_leaks(engine)


def test_cache_events_are_kept_only_for_a_consumer(tiny_checkpoint):
    """Without one they would pile up for the pod's whole life; with one, each drain returns what happened, and
    the snapshot and digest describe the cache exactly."""
    prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    silent = cpu_engine(tiny_checkpoint)
    silent.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    assert silent.drain_cache_events() == [] and silent.cache_digest.pages > 0
    engine = cpu_engine(tiny_checkpoint, record_cache_events=True)
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    events = engine.drain_cache_events()
    assert engine.drain_cache_events() == []
    snapshot = engine.cache_snapshot()
    stored = {e.page_hash for e in events if e.kind == "stored"} - {e.page_hash for e in events if e.kind == "evicted"}
    assert {e.page_hash for e in snapshot if e.kind == "stored"} == stored
    assert engine.cache_digest == silent.cache_digest
    assert engine.cache_digest.pages == len(stored)


def test_callers_that_leave_before_the_engine_answers_do_not_stop_it(tiny_checkpoint):
    """A Health read or a request whose caller gives up while the engine thread is busy: the engine skips the
    read, drops the request (or aborts it), and keeps serving; nothing leaks."""
    import threading

    engine = cpu_engine(tiny_checkpoint)
    async_engine = AsyncEngine(engine)
    release = threading.Event()
    busy = async_engine.call(lambda e: release.wait(30))  # holds the engine thread until released

    async def main():
        read = async_engine.call(lambda e: e.resource_usage())
        waiter = asyncio.ensure_future(asyncio.wrap_future(read))
        request = asyncio.ensure_future(anext(async_engine.generate([5, 6, 7, 8], GREEDY)))
        await asyncio.sleep(0)  # let the generate post its command: it waits on the engine now
        await asyncio.sleep(0)
        waiter.cancel()
        request.cancel()
        for task in (waiter, request):
            with pytest.raises(asyncio.CancelledError):
                await task
        release.set()
        busy.result(timeout=30)
        # Still serving: a new request gets its tokens (a dead engine thread would leave it waiting).
        async def collect():
            return [out async for out in async_engine.generate([5, 6, 7, 8], GREEDY)]

        return await asyncio.wait_for(collect(), 30)

    outs = asyncio.run(main())
    assert async_engine.dead is None and outs[-1].finished
    usage = async_engine.call(lambda e: e.resource_usage()).result(timeout=30)
    assert usage["slots_used"] == 0 and usage["running"] == 0 and usage["waiting"] == 0, usage
    async_engine.shutdown()
    assert_no_leaks(engine)

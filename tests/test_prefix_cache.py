"""The hybrid prefix cache inside the engine: cached output equals uncached output, hit rate on an
agentic trace, hits that land mid-page or between checkpoints, copy-on-write, events and counters."""

from __future__ import annotations

import pytest
import torch

from loadtest.agentic import agentic_trace, reusable_tokens
from services.common.page_hash import ROOT_HASH, extend_page_hashes
from services.engine.engine import Engine
from services.engine.request import SamplingParams
from tests.helpers import assert_no_leaks, cpu_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run_waves(engine: Engine, waves: list[list[list[int]]], params=GREEDY) -> list[list[int]]:
    """Each wave runs concurrently, after the previous one finished."""
    return [c.token_ids for wave in waves for c in engine.generate(wave, params)]


def test_shared_system_prompt(tiny_checkpoint):
    system = _tokens(100, seed=1)
    users = [system + _tokens(10 + 5 * i, seed=10 + i) for i in range(8)]
    waves = [users[:1], users[1:]]
    cached = cpu_engine(tiny_checkpoint, checkpoint_interval=32)
    uncached = cpu_engine(tiny_checkpoint, enable_prefix_cache=False)
    assert _run_waves(cached, waves) == _run_waves(uncached, waves)
    # The periodic checkpoint at 96 (interval 32) lies inside the shared 100 tokens: 7 requests hit it.
    assert cached.cache.stats.cached_tokens == 7 * 96
    assert uncached.cache.stats.cached_tokens == 0
    assert_no_leaks(cached)
    assert_no_leaks(uncached)


def _conversation(engine: Engine, turns: int, seed: int) -> tuple[list[list[int]], list[int]]:
    history, outputs, cached = _tokens(120, seed), [], []
    for turn in range(turns):
        [out] = engine.generate([history], SamplingParams(max_tokens=10 + 3 * turn, temperature=0))
        outputs.append(out.token_ids)
        cached.append(out.num_cached_tokens)
        history = history + out.token_ids + _tokens(25, seed * 100 + turn)
    return outputs, cached


def test_multi_turn_conversation(tiny_checkpoint):
    cached_engine = cpu_engine(tiny_checkpoint)
    outputs, cached = _conversation(cached_engine, turns=6, seed=2)
    expected, _ = _conversation(cpu_engine(tiny_checkpoint, enable_prefix_cache=False), turns=6, seed=2)
    assert outputs == expected
    # Every later turn resumes from the previous turn's decode snapshot: at most a page and a token
    # behind everything the previous turn computed.
    length = 120
    for turn in range(1, 6):
        computed_before = length + len(outputs[turn - 1]) - 1
        assert computed_before - cached_engine.config.page_size - 1 <= cached[turn] <= computed_before
        length = computed_before + 1 + 25
    assert_no_leaks(cached_engine)


def test_cache_too_small_evicts_constantly_and_stays_exact(tiny_checkpoint):
    def interleaved(engine):
        histories = [_tokens(90, seed=30 + c) for c in range(3)]
        outputs = []
        for turn in range(4):
            done = engine.generate(histories, SamplingParams(max_tokens=8, temperature=0))
            outputs.append([d.token_ids for d in done])
            histories = [
                h + d.token_ids + _tokens(20, seed=turn * 7 + i)
                for i, (h, d) in enumerate(zip(histories, done, strict=True))
            ]
        return outputs

    # 110 pages of 4 tokens: the three conversations (up to ~200 tokens each) never fit together.
    small = cpu_engine(tiny_checkpoint, num_pages=110, num_checkpoint_slots=2, checkpoint_interval=16)
    assert interleaved(small) == interleaved(cpu_engine(tiny_checkpoint, enable_prefix_cache=False))
    assert small.cache.tree.num_evicted_pages > 100
    assert small.cache.tree.num_evicted_states > 0
    assert small.cache.stats.cached_tokens > 0, "some hits should survive the churn"
    assert_no_leaks(small)


def test_hit_mid_page_and_between_checkpoints(tiny_checkpoint):
    """B shares A's first 150 tokens: 37.5 pages, between A's checkpoints at 128 and 160. B must resume
    from the checkpoint at 128 (the KV of pages up to 148 matches but no state exists at 148: those 20
    tokens are recomputed) and still produce exactly the uncached output."""
    a = _tokens(200, seed=3)
    b = a[:150] + _tokens(30, seed=4)
    engine = cpu_engine(tiny_checkpoint, checkpoint_interval=32)
    engine.generate([a], GREEDY)
    recomputed_before = engine.cache.stats.recomputed_missing_state_tokens
    [out_b] = engine.generate([b], GREEDY)
    assert out_b.num_cached_tokens == 128
    assert engine.cache.stats.recomputed_missing_state_tokens - recomputed_before == 148 - 128
    [expected] = cpu_engine(tiny_checkpoint, enable_prefix_cache=False).generate([b], GREEDY)
    assert out_b.token_ids == expected.token_ids
    # A prompt that is entirely cached still computes its last token (its logits are needed).
    [again] = engine.generate([a[:160]], GREEDY)
    assert again.num_cached_tokens == 128
    [expected] = cpu_engine(tiny_checkpoint, enable_prefix_cache=False).generate([a[:160]], GREEDY)
    assert again.token_ids == expected.token_ids
    assert_no_leaks(engine)


def test_copy_on_write_never_writes_the_shared_checkpoint(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, checkpoint_interval=32)
    system = _tokens(64, seed=5)
    engine.generate([system + _tokens(5, seed=6)], GREEDY)
    match = engine.cache.tree.match(system + [1], _page_hashes(system + [1], 4), max_pages=16)
    assert match.node.depth == 16 and match.state_slot is not None
    slot = match.state_slot
    conv_before = engine.runner.state_cache.conv[slot].clone()
    ssm_before = engine.runner.state_cache.ssm[slot].clone()
    results = engine.generate([system + _tokens(20, seed=7 + i) for i in range(3)], GREEDY)
    assert all(r.num_cached_tokens == 64 for r in results)
    assert torch.equal(engine.runner.state_cache.conv[slot], conv_before)
    assert torch.equal(engine.runner.state_cache.ssm[slot], ssm_before)
    assert_no_leaks(engine)


def _page_hashes(tokens, page_size):
    return extend_page_hashes([], tokens, page_size)


def test_events_carry_chained_hashes_and_checkpoint_flags(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, checkpoint_interval=16, num_pages=40, record_cache_events=True)
    prompt = _tokens(40, seed=8)
    engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0))
    events = engine.drain_cache_events()
    stored = [e for e in events if e.kind == "stored"]
    hashes = _page_hashes(prompt, 4)
    assert [e.page_hash for e in stored][:10] == hashes
    assert all(e.parent_hash == (hashes[i - 1] if i else ROOT_HASH) for i, e in enumerate(stored[:10]))
    states = {e.page_hash for e in events if e.kind == "state_stored"}
    assert {hashes[3], hashes[7]} <= states, "interval checkpoints at 16 and 32 tokens"
    assert engine.drain_cache_events() == []
    # Filling the 40 pages with another prompt evicts the first one: evicted events for its pages.
    engine.generate([_tokens(150, seed=9)], SamplingParams(max_tokens=5, temperature=0))
    evicted = {e.page_hash for e in engine.drain_cache_events() if e.kind == "evicted"}
    assert set(hashes) & evicted
    assert_no_leaks(engine)


@pytest.mark.parametrize("page_size", [16])
def test_agentic_trace_hit_rate(tiny_checkpoint, page_size):
    """8 concurrent conversations: a 2K-token first turn, then 10 turns of 100 new tokens each."""
    engine = cpu_engine(
        tiny_checkpoint, page_size=page_size, num_pages=2600, max_num_seqs=8, prefill_chunk_size=512,
        max_num_batched_tokens=1024,
    )
    conversations = agentic_trace(8, 2048, 10, 100, vocab_size=512, seed=11)
    params = SamplingParams(max_tokens=16, temperature=0)
    finished_sequences: list[list[int]] = []
    pending = {}  # request id -> (conversation, prompt, reusable)
    reusable_total = cached_total = 0
    for conv in conversations:
        prompt = conv.next_prompt()
        pending[engine.add_request(prompt, params)] = (conv, prompt, reusable_tokens(prompt, finished_sequences))
    outputs: dict[str, list[int]] = {rid: [] for rid in pending}
    while pending:
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if not out.finished:
                continue
            conv, prompt, reusable = pending.pop(out.request_id)
            reusable_total += reusable
            cached_total += out.num_cached_tokens
            answer = outputs.pop(out.request_id)
            finished_sequences.append(prompt + answer[:-1])  # the last sampled token was never computed
            conv.finish_turn(prompt, answer)
            nxt = conv.next_prompt()
            if nxt is not None:
                rid = engine.add_request(nxt, params)
                pending[rid] = (conv, nxt, reusable_tokens(nxt, finished_sequences))
                outputs[rid] = []
    hit_rate = cached_total / reusable_total
    stats = engine.cache.stats
    print(
        f"\nagentic trace: {cached_total} of {reusable_total} reusable prompt tokens served from cache "
        f"({hit_rate:.1%}); {stats.prompt_tokens} prompt tokens in all, "
        f"{stats.recomputed_missing_state_tokens} recomputed for lack of a checkpoint, "
        f"{engine.cache.tree.num_evicted_states} checkpoints evicted"
    )
    assert reusable_total > 8 * 10 * 2048
    assert hit_rate >= 0.95
    assert_no_leaks(engine)


def test_the_same_prompt_again_resumes_one_page_before_its_end(tiny_checkpoint):
    """Regenerate / retry on one engine: a prompt is checkpointed at its resume boundary (its last page boundary
    before its last token, as a prefill pod does for a decode pod), so sending it again computes at most one page,
    also when its length is a whole number of pages (its last page boundary is then its end, unusable to resume
    the same prompt). Output stays the uncached engine's."""
    page = 4
    for length in (160, 162):  # a whole number of pages, and not
        prompt = _tokens(length, seed=11)
        engine = cpu_engine(tiny_checkpoint, page_size=page, checkpoint_interval=64)
        [first] = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))  # no decode page
        [again] = engine.generate([prompt], GREEDY)
        assert again.num_cached_tokens == (length - 1) // page * page, (length, again.num_cached_tokens)
        [expected] = cpu_engine(tiny_checkpoint, enable_prefix_cache=False).generate([prompt], GREEDY)
        assert again.token_ids == expected.token_ids and first.token_ids == expected.token_ids[:2]
        assert_no_leaks(engine)


def test_a_prompt_is_computed_in_the_same_pieces_whether_or_not_its_checkpoints_were_taken(tiny_checkpoint):
    """The GDN layers split a prompt at its resume boundary always, not only where a checkpoint is taken: an
    engine without a prefix cache and one that checkpoints the prompt there compute bitwise the same log-probs
    (a prefill pod snapshots there too, so a prefill/decode pair equals one engine whether or not either could
    spare a checkpoint slot), and the same prompt resumed from that checkpoint the same tokens. A whole-pages
    prompt is the case that matters: its resume boundary is one page before its end, inside the GDN kernels'
    last chunk."""
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True)
    for length in (160, 161):
        prompt = _tokens(length, seed=12)
        [uncached] = cpu_engine(tiny_checkpoint, enable_prefix_cache=False).generate([prompt], params)
        engine = cpu_engine(tiny_checkpoint, checkpoint_interval=64)
        [first] = engine.generate([prompt], params)
        [again] = engine.generate([prompt], params)
        assert again.num_cached_tokens == (length - 1) // 4 * 4
        assert first.token_ids == uncached.token_ids == again.token_ids
        assert first.logprobs == uncached.logprobs, length  # bitwise: the same pieces, the same kernels
        # Resumed, the last page's queries attend to cached keys in a smaller block: equal up to rounding.
        assert max(abs(x - y) for x, y in zip(again.logprobs, first.logprobs, strict=True)) < 1e-4
        assert_no_leaks(engine)

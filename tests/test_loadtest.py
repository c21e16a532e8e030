"""The load-test harness without a server: workload generators (lengths, reuse structure, determinism, the
Mooncake format both ways), the token expansion and prefix accounting, the metric maths on hand-made inputs
with known answers, the SSE decoder on hand-made byte streams, the Prometheus parser, and how the clients
build requests and read responses (the OpenAI one also over a real socket, from a server that plays hand-made
bytes: Baton's HTTP gateway does not exist yet)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest import generators
from loadtest.agentic import common_prefix
from loadtest.clients import (
    OpenAIClient,
    RequestError,
    Sampling,
    chunk_from_completion,
    chunk_from_response,
    completion_body,
    generate_request,
    http_error,
)
from loadtest.prometheus import parse, read, select
from loadtest.sse import SSEDecoder, SSEEvent
from loadtest.stats import RequestRecord, decode_speed, inter_token_latencies, percentile, summarize
from loadtest.tokens import BlockHasher, PrefixIndex, seeded_tokens
from loadtest.workload import HashBlocks, SeededTokens, Session, Tokens, Turn, Workload, WorkloadError, expand, load

VOCAB = 1 << 20  # large: two unrelated token runs agree on their first token with probability 1e-6


# ---- tokens ---------------------------------------------------------------------------------------------------

def test_seeded_tokens_follow_their_definition():
    # The expansion is a file-format contract (saved workloads must replay the same tokens forever): restate it.
    key, n, vocab = "0/c3/t1", 40, 151_936
    stream = hashlib.shake_256(key.encode()).digest(4 * n)
    expected = [int.from_bytes(stream[4 * j:4 * j + 4], "little") % vocab for j in range(n)]
    assert seeded_tokens(key, n, vocab) == expected
    assert seeded_tokens(key, 17, vocab) == expected[:17], "a shorter run is a prefix of a longer one"
    assert seeded_tokens("other", n, vocab) != expected
    assert all(0 <= t < 7 for t in seeded_tokens(key, 500, 7))


@settings(max_examples=150, deadline=None)
@given(
    stem=st.lists(st.integers(0, 2), max_size=12),
    tails=st.lists(st.lists(st.integers(0, 2), max_size=10), min_size=1, max_size=5),
    probe=st.lists(st.integers(0, 2), max_size=14),
    cut=st.integers(0, 12),
    block=st.integers(1, 4),
)
def test_prefix_index_is_the_longest_common_prefix_in_whole_blocks(stem, tails, probe, cut, block):
    index = PrefixIndex(block)
    added = [stem + tail for tail in tails]
    for seq in added:
        index.add(seq)
    prompt = stem[:cut] + probe
    best = max(common_prefix(prompt, seq) for seq in added)
    assert index.reusable(prompt) == min(best, max(len(prompt) - 1, 0)) // block * block


@settings(max_examples=150, deadline=None)
@given(a=st.lists(st.integers(0, 2), max_size=14), b=st.lists(st.integers(0, 2), max_size=14),
       block=st.integers(1, 4))
def test_block_hash_ids_are_equal_exactly_as_far_as_the_blocks_are(a, b, block):
    hasher = BlockHasher(block)
    ids_a, ids_b = hasher.hash_ids(a), hasher.hash_ids(b)
    assert len(ids_a) == -(-len(a) // block)
    shared_ids = common_prefix(ids_a, ids_b)
    blocks_a = [tuple(a[i:i + block]) for i in range(0, len(a), block)]
    blocks_b = [tuple(b[i:i + block]) for i in range(0, len(b), block)]
    assert shared_ids == common_prefix(blocks_a, blocks_b)
    assert sorted(set(ids_a) | set(ids_b)) == list(range(len(set(ids_a) | set(ids_b)))), "numbered 0, 1, 2, ..."


# ---- generators -----------------------------------------------------------------------------------------------

def _prompts(workload: Workload) -> dict[tuple[int, int], list[int]]:
    return {(r.session, r.turn): r.prompt for r in generators.realize(workload)}


def test_agentic_lengths_and_reuse_structure():
    w = generators.agentic(6, VOCAB, first_turn_tokens=3000, follow_ups=(2, 5), turn_tokens=200, output_tokens=40,
                           think_time_s=1.5, system_prompt_tokens=500, jitter=0.25, seed=3)
    prompts = _prompts(w)
    assert len(w.sessions) == 6
    for s in w.sessions:
        assert 2 <= len(s.turns) - 1 <= 5
        assert 3000 * 0.75 <= len(prompts[(s.id, 0)]) <= 3000 * 1.25
        assert s.turns[0].think_s == 0 and all(t.think_s >= 0 for t in s.turns)
        for k in range(1, len(s.turns)):
            previous, prompt = prompts[(s.id, k - 1)], prompts[(s.id, k)]
            answer = generators.placeholder_answer(s.id, k - 1, s.turns[k - 1].max_tokens, VOCAB)
            new = expand(s.turns[k].add, VOCAB)
            assert 150 <= len(new) <= 250 and 30 <= s.turns[k].max_tokens <= 50
            assert prompt == previous + answer + new, "each turn resends the history and its answer"
    firsts = [prompts[(s.id, 0)] for s in w.sessions]
    assert {common_prefix(firsts[0], f) for f in firsts[1:]} == {500}, "only the system prompt is shared"
    assert all(t.think_s > 0 for s in w.sessions for t in s.turns[1:])


def test_generators_are_deterministic_by_seed(tmp_path):
    def write(seed: int, name: str) -> bytes:
        generators.agentic(4, VOCAB, first_turn_tokens=900, follow_ups=(1, 4), turn_tokens=50, seed=seed).save(
            tmp_path / name)
        return (tmp_path / name).read_bytes()

    assert write(7, "a.jsonl") == write(7, "b.jsonl")
    assert write(8, "c.jsonl") != write(7, "a.jsonl")
    a = generators.shared_prefix(20, VOCAB, seed=1)
    assert _prompts(a) == _prompts(generators.shared_prefix(20, VOCAB, seed=1))
    assert _prompts(a) != _prompts(generators.shared_prefix(20, VOCAB, seed=2))


def test_workload_file_round_trip(tmp_path):
    for workload in (
        generators.agentic(3, VOCAB, first_turn_tokens=800, follow_ups=(1, 3), turn_tokens=60, seed=2),
        generators.subagents(2, VOCAB, context_tokens=600, subagents_per_tree=3, subagent_turns=2, seed=2),
        Workload("hand", 100, [Session(0, (Turn((Tokens((1, 2, 3)), HashBlocks("k", (0, 1), 700, 512)), 5),),
                                       start_s=1.5)], timed=True),
    ):
        workload.save(tmp_path / "w.jsonl")
        assert load(tmp_path / "w.jsonl") == workload


def test_salt_gives_new_tokens_with_the_same_structure():
    w = generators.shared_prefix(12, VOCAB, system_prompts=2, system_prompt_tokens=300, seed=4)
    plain, salted = _prompts(w), {(r.session, r.turn): r.prompt for r in generators.realize(w, salt=1)}
    for key in plain:
        assert len(plain[key]) == len(salted[key]) and common_prefix(plain[key], salted[key]) == 0
    for a in plain:
        for b in plain:
            assert (common_prefix(plain[a], plain[b]) >= 300) == (common_prefix(salted[a], salted[b]) >= 300)


def test_shared_prefix_structure_and_popularity():
    w = generators.shared_prefix(400, VOCAB, system_prompts=4, system_prompt_tokens=256, user_tokens=64, zipf=1.5,
                                 seed=5)
    system_of = {s.id: s.turns[0].add[0].key for s in w.sessions}
    prompts = _prompts(w)
    for a in range(40):
        for b in range(a + 1, 40):
            shared = common_prefix(prompts[(a, 0)], prompts[(b, 0)])
            assert shared == (256 if system_of[a] == system_of[b] else 0)
    counts = [sum(k.endswith(f"system{i}") for k in system_of.values()) for i in range(4)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[3], counts


def test_subagents_branch_from_the_orchestrator_context_and_answer():
    w = generators.subagents(2, VOCAB, context_tokens=1000, subagents_per_tree=3, task_tokens=50, subagent_turns=2,
                             turn_tokens=30, output_tokens=20, jitter=0.0, seed=6)
    prompts = _prompts(w)
    roots = [s for s in w.sessions if s.parent is None]
    assert len(roots) == 2 and len(w.sessions) == 2 * (1 + 3)
    for root in roots:
        context = prompts[(root.id, 0)] + generators.placeholder_answer(root.id, 0, 20, VOCAB)
        agents = [s for s in w.sessions if s.parent == (root.id, 0)]
        assert len(agents) == 3 and all(len(a.turns) == 2 for a in agents)
        firsts = [prompts[(a.id, 0)] for a in agents]
        assert all(f[:len(context)] == context and len(f) == len(context) + 50 for f in firsts)
        assert common_prefix(firsts[0], firsts[1]) == len(context), "siblings share exactly the context"
        assert all(prompts[(a.id, 1)][:len(firsts[i])] == firsts[i] for i, a in enumerate(agents))
    assert w.tree_sizes() == {r.id: 1 + 3 * 2 for r in roots}


MOONCAKE_RECORDS = [  # hash ids numbered in order of first appearance, as in the published traces
    {"timestamp": 0, "input_length": 1300, "output_length": 12, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 1900, "output_length": 7, "hash_ids": [0, 1, 3, 4]},
    {"timestamp": 1500, "input_length": 100, "output_length": 3, "hash_ids": [5]},
    {"timestamp": 3052, "input_length": 1300, "output_length": 9, "hash_ids": [0, 1, 2]},
    {"timestamp": 3999, "input_length": 2048, "output_length": 1, "hash_ids": [0, 1, 3, 6]},
]


def test_mooncake_trace_round_trip_and_block_structure(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in MOONCAKE_RECORDS))
    w = generators.from_mooncake(trace, VOCAB)
    assert w.timed and [s.start_s for s in w.sessions] == [0, 0, 1.5, 3.052, 3.999]
    prompts = [_prompts(w)[(i, 0)] for i in range(5)]
    assert [len(p) for p in prompts] == [r["input_length"] for r in MOONCAKE_RECORDS]
    assert prompts[0] == prompts[3], "equal hash ids, equal tokens"
    assert common_prefix(prompts[0], prompts[1]) == 1024  # blocks 0, 1
    assert common_prefix(prompts[1], prompts[4]) == 1536  # blocks 0, 1, 3
    assert common_prefix(prompts[0], prompts[2]) == 0
    generators.to_mooncake(w, tmp_path / "back.jsonl")
    back = [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert back == MOONCAKE_RECORDS


def test_mooncake_export_of_an_agentic_workload_chains_the_turns(tmp_path):
    w = generators.agentic(2, VOCAB, first_turn_tokens=2000, follow_ups=(3, 3), turn_tokens=300, output_tokens=100,
                           think_time_s=2.0, seed=9)
    generators.to_mooncake(w, tmp_path / "t.jsonl")
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records == sorted(records, key=lambda r: r["timestamp"])
    by_length = {r["input_length"]: r for r in records}
    for s in w.sessions:
        lengths = [len(p) for (sid, _), p in sorted(_prompts(w).items()) if sid == s.id]
        for previous, current in zip(lengths, lengths[1:], strict=False):
            full_blocks = previous // 512
            assert by_length[current]["hash_ids"][:full_blocks] == by_length[previous]["hash_ids"][:full_blocks]
        think = sum(t.think_s for t in s.turns)
        assert by_length[lengths[-1]]["timestamp"] == round(think * 1000)


def test_bad_inputs_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 2000, "output_length": 5, "hash_ids": [0, 1]}\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl:1: .*need 4 hash ids, got 2"):
        generators.from_mooncake(bad, VOCAB)
    with pytest.raises(WorkloadError, match="not a workload file"):
        load(bad)
    with pytest.raises(WorkloadError, match="branches from missing turn"):
        Workload("x", 10, [Session(0, (Turn((), 1),)), Session(1, (Turn((), 1),), parent=(0, 3))])
    with pytest.raises(ValueError, match="system prompt must be shorter"):
        generators.agentic(1, VOCAB, first_turn_tokens=100, system_prompt_tokens=100)


# ---- metric maths ---------------------------------------------------------------------------------------------

def test_percentiles_known_answers_and_numpy():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([5.0], 99) == 5.0
    values = np.random.default_rng(0).exponential(size=1001).tolist()
    for q in (1, 10, 50, 90, 99, 99.9):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_itl_and_decode_speed_from_token_timestamps():
    chunks = [(0.100, 1), (0.300, 1), (0.350, 2), (0.550, 1)]  # one chunk of two tokens
    assert inter_token_latencies(chunks) == pytest.approx([0.2, 0.025, 0.025, 0.2])
    assert decode_speed(chunks) == pytest.approx(4 / 0.45)
    assert inter_token_latencies([(0.1, 3)]) == [] and decode_speed([(0.1, 3)]) is None


def test_summary_of_hand_made_records():
    records = [
        RequestRecord(0, 0, 0.0, prompt_tokens=1000, max_tokens=4, reusable_tokens=0, chunks=[(0.5, 1), (0.6, 1),
                      (0.7, 1), (0.8, 1)], end_s=0.8, output_tokens=4, cached_tokens=0, finish_reason="length"),
        RequestRecord(0, 1, 1.0, prompt_tokens=1100, max_tokens=3, reusable_tokens=1000, chunks=[(0.1, 1), (0.2, 2)],
                      end_s=0.2, output_tokens=3, cached_tokens=960, finish_reason="length"),
        RequestRecord(1, 0, 0.0, prompt_tokens=500, max_tokens=4, error="grpc:UNAVAILABLE"),
    ]
    s = summarize(records, duration_s=2.0, decode_floor_tok_s=15)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, {"grpc:UNAVAILABLE": 1})
    assert s["ttft_s"]["p50"] == pytest.approx(0.3) and s["ttft_s"]["mean"] == pytest.approx(0.3)
    assert s["e2e_s"]["p90"] == pytest.approx(0.2 + 0.9 * 0.6)
    assert s["itl_s"]["p50"] == pytest.approx(0.1) and s["itl_s"]["mean"] == pytest.approx(0.4 / 5)
    speed = s["decode_tok_s_per_user"]  # 3 tokens in 0.3 s and 2 tokens in 0.1 s
    assert (speed["p50"], speed["p10"], speed["mean"]) == pytest.approx((15, 11, 15))
    assert s["share_at_decode_floor"] == 0.5
    assert s["throughput"]["output_tok_s"] == pytest.approx(7 / 2.0)
    assert s["throughput"]["requests_per_s"] == pytest.approx(1.0)
    assert s["cache"]["hit_rate"] == pytest.approx(960 / 2100)
    assert s["cache"]["cached_of_reusable"] == pytest.approx(0.96)
    assert s["cache_by_turn"]["1"]["hit_rate"] == pytest.approx(960 / 1100)
    assert s["cache_by_turn"]["0"]["hit_rate"] == 0


# ---- SSE --------------------------------------------------------------------------------------------------------

SSE_STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"text": "caf\xc3\xa9 \xf0\x9f\x9a\x80"}\r\n\r\n'  # multi-byte UTF-8, CRLF line ends
    b"data: x\r\ndata: y\r\n\r\n"  # a cut between CR and LF must not end the event early
    b"event: update\rid: 7\rdata: first line\rdata:second line\r\r"  # CR line ends, no space after the colon
    b"retry: 100\nunknown: field\ndata: \n\n"  # an empty data line is still data
    b"data: [DONE]\n\n"
    b"data: never finished"  # no blank line: not an event
)
SSE_EVENTS = [
    SSEEvent('{"text": "café 🚀"}'),
    SSEEvent("x\ny"),
    SSEEvent("first line\nsecond line", "update", "7"),
    SSEEvent("", "message", "7"),
    SSEEvent("[DONE]", "message", "7"),
]


def test_sse_decoder_on_a_hand_made_stream():
    assert SSEDecoder().feed(SSE_STREAM) == SSE_EVENTS


def test_sse_decoder_cut_anywhere():
    for cut in range(len(SSE_STREAM) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(SSE_STREAM[:cut]) + decoder.feed(SSE_STREAM[cut:]) == SSE_EVENTS, cut
    decoder = SSEDecoder()
    assert [e for byte in SSE_STREAM for e in decoder.feed(bytes([byte]))] == SSE_EVENTS


# ---- Prometheus -------------------------------------------------------------------------------------------------

METRICS_PAGE = """# HELP baton_engine_requests Requests in the engine by scheduler state
# TYPE baton_engine_requests gauge
baton_engine_requests{state="running"} 3.0
baton_engine_requests{state="waiting"} 1.0
baton_kv_pages_used 150.0
baton_kv_pages_capacity 600.0
baton_prefix_cache_query_tokens_total 12000.0
baton_prefix_cache_hit_tokens_total 9000.0
odd_labels{path="a\\"b\\\\c",le="+Inf"} +Inf 1712345678000
not_a_number NaN
"""


def test_prometheus_parse_and_read():
    samples = parse(METRICS_PAGE)
    assert samples[("odd_labels", (("le", "+Inf"), ("path", 'a"b\\c')))] == float("inf")
    assert select(samples, "baton_engine_requests") == 4.0
    assert select(samples, "baton_engine_requests", state="running") == 3.0
    assert select(samples, "not_a_number") is None and select(samples, "absent") is None
    assert read(samples) == {"running": 3.0, "waiting": 1.0, "kv_pages_used": 150.0, "kv_pages_total": 600.0,
                             "kv_usage": 0.25, "prefix_prompt_tokens": 12000.0, "prefix_cached_tokens": 9000.0}
    vllm = parse('vllm:num_requests_running{model_name="m"} 2\nvllm:prefix_cache_hits_total{model_name="m"} 5\n'
                 'vllm:prefix_cache_queries_total{model_name="m"} 8\nvllm:kv_cache_usage_perc{model_name="m"} 0.5\n')
    assert read(vllm) == {"running": 2, "kv_usage": 0.5, "prefix_prompt_tokens": 8, "prefix_cached_tokens": 5}


# ---- clients: requests and responses --------------------------------------------------------------------------

def test_openai_request_body():
    body = completion_body([1, 2, 3], 16, "m", Sampling(temperature=0.0, ignore_eos=True, extra={"top_k": 5}),
                           return_token_ids=True)
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 16, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "return_token_ids": True,
                    "top_k": 5}
    body = completion_body("hello", 4, "m", Sampling(temperature=0.7, ignore_eos=False))
    assert body["prompt"] == "hello" and "ignore_eos" not in body and "return_token_ids" not in body
    assert "user" not in body
    assert completion_body([1], 4, "m", Sampling(), session_id="conv-7")["user"] == "conv-7"


def test_openai_stream_chunks_usage_and_errors():
    text = chunk_from_completion({"id": "c", "object": "text_completion",
                                  "choices": [{"index": 0, "text": " hi", "finish_reason": None}], "usage": None})
    assert (text.num_tokens, text.token_ids, text.text, text.finished) == (1, None, " hi", False)
    last = chunk_from_completion({"choices": [{"index": 0, "text": "!", "token_ids": [33, 34],
                                               "finish_reason": "length"}]})
    assert (last.num_tokens, last.token_ids, last.finished, last.finish_reason) == (2, [33, 34], True, "length")
    usage = chunk_from_completion({"choices": [], "usage": {"prompt_tokens": 900, "completion_tokens": 3,
                                                            "prompt_tokens_details": {"cached_tokens": 768}}})
    assert usage.num_tokens == 0 and (usage.usage.prompt_tokens, usage.usage.completion_tokens,
                                      usage.usage.cached_tokens) == (900, 3, 768)
    assert chunk_from_completion({"choices": [], "usage": {"prompt_tokens": 9}}).usage.cached_tokens is None
    with pytest.raises(RequestError) as err:
        chunk_from_completion({"error": {"message": "engine died", "type": "InternalServerError"}})
    assert err.value.kind == "http:stream_error" and err.value.message == "engine died"
    error = http_error(429, json.dumps({"error": {"message": "admission refused", "type": "rate_limit", "code": 429}}))
    assert (error.kind, error.message) == ("http:429", "admission refused")
    assert http_error(503, "<html>busy</html>").message == "<html>busy</html>"


def test_grpc_request_and_response():
    from services.common.protos import inference_pb2

    request = generate_request([5, 6, 7], 9, "r1", Sampling())
    assert list(request.token_ids.ids) == [5, 6, 7] and request.request_id == "r1"
    assert request.sampling.max_tokens == 9 and request.sampling.temperature == 0 and request.sampling.ignore_eos
    assert generate_request("text", 2, "r2", Sampling()).text == "text"
    assert request.session_id == "" and generate_request([1], 2, "r3", Sampling(), "conv-7").session_id == "conv-7"
    response = inference_pb2.GenerateResponse(
        token_ids=[4, 2], text="ab", finished=True, finish_reason=inference_pb2.FINISH_REASON_LENGTH,
        usage=inference_pb2.Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=8))
    chunk = chunk_from_response(response)
    assert (chunk.num_tokens, chunk.token_ids, chunk.text, chunk.finished, chunk.finish_reason) == (
        2, [4, 2], "ab", True, "length")
    assert (chunk.usage.prompt_tokens, chunk.usage.cached_tokens) == (10, 8)


def test_openai_client_over_a_socket():
    """The HTTP path (aiohttp streaming, SSE split across writes, status errors) against a server that plays
    hand-made bytes."""
    from aiohttp import web

    events = [
        {"choices": [{"index": 0, "text": "a", "token_ids": [1], "finish_reason": None}], "usage": None},
        {"choices": [{"index": 0, "text": "b", "token_ids": [2], "finish_reason": "length"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                  "prompt_tokens_details": {"cached_tokens": 2}}},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    seen = []

    async def completions(request):
        seen.append(await request.json())
        if seen[-1]["max_tokens"] == 99:
            return web.json_response({"error": {"message": "too many requests"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(body), 7):  # cut mid-line and mid-event
            await response.write(body[start:start + 7])
        return response

    async def models(request):
        return web.json_response({"data": [{"id": "tiny"}]})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        client = OpenAIClient(f"http://127.0.0.1:{port}", "", Sampling(), timeout_s=10, return_token_ids=True)
        await client.start()
        try:
            assert (await client.model_info())["model"] == "tiny"
            chunks = [c async for c in client.stream([7, 8, 9], 2, "r")]
            with pytest.raises(RequestError) as err:
                [c async for c in client.stream([7], 99, "r")]
        finally:
            await client.close()
            await runner.cleanup()
        return chunks, err.value

    chunks, error = asyncio.run(scenario())
    assert [c.token_ids for c in chunks] == [[1], [2], None] and chunks[1].finished
    assert chunks[2].usage.cached_tokens == 2
    assert seen[0]["prompt"] == [7, 8, 9] and seen[0]["model"] == "tiny" and seen[0]["stream"] is True
    assert (error.kind, error.message) == ("http:429", "too many requests")


def test_segment_expansion_lengths():
    assert len(SeededTokens("k", 1234).expand(VOCAB)) == 1234
    blocks = HashBlocks("t", (3, 9, 4), 1100, 512)
    tokens = blocks.expand(VOCAB)
    assert len(tokens) == 1100 and tokens[512:1024] == HashBlocks("t", (9,), 512, 512).expand(VOCAB)
    assert Tokens((1, 2, 9)).expand(10, salt=2) == [3, 4, 1]


# ---- the runner over HTTP -------------------------------------------------------------------------------------

async def _stream_answer(request, body: dict):
    """An SSE completion of ``max_tokens`` tokens 1..n, then the usage chunk."""
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    n = body["max_tokens"]
    for i in range(1, n + 1):
        choice = {"index": 0, "text": "x", "token_ids": [i], "finish_reason": "length" if i == n else None}
        await response.write(b"data: " + json.dumps({"choices": [choice], "usage": None}).encode() + b"\n\n")
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
             "prompt_tokens_details": {"cached_tokens": 16 if len(body["prompt"]) > 20 else 0}}
    await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
    return response


def _run_over_http(completions, workload, **config) -> dict:
    """``loadtest.runner.run`` over the OpenAI API against an aiohttp server answering /v1/completions with
    ``completions``."""
    from aiohttp import web

    from loadtest.runner import RunConfig, run

    async def models(request):
        return web.json_response({"data": [{"id": "fake"}]})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        server = web.AppRunner(app)
        await server.setup()
        site = web.TCPSite(server, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        run_config = RunConfig(workload="(in memory)", api="openai", target=f"http://127.0.0.1:{port}",
                               progress=False, **config)
        try:
            return await run(run_config, workload)
        finally:
            await server.cleanup()

    return asyncio.run(scenario())


def test_runner_over_openai_http_multi_turn_and_errors(tmp_path):
    """The runner's OpenAI path end to end against a server that answers each prompt with the tokens 1..n
    (ids included, as vLLM's return_token_ids gives them) and refuses prompts longer than 40 tokens with 429:
    follow-ups resend the history with the answer, a refused turn ends its conversation, and the rest of it is
    counted as not sent."""
    from aiohttp import web

    prompts = []

    async def completions(request):
        body = await request.json()
        prompts.append(body["prompt"])
        if len(body["prompt"]) > 40:
            return web.json_response({"error": {"message": "queue full"}}, status=429)
        return await _stream_answer(request, body)

    workload = generators.agentic(3, 512, first_turn_tokens=20, follow_ups=(4, 4), turn_tokens=5, output_tokens=4,
                                  think_time_s=0.0, jitter=0.0, seed=1)
    results = _run_over_http(completions, workload, concurrency=(2,), return_token_ids=True, reuse_block=4,
                             out=str(tmp_path / "http.json"))
    [level] = results["levels"]
    s = level["summary"]
    # Turns of 20, 29, 38 tokens pass; the fourth (47) is refused; the fifth is never sent.
    assert (s["requests"], s["ok"], s["errors"], level["not_sent"]) == (12, 9, {"http:429": 3}, {"after_error": 3})
    by_turn = {}
    for prompt in prompts:
        by_turn.setdefault(len(prompt), []).append(prompt)
    assert sorted(by_turn) == [20, 29, 38, 47]
    for prompt in by_turn[29]:
        assert prompt[20:24] == [1, 2, 3, 4], "the answer's ids follow the first prompt"
        assert any(p == prompt[:20] for p in by_turn[20])
    ok = [r for r in level["requests"] if r["error"] is None]
    assert all(r["output_tokens"] == 4 and len(r["chunks"]) == 4 for r in ok)
    assert {r["turn"]: r["reusable_tokens"] for r in ok} == {0: 0, 1: 20, 2: 32}  # (20 + 3) and (29 + 3), 4-blocks
    assert s["cache"]["cached_tokens"] == 6 * 16 and results["config"]["api_key"] is None


def test_closed_loop_ramp_spreads_the_first_turns_and_the_summary_counts_after_it(tmp_path):
    """With a ramp, conversation slot i starts no earlier than i/concurrency of it into the level, and the level's
    summary covers only the requests started after the ramp (all of them under ``summary_with_ramp``)."""
    async def completions(request):
        await asyncio.sleep(0.05)  # the server's time per request, so that conversations overlap the ramp's end
        return await _stream_answer(request, await request.json())

    workload = generators.agentic(3, 512, first_turn_tokens=20, follow_ups=(4, 4), turn_tokens=5, output_tokens=4,
                                  think_time_s=0.0, jitter=0.0, seed=1)
    results = _run_over_http(completions, workload, concurrency=(3,), ramp_s=0.3, return_token_ids=True,
                             out=str(tmp_path / "ramp.json"))
    [level] = results["levels"]
    starts = sorted(r["start_s"] for r in level["requests"] if r["turn"] == 0)
    # (1 ms: the event loop's timer granularity)
    assert len(starts) == 3 and all(start >= i * 0.1 - 1e-3 for i, start in enumerate(starts))
    after = [r for r in level["requests"] if r["start_s"] >= 0.3]
    assert 0 < len(after) < len(level["requests"]) == 15
    assert level["summary"]["requests"] == len(after) and level["summary_with_ramp"]["requests"] == 15
    assert level["ramp_s"] == 0.3


def test_ramp_needs_a_closed_loop_shorter_than_the_level():
    from loadtest.runner import RunConfig, RunError

    with pytest.raises(RunError, match="only the closed loop ramps"):
        RunConfig(workload="w", mode="open", ramp_s=5.0)
    with pytest.raises(RunError, match="shorter than max_duration_s"):
        RunConfig(workload="w", ramp_s=30.0, max_duration_s=20.0)


def test_prompt_codec_text_and_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from loadtest.runner import PromptCodec, RunConfig, RunError

    vocab = {word: i for i, word in enumerate(["<unk>", "alpha", "beta", "gamma", "delta"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))

    text = PromptCodec("text", str(tmp_path))  # a directory holding tokenizer.json
    assert text.empty() == "" and text.new_tokens([1, 3]) == "alpha gamma" and text.answer(None, " beta") == " beta"
    assert text.length("alpha") is None
    ids = PromptCodec("ids", str(path))
    assert ids.answer(None, "beta delta") == [2, 4] and ids.answer([7], "ignored") == [7] and ids.length([1, 2]) == 2
    with pytest.raises(RunError, match="pass --tokenizer"):
        PromptCodec("ids", None).answer(None, "beta")
    with pytest.raises(RunError, match="text prompts need --tokenizer"):
        RunConfig(workload="w", prompt_format="text")
    with pytest.raises(RunError, match="mode must be"):
        RunConfig(workload="w", mode="burst")

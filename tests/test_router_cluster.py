"""The router in front of real pods, all separate processes on loopback, with a real redis-server: cache-aware
placement on a multi-turn trace against round robin, replicas that agree, Redis lost and restarted empty, a
decode pod killed mid-stream, admission control when every pod is full, and bad input.

Every output is compared with the single-process engine's greedy output, token for token.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest

from loadtest.agentic import agentic_trace, reusable_tokens
from services.common.protos import inference_pb2
from services.engine.request import SamplingParams
from tests.helpers import cpu_engine
from tests.pods import Pod, RedisServer, assert_pod_clean, wait_until
from tests.test_pd_cluster import PAGE, engine_flags

NUM_CONVERSATIONS = 5
NUM_FOLLOW_UPS = 4


def _serve(role: str, checkpoint: str, redis: RedisServer, *extra: str) -> Pod:
    # Streams keep only their last 10 batches: a router that falls behind or starts late must use snapshots.
    return Pod(role, *engine_flags(checkpoint), "--redis-url", redis.url, "--event-stream-maxlen", "10", *extra)


def _router(checkpoint: str, redis: RedisServer, *extra: str) -> Pod:
    # The prompts here are ~100 tokens where agentic ones are ~50K: the load weight (prompt tokens one more
    # request on a pod is worth) is scaled down with them.
    return Pod("router", "--model", checkpoint, "--page-size", str(PAGE), "--redis-url", redis.url,
               "--poll-interval-s", "0.05", "--weight-request", "4", *extra)


def _request(tokens: list[int], max_tokens: int, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=tokens),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    )


def generate(router: Pod, tokens: list[int], max_tokens: int = 8, **sampling):
    """Tokens, the last response, and the decode pod that served it (the router's trailing metadata)."""
    call = router.inference.Generate(_request(tokens, max_tokens, **sampling), timeout=120)
    out, last = [], None
    for response in call:
        out.extend(response.token_ids)
        last = response
    served_by = dict(call.trailing_metadata())["baton-decode-pod"]
    return out, last, served_by


def index_matches(router: Pod, pods: list[Pod]) -> bool:
    """The router's index of every pod equals that pod's own cache (counts and hash sums), and is in step."""
    workers = {w.instance_id: w for w in router.health().workers}
    for pod in pods:
        seen = workers.get(pod.info["instance_id"])
        if seen is None or seen.feed_state != "following":
            return False
        usage = pod.health().usage
        if (seen.index_pages, seen.index_states, seen.index_page_digest, seen.index_state_digest) != (
            usage.pages_cached, usage.checkpoints_cached, usage.cache_page_digest, usage.cache_state_digest
        ):
            return False
    return True


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Single-process greedy output (thread-safe: the trace runs conversations in parallel)."""
    engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=700, max_num_seqs=40, prefill_chunk_size=64,
                        max_num_batched_tokens=512)
    lock = threading.Lock()

    def expected(tokens: list[int], max_tokens: int = 8, **sampling) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, **sampling)
        with lock:
            return engine.generate([tokens], params)[0].token_ids

    return expected


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    redis = RedisServer()
    prefills = [_serve("prefill", tiny_checkpoint, redis) for _ in range(2)]
    decodes = [_serve("decode", tiny_checkpoint, redis) for _ in range(3)]
    routers = [_router(tiny_checkpoint, redis) for _ in range(2)]
    round_robin = _router(tiny_checkpoint, redis, "--policy", "round_robin")
    everyone = [*prefills, *decodes, *routers, round_robin]
    try:
        for router in [*routers, round_robin]:
            wait_until(lambda r=router: len(r.health().workers) == 5, what="the routers to see all 5 pods")
        yield {"redis": redis, "prefills": prefills, "decodes": decodes, "routers": routers,
               "round_robin": round_robin}
    finally:
        for process in everyone:
            process.stop()
        redis.stop()


def _run_trace(routers: list[Pod], seed: int, expected) -> dict:
    """Conversations in parallel, each turn through the next router in turn; returns the placement figures."""
    trace = agentic_trace(NUM_CONVERSATIONS, first_turn_tokens=70, num_follow_ups=NUM_FOLLOW_UPS,
                          follow_up_tokens=12, vocab_size=512, seed=seed)
    computed: list[list[int]] = []
    lock = threading.Lock()
    figures = {"follow_ups": 0, "on_holder": 0, "reusable": 0, "cached": 0, "mismatches": []}

    def converse(conversation):
        holder = None
        turn = 0
        while (prompt := conversation.next_prompt()) is not None:
            router = routers[(conversation.conversation_id + turn) % len(routers)]
            with lock:
                reusable = reusable_tokens(prompt, computed)
            tokens, last, served_by = generate(router, prompt, max_tokens=6 + turn)
            if tokens != expected(prompt, 6 + turn):
                figures["mismatches"].append((conversation.conversation_id, turn))
            with lock:
                computed.append(prompt + tokens)
                if turn:
                    figures["follow_ups"] += 1
                    figures["on_holder"] += served_by == holder
                figures["reusable"] += reusable
                figures["cached"] += min(last.usage.cached_tokens, reusable)
            holder = served_by
            conversation.finish_turn(prompt, tokens)
            turn += 1

    with concurrent.futures.ThreadPoolExecutor(NUM_CONVERSATIONS) as pool:
        list(pool.map(converse, trace))
    return figures


def test_cache_aware_placement_beats_round_robin_on_a_multi_turn_trace(cluster, reference):
    cache_aware = _run_trace(cluster["routers"], seed=11, expected=reference)
    round_robin = _run_trace([cluster["round_robin"]], seed=12, expected=reference)
    for name, fig in (("cache_aware", cache_aware), ("round_robin", round_robin)):
        print(f"{name}: {fig['on_holder']}/{fig['follow_ups']} follow-up turns on the pod holding their prefix, "
              f"{fig['cached']}/{fig['reusable']} reusable prompt tokens served from cache "
              f"({fig['cached'] / fig['reusable']:.1%})")
    assert cache_aware["mismatches"] == [] and round_robin["mismatches"] == []
    assert cache_aware["on_holder"] >= 0.95 * cache_aware["follow_ups"]
    assert cache_aware["cached"] >= 0.90 * cache_aware["reusable"]
    assert round_robin["cached"] < cache_aware["cached"]
    for router in cluster["routers"]:
        wait_until(lambda r=router: index_matches(r, cluster["decodes"] + cluster["prefills"]),
                   what="the index to equal every pod's cache")
    metrics = cluster["routers"][0].metrics()
    assert metrics['baton_router_prefix_hit_tokens_total{kind="delivered"}'] > 0
    assert metrics["baton_router_cache_events_total"] > 0
    for pod in cluster["decodes"] + cluster["prefills"]:
        assert_pod_clean(pod)


def test_text_prompts_are_tokenized_in_the_router(cluster, reference):
    router = cluster["routers"][0]
    request = inference_pb2.GenerateRequest(text="Baton hands the state over: ",
                                            sampling=inference_pb2.SamplingParams(max_tokens=6, temperature=0.0))
    responses = list(router.inference.Generate(request, timeout=60))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == reference(list(b"Baton hands the state over: "), 6)  # the tiny model's byte tokenizer
    assert responses[-1].usage.prompt_tokens == len(b"Baton hands the state over: ")


def test_a_router_started_late_converges_to_the_pods_caches(cluster, tiny_checkpoint):
    """Its workers' streams were trimmed or began before it: it rebuilds them from snapshots (or replays
    what is still there) without any pod restarting."""
    late = _router(tiny_checkpoint, cluster["redis"])
    try:
        wait_until(lambda: index_matches(late, cluster["decodes"] + cluster["prefills"]), timeout=60,
                   what="a late router's index to equal every pod's cache")
        assert any(w.resyncs for w in late.health().workers), "the trimmed streams needed snapshots"
    finally:
        late.stop()


def _idle(router: Pod) -> bool:
    return all(w.active == 0 for w in router.health().workers)


def test_replicas_make_the_same_choice_and_share_their_load(cluster):
    """Two routers with the same view, asked at the same moment, choose the same pod; a request in flight
    through one router counts on the other, so the other does not pile onto the same pod."""
    a, b = cluster["routers"]
    for seed in range(4):
        wait_until(lambda: _idle(a) and _idle(b), what="both routers to see an idle cluster")
        prompt = _tokens(20 + seed, seed=500 + seed)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first, second = pool.map(lambda r, p=prompt: generate(r, p)[2], (a, b))
        assert first == second
    wait_until(lambda: _idle(a) and _idle(b), what="both routers to see an idle cluster")
    held = a.inference.Generate(_request(_tokens(20, seed=520), 2000, ignore_eos=True), timeout=120)
    try:
        busy = dict(held.initial_metadata())["baton-decode-pod"]
        wait_until(lambda: any(w.address == busy and w.active == 1 for w in b.health().workers),
                   what="the other router to count the request in flight")
        assert generate(b, _tokens(20, seed=521))[2] != busy
    finally:
        held.cancel()


def _tokens(n: int, seed: int) -> list[int]:
    import torch

    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"token_ids": inference_pb2.TokenIds(ids=[])}, "prompt is empty"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1, 70000])}, "out of range"),
        ({"text": ""}, "prompt is empty"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1]), "sampling": inference_pb2.SamplingParams(top_p=0)},
         "top_p"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1]), "sampling": inference_pb2.SamplingParams(max_tokens=0)},
         "max_tokens"),
        ({"token_ids": inference_pb2.TokenIds(ids=list(range(400)) * 9)}, "exceeds the maximum context"),
    ],
)
def test_bad_input_gets_invalid_argument_and_the_router_keeps_serving(cluster, reference, request_kwargs, message):
    router = cluster["routers"][0]
    with pytest.raises(grpc.RpcError) as err:
        list(router.inference.Generate(inference_pb2.GenerateRequest(**request_kwargs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    prompt = _tokens(30, seed=600)
    assert generate(router, prompt)[0] == reference(prompt, 8)


def test_invalid_utf8_text_is_invalid_argument(cluster):
    router = cluster["routers"][0]
    # field 2 (text), wire type 2 (bytes), 2 bytes that are not UTF-8
    raw = bytes([0x12, 0x02, 0xC3, 0x28])
    generate_raw = router.channel.unary_stream("/baton.v1.Inference/Generate", request_serializer=lambda b: b,
                                               response_deserializer=inference_pb2.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(generate_raw(raw, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()


def test_redis_lost_and_restarted_empty(cluster, reference):
    """Requests keep succeeding while Redis is gone (placement by load from the last known state); Redis back
    with nothing in it, the pods re-register, the routers notice the lost batches, and the index converges to
    the pods' caches again from snapshots."""
    redis, router = cluster["redis"], cluster["routers"][0]
    pods = cluster["decodes"] + cluster["prefills"]
    redis.kill()
    wait_until(lambda: not router.health().redis_up, what="the router to notice Redis is gone")
    prompts = [_tokens(50, seed=700 + i) for i in range(3)]
    for prompt in prompts:
        assert generate(router, prompt)[0] == reference(prompt, 8)
    assert router.metrics()['baton_router_decisions_total{policy="cache_aware",reason="redis_down"}'] >= 3
    redis.start()
    wait_until(lambda: router.health().redis_up, what="the router to reconnect")
    for r in cluster["routers"]:
        wait_until(lambda r=r: index_matches(r, pods), timeout=60, what="the index to converge after the restart")
    assert sum(w.resyncs for w in router.health().workers) >= 1
    # Cache-aware again: a follow-up of one of the prompts served while Redis was down hits its pod's cache.
    first, _, _ = generate(router, prompts[0])
    follow_up = prompts[0] + first + _tokens(5, seed=710)
    tokens, last, _ = generate(router, follow_up)
    assert tokens == reference(follow_up, 8)
    assert last.usage.cached_tokens >= len(prompts[0]) - PAGE


def test_decode_pod_killed_mid_stream_the_stream_continues_elsewhere(cluster, reference):
    router = cluster["routers"][1]
    prompt = _tokens(40, seed=800)
    call = router.inference.Generate(_request(prompt, 120, ignore_eos=True), timeout=120)
    serving = dict(call.initial_metadata())["baton-decode-pod"]
    victim = next(p for p in cluster["decodes"] if p.address == serving)
    tokens = []
    for response in call:
        tokens.extend(response.token_ids)
        if victim.proc.poll() is None and len(tokens) >= 5:
            victim.kill()
    assert tokens == reference(prompt, 120, ignore_eos=True)
    assert dict(call.trailing_metadata())["baton-decode-pod"] != serving
    assert router.metrics()['baton_router_failovers_total{stage="mid_stream"}'] >= 1
    cluster["decodes"].remove(victim)
    wait_until(lambda: victim.info["instance_id"] not in {w.instance_id for w in router.health().workers},
               what="the dead pod to leave the router's table")
    for pod in cluster["decodes"]:
        wait_until(lambda p=pod: p.health().usage.running == 0, what="the surviving pods to go idle")
        assert_pod_clean(pod)


def test_all_pods_full_is_resource_exhausted_at_once_then_served(tiny_checkpoint, reference):
    redis = RedisServer()
    decode = _serve("decode", tiny_checkpoint, redis, "--max-num-seqs", "2", "--max-waiting-requests", "1")
    router = _router(tiny_checkpoint, redis)
    try:
        wait_until(lambda: len(router.health().workers) == 1, what="the router to see the pod")
        long = [router.inference.Generate(_request(_tokens(20, seed=900 + i), 2000, ignore_eos=True), timeout=120)
                for i in range(3)]
        wait_until(lambda: decode.health().usage.waiting == 1 and decode.health().usage.running == 2,
                   what="2 requests running and 1 waiting on the pod")
        with pytest.raises(grpc.RpcError) as err:
            list(router.inference.Generate(_request(_tokens(20, seed=950), 4), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in err.value.details()
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
        # The pod refuses on its own too, when a client bypasses the router.
        direct = [decode.inference.Generate(_request(_tokens(20, seed=960), 4), timeout=30)]
        with pytest.raises(grpc.RpcError) as err:
            list(direct[0])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in long:
            call.cancel()
        wait_until(lambda: all(w.active == 0 for w in router.health().workers), what="the load to drain")
        prompt = _tokens(20, seed=970)
        assert generate(router, prompt, max_tokens=4)[0] == reference(prompt, 4)
        wait_until(lambda: decode.health().usage.running == 0, what="the pod to finish")
        assert_pod_clean(decode)
    finally:
        router.stop()
        decode.stop()
        redis.stop()

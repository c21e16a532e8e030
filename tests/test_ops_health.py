"""Operations on a real cluster (redis-server, a router, a prefill pod and two decode pods, separate processes on
loopback): the standard gRPC health service on every process, Generate called through server reflection alone,
and a decode pod drained by SIGTERM while it streams.

Outputs are compared with the single-process engine's greedy output, token for token.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.protos import inference_pb2
from services.engine.request import SamplingParams
from tests.helpers import cpu_engine
from tests.pods import Pod, RedisServer, assert_pod_clean, wait_until
from tests.test_pd_cluster import PAGE, THRESHOLD, engine_flags

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# Long enough that a pod deregistered only by its record expiring would still be routed to during the test: the
# router must drop a drained pod from its departure notice.
TTL = ["--heartbeat-ttl-s", "30"]
REFLECTION_CLIENT = Path(__file__).with_name("reflection_client.py")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=700, max_num_seqs=40, prefill_chunk_size=64,
                        max_num_batched_tokens=512)

    def expected(tokens: list[int], max_tokens: int, **sampling) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, **sampling)
        return engine.generate([tokens], params)[0].token_ids

    return expected


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    """The prefill pod pauses every hand-over until ``resume`` exists: a request sent to it holds a decode pod's
    drain open for as long as the test needs (prompts under THRESHOLD tokens are prefilled on the decode pod)."""
    resume = tmp_path_factory.mktemp("drain") / "resume"
    server = RedisServer()
    started: list[Pod] = []

    def start(role: str, *args: str) -> Pod:
        pod = Pod(role, *args)
        started.append(pod)
        return pod

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            prefill_f = pool.submit(start, "prefill", *engine_flags(tiny_checkpoint), "--redis-url", server.url, *TTL,
                                    "--fault-transfer-pause-s", "300", "--fault-transfer-resume-file", str(resume))
            routers = [pool.submit(start, "router", "--model", tiny_checkpoint, "--tokenizer", "byte", "--page-size",
                                   str(PAGE), "--redis-url", server.url, "--poll-interval-s", "0.05", *TTL)
                       for _ in range(2)]
            prefill, router, router2 = prefill_f.result(), routers[0].result(), routers[1].result()
            decodes = list(pool.map(lambda _: start("decode", *engine_flags(tiny_checkpoint), "--redis-url",
                                                    server.url, *TTL, "--prefill-addrs", prefill.address,
                                                    "--drain-grace-s", "120"), range(2)))
        for each in (router, router2):
            wait_until(lambda r=each: sum(w.eligible for w in r.health().workers) == 3, what="a router to see 3 pods")
        yield {"redis": server, "router": router, "router2": router2, "prefill": prefill, "decodes": decodes,
               "resume": resume}
    finally:
        resume.touch()  # a paused hand-over must not hold a pod's stop
        for pod in started:
            pod.stop()
        server.stop()


def _check(pod: Pod, service: str) -> int:
    return health_pb2_grpc.HealthStub(pod.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def _request(tokens: list[int], max_tokens: int, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=tokens),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    )


def _routed(router: Pod, tokens: list[int], max_tokens: int) -> tuple[list[int], str]:
    call = router.inference.Generate(_request(tokens, max_tokens), timeout=120)
    out = [t for response in call for t in response.token_ids]
    return out, dict(call.trailing_metadata())["baton-decode-pod"]


def _reflect(address: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(REFLECTION_CLIENT), address, *args], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_process_serves_standard_health(cluster):
    router, prefill, decodes = cluster["router"], cluster["prefill"], cluster["decodes"]
    for pod, api in [(router, "baton.v1.Inference"), (prefill, "baton.v1.Prefill"),
                     *[(d, "baton.v1.Inference") for d in decodes]]:
        for service in ("", api, "liveness"):
            assert _check(pod, service) == SERVING, (pod.role, service)
        other = "baton.v1.Prefill" if api == "baton.v1.Inference" else "baton.v1.Inference"
        with pytest.raises(grpc.RpcError) as err:
            _check(pod, other)  # a service this process does not serve
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert pod.health().serving  # Baton's own Health agrees


def test_generate_through_reflection_alone(cluster, reference):
    router, prefill, decodes = cluster["router"], cluster["prefill"], cluster["decodes"]
    standard = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert set(_reflect(prefill.address, "list")["services"]) == standard | {"baton.v1.Prefill"}
    assert set(_reflect(decodes[0].address, "list")["services"]) == standard | {"baton.v1.Inference"}
    prompt = list(range(40, 60))  # under THRESHOLD: prefilled on the decode pod (the prefill pod pauses)
    request = {"token_ids": {"ids": prompt}, "sampling": {"max_tokens": 10, "temperature": 0.0}}
    result = _reflect(router.address, "generate", json.dumps(request))
    assert set(result["services"]) == standard | {"baton.v1.Inference"}
    assert result["generated_modules_loaded"] == [], "the generic client must not use Baton's generated code"
    assert result["response_type"] == "baton.v1.GenerateResponse" and result["finished"]
    normal, _ = _routed(router, prompt, 10)
    assert result["token_ids"] == normal == reference(prompt, 10)


def _http_health_status(router: Pod) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{router.info['http_port']}/health", timeout=10).status
    except urllib.error.HTTPError as err:
        return err.code


def test_sigterm_drains_a_decode_pod_and_a_router(cluster, reference):
    """SIGTERM to decode pod A with two streams on it: one decoding (placed by the router) and one whose prompt a
    prefill pod is still computing (held there until the test lets it go). A says NOT_SERVING at once, leaves
    Redis, is dropped by the router, refuses new requests; new requests go to B without a failover; both streams
    finish with every token; A exits 0. SIGTERM to a second router at the same time, with a held stream: it says
    NOT_SERVING (gRPC and HTTP), refuses new requests, finishes its stream and exits 0."""
    router, router2, prefill, decodes = cluster["router"], cluster["router2"], cluster["prefill"], cluster["decodes"]
    r = redis.Redis.from_url(cluster["redis"].url)
    try:
        # Stream 1 through the router; the pod it landed on is A.
        decoding_prompt = list(range(100, 120))
        stream = router.inference.Generate(_request(decoding_prompt, 64, ignore_eos=True), timeout=180)
        address = dict(stream.initial_metadata())["baton-decode-pod"]
        a = next(d for d in decodes if d.address == address)
        b = next(d for d in decodes if d is not a)
        decoded = list(next(stream).token_ids)  # mid-stream
        # Stream 2 straight to A: its prompt goes to the prefill pod, which pauses halfway through the hand-over.
        held_prompt = list(range(200, 200 + THRESHOLD + 8))
        mark = prefill.mark()
        held = a.inference.Generate(_request(held_prompt, 12), timeout=180)
        prefill.wait_for_log("pausing", since=mark)
        # Stream 3 through the second router, held the same way (on whichever decode pod it places it).
        routed_prompt = list(range(400, 400 + THRESHOLD + 8))
        mark = prefill.mark()
        through_router2 = router2.inference.Generate(_request(routed_prompt, 12), timeout=180)
        prefill.wait_for_log("pausing", since=mark)
        failovers = router.metrics().get('baton_router_failovers_total{stage="before_first_token"}', 0.0)
        a_id = a.info["instance_id"]
        assert r.sismember("baton:workers", a_id) and r.exists(f"baton:worker:{a_id}")

        a.proc.terminate()
        router2.proc.terminate()
        wait_until(lambda: _check(a, "baton.v1.Inference") == NOT_SERVING, what="A to say NOT_SERVING")
        assert _check(a, "") == NOT_SERVING
        assert _check(a, "liveness") == SERVING  # draining is alive: no restart mid-drain
        assert not a.health().serving  # Baton's own Health agrees
        wait_until(lambda: not r.exists(f"baton:worker:{a_id}") and not r.sismember("baton:workers", a_id),
                   timeout=10, what="A's registry entry to leave Redis")
        wait_until(lambda: a_id not in {w.instance_id for w in router.health().workers}, timeout=10,
                   what="the router to drop A (its departure notice; the record's TTL is 30 s)")
        with pytest.raises(grpc.RpcError) as refused:
            a.generate(list(range(10, 20)), max_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        for i in range(3):  # new requests during the drain: all on B, none tried on A first
            prompt = list(range(300 + 20 * i, 316 + 20 * i))
            out, served_by = _routed(router, prompt, 6)
            assert served_by == b.address and out == reference(prompt, 6)
        assert router.metrics().get('baton_router_failovers_total{stage="before_first_token"}', 0.0) == failovers
        assert a.proc.poll() is None, "A must wait for its streams"

        wait_until(lambda: _check(router2, "baton.v1.Inference") == NOT_SERVING, what="router 2 to say NOT_SERVING")
        assert _check(router2, "") == NOT_SERVING and _check(router2, "liveness") == SERVING
        assert not router2.health().serving and _http_health_status(router2) == 503
        with pytest.raises(grpc.RpcError) as refused:
            _routed(router2, list(range(10, 20)), 4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        assert router2.proc.poll() is None, "router 2 must wait for its stream"

        cluster["resume"].touch()  # let the hand-over finish: both streams end, then A stops
        decoded += [t for response in stream for t in response.token_ids]
        assert decoded == reference(decoding_prompt, 64, ignore_eos=True)
        assert [t for response in held for t in response.token_ids] == reference(held_prompt, 12)
        assert [t for response in through_router2 for t in response.token_ids] == reference(routed_prompt, 12)
        assert router2.proc.wait(timeout=60) == 0
        assert a.proc.wait(timeout=60) == 0
        assert int(a.wait_for_log("streams (up to").split("draining ")[1].split()[0]) >= 1  # stream 2 at least
    finally:
        r.close()
    wait_until(lambda: b.health().usage.running == 0, what="B to finish")
    assert_pod_clean(b)
    wait_until(lambda: prefill.health().usage.held == 0, what="the prefill pod to settle")
    assert_pod_clean(prefill)

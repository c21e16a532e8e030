"""Prefill and decode pods as real processes on loopback, handing state over through Mooncake (TCP).

Greedy output must equal the single-process engine's token for token; the bytes handed over must be
exactly the decode pod's missing pages plus two slots of conv and SSM state (the final state and the one
at the prompt's resume boundary); the same prompt again is served from the decode pod's cache. Faults (a
transfer slower than the decode pod's deadline, a prefill pod killed mid-transfer and restarted with
quarantined memory outstanding, an error inside the engine thread, a prefill pod answering nonsense,
malformed requests, duplicate request ids, cancelled streams) must end in a correct stream or a clear
error, and no leak on either side.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest
import torch

from services.common.protos import inference_pb2, pd_pb2
from services.engine.request import SamplingParams
from services.transfer.handover import state_layout
from tests.helpers import cpu_engine
from tests.pods import Pod, assert_pod_clean

PAGE = 4
THRESHOLD = 32  # uncached prompts at least this long go to the prefill pod


def engine_flags(checkpoint: str, page_size: int = PAGE, tokenizer: str = "byte") -> list[str]:
    return [
        "--model", checkpoint, "--tokenizer", tokenizer, "--device", "cpu", "--dtype", "float32",
        "--page-size", str(page_size),
        "--num-pages", "700", "--max-num-seqs", "40", "--prefill-chunk-size", "64",
        "--max-num-batched-tokens", "512", "--remote-prefill-threshold", str(THRESHOLD),
        "--checkpoint-interval", "32",
    ]


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=700, max_num_seqs=40, prefill_chunk_size=64,
                        max_num_batched_tokens=512)

    def expected(tokens: list[int], max_tokens: int = 12) -> list[int]:
        return engine.generate([tokens], SamplingParams(max_tokens=max_tokens, temperature=0))[0].token_ids

    return expected


def _serve(role: str, checkpoint: str, *extra: str, page_size: int = PAGE) -> Pod:
    return Pod(role, *engine_flags(checkpoint, page_size), *extra)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    prefill = _serve("prefill", tiny_checkpoint)
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _bytes_sent(prefill: Pod) -> float:
    return prefill.metrics().get("baton_transfer_bytes_total", 0.0)


def _expected_bytes(prompt_len: int, cached: int, layout) -> int:
    """Missing pages (every attention layer) + two slots of conv and SSM state (the final state and the one
    at the prompt's resume boundary), nothing else."""
    missing_pages = -(-prompt_len // PAGE) - cached // PAGE
    return missing_pages * layout["kv_page_bytes"] * layout["attn_layers"] + 2 * layout["slot_bytes"]


def _layout_of(engine) -> dict:
    """Bytes of one KV page of one attention layer, the attention layers, bytes of one conv + SSM state slot."""
    kv = engine.runner.kv_cache.buffer
    states = engine.runner.state_cache
    return {
        "kv_page_bytes": kv[0, 0].numel() * kv.element_size(),
        "attn_layers": kv.shape[0],
        "slot_bytes": sum(s[0].numel() * s.element_size() for s in (states.conv, states.ssm)),
    }


@pytest.fixture(scope="module")
def layout(tiny_checkpoint):
    return _layout_of(cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=8))


def _fresh_then_shared(prefill: Pod, decode: Pod, expected, layout: dict, seeds: tuple[int, int]) -> list[int]:
    """A fresh 100-token prompt, then one sharing its first 60 tokens: outputs as ``expected``, every page of
    the first sent, and for the second only the pages past those the decode pod holds (with the two state
    slots each time). Returns the fresh prompt."""
    fresh = _tokens(100, seed=seeds[0])
    before = _bytes_sent(prefill)
    tokens, last = decode.generate(fresh)
    assert tokens == expected(fresh)
    assert last.usage.cached_tokens == 0
    assert _bytes_sent(prefill) - before == _expected_bytes(100, 0, layout)
    # The decode pod holds the shared tokens' KV (no checkpoint there), so the prefill pod recomputes the state
    # from its own cache but sends only the pages past them.
    shared = fresh[:60] + _tokens(50, seed=seeds[1])
    before = _bytes_sent(prefill)
    tokens, last = decode.generate(shared)
    assert tokens == expected(shared)
    assert last.usage.cached_tokens == 60
    assert _bytes_sent(prefill) - before == _expected_bytes(110, 60, layout)
    return fresh


def test_handover_matches_single_process_and_moves_only_missing_pages(cluster, reference, layout):
    prefill, decode = cluster
    fresh = _fresh_then_shared(prefill, decode, reference, layout, seeds=(1, 2))

    # Follow-up turn: previous prompt + answer + a short message. The decode pod holds all but the short
    # suffix, so it prefills locally: nothing is handed over.
    follow_up = fresh + tokens_of(decode, fresh) + _tokens(10, seed=3)
    before = _bytes_sent(prefill)
    tokens, last = decode.generate(follow_up)
    assert tokens == reference(follow_up)
    assert last.usage.cached_tokens >= 100
    assert _bytes_sent(prefill) - before == 0
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


@pytest.mark.parametrize("length", [64, 101])
def test_same_prompt_twice_is_served_from_the_decode_pods_cache(cluster, reference, length):
    """Regenerate, retries, best-of-n: after a remote prefill the decode pod holds the prompt's KV and the
    state at its last page boundary before the last token, so the same prompt again computes at most one
    page here and nothing is sent."""
    prefill, decode = cluster
    prompt = _tokens(length, seed=60 + length)
    first, _ = decode.generate(prompt)
    assert first == reference(prompt)
    sent = _bytes_sent(prefill)
    pages = prefill.metrics().get("baton_transfer_kv_pages_total", 0.0)
    again, last = decode.generate(prompt)
    assert again == first
    assert last.usage.cached_tokens >= length - PAGE
    assert _bytes_sent(prefill) == sent and prefill.metrics().get("baton_transfer_kv_pages_total", 0.0) == pages
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


def tokens_of(decode: Pod, prompt: list[int]) -> list[int]:
    tokens, _ = decode.generate(prompt)
    return tokens


def test_multi_turn_conversation(cluster, reference):
    prefill, decode = cluster
    history = _tokens(90, seed=4)
    sent_before = _bytes_sent(prefill)
    for turn in range(4):
        tokens, last = decode.generate(history, max_tokens=8 + turn)
        assert tokens == reference(history, max_tokens=8 + turn), turn
        if turn:
            assert last.usage.cached_tokens >= len(history) - 30, "later turns hit the decode pod's cache"
        history = history + tokens + _tokens(15, seed=40 + turn)
    assert _bytes_sent(prefill) > sent_before, "the first turn went to the prefill pod"
    assert_pod_clean(decode)


def test_32_concurrent_streams(cluster, reference):
    prefill, decode = cluster
    prompts = [_tokens(20 + 7 * i, seed=100 + i) for i in range(32)]  # short ones local, long ones remote
    expected = [reference(p, max_tokens=10) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: decode.generate(p, max_tokens=10)[0], prompts))
    assert results == expected
    assert prefill.metrics()["baton_transfer_bytes_total"] > 0
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"token_ids": inference_pb2.TokenIds(ids=[])}, "prompt is empty"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1, 70000])}, "out of range"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1]), "sampling": inference_pb2.SamplingParams(max_tokens=0)},
         "max_tokens"),
        ({"token_ids": inference_pb2.TokenIds(ids=[1]), "sampling": inference_pb2.SamplingParams(temperature=-1)},
         "temperature"),
        ({"token_ids": inference_pb2.TokenIds(ids=list(range(400)) * 9)}, "exceeds the maximum context"),
    ],
)
def test_malformed_requests_get_invalid_argument(cluster, reference, request_kwargs, message):
    _, decode = cluster
    with pytest.raises(grpc.RpcError) as err:
        list(decode.inference.Generate(inference_pb2.GenerateRequest(**request_kwargs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    prompt = _tokens(40, seed=5)
    assert decode.generate(prompt)[0] == reference(prompt), "the pod keeps serving"


def _with_bad_utf8(message, text: str) -> bytes:
    """``message`` serialized, with the UTF-8 of ``text`` (a string field's value) replaced by invalid bytes."""
    data = message.SerializeToString()
    assert data.count(text.encode()) == 1
    return data.replace(text.encode(), b"\xff\xfe" + text.encode()[2:])


def test_invalid_utf8_is_invalid_argument(cluster, reference):
    """A proto3 string that is not UTF-8 fails to parse before any handler runs; the client must learn why."""
    prefill, decode = cluster
    request = inference_pb2.GenerateRequest(text="hello there", sampling=inference_pb2.SamplingParams(max_tokens=2))
    generate = decode.channel.unary_stream(
        "/baton.v1.Inference/Generate", request_serializer=lambda raw: raw,
        response_deserializer=inference_pb2.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(generate(_with_bad_utf8(request, "hello there"), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details() and "GenerateRequest" in err.value.details()
    abort = prefill.channel.unary_unary(
        "/baton.v1.Prefill/Abort", request_serializer=lambda raw: raw,
        response_deserializer=pd_pb2.AbortResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        abort(_with_bad_utf8(pd_pb2.AbortRequest(request_id="call-1", decode_id="d"), "call-1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    prompt = _tokens(40, seed=5)
    assert decode.generate(prompt)[0] == reference(prompt), "the pod keeps serving"


def test_temperature_near_zero_is_greedy(cluster, reference):
    """1e-38 used to overflow the logits to inf and always draw token 0."""
    _, decode = cluster
    prompt = _tokens(20, seed=11)
    request = _request(prompt, 6)
    request.sampling.temperature = 1e-38
    tokens = [t for r in decode.inference.Generate(request, timeout=60) for t in r.token_ids]
    assert tokens == reference(prompt, max_tokens=6)


def _prefill_outcomes(prefill: Pod) -> dict[str, float]:
    metrics = prefill.metrics()
    return {o: metrics[f'baton_prefill_requests_total{{outcome="{o}"}}']
            for o in ("finished", "invalid", "refused", "aborted", "error")}


def test_malformed_prefill_calls(cluster, tiny_checkpoint):
    prefill, _ = cluster
    before = _prefill_outcomes(prefill)
    with pytest.raises(grpc.RpcError) as err:
        prefill.prefill.Prefill(pd_pb2.PrefillRequest(request_id="x", decode_id="nobody", token_ids=[1]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "handshake first" in err.value.details()

    # A decode pod that restarts on the same transfer address replaces its old entry (the map stays bounded).
    engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=8)
    memory = pd_pb2.MemoryRegions(transfer_session="127.0.0.1:1", kv_base=1 << 20, kv_num_pages=8,
                                  conv_base=2 << 20, ssm_base=3 << 20, num_slots=4)
    for decode_id in ("old", "new"):
        prefill.prefill.Handshake(
            pd_pb2.HandshakeRequest(layout=state_layout(engine), memory=memory, decode_id=decode_id), timeout=10
        )
    call = pd_pb2.PrefillRequest(request_id="y", decode_id="old", token_ids=[1] * 10, dest_page_ids=[0, 1, 2])
    with pytest.raises(grpc.RpcError) as err:
        prefill.prefill.Prefill(call, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "handshake first" in err.value.details()

    # Aborted before it arrives (its call was cancelled on the way): refused, nothing written.
    assert not prefill.prefill.Abort(pd_pb2.AbortRequest(request_id="y", decode_id="new"), timeout=10).found
    call.decode_id = "new"
    with pytest.raises(grpc.RpcError) as err:
        prefill.prefill.Prefill(call, timeout=10)
    assert err.value.code() == grpc.StatusCode.ABORTED and "before it arrived" in err.value.details()
    # Each call counted once, under the outcome its status means.
    after = _prefill_outcomes(prefill)
    assert {o: after[o] - before[o] for o in after} == {"finished": 0, "invalid": 0, "refused": 2, "aborted": 1,
                                                        "error": 0}
    assert_pod_clean(prefill)


@pytest.fixture(scope="module")
def slow_cluster(tiny_checkpoint):
    """A prefill pod that pauses 2 s halfway through every hand-over, and its decode pod."""
    prefill = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "2")
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _request(tokens: list[int], max_tokens: int, request_id: str = "") -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=request_id, token_ids=inference_pb2.TokenIds(ids=tokens),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def test_cancelled_stream_frees_both_sides(slow_cluster):
    prefill, decode = slow_cluster
    mark_p, mark_d = prefill.mark(), decode.mark()
    call = decode.inference.Generate(_request(_tokens(120, seed=6), 50), timeout=60)
    prefill.wait_for_log("pausing", since=mark_p)  # mid-transfer
    call.cancel()
    decode.wait_for_log("ABORTED", since=mark_d)  # the prefill pod stopped and said so
    prefill.wait_for_log("hand-over settled", since=mark_p)
    prompt = _tokens(50, seed=7)
    decode.generate(prompt)  # after which the abort has been fully processed on both sides
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


def test_duplicate_request_ids_never_touch_each_other(slow_cluster, reference):
    """A client reusing a request id while the first request's prompt is on the prefill pod: both are served;
    the second must not abort the first's remote prefill (it used to, through its shared id)."""
    prefill, decode = slow_cluster
    metrics = decode.metrics()
    ok_before = metrics.get('baton_remote_prefills_total{outcome="ok"}', 0.0)
    others_before = [metrics.get(f'baton_remote_prefills_total{{outcome="{o}"}}', 0.0) for o in ("local", "retried")]
    long_prompt, short_prompt = _tokens(110, seed=12), _tokens(12, seed=13)
    mark = prefill.mark()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: list(decode.inference.Generate(_request(long_prompt, 8, "dup"), timeout=60)))
        prefill.wait_for_log("pausing", since=mark)
        second = list(decode.inference.Generate(_request(short_prompt, 8, "dup"), timeout=60))
        first = first.result(timeout=60)
    for responses, prompt in ((first, long_prompt), (second, short_prompt)):
        assert [t for r in responses for t in r.token_ids] == reference(prompt, max_tokens=8)
        assert all(r.request_id == "dup" for r in responses)
    metrics = decode.metrics()
    assert metrics['baton_remote_prefills_total{outcome="ok"}'] == ok_before + 1
    others = [metrics.get(f'baton_remote_prefills_total{{outcome="{o}"}}', 0.0) for o in ("local", "retried")]
    assert others == others_before, "the first request's remote prefill went through undisturbed"
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


def test_transfer_slower_than_the_deadline_never_reuses_memory(tiny_checkpoint, reference, tmp_path):
    """The decode pod gives up on a hand-over (deadline) while the prefill pod's write goes on. The write's
    destination must stay out of use (quarantined: the pod does not confirm within the Abort deadline)
    while the write may land, and come back once the pod confirms it stopped. Meanwhile the request is
    served locally, and a request running when the late write lands keeps its tokens (it used to be given
    the freed working slot, and the late write replaced its state)."""
    resume = tmp_path / "resume"
    prefill = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "60",
                     "--fault-transfer-resume-file", str(resume))
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address, "--prefill-timeout-s", "1",
                    "--rpc-timeout-s", "0.5", "--max-prefill-attempts", "1", "--peer-check-interval-s", "0.5")
    try:
        prompt = _tokens(120, seed=8)
        tokens, _ = decode.generate(prompt, max_tokens=4)
        assert tokens == reference(prompt, max_tokens=4), "served by a local prefill"
        usage = decode.health().usage
        assert usage.pages_quarantined == 30 and usage.slots_quarantined == 1 and usage.checkpoints_quarantined == 1
        assert decode.metrics()["baton_kv_pages_quarantined"] == 30
        assert decode.metrics()["baton_remote_prefill_quarantines_total"] == 1

        # A short prompt (prefilled here) decoding while the paused write goes on and lands.
        other = _tokens(10, seed=18)
        stream = decode.inference.Generate(_request(other, 100), timeout=120)
        streamed = list(next(stream).token_ids)
        resume.touch()
        prefill.wait_for_log("wrote its second half")
        streamed += [t for r in stream for t in r.token_ids]
        assert streamed == reference(other, max_tokens=100)

        prefill.wait_for_log("hand-over settled")
        decode.wait_for_log("confirmed it stopped: reclaiming")  # the decode pod took its memory back
        again, last = decode.generate(prompt, max_tokens=4)
        assert again == tokens and last.usage.cached_tokens > 0
        assert_pod_clean(decode)
        assert_pod_clean(prefill)
    finally:
        decode.stop()
        prefill.stop()


def test_two_prefill_pods_one_killed_mid_transfer_then_restarted(tiny_checkpoint, reference):
    """The first prefill pod is killed halfway through writing: the request completes on the second. The
    memory the dead pod was writing stays quarantined (a dead pod cannot confirm anything) until it is back
    with a new process id; then every page and slot is accounted for again."""
    first = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "3")
    second = _serve("prefill", tiny_checkpoint)
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", f"{first.address},{second.address}")
    try:
        prompt = _tokens(120, seed=8)
        result = {}
        client = threading.Thread(target=lambda: result.update(out=decode.generate(prompt)))
        client.start()
        first.wait_for_log("pausing")  # half the pages are written, the other half never will be
        first.kill()
        client.join(timeout=120)
        tokens, _ = result["out"]
        assert tokens == reference(prompt), "completed on the other prefill pod"
        assert second.metrics()["baton_transfer_bytes_total"] > 0
        metrics = decode.metrics()
        assert metrics["baton_remote_prefill_quarantines_total"] == 1
        assert metrics['baton_remote_prefills_total{outcome="ok"}'] == 1
        assert metrics.get('baton_remote_prefills_total{outcome="local"}', 0.0) == 0
        health = decode.health()
        assert not health.prefill_peers[0].usable and health.prefill_peers[1].usable
        assert health.usage.pages_quarantined > 0 and health.usage.slots_quarantined == 1
        assert_pod_clean(second)

        # Restart on the same port: the decode pod reconnects, sees a new process, takes its memory back.
        port = str(first.port)
        mark = decode.mark()
        first = _serve("prefill", tiny_checkpoint, "--port", port)
        decode.wait_for_log(f"prefill pod 127.0.0.1:{port} ready", since=mark)
        decode.wait_for_log("restarted (now", since=mark)
        prompt = _tokens(90, seed=9)
        assert decode.generate(prompt)[0] == reference(prompt)
        assert decode.health().prefill_peers[0].usable
        for pod in (decode, first, second):
            assert_pod_clean(pod)
    finally:
        for pod in (decode, first, second):
            pod.stop()


def test_prefill_pod_finishes_its_hand_overs_when_terminated(tiny_checkpoint, reference):
    """SIGTERM mid-transfer: the prefill pod refuses new prefills but finishes the hand-over it is writing
    before it closes its port (a decode pod takes a closed port for a pod that writes nothing more)."""
    prefill = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "2")
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    try:
        prompt = _tokens(100, seed=19)
        result = {}
        client = threading.Thread(target=lambda: result.update(out=decode.generate(prompt)))
        client.start()
        prefill.wait_for_log("pausing")
        prefill.proc.terminate()
        prefill.wait_for_log("draining 1 hand-overs")
        client.join(timeout=120)
        assert result["out"][0] == reference(prompt)
        assert prefill.proc.wait(timeout=60) == 0
        metrics = decode.metrics()
        assert metrics['baton_remote_prefills_total{outcome="ok"}'] == 1
        assert metrics.get("baton_remote_prefill_quarantines_total", 0.0) == 0
        assert_pod_clean(decode)
    finally:
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize("command", ["abort", "remote_done"])
def test_engine_thread_error_stops_the_pod(tiny_checkpoint, reference, command):
    """An error inside the engine thread outside a step (here injected while it handles a cancelled stream,
    or a prefill pod's answer): streams in flight fail with UNAVAILABLE naming it, and the pod exits
    non-zero so that it is restarted, instead of hanging every request and health check."""
    prefill = _serve("prefill", tiny_checkpoint) if command == "remote_done" else None
    addrs = ["--prefill-addrs", prefill.address] if prefill else []
    decode = _serve("decode", tiny_checkpoint, *addrs, "--fault-engine-error", command)
    try:
        running = decode.inference.Generate(_request(_tokens(20, seed=14), 2000), timeout=60)
        next(running)  # decoding
        if command == "abort":
            other = decode.inference.Generate(_request(_tokens(10, seed=15), 500), timeout=60)
            next(other)
            other.cancel()
        else:
            with pytest.raises(grpc.RpcError) as err:
                list(decode.inference.Generate(_request(_tokens(60, seed=16), 5), timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            list(running)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine thread died" in err.value.details() and "injected error" in err.value.details()
        assert decode.proc.wait(timeout=60) == 1
        assert any("the engine thread stopped" in line for line in decode.log)
        if prefill is not None:
            prefill.wait_for_log("hand-over settled")
            assert_pod_clean(prefill)
    finally:
        decode.stop()
        if prefill is not None:
            prefill.stop()


def test_first_token_out_of_range_is_prefilled_locally(tiny_checkpoint, reference):
    """A prefill pod answering a token outside the vocabulary (a bug there) must not reach the client or the
    engine: the decode pod prefills locally and answers correctly."""
    prefill = _serve("prefill", tiny_checkpoint, "--fault-first-token", "1000000")
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    try:
        prompt = _tokens(80, seed=17)
        assert decode.generate(prompt)[0] == reference(prompt)
        assert decode.metrics()['baton_remote_prefills_total{outcome="local"}'] == 1
        decode.wait_for_log("outside [0,")
        assert decode.health().serving
        assert_pod_clean(decode)
        assert_pod_clean(prefill)
    finally:
        decode.stop()
        prefill.stop()


def test_handshake_mismatch_is_refused_clearly(tiny_checkpoint, reference):
    mismatched = _serve("prefill", tiny_checkpoint, page_size=8)
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", mismatched.address)
    try:
        [peer] = decode.health().prefill_peers
        assert not peer.usable and "page_size" in peer.reason
        prompt = _tokens(60, seed=10)
        assert decode.generate(prompt)[0] == reference(prompt), "served locally instead"
        assert mismatched.metrics().get("baton_transfer_bytes_total", 0) == 0
        # Called directly, the prefill pod names the mismatch.
        with pytest.raises(grpc.RpcError) as err:
            mismatched.prefill.Handshake(pd_pb2.HandshakeRequest(decode_id="probe"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "page_size" in err.value.details()
        assert_pod_clean(decode)
    finally:
        decode.stop()
        mismatched.stop()


def test_fp8_kv_cache_on_both_pods(tiny_checkpoint, reference):
    """Both pods with ``--kv-cache-dtype fp8_e4m3``: the prefill pod's fp8 pages (one byte per element) land in
    the decode pod as they are, and the output equals a single fp8 engine's token for token, a prefix-cache hit
    included. A decode pod with the model-dtype cache finds the prefill pod unusable, the reason naming both KV
    dtypes, and serves locally; nothing is sent to it."""
    fp8 = ("--kv-cache-dtype", "fp8_e4m3")
    prefill = _serve("prefill", tiny_checkpoint, *fp8)
    decode = _serve("decode", tiny_checkpoint, *fp8, "--prefill-addrs", prefill.address)
    plain = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    try:
        single = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=700, max_num_seqs=40, prefill_chunk_size=64,
                            max_num_batched_tokens=512, kv_cache_dtype="fp8_e4m3")
        assert single.runner.kv_cache.buffer.element_size() == 1

        def expected(tokens: list[int]) -> list[int]:
            return single.generate([tokens], SamplingParams(max_tokens=12, temperature=0))[0].token_ids

        # The decode pod's cached fp8 pages serve a prompt sharing 60 tokens; the prefill pod sends the rest.
        _fresh_then_shared(prefill, decode, expected, _layout_of(single), seeds=(71, 72))

        [peer] = plain.health().prefill_peers
        assert not peer.usable
        assert "kv_dtype: prefill float8_e4m3fn, decode float32" in peer.reason and "--kv-cache-dtype" in peer.reason
        before = _bytes_sent(prefill)
        prompt = _tokens(60, seed=73)
        assert plain.generate(prompt)[0] == reference(prompt), "served locally, with its own float32 cache"
        assert _bytes_sent(prefill) == before
        for pod in (decode, plain, prefill):
            assert_pod_clean(pod)
    finally:
        for pod in (plain, decode, prefill):
            pod.stop()

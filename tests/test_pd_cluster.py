"""Prefill and decode pods as real processes on loopback, handing state over through Mooncake (TCP).

Greedy output must equal the single-process engine's token for token; the bytes handed over must be
exactly the decode pod's missing pages plus one slot of conv and SSM state; failures (a prefill pod
killed mid-transfer, restarted, refused at handshake, malformed requests, cancelled streams) must end
in a correct stream or a clear error, and no leak on either side.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest
import torch

from services.common.protos import inference_pb2, pd_pb2
from services.engine.request import SamplingParams
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
    """Missing pages (every attention layer) + one slot of conv and SSM state, nothing else."""
    missing_pages = -(-prompt_len // PAGE) - cached // PAGE
    return missing_pages * layout["kv_page_bytes"] * layout["attn_layers"] + layout["slot_bytes"]


@pytest.fixture(scope="module")
def layout(tiny_checkpoint):
    engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=8)
    kv = engine.runner.kv_cache.buffer
    states = engine.runner.state_cache
    return {
        "kv_page_bytes": kv[0, 0].numel() * kv.element_size(),
        "attn_layers": kv.shape[0],
        "slot_bytes": states.conv[0].numel() * states.conv.element_size() + states.ssm[0].numel() * 4,
    }


def test_handover_matches_single_process_and_moves_only_missing_pages(cluster, reference, layout):
    prefill, decode = cluster
    fresh = _tokens(100, seed=1)
    before = _bytes_sent(prefill)
    tokens, last = decode.generate(fresh)
    assert tokens == reference(fresh)
    assert last.usage.cached_tokens == 0
    assert _bytes_sent(prefill) - before == _expected_bytes(100, 0, layout)

    # Shares its first 60 tokens: whatever the decode pod holds of it is not sent again.
    shared = fresh[:60] + _tokens(50, seed=2)
    before = _bytes_sent(prefill)
    tokens, last = decode.generate(shared)
    assert tokens == reference(shared)
    assert _bytes_sent(prefill) - before == _expected_bytes(110, last.usage.cached_tokens, layout)

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


def test_malformed_prefill_calls(cluster):
    prefill, _ = cluster
    with pytest.raises(grpc.RpcError) as err:
        prefill.prefill.Prefill(pd_pb2.PrefillRequest(request_id="x", decode_id="nobody", token_ids=[1]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "handshake first" in err.value.details()


def test_cancelled_stream_frees_both_sides(tiny_checkpoint):
    prefill = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "2")
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    try:
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=_tokens(120, seed=6)),
            sampling=inference_pb2.SamplingParams(max_tokens=50, temperature=0.0),
        )
        call = decode.inference.Generate(request, timeout=60)
        prefill.wait_for_log("pausing")  # mid-transfer
        call.cancel()
        decode.wait_for_log("ABORTED")  # the prefill pod stopped and said so
        prompt = _tokens(50, seed=7)
        decode.generate(prompt)  # after which the abort has been fully processed on both sides
        assert_pod_clean(decode)
        assert_pod_clean(prefill)
    finally:
        decode.stop()
        prefill.stop()


def test_prefill_pod_killed_mid_transfer_then_restarted(tiny_checkpoint, reference):
    prefill = _serve("prefill", tiny_checkpoint, "--fault-transfer-pause-s", "3")
    decode = _serve("decode", tiny_checkpoint, "--prefill-addrs", prefill.address)
    try:
        prompt = _tokens(120, seed=8)
        result = {}
        client = threading.Thread(target=lambda: result.update(out=decode.generate(prompt)))
        client.start()
        prefill.wait_for_log("pausing")  # half the pages are written, the other half never will be
        prefill.kill()
        client.join(timeout=120)
        tokens, _ = result["out"]
        assert tokens == reference(prompt), "falls back to a local prefill and still answers correctly"
        peers = decode.health().prefill_peers
        assert not peers[0].usable
        assert decode.metrics()['baton_remote_prefills_total{outcome="local"}'] >= 1
        assert_pod_clean(decode)

        # Restart on the same port: the decode pod reconnects and hands prefills to it again.
        port = str(prefill.port)
        mark = decode.mark()
        prefill = _serve("prefill", tiny_checkpoint, "--port", port)
        decode.wait_for_log(f"prefill pod 127.0.0.1:{port} ready", since=mark)
        prompt = _tokens(90, seed=9)
        assert decode.generate(prompt)[0] == reference(prompt)
        assert prefill.metrics()["baton_transfer_bytes_total"] > 0
        assert decode.health().prefill_peers[0].usable
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

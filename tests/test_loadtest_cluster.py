"""The load runner end to end against real pods (a prefill pod and a decode pod on loopback, tiny checkpoint):
``python -m loadtest generate`` / ``run`` / ``report`` as a user runs them. The results must hold every measured
field; follow-up turns (and sub-agents branching from an orchestrator) must be served from the decode pod's
prefix cache as far as an earlier request computed them; the cached tokens the responses report must add up to
what the pod's own /metrics counted; a second load level must not hit the first one's cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pods import Pod, assert_pod_clean

PAGE = 4
OUTPUT = 6
REUSE_BLOCK = 16


def _flags(checkpoint: str) -> list[str]:
    return [
        "--model", checkpoint, "--device", "cpu", "--dtype", "float32", "--page-size", str(PAGE),
        "--num-pages", "700", "--max-num-seqs", "16", "--prefill-chunk-size", "64", "--max-num-batched-tokens", "256",
        "--remote-prefill-threshold", "32", "--checkpoint-interval", "32",
    ]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    prefill = Pod("prefill", *_flags(tiny_checkpoint))
    decode = Pod("decode", *_flags(tiny_checkpoint), "--prefill-addrs", prefill.address)
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _loadtest(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "loadtest", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _metrics_url(pod: Pod) -> str:
    return f"http://127.0.0.1:{pod.info['metrics_port']}/metrics"


def test_agentic_closed_loop_sweep(cluster, tmp_path):
    prefill, decode = cluster
    workload = tmp_path / "agentic.jsonl"
    _loadtest("generate", "agentic", "--conversations", "3", "--first-turn-tokens", "96", "--follow-ups", "3:3",
              "--turn-tokens", "12", "--output-tokens", str(OUTPUT), "--think-time-s", "0.05", "--jitter", "0",
              "--vocab-size", "512", "--out", str(workload))
    out = tmp_path / "agentic_run.json"
    printed = _loadtest(
        "run", "--workload", str(workload), "--api", "grpc", "--target", decode.address, "--concurrency", "1,2",
        "--metrics-url", _metrics_url(decode), "--metrics-url", _metrics_url(prefill), "--scrape-interval-s", "0.2",
        "--reuse-block", str(REUSE_BLOCK), "--record-trace", str(tmp_path / "sent.jsonl"), "--no-progress",
        "--out", str(out))
    results = json.loads(out.read_text())
    assert results["server"]["vocab_size"] == 512 and len(results["levels"]) == 2
    for level in results["levels"]:
        s = level["summary"]
        assert (s["requests"], s["ok"], s["errors"], level["not_sent"]) == (12, 12, {}, {})
        for metric in ("ttft_s", "itl_s", "e2e_s"):
            assert set(s[metric]) == {"mean", "p50", "p90", "p99"}
            assert 0 < s[metric]["p50"] <= s[metric]["p90"] <= s[metric]["p99"]
        assert s["decode_tok_s_per_user"]["p50"] > 0 and 0 <= s["share_at_decode_floor"] <= 1
        assert s["throughput"]["output_tokens"] == 12 * OUTPUT  # EOS ignored: every answer as long as asked
        assert s["throughput"]["output_tok_s"] > 0 and level["client_loop_lag_ms"]["p99"] >= 0

        requests = {(r["session"], r["turn"]): r for r in level["requests"]}
        for (session, turn), r in requests.items():
            assert len(r["chunks"]) >= 1 and sum(n for _, n in r["chunks"]) == OUTPUT
            if turn == 0:
                # Random first turns (salted per level): nothing to reuse, nothing served from the cache.
                assert r["reusable_tokens"] == 0 and r["cached_tokens"] == 0
                continue
            previous = requests[(session, turn - 1)]
            assert r["prompt_tokens"] == previous["prompt_tokens"] + OUTPUT + 12
            computed = previous["prompt_tokens"] + OUTPUT - 1  # the last answer token is never fed back
            assert r["reusable_tokens"] == computed // REUSE_BLOCK * REUSE_BLOCK
            # The decode pod keeps the end of each turn (a checkpoint at the last full page of what it computed).
            assert r["cached_tokens"] >= computed // PAGE * PAGE >= r["reusable_tokens"], (session, turn, r)

        # The responses' usage and the pod's own counters agree.
        pods = {p["url"]: p for p in level["pods"]}
        decode_counters = pods[_metrics_url(decode)]["counter_deltas"]
        assert decode_counters["prefix_cached_tokens"] == s["cache"]["cached_tokens"] > 0
        assert decode_counters["prefix_prompt_tokens"] == s["throughput"]["prompt_tokens"]
        assert pods[_metrics_url(prefill)]["counter_deltas"]["transfer_bytes"] > 0, "first turns prefilled remotely"
        assert len(pods[_metrics_url(decode)]["t"]) >= 2 and "running" in pods[_metrics_url(decode)]["series"]
        assert s["cache_by_turn"]["3"]["hit_rate"] > 0.8

    for index in range(2):
        sent = [json.loads(line) for line in (tmp_path / f"sent.jsonl.level{index}").read_text().splitlines()]
        assert len(sent) == 12 and all(len(r["hash_ids"]) == -(-r["input_length"] // 512) for r in sent)
    for plot in ("latency", "throughput", "hit_rate", "pods"):
        assert (tmp_path / f"agentic_run_{plot}.png").stat().st_size > 10_000
    assert "c=2" in printed and "errors" not in printed
    reported = _loadtest("report", str(out), str(out), "--labels", "a,b", "--out-stem", str(tmp_path / "cmp"))
    assert "b / a" in reported and "output_tok_s 1.00" in reported
    assert_pod_clean(decode)
    assert_pod_clean(prefill)


def test_subagents_open_loop(cluster, tmp_path):
    _, decode = cluster
    workload = tmp_path / "subagents.jsonl"
    # Answers of 8 tokens complete a page after the 80-token context: the decode pod's end-of-request checkpoint
    # (see test_short_answer_after_remote_prefill for answers that do not).
    _loadtest("generate", "subagents", "--trees", "2", "--subagents", "3", "--context-tokens", "80", "--task-tokens",
              "8", "--subagent-turns", "2", "--turn-tokens", "8", "--output-tokens", "8", "--think-time-s", "0.02",
              "--jitter", "0", "--vocab-size", "512", "--out", str(workload))
    out = tmp_path / "subagents_run.json"
    _loadtest("run", "--workload", str(workload), "--target", decode.address, "--mode", "open", "--rate", "20",
              "--salt", "7", "--no-progress", "--out", str(out))
    [level] = json.loads(out.read_text())["levels"]
    assert (level["summary"]["ok"], level["summary"]["errors"]) == (2 * (1 + 3 * 2), {})
    sessions = [json.loads(line) for line in workload.read_text().splitlines()[1:]]
    parent_of = {s["id"]: s["parent"] for s in sessions}
    requests = {(r["session"], r["turn"]): r for r in level["requests"]}
    for (session, turn), r in requests.items():
        parent = parent_of[session]
        if parent is None:
            assert r["cached_tokens"] == 0
        elif turn == 0:
            orchestrator = requests[tuple(parent)]
            assert r["prompt_tokens"] == orchestrator["prompt_tokens"] + 8 + 8
            assert r["start_s"] >= orchestrator["start_s"] + orchestrator["end_s"], "starts after its parent's answer"
            assert r["cached_tokens"] >= (orchestrator["prompt_tokens"] + 7) // PAGE * PAGE
        else:
            assert r["cached_tokens"] >= (requests[(session, turn - 1)]["prompt_tokens"] + 7) // PAGE * PAGE
    assert_pod_clean(decode)


def test_short_answer_after_remote_prefill(cluster, tmp_path):
    """The hand-over carries the state at the prompt's last page boundary, which the decode pod publishes: a
    short answer (a tool call) after a remote prefill still leaves the follow-up turn its prompt cached."""
    _, decode = cluster
    workload = tmp_path / "short.jsonl"
    _loadtest("generate", "agentic", "--conversations", "1", "--first-turn-tokens", "80", "--follow-ups", "1:1",
              "--turn-tokens", "8", "--output-tokens", "2", "--think-time-s", "0", "--jitter", "0", "--vocab-size",
              "512", "--out", str(workload))
    out = tmp_path / "short_run.json"
    _loadtest("run", "--workload", str(workload), "--target", decode.address, "--concurrency", "1", "--salt", "11",
              "--no-progress", "--out", str(out))
    first, follow_up = json.loads(out.read_text())["levels"][0]["requests"]
    assert first["prompt_tokens"] == 80 and follow_up["turn"] == 1
    # The hand-over's checkpoint is at the last page boundary before the prompt's last token.
    assert follow_up["cached_tokens"] >= 80 - PAGE, "the prompt the decode pod holds is reusable but for a page"


def test_mooncake_trace_replay_at_its_timestamps(cluster, tmp_path):
    """A Mooncake-format trace (16-token blocks to keep it small) replayed at twice its speed: requests start at
    their timestamps, with their lengths, and the runner sees the blocks they share with earlier requests."""
    _, decode = cluster
    records = [
        {"timestamp": 0, "input_length": 40, "output_length": 8, "hash_ids": [0, 1, 2]},
        {"timestamp": 0, "input_length": 60, "output_length": 8, "hash_ids": [0, 1, 3, 4]},
        {"timestamp": 400, "input_length": 10, "output_length": 8, "hash_ids": [5]},
        {"timestamp": 3052, "input_length": 40, "output_length": 8, "hash_ids": [0, 1, 2]},
        {"timestamp": 3999, "input_length": 64, "output_length": 8, "hash_ids": [0, 1, 3, 6]},
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    workload = tmp_path / "trace_workload.jsonl"
    _loadtest("generate", "mooncake", "--trace", str(trace), "--block-size", "16", "--vocab-size", "512",
              "--trace-key", "test-replay", "--out", str(workload))
    out = tmp_path / "trace_run.json"
    _loadtest("run", "--workload", str(workload), "--target", decode.address, "--mode", "open", "--speedup", "2",
              "--no-progress", "--out", str(out))
    [level] = json.loads(out.read_text())["levels"]
    assert level["rate"] is None and level["summary"]["ok"] == 5
    requests = {r["session"]: r for r in level["requests"]}
    for i, record in enumerate(records):
        due = record["timestamp"] / 1000 / 2
        assert due <= requests[i]["start_s"] < due + 0.5, (i, requests[i]["start_s"])
        assert requests[i]["prompt_tokens"] == record["input_length"]
    for earlier, later in ((0, 3), (1, 4)):
        assert requests[earlier]["start_s"] + requests[earlier]["end_s"] < requests[later]["start_s"]
    assert requests[3]["reusable_tokens"] == 36  # a repeat: all of it but the page of its last token
    assert requests[4]["reusable_tokens"] == 48  # blocks 0, 1, 3
    # What the decode pod serves of them depends on checkpoints it does not keep for remotely prefilled prompts
    # (test_short_answer_after_remote_prefill); here only that it says.
    assert all(r["cached_tokens"] is not None for r in requests.values())

"""The PD-pair benchmark's bookkeeping (loadtest.bench_pd_gpu), without pods or a GPU: the decode pod's per-call
log line parsed back, the TTFT split adding up, greedy comparison, prompts and the floor point of a sweep."""

from __future__ import annotations

import pytest

from loadtest.bench_pd_gpu import compare, floor_point, make_prompts, parse_handover, ttft_split, turn_ttfts
from services.decode.server import HANDOVER_LOG


def test_the_decode_pods_log_line_parses_back():
    line = "2026-12-03 22:42:19,092 INFO baton.decode: " + HANDOVER_LOG % (
        "req7.abc123.1", 32768, 4096, "127.0.0.1:5001", 0.7191, 0.4473, 0.2402, 399_745_024, 1792)
    parsed = parse_handover(line)
    assert parsed == {"call_id": "req7.abc123.1", "tokens": 32768, "cached_tokens": 4096, "call_s": 0.7191,
                      "compute_s": 0.4473, "transfer_s": 0.2402, "bytes": 399_745_024, "pages": 1792}
    assert parse_handover("2026-12-03 INFO baton.decode: hand-over started: x") is None


def test_ttft_split_adds_up_to_the_clients_ttft():
    handover = {"call_s": 0.70, "compute_s": 0.45, "transfer_s": 0.24}
    split = ttft_split(0.72, handover)
    parts = ("prefill_compute_s", "transfer_s", "prefill_call_rest_s", "decode_pod_s")
    assert sum(split[k] for k in parts) == pytest.approx(0.72)
    assert split["decode_pod_s"] == pytest.approx(0.02) and split["prefill_call_rest_s"] == pytest.approx(0.01)


def test_compare_finds_the_first_difference_and_the_logprob_gap_up_to_it():
    same = compare([1, 2, 3], [-0.1, -0.2, -0.3], [1, 2, 3], [-0.1, -0.25, -0.3])
    assert same["equal"] and same["first_mismatch"] is None and same["max_logprob_diff"] == pytest.approx(0.05)
    diff = compare([1, 5, 3], [-0.1, -0.2, -9.0], [1, 2, 3], [-0.1, -0.3, -0.3])
    assert not diff["equal"] and diff["first_mismatch"] == 1 and diff["max_logprob_diff"] == 0.0
    assert compare([7], [-1.0], [8], [-2.0])["max_logprob_diff"] is None
    assert compare([1, 2], [0, 0], [1, 2, 3], [0, 0, 0])["first_mismatch"] == 2  # cut short


def test_prompts_are_fresh_and_reproducible():
    prompts = make_prompts([64, 128], 2, vocab=1000, seed=3)
    assert [(p["length"], p["rep"], p["warmup"]) for p in prompts] == [
        (64, -1, True), (64, 0, False), (64, 1, False), (128, -1, True), (128, 0, False), (128, 1, False)]
    assert all(len(p["tokens"]) == p["length"] for p in prompts)
    assert len({tuple(p["tokens"][:16]) for p in prompts}) == len(prompts)  # no shared first page
    assert make_prompts([64, 128], 2, vocab=1000, seed=3) == prompts


def test_floor_point_is_the_largest_level_holding_the_floor_without_errors():
    levels = [{"concurrency": 16, "decode_p10_tok_s": 120.0, "errors": {}},
              {"concurrency": 32, "decode_p10_tok_s": 80.0, "errors": {}},
              {"concurrency": 48, "decode_p10_tok_s": 90.0, "errors": {"timeout": 1}},
              {"concurrency": 64, "decode_p10_tok_s": 60.0, "errors": {}}]
    assert floor_point(levels)["concurrency"] == 32
    assert floor_point(levels[3:]) is None


def test_turn_ttfts_separate_first_turns_from_follow_ups():
    requests = [{"turn": 0, "chunks": [[2.0, 1]], "error": None}, {"turn": 0, "chunks": [[4.0, 1]], "error": None},
                {"turn": 1, "chunks": [[0.5, 1]], "error": None}, {"turn": 2, "chunks": [], "error": "timeout"}]
    out = turn_ttfts(requests)
    assert out["first_turn"]["n"] == 2 and out["first_turn"]["p99_s"] == 4.0
    assert out["follow_up"] == {"n": 1, "p50_s": 0.5, "p99_s": 0.5}

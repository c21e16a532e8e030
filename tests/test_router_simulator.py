"""The router simulator's bookkeeping on hand-made traces with known answers, and a small run's report.

Hand-made traces use page size 4 and exact tokens (token scale 1). A conversation of a 30-token first turn and
follow-ups of 8 new tokens, every answer 8 tokens: turn k's prompt is 30 + 16k tokens; its answer's decode
snapshot lands at the last page boundary before the history's end (36, 52, 68 for turns 0, 1, 2), which is
exactly what the next turn can resume from. So a sticky placement serves 36 + 52 + 68 = 156 of the
38 + 54 + 70 = 162 reusable tokens of a conversation's three follow-ups.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.simulator.__main__ import main as simulator_main
from loadtest.simulator.config import SimConfig
from loadtest.simulator.experiments import choose_weights, paired
from loadtest.simulator.router import POLICIES
from loadtest.simulator.simulation import Simulation, run
from loadtest.simulator.timing import DEFAULT_DECODE, DEFAULT_PREFILL, TimeModel
from loadtest.simulator.trace import ScriptedUsers, TraceConfig, Turn
from services.common.page_hash import page_hashes
from services.router.policy import Candidate, Placer, Policy, Weights
from services.router.sessions import SessionTable

PAGE = 4
STICKY_HITS = [36, 52, 68]
STICKY_REUSABLE = [38, 54, 70]


def conversation(seed: int, follow_ups: int = 3, think_s: float = 1.0) -> list[Turn]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(256) for _ in range(n)]

    return [Turn(tokens(30), tokens(8), think_s)] + [Turn(tokens(8), tokens(8), think_s) for _ in range(follow_ups)]


def tiny_config(**changes) -> SimConfig:
    base = dict(workers=2, page_size=PAGE, cache_tokens=4096, duration_s=1000.0, warmup_s=0.0,
                remote_prefill_threshold=0, checkpoint_slots=64,
                trace=TraceConfig(first_turn_tokens=30, first_turn_spread=0.0, follow_up_tokens=8, follow_up_spread=0.0,
                                  answer_tokens=8, answer_spread=0.0, min_follow_ups=0, max_follow_ups=1,
                                  token_scale=1, ramp_s=0.0))  # (the scripted users replace this trace)
    base.update(changes)
    return SimConfig(**base)


def simulate(config: SimConfig, users: ScriptedUsers):
    """The simulation, its report, and each user's finished requests in turn order."""
    sim = Simulation(config, TimeModel.from_results(), users)
    report = sim.run()
    by_user: dict[int, list] = {}
    for record in sorted(sim.finished, key=lambda r: r.sent_at):
        by_user.setdefault(record.user, []).append(record)
    return sim, report, by_user


@pytest.mark.parametrize("policy", ["cache_aware", "session", "oracle"])
def test_sticky_policies_serve_every_follow_up_from_cache(policy):
    users = ScriptedUsers([[conversation(1)], [conversation(2)]], [0.0, 0.5], PAGE)
    sim, report, turns = simulate(tiny_config(policy=policy, weight_session=4096.0), users)
    for user in (0, 1):
        records = turns[user]
        assert [r.turn for r in records] == [0, 1, 2, 3]
        assert len({r.worker for r in records}) == 1, "a sticky policy kept the conversation on one worker"
        assert [r.cached for r in records[1:]] == STICKY_HITS
        assert [r.reusable for r in records[1:]] == STICKY_REUSABLE
        assert records[0].cached == 0 and records[0].reusable == 0
    assert report.served_tokens == 2 * sum(STICKY_HITS)
    assert report.reusable_served == pytest.approx(sum(STICKY_HITS) / sum(STICKY_REUSABLE))
    assert report.index == {"events_applied": report.index["events_applied"], "resyncs": 0, "matches_caches": True}


def test_round_robin_alternates_and_hits_only_the_turn_before_last():
    """One conversation after the other (the second starts once the first is over): round robin sends turns
    0, 1, 2, 3 to workers 0, 1, 0, 1. Turn 1 finds nothing on worker 1; turn 2 resumes on worker 0 from turn
    0's snapshot (36); turn 3 on worker 1 from turn 1's (52)."""
    users = ScriptedUsers([[conversation(1)], [conversation(2)]], [0.0, 100.0], PAGE)
    _, report, turns = simulate(tiny_config(policy="round_robin"), users)
    for user in (0, 1):
        records = turns[user]
        assert [r.worker for r in records] == [0, 1, 0, 1]
        assert [r.cached for r in records] == [0, 0, 36, 52]
    assert report.served_tokens == 2 * (36 + 52)
    assert report.decisions == {"round_robin": 8}


def test_a_cache_of_n_pages_evicts_the_least_recently_used_conversation():
    """One worker of 20 pages. A and B (10 pages each while running: 30 + 8 tokens) finish and leave 9 pages
    each in the cache (their decode snapshots at 36, prefill checkpoints at 28). C then needs 10 pages with 2
    free: 8 go, all A's, the older conversation, from its tail (a leaf at a time; pages without a checkpoint
    before those with one). B's next turn resumes at 36 and needs 5 more pages with 1 free: A's last page goes,
    then C's tail (B's path is locked by B). A and C keep no checkpoint: nothing of theirs is usable."""
    users = ScriptedUsers([[conversation(1, 0)], [conversation(2, 1, 30.0)], [conversation(3, 0)]],
                          [0.0, 10.0, 20.0], PAGE)
    sim, report, turns = simulate(tiny_config(workers=1, policy="cache_aware", cache_tokens=20 * PAGE), users)
    assert [(r.user, r.turn) for r in sorted(sim.finished, key=lambda r: r.sent_at)] == [
        (0, 0), (1, 0), (2, 0), (1, 1)]
    assert [r.cached for r in turns[1]] == [0, 36]
    tree = sim.workers[0].cache.tree
    assert tree.num_evicted_pages == 8 + 4
    assert tree.num_evicted_states == 4  # A's and C's, each at 28 and 36
    assert report.evicted_tokens == 12 * PAGE
    for user in (0, 2):
        history = users.conversations[user][0][0].new_tokens + users.conversations[user][0][0].answer
        assert sim.router.index.usable_pages(page_hashes(history, PAGE)) == {}
    assert sim.workers[0].pages.num_used == tree.num_cached_pages  # nothing leaked: every page cached or free
    tree.check_integrity()


def test_the_router_index_follows_every_worker_cache_exactly():
    users = ScriptedUsers([[conversation(s)] for s in range(6)], [0.1 * s for s in range(6)], PAGE)
    sim, report, _ = simulate(tiny_config(workers=3, policy="round_robin", cache_tokens=40 * PAGE), users)
    assert report.index["resyncs"] == 0 and report.index["matches_caches"]
    for worker in sim.workers:
        assert sim.router.index.digest(worker.name) == worker.cache.tree.digest
        assert worker.pages.num_used == worker.cache.tree.num_cached_pages
        assert worker.active == 0 and worker.queued_tokens == 0


def test_time_model_reproduces_the_h200_measurements():
    model = TimeModel.from_results()
    decode = json.loads(DEFAULT_DECODE.read_text())
    for measured in (r for r in decode["runs"] if "step_ms_median" in r):
        step = model.decode_step_s(measured["batch"], measured["batch"] * measured["context"])
        assert step * 1e3 == pytest.approx(measured["step_ms_median"], rel=0.03)
    prefill = json.loads(DEFAULT_PREFILL.read_text())
    for measured in (r for r in prefill["runs"] if r["chunk_size"] == 8192):
        assert model.prefill_s(0, measured["length"]) == pytest.approx(measured["ttft_s"])
    # A follow-up's new tokens cost more after a long cached history than at the start of a prompt.
    assert model.prefill_s(50_000, 51_000) > model.prefill_s(0, 1_000) > 0


def test_small_run_reports_every_policy():
    base = SimConfig(workers=4, users_per_worker=2, duration_s=40, warmup_s=10, cache_tokens=250_000,
                     weight_session=4096.0)
    for policy in POLICIES:
        report = run(dataclasses.replace(base, policy=policy))
        assert report.policy == policy and report.workers == 4
        assert report.requests > 20 and report.refusals == 0
        assert 0 < report.reusable_served <= 1 and 0 <= report.prompt_served <= 1
        assert report.served_tokens <= report.reusable_tokens <= report.prompt_tokens
        assert report.available_hit >= report.chosen_hit - 1e-9
        assert 0 < report.ttft_s["p50"] <= report.ttft_s["p90"] <= report.ttft_s["p99"]
        assert 0 <= report.idle_fraction["min"] <= report.idle_fraction["mean"] <= report.idle_fraction["max"] <= 1
        assert report.load_imbalance >= 1
        assert report.index["resyncs"] == 0 and report.index["matches_caches"]
        assert sum(report.decisions.values()) == report.requests_all + report.refusals


def test_cli_compare_writes_json_png_and_table(tmp_path):
    out = tmp_path / "compare.json"
    simulator_main(["compare", "--workers-list", "2,4", "--cache-sizes", "400000,120000", "--policies",
                    "cache_aware,round_robin,oracle", "--users-per-worker", "2", "--duration-s", "25",
                    "--warmup-s", "5", "--jobs", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2 * 2 * 3
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert result["table"].count("\n") == 1 + 2 * 3


def test_cli_seeds_pairs_the_policy_with_the_oracle_seed_by_seed(tmp_path):
    out = tmp_path / "seeds.json"
    simulator_main(["seeds", "--workers", "2", "--cache-sizes", "400000,120000", "--seeds", "3,4",
                    "--users-per-worker", "2", "--duration-s", "25", "--warmup-s", "5", "--jobs", "1",
                    "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2 * 2 * 2 and out.with_suffix(".png").stat().st_size > 10_000
    for tokens in ("400000", "120000"):
        s = result["summary"][tokens]
        assert s["seeds"] == [3, 4]
        mine = [r["reusable_served"] for r in result["runs"]
                if r["policy"] == "cache_aware" and str(r["cache_tokens"]) == tokens]
        assert s["cache_aware"]["served"] == mine
    assert result["table"].count("\n") == 1 + 2 * (2 + 2)


def test_paired_summary_meets_only_with_both_served_and_idle():
    def run_(policy, cache, seed, served, idle):
        return {"policy": policy, "cache_tokens": cache, "seed": seed, "reusable_served": served,
                "idle_fraction": {"max": idle}}

    runs = [run_("oracle", 10, 0, 0.5, 0.2), run_("oracle", 10, 1, 0.7, 0.2), run_("oracle", 10, 2, 0.9, 0.2),
            run_("cache_aware", 10, 0, 0.6, 0.1), run_("cache_aware", 10, 1, 0.6, 0.3),
            run_("cache_aware", 10, 2, 0.9, 0.1), run_("cache_aware", 10, 3, 0.0, 0.0),  # seed 3: no oracle run
            run_("oracle", 20, 0, 0.5, 0.2), run_("cache_aware", 20, 0, 0.6, 0.25)]
    summary = paired({"cache_sizes": [10, 20], "runs": runs}, "cache_aware", "oracle")
    s = summary["10"]
    assert s["seeds"] == [0, 1, 2] and s["seeds_at_least"] == 2
    assert s["served_diff_mean"] == pytest.approx(0.0) and s["served_diff_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert s["met"]  # as much served, idle 0.167 against 0.2
    assert not summary["20"]["met"]  # more served, but its most idle worker idler than the oracle's


# ---- the router's session table ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["place", "answer", "expire", "drop", "end"]), st.integers(0, 5),
                          st.integers(0, 3), st.integers(0, 3), st.floats(0, 5)), max_size=60))
def test_session_table_matches_a_plain_model(ops):
    """Counts, tokens and expiry against the definition: a conversation is live from a placement until ``ttl``
    after its last request ended, and never while one of its requests is in flight."""
    ttl = 2.0
    table, model = SessionTable(ttl), {}  # session -> [worker, tokens, in flight, silent since]
    now = 0.0
    for op, session, worker, tokens, dt in ops:
        now += dt
        s, w = f"s{session}", f"w{worker}"
        if op == "place":
            table.placed(s, w, now, 1000 * tokens)
            held = model.setdefault(s, [w, 0, 0, now])
            held[0], held[1], held[2], held[3] = w, 1000 * tokens, held[2] + 1, now
        elif op == "answer":
            table.answered(s, now)
            if s in model and model[s][2] > 0:
                model[s][2] -= 1
                model[s][3] = now
        elif op == "expire":
            table.expire(now)
            model = {k: v for k, v in model.items() if v[2] > 0 or v[3] > now - ttl}
        elif op == "drop":
            table.drop_worker(w)
            model = {k: v for k, v in model.items() if v[0] != w}
        else:
            table.ended(s)
            model.pop(s, None)
        assert len(table) == len(model)
        for k in (f"s{i}" for i in range(6)):
            assert table.worker_of(k) == (model[k][0] if k in model else None)
            assert table.in_flight(k) == (model[k][2] if k in model else 0)
        positions = {f"w{i}": i for i in range(4)}
        counts, held_tokens = table.counts(positions, 4, "s0"), table.tokens(positions, 4, "s0")
        holder = model.get("s0", (None,))[0]
        for i in range(4):
            others = [v for k, v in model.items() if v[0] == f"w{i}" and k != "s0"]
            assert counts[i] == len(others) - (0.5 if holder == f"w{i}" else 0)
            assert held_tokens[i] == sum(v[1] for v in others)
            assert table.live(f"w{i}") == sum(1 for v in model.values() if v[0] == f"w{i}")


def test_a_conversation_is_not_forgotten_while_its_request_waits_longer_than_the_ttl():
    table = SessionTable(ttl_s=10.0)
    table.placed("a", "w0", now=0.0, tokens=50_000)
    table.expire(now=60.0)  # queued and running for a minute: still live
    assert table.worker_of("a") == "w0" and table.live("w0") == 1
    table.answered("a", now=60.0)
    table.expire(now=69.0)
    assert table.worker_of("a") == "w0"
    table.placed("a", "w1", now=69.5, tokens=51_000)  # the next turn, placed elsewhere: moves, counted once
    table.placed("a", "w1", now=69.6, tokens=51_000)  # and a second request of it at once
    table.answered("a", now=70.0)
    table.expire(now=200.0)  # one request still in flight
    assert table.live("w0") == 0 and table.live("w1") == 1 and table.in_flight("a") == 1
    table.answered("a", now=200.0)
    assert table.expire(now=210.0) == ["w1"] and len(table) == 0


def test_session_term_spreads_new_conversations_and_keeps_follow_ups():
    placer = Placer(Policy.CACHE_AWARE, Weights(cache=1.0, queue=0.1, request=512.0, session=8192.0))
    busy_with_conversations = Candidate("w0", "a0", active=0, queued_tokens=0, hit_tokens=0, sessions=3)
    running_one = Candidate("w1", "a1", active=1, queued_tokens=0, hit_tokens=0, sessions=1)
    # A new conversation: no hit anywhere; w0 looks idle (its three conversations are between turns) but holds more.
    assert placer.choose([busy_with_conversations, running_one], 50_000).name == "w1"
    # A follow-up whose history w0 holds stays there (its own conversation is not counted against w0).
    holder = dataclasses.replace(busy_with_conversations, hit_tokens=49_000, sessions=2)
    choice = placer.choose([holder, running_one], 50_000)
    assert choice.name == "w0" and choice.reason == "cache_hit"
    # A follow-up that no worker can resume stays with its conversation unless moving evens the counts out:
    # w0 runs one more request, but w1 holds as many other conversations.
    evicted = dataclasses.replace(holder, hit_tokens=0, sessions=1, active=1, holds_session=True)
    other = dataclasses.replace(running_one, active=0)
    assert placer.choose([evicted, other], 50_000).name == "w0"
    assert placer.choose([evicted, dataclasses.replace(other, sessions=0)], 50_000).name == "w1"
    # Without the term, the new conversation goes to the worker that only looks idle.
    plain = Placer(Policy.CACHE_AWARE, Weights(cache=1.0, queue=0.1, request=512.0, session=0.0))
    assert plain.choose([busy_with_conversations, running_one], 50_000).name == "w0"


def test_weights_are_chosen_by_the_oracle_bar_then_ttft():
    def named(weights):
        return dict(zip(("cache", "queue", "request", "session", "memory"), (*weights, 0.0), strict=True))

    def run_(policy, weights, cache, served, idle, p99, seed=0):
        return {"policy": policy, "weights": named(weights),
                "cache_tokens": cache, "seed": seed, "reusable_served": served, "idle_fraction": {"max": idle},
                "ttft_s": {"p99": p99}}

    meets_slow, meets_fast, short, blind = (1, 0.1, 0, 8192), (1, 0, 512, 8192), (1, 1, 512, 0), (1, 0, 0, 8192)
    runs = []
    for cache, oracle_served in ((1000, 0.99), (100, 0.30)):
        for seed, noise in ((0, 0.01), (1, -0.01)):  # means over seeds are what count
            runs += [run_("oracle", (1, 1, 512, 0), cache, oracle_served + noise, 0.40, 5.0, seed),
                     run_("cache_aware", meets_slow, cache, oracle_served - noise, 0.40, 4.0, seed),
                     run_("cache_aware", meets_fast, cache, oracle_served + 0.001, 0.39, 3.0, seed),
                     run_("cache_aware", short, cache, oracle_served - 0.05, 0.10, 1.0, seed),
                     run_("cache_aware", blind, cache, oracle_served + 0.05, 0.10, 0.5, seed)]
    choice = choose_weights({"runs": runs})
    assert choice["weights"] == named(meets_fast)  # the load-blind weights would look best: never chosen
    assert choice["feasible"] == 2 and choice["candidates"] == 3
    # Without a feasible set, the least shortfall wins.
    runs = [r for r in runs if r["weights"] != named(meets_fast)
            or r["policy"] == "oracle"]
    runs = [dict(r, reusable_served=r["reusable_served"] - 0.02) if r["policy"] != "oracle" else r for r in runs]
    choice = choose_weights({"runs": runs})
    assert choice["feasible"] == 0 and choice["weights"] == named(meets_slow)
    assert choice["shortfall"] == pytest.approx(0.02)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4) .map(lambda x: x * 1000), st.integers(0, 3),
                          st.integers(0, 2), st.booleans(), st.integers(0, 3).map(lambda x: x * 32),
                          st.sampled_from([0, 64, 128])), min_size=1, max_size=12),
       st.sampled_from([Weights(), Weights(1, 1, 512, 0), Weights(1, 0.1, 0, 32768), Weights(0, 0, 0, 0),
                        Weights(1, 0, 512, 8192, 1.0), Weights(0, 0, 0, 0, 2.0)]))
def test_cache_aware_choice_is_the_lowest_cost_then_the_lowest_name(rows, weights):
    """Placer.choose against the plain definition, ties included (small integer values make many)."""
    candidates = [Candidate(f"w{i:02d}", f"a{i}", active, queued, hit * 16, sessions, holds, held, size)
                  for i, (hit, queued, active, sessions, holds, held, size) in enumerate(rows)]
    random.Random(len(rows)).shuffle(candidates)
    placer = Placer(Policy.CACHE_AWARE, weights)

    def plain_cost(c):
        # the 64-token prompt on top of the other conversations' tokens: what passes the cache, less what did
        pushed_out = max(0, c.session_tokens + 64 - c.cache_tokens) - max(0, c.session_tokens - c.cache_tokens)
        return (weights.cache * (64 - c.hit_tokens) + weights.queue * c.queued_tokens + weights.request * c.active
                + weights.session * (c.sessions - 0.5 * c.holds_session)
                + (weights.memory * pushed_out if c.cache_tokens else 0))

    expected = min(candidates, key=lambda c: (plain_cost(c), c.name))
    choice = placer.choose(candidates, 64)
    assert choice.name == expected.name and choice.cost == pytest.approx(plain_cost(expected))


def test_memory_term_keeps_conversations_within_each_cache():
    """Caches of 250K tokens. w0 holds three conversations of 70K (210K), w1 four of 40K (160K): a new 60K
    conversation would push 20K of w0's histories out, none of w1's, so it goes to w1 though w1 holds more
    conversations. A follow-up whose 60K history w0 holds stays there even if w0 is past its cache: pushing 10K out
    costs less than computing the 60K again elsewhere. Without a known capacity the term is off."""
    placer = Placer(Policy.CACHE_AWARE, Weights(cache=1.0, queue=0.0, request=512.0, session=8192.0, memory=1.0))
    w0 = Candidate("w0", "a0", active=0, queued_tokens=0, hit_tokens=0, sessions=3, session_tokens=210_000,
                   cache_tokens=250_000)
    w1 = Candidate("w1", "a1", active=0, queued_tokens=0, hit_tokens=0, sessions=4, session_tokens=160_000,
                   cache_tokens=250_000)
    assert placer.choose([w0, w1], 60_000).name == "w1"
    assert placer.choose([dataclasses.replace(w0, cache_tokens=0), dataclasses.replace(w1, cache_tokens=0)],
                         60_000).name == "w0"  # unknown capacity: fewer conversations wins
    holder = dataclasses.replace(w0, hit_tokens=59_000, session_tokens=200_000, holds_session=True)
    assert placer.choose([holder, dataclasses.replace(w1, session_tokens=0, sessions=0)], 60_000).name == "w0"


@pytest.mark.parametrize("handover_checkpoint, expected", [(True, 28), (False, 0)])
def test_remote_prefill_hands_over_the_resume_checkpoint(handover_checkpoint, expected):
    """Every prompt goes to a prefill pod (threshold 1 token). A 2-token answer crosses no page boundary, so the
    decode snapshot never lands; the next turn can resume only from the checkpoint the prefill pod handed over
    at the prompt's last page boundary (28 of 30 tokens), if it hands one over."""
    rng = random.Random(5)
    turns = [Turn([rng.randrange(256) for _ in range(30)], [1, 2], 1.0), Turn([3] * 8, [4, 5], 1.0)]
    users = ScriptedUsers([[turns]], [0.0], PAGE)
    _, report, by_user = simulate(tiny_config(policy="session", remote_prefill_threshold=1,
                                              handover_resume_checkpoint=handover_checkpoint), users)
    assert [r.cached for r in by_user[0]] == [0, expected]
    assert report.index["matches_caches"] and report.index["resyncs"] == 0


def test_the_router_ends_every_attempt_of_a_conversation_in_its_session_table():
    """In the router itself: a conversation is in flight from each placement to the end of that attempt, whether it
    failed over (the first pod fails: the request moves, and the conversation with it), finished, or was abandoned
    by its client mid-stream. An attempt left in flight would keep the conversation live forever."""
    import asyncio
    import time
    from types import SimpleNamespace

    import grpc

    from services.cluster.schema import WorkerRecord
    from services.common.page_hash import SCHEME
    from services.common.protos import inference_pb2
    from services.router import server
    from services.router.config import RouterConfig
    from services.router.index import CacheIndex
    from services.router.metrics import RouterMetrics
    from services.router.workers import WorkerTable

    config = RouterConfig()
    table = WorkerTable(CacheIndex(), config.model_name, SCHEME, config.page_size, 3.0)
    router = server.RouterService(config, table, SimpleNamespace(up=True, router_id="r"), RouterMetrics(lambda: {}))
    table.update([WorkerRecord(f"d{i}", "decode", f"127.0.0.1:{i}", config.model_name, "fp", SCHEME,
                               config.page_size, max_running=4, max_waiting=4, max_model_len=1024, pages_total=64,
                               slots_total=4, remote_prefill_threshold=0, metrics_address="", started_at=0.0)
                  for i in (1, 2)], now=time.monotonic())
    attempts = []

    async def relay(placement, pod_request, stream):
        attempts.append(placement.decode.name)
        assert router.sessions.in_flight("conv") == 1  # this attempt only: the failed one has ended
        assert router.sessions.worker_of("conv") == placement.decode.name
        if len(attempts) == 1:
            raise server._PodFailed(placement.decode, grpc.StatusCode.UNAVAILABLE, "pod gone")
        yield inference_pb2.GenerateResponse(token_ids=[5], finished=len(attempts) == 2)
        yield inference_pb2.GenerateResponse(token_ids=[6], finished=True)

    router._relay = relay

    def route():
        return server.RouteRequest([1, 2, 3], inference_pb2.SamplingParams(max_tokens=2), session_id="conv")

    async def consume(stop_early: bool) -> None:
        responses = router.generate(route())
        async for response in responses:
            if stop_early:
                await responses.aclose()  # the client left mid-stream
                break
            assert response.finished

    asyncio.run(consume(stop_early=False))
    assert attempts == ["d1", "d2"]
    assert router.sessions.in_flight("conv") == 0 and router.sessions.worker_of("conv") == "d2"
    asyncio.run(consume(stop_early=True))
    assert len(attempts) == 3 and router.sessions.in_flight("conv") == 0
    router.sessions.expire(time.monotonic() + config.session_ttl_s + 1)
    assert router.sessions.worker_of("conv") is None

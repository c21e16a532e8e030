"""Metrics of a live cluster (redis-server, a router with its HTTP gateway, 1 prefill + 2 decode pods, all separate
processes) under known traffic: successful requests (one prefilled remotely), bad parameters (gRPC, HTTP, and straight
to a pod), requests refused because every pod is full (at the router and at a pod), and streams cancelled after their
first token.

``test_counts_are_exact``: each request is counted once, under its outcome, in the router and in the decode pod that
saw it; token counters equal the tokens sent and generated; the hand-over's bytes are exactly the missing pages plus
two state slots.

``test_every_dashboard_query_and_alert_expression_returns_data``: a real ``prometheus`` (the distribution's package,
installed by ``make setup``) scrapes every process every second; every Grafana panel's query (deploy/grafana/build.py)
and every alert rule's expression (deploy/prometheus/baton-rules.yaml, split at its comparisons: see
``alert_queries``) is evaluated through Prometheus' HTTP API and must return data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from tests.metrics_scrape import Samples, delta, scrape, total, value
from tests.pods import Pod, RedisServer, free_port, wait_until
from tests.test_pd_cluster import THRESHOLD, _expected_bytes, _tokens, layout  # noqa: F401 (layout: a fixture)
from tests.test_router_cluster import _request, _router, _serve, generate

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "baton-rules.yaml"
SHORT, LONG, MAX_TOKENS = 12, 100, 6  # prompt lengths (short: prefilled on the decode pod; long: remotely)
HOLD_TOKENS = 2500  # the streams that fill the pods are cancelled long before they could finish


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    redis = RedisServer()
    started: list[Pod] = []
    try:
        started.append(_serve("prefill", tiny_checkpoint, redis))
        # Room for one running and one waiting request per decode pod, so that "every pod full" is easy to reach.
        started += [_serve("decode", tiny_checkpoint, redis, "--max-num-seqs", "1", "--max-waiting-requests", "1")
                    for _ in range(2)]
        router = _router(tiny_checkpoint, redis, "--http-port", "0")
        started.append(router)
        wait_until(lambda: sum(w.eligible for w in router.health().workers) == 3, timeout=60,
                   what="the router to see all 3 pods eligible")
        yield {"redis": redis, "prefill": started[0], "decodes": started[1:3], "router": router}
    finally:
        for process in started:
            process.stop()
        redis.stop()


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    """A real Prometheus scraping the router and every pod every second (started before the traffic)."""
    binary = shutil.which("prometheus")
    assert binary, "the prometheus package is missing: run `make setup` (Makefile SYSTEM_PACKAGES)"
    work = tmp_path_factory.mktemp("prometheus")
    jobs = {"baton-router": [cluster["router"]], "baton-prefill": [cluster["prefill"]],
            "baton-decode": cluster["decodes"]}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],  # loaded as in production: the rules must evaluate against real series
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p.info['metrics_port']}" for p in pods]}]}
            for job, pods in jobs.items()
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(base, proc), timeout=60, interval=0.2, what="prometheus to be ready")
        # Traffic must come after a first scrape of every target: a counter first seen at 1 has no increase.
        wait_until(lambda: len(_query(base, 'up{job=~"baton-.*"} == 1')) == 4, timeout=30, interval=0.2,
                   what="a first scrape of every target")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def _ready(base: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "prometheus exited at start (see its log in the test's tmp dir)"
    try:
        return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def _snapshot(cluster) -> dict[str, Samples | list[Samples]]:
    return {"router": scrape(cluster["router"].info["metrics_port"]),
            "prefill": scrape(cluster["prefill"].info["metrics_port"]),
            "decodes": [scrape(p.info["metrics_port"]) for p in cluster["decodes"]]}


def _http(router: Pod, path: str, body: dict | None = None) -> tuple[int, dict]:
    """GET (or POST ``body`` to) the gateway; the HTTP status and the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{router.info['http_port']}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    return err.value.code()


@pytest.fixture(scope="module")
def traffic(cluster, prometheus):
    """Sends the known traffic once; returns the scrapes before it, after the part with exact token counts, and
    after the cancelled stream, with what was sent."""
    router, decodes = cluster["router"], cluster["decodes"]
    sent = {"prompt_tokens": 0, "generated": 0, "cached": 0}
    before = _snapshot(cluster)

    def ok(tokens: list[int]) -> None:
        out, last, _ = generate(router, tokens, MAX_TOKENS, ignore_eos=True)
        assert len(out) == MAX_TOKENS and last.finished
        sent["prompt_tokens"] += len(tokens)
        sent["generated"] += len(out)
        sent["cached"] += last.usage.cached_tokens

    # 5 finished: 3 short gRPC, 1 long (remote prefill), 1 over HTTP.
    for seed in range(3):
        ok(_tokens(SHORT, seed=900 + seed))
    ok(_tokens(LONG, seed=910))
    model = _http(router, "/v1/models")[1]["data"][0]["id"]
    status, body = _http(router, "/v1/completions", {"model": model, "prompt": _tokens(SHORT, seed=911),
                                                      "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == MAX_TOKENS, body
    sent["prompt_tokens"] += SHORT
    sent["generated"] += MAX_TOKENS
    sent["cached"] += (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    # 3 invalid: a bad sampling value through the router (gRPC) and straight to a pod, a field Baton refuses (HTTP).
    assert _refused(router.inference.Generate(_request(_tokens(SHORT, 912), 4, top_p=1.5))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(decodes[0].inference.Generate(_request(_tokens(SHORT, 913), 4, top_p=1.5))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _http(router, "/v1/completions", {"model": model, "prompt": [1, 2, 3], "max_tokens": 4, "n": 2})[0] == 400

    exact = _snapshot(cluster)

    # Fill both decode pods: a long stream running on each (read up to its first token), then a short one queued
    # behind each. One request through the router and one straight to a pod are refused as overloaded. The long
    # streams are then cancelled, and the queued ones run and finish. Each request is placed only once the router
    # counts the one before in flight: two placed at the same moment could pick the same pod.
    def in_flight(n: int) -> None:
        wait_until(lambda: sum(w.active for w in router.health().workers) == n, what=f"{n} requests in flight")

    running = []
    for seed in range(2):
        running.append(router.inference.Generate(_request(_tokens(SHORT, seed=920 + seed), HOLD_TOKENS,
                                                          ignore_eos=True), timeout=120))
        next(running[-1])  # its first token: admitted and running, its prompt counted
        in_flight(seed + 1)
    queued, results = [], []
    for seed in range(2):
        tokens = _tokens(SHORT, seed=930 + seed)
        queued.append(threading.Thread(target=lambda t=tokens: results.append(
            (t, generate(router, t, MAX_TOKENS, ignore_eos=True)))))
        queued[-1].start()
        in_flight(3 + seed)
    for pod in decodes:
        wait_until(lambda p=pod: (p.health().usage.running, p.health().usage.waiting) == (1, 1),
                   what="each decode pod to run one request and queue one")
    assert _refused(router.inference.Generate(_request(_tokens(SHORT, 940), 4))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _refused(decodes[0].inference.Generate(_request(_tokens(SHORT, 941), 4))) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in running:
        call.cancel()
    for thread in queued:
        thread.join(timeout=120)
    assert len(results) == 2 and all(len(out) == MAX_TOKENS and last.finished for _, (out, last, _) in results)

    def counted_everywhere() -> bool:
        after = _snapshot(cluster)
        return (delta(exact["router"], after["router"], "baton_router_requests_total", outcome="cancelled") >= 2
                and total(after["decodes"], "baton_requests_total", outcome="cancelled")
                - total(exact["decodes"], "baton_requests_total", outcome="cancelled") >= 2)  # exact: in the test

    wait_until(counted_everywhere, what="the cancelled streams to be counted by the router and their pods")
    wait_until(lambda: all(p.health().usage.running == 0 for p in decodes), what="the decode pods to be idle")
    return {"before": before, "exact": exact, "after": _snapshot(cluster), "sent": sent}


def _decode_delta(traffic, name: str, until: str = "after", **labels: str) -> float:
    return total(traffic[until]["decodes"], name, **labels) - total(traffic["before"]["decodes"], name, **labels)


def test_counts_are_exact(traffic, layout):  # noqa: F811 (layout: the fixture imported above)
    before, exact, after, sent = traffic["before"], traffic["exact"], traffic["after"], traffic["sent"]
    # Router: each request once, under one outcome.
    router_outcomes = {o: delta(before["router"], after["router"], "baton_router_requests_total", outcome=o)
                       for o in ("finished", "invalid", "overloaded", "unavailable", "error", "cancelled")}
    assert router_outcomes == {"finished": 7, "invalid": 2, "overloaded": 1, "unavailable": 0, "error": 0,
                               "cancelled": 2}
    # Decode pods: the 9 requests the router placed, and the 2 sent to a pod directly (invalid, overloaded). A
    # refusal is not also a cancellation.
    pod_outcomes = {o: _decode_delta(traffic, "baton_requests_total", outcome=o)
                    for o in ("finished", "invalid", "overloaded", "error", "cancelled")}
    assert pod_outcomes == {"finished": 7, "invalid": 1, "overloaded": 1, "error": 0, "cancelled": 2}
    # Tokens, up to the snapshot before any stream was cancelled (every count known): the prompt tokens of the 5
    # finished requests, the tokens generated for them, and what their caches served, equal on the router and pods.
    prompt_tokens, generated = sent["prompt_tokens"], sent["generated"]
    assert delta(before["router"], exact["router"], "baton_router_prompt_tokens_total") == prompt_tokens
    assert delta(before["router"], exact["router"], "baton_router_generation_tokens_total") == generated
    assert _decode_delta(traffic, "baton_prompt_tokens_total", until="exact") == prompt_tokens
    assert _decode_delta(traffic, "baton_generation_tokens_total", until="exact") == generated
    assert _decode_delta(traffic, "baton_prefix_cache_query_tokens_total", until="exact") == prompt_tokens
    hits = _decode_delta(traffic, "baton_prefix_cache_hit_tokens_total", until="exact")
    assert hits == sent["cached"]
    assert hits == delta(before["router"], exact["router"], "baton_router_prefix_hit_tokens_total", kind="delivered")
    for name in ("baton_time_to_first_token_seconds_count", "baton_e2e_request_latency_seconds_count",
                 "baton_request_decode_tokens_per_second_count", "baton_request_queue_time_seconds_count"):
        assert _decode_delta(traffic, name, until="exact") == 5, name
    for name in ("baton_router_time_to_first_token_seconds_count", "baton_router_e2e_request_latency_seconds_count"):
        assert delta(before["router"], exact["router"], name) == 5, name
    # After the 4 requests that filled the pods (2 cancelled after their first token, 2 finished): their prompts
    # counted once each, where they produced a first token; latencies of the finished ones only.
    assert delta(exact["router"], after["router"], "baton_router_prompt_tokens_total") == 4 * SHORT
    assert _decode_delta(traffic, "baton_prompt_tokens_total") - prompt_tokens == 4 * SHORT
    assert _decode_delta(traffic, "baton_prefix_cache_query_tokens_total") - prompt_tokens == 4 * SHORT
    assert _decode_delta(traffic, "baton_generation_tokens_total") - generated >= 2 * MAX_TOKENS + 2
    assert delta(exact["router"], after["router"], "baton_router_generation_tokens_total") >= 2 * MAX_TOKENS + 2
    assert _decode_delta(traffic, "baton_time_to_first_token_seconds_count") == 9
    assert _decode_delta(traffic, "baton_request_queue_time_seconds_count") == 9
    assert _decode_delta(traffic, "baton_e2e_request_latency_seconds_count") == 7
    assert _decode_delta(traffic, "baton_request_decode_tokens_per_second_count") == 7
    assert delta(before["router"], after["router"], "baton_router_e2e_request_latency_seconds_count") == 7
    # Placements: exactly the requests placed (not the refused ones).
    assert delta(before["router"], after["router"], "baton_router_placement_seconds_count") == 9
    assert delta(before["router"], after["router"], "baton_router_decisions_total") == 9
    # The one long prompt went to the prefill pod: one call, one transfer of its 25 pages and two state slots.
    prefill_before, prefill_after = before["prefill"], after["prefill"]
    assert _decode_delta(traffic, "baton_remote_prefills_total", outcome="ok") == 1
    assert _decode_delta(traffic, "baton_remote_prefills_total") == 1
    assert delta(prefill_before, prefill_after, "baton_prefill_requests_total", outcome="finished") == 1
    assert delta(prefill_before, prefill_after, "baton_prefill_requests_total") == 1
    assert delta(prefill_before, prefill_after, "baton_prefill_prompt_tokens_total") == LONG
    assert delta(prefill_before, prefill_after, "baton_transfers_total", outcome="ok") == 1
    assert delta(prefill_before, prefill_after, "baton_transfers_total", outcome="failed") == 0
    assert delta(prefill_before, prefill_after, "baton_transfer_kv_pages_total") == -(-LONG // 4)
    assert delta(prefill_before, prefill_after, "baton_transfer_bytes_total") == _expected_bytes(LONG, 0, layout)
    assert delta(prefill_before, prefill_after, "baton_transfer_duration_seconds_count") == 1
    # Idle pods: nothing running or waiting, no working slot taken, every page in use is a cached one.
    for samples in after["decodes"]:
        assert value(samples, "baton_engine_requests") == 0
        assert value(samples, "baton_state_slots_used") == 0 and value(samples, "baton_state_slots_capacity") >= 1
        assert value(samples, "baton_kv_pages_used") == value(samples, "baton_kv_pages_cached")
        assert value(samples, "baton_kv_pages_capacity") == 700
    assert value(after["router"], "baton_router_requests_in_flight") == 0
    assert value(after["router"], "baton_router_redis_up") == 1
    assert value(after["router"], "baton_router_workers", eligible="true") == 3


# ---- a real Prometheus: every dashboard query and alert expression returns data ---------------------------------
# Grafana's ``$__rate_interval`` is fixed here to a window that covers the whole traffic above.
WINDOW = "2m"


def _query(base: str, expr: str) -> list[dict]:
    """The result vector of an instant query through Prometheus' HTTP API (a bad expression fails the test)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{expr}: {err.read().decode()}") from err
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    """At least one series with a number (NaN, from 0/0 or a quantile of nothing, is no data)."""
    return any(not math.isnan(float(series["value"][1])) for series in result)


def _split_top_level(expr: str, words: tuple[str, ...]) -> list[str]:
    """``expr`` cut at the binary operators ``words`` outside any parentheses or braces."""
    parts, depth, start = [], 0, 0
    for match in re.finditer(r"[(){}]|\b(?:" + "|".join(words) + r")\b", expr):
        token = match.group()
        if token in "({":
            depth += 1
        elif token in ")}":
            depth -= 1
        elif depth == 0:
            parts.append(expr[start:match.start()])
            start = match.end()
    return [p.strip() for p in [*parts, expr[start:]]]


def alert_queries(expr: str) -> list[str]:
    """The queries inside an alert expression: its parts joined by ``and`` / ``or`` / ``unless``, each without its
    trailing comparison with a number (``x > 0.05`` -> ``x``). A condition that holds returns data only while the
    alert would fire; the query under it must return data whenever the cluster runs, or the alert could never fire
    (a renamed metric, a wrong label)."""
    return [re.sub(r"\s*(>=|<=|==|!=|>|<)\s*[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$", "", part)
            for part in _split_top_level(expr, ("and", "or", "unless"))]


def test_alert_queries_strip_comparisons():
    assert alert_queries('up{job=~"baton-.*"} == 0') == ['up{job=~"baton-.*"}']
    assert alert_queries("sum(rate(a[5m])) / sum(rate(b[5m])) < 0.5\nand\nsum(rate(b[5m])) > 100") == [
        "sum(rate(a[5m])) / sum(rate(b[5m]))", "sum(rate(b[5m]))"]
    assert alert_queries("max(x) and on (job) y > 1e3") == ["max(x)", "on (job) y"]


def test_every_dashboard_query_and_alert_expression_returns_data(traffic, prometheus):
    from deploy.grafana.build import queries

    expressions = {f"panel {uid} / {title} / target {i}": expr.replace("$__rate_interval", WINDOW)
                   for i, (uid, title, expr) in enumerate(queries())}
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    for rule in rules:
        for i, query in enumerate(alert_queries(rule["expr"].strip())):
            expressions[f"alert {rule['alert']} part {i}"] = query
    assert len(expressions) == len(queries()) + len(rules) + 1  # one rule has two parts
    # Poll (not sleep): the last scrapes after the traffic arrive within a few scrape intervals.
    missing: dict[str, str] = dict(expressions)

    def all_have_data() -> bool:
        for name, expr in list(missing.items()):
            if _has_data(_query(prometheus, expr)):
                del missing[name]
        return not missing

    try:
        wait_until(all_have_data, timeout=60, interval=1.0, what="every query to return data")
    except AssertionError:
        raise AssertionError("no data for:\n" + "\n".join(f"  {n}: {e}" for n, e in missing.items())) from None
    # Every target is up, and Prometheus itself evaluates every rule without an error.
    assert len(_query(prometheus, 'up{job=~"baton-.*"} == 1')) == 4

    def loaded_rules() -> list[dict]:
        groups = json.loads(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10).read())["data"]
        return [rule for group in groups["groups"] for rule in group["rules"]]

    assert sorted(r["name"] for r in loaded_rules()) == sorted(r["alert"] for r in rules)
    wait_until(lambda: all(r["health"] == "ok" for r in loaded_rules()), timeout=10,
               what="every rule evaluated without error")


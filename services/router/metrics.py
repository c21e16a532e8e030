"""The router's Prometheus metrics, on its own ``/metrics`` port and the gateway's ``/metrics`` (its own registry: no
global state). Every metric the router exposes is defined here, once; conventions as the pods'
(services/common/metrics.py).

Requests: every request the router is asked to serve (gRPC ``Generate`` or an OpenAI HTTP call) is counted once in
``baton_router_requests_total{outcome}``: ``finished``; ``invalid`` (bad input, refused before placement or by the
pod); ``overloaded`` (every decode pod full: 429 / RESOURCE_EXHAUSTED); ``unavailable`` (no decode pod, or none
completed it); ``error`` (a pod failed it with another status); ``cancelled`` (the client left first). Latencies are
the client's view (arrival at the router to the first / last token relayed).

Cache-hit accounting per request, in prompt tokens: ``available`` is the best usable hit on any worker of the
cluster, ``chosen`` the hit on the decode pod placement chose, ``delivered`` what that pod's engine then served
from its cache. available >= chosen shows what placement gave up (for load); chosen vs delivered shows the
index's accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from services.common.metrics import E2E_BUCKETS, TTFT_BUCKETS

_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_PLACEMENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)
OUTCOMES = ("finished", "invalid", "overloaded", "unavailable", "error", "cancelled")


class _StateCollector:
    """Gauges read at scrape time from the router's live state."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self._state = state

    def collect(self):
        state = self._state()
        up = GaugeMetricFamily("baton_router_redis_up", "1 when the router can read the cluster's Redis")
        up.add_metric([], 1.0 if state["redis_up"] else 0.0)
        yield up
        workers = GaugeMetricFamily("baton_router_workers", "Workers known to the router, by role and whether "
                                    "placement may choose them now", labels=["role", "eligible"])
        for role in ("decode", "prefill"):
            for eligible in ("true", "false"):
                workers.add_metric([role, eligible], state["workers"].get((role, eligible), 0))
        yield workers
        feeds = GaugeMetricFamily("baton_router_worker_feeds", "Workers by the state of their cache-event feed "
                                  "(following: the index is in step; else rebuilding from a snapshot)",
                                  labels=["role", "state"])
        for (role, feed_state), count in sorted(state["feeds"].items()):
            feeds.add_metric([role, feed_state], count)
        yield feeds
        pages = GaugeMetricFamily("baton_router_index_pages", "Distinct KV pages in the router's cache index")
        pages.add_metric([], state["index_pages"])
        yield pages
        entries = GaugeMetricFamily("baton_router_index_entries", "(worker, page) pairs in the router's cache index")
        entries.add_metric([], state["index_entries"])
        yield entries


class RouterMetrics:
    def __init__(self, state: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("baton_router_requests", "Requests by outcome, counted once", ["outcome"],
                                registry=r)
        for outcome in OUTCOMES:  # exported from the start: an error rate of 0 rather than no data
            self.requests.labels(outcome)
        self.in_flight = Gauge("baton_router_requests_in_flight", "Requests being placed or relayed", registry=r)
        self.ttft = Histogram("baton_router_time_to_first_token_seconds", "Arrival at the router to the first "
                              "token relayed (tokenizing, placement, queue, prefill, hand-over)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("baton_router_e2e_request_latency_seconds", "Arrival at the router to the last token "
                             "of a finished request", buckets=E2E_BUCKETS, registry=r)
        self.decisions = Counter("baton_router_decisions", "Placement decisions by policy and reason",
                                 ["policy", "reason"], registry=r)
        self.placement_seconds = Histogram("baton_router_placement_seconds",
                                           "Time to place one request (index lookup, scoring)",
                                           buckets=_PLACEMENT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("baton_router_prompt_tokens", "Prompt tokens of placed requests", registry=r)
        self.generation_tokens = Counter("baton_router_generation_tokens", "Tokens relayed to clients", registry=r)
        self.hit_tokens = Counter("baton_router_prefix_hit_tokens",
                                  "Prompt tokens reusable from a prefix cache: best anywhere (available), on "
                                  "the chosen decode pod (chosen), served by it (delivered)", ["kind"], registry=r)
        for kind in ("available", "chosen", "delivered"):
            self.hit_tokens.labels(kind)
        self.failovers = Counter("baton_router_failovers",
                                 "Requests moved to another decode pod (refused before a token, or mid-stream)",
                                 ["stage"], registry=r)
        for stage in ("before_first_token", "mid_stream"):
            self.failovers.labels(stage)
        self.events = Counter("baton_router_cache_events", "Cache events applied to the index", registry=r)
        # Every stream the router relays waits while its event loop is held: tokenizing on the loop, a slow handler.
        self.loop_lag = Histogram("baton_router_event_loop_lag_seconds",
                                  "How late the router's event loop wakes a timer (sampled every 10 ms)",
                                  buckets=_LAG_BUCKETS, registry=r)
        r.register(_StateCollector(state))

    def serve(self, host: str, port: int) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

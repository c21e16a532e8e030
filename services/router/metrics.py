"""The router's Prometheus metrics, on its own ``/metrics`` port (its own registry: no global state).

Cache-hit accounting per request, in prompt tokens: ``available`` is the best usable hit on any worker of the
cluster, ``chosen`` the hit on the decode pod placement chose, ``delivered`` what that pod's engine then served
from its cache. available >= chosen shows what placement gave up (for load); chosen vs delivered shows the
index's accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_PLACEMENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)


class _StateCollector:
    """Gauges read at scrape time from the router's live state."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self._state = state

    def collect(self):
        state = self._state()
        up = GaugeMetricFamily("baton_router_redis_up", "1 when the router can read the cluster's Redis")
        up.add_metric([], 1.0 if state["redis_up"] else 0.0)
        yield up
        workers = GaugeMetricFamily("baton_router_workers", "Workers known to the router", labels=["role", "state"])
        for (role, status), count in sorted(state["workers"].items()):
            workers.add_metric([role, status], count)
        yield workers
        pages = GaugeMetricFamily("baton_router_index_pages", "Distinct KV pages in the router's cache index")
        pages.add_metric([], state["index_pages"])
        yield pages
        entries = GaugeMetricFamily("baton_router_index_entries", "(worker, page) pairs in the router's cache index")
        entries.add_metric([], state["index_entries"])
        yield entries


class RouterMetrics:
    def __init__(self, state: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("baton_router_requests", "Requests by outcome", ["outcome"], registry=r)
        self.decisions = Counter("baton_router_decisions", "Placement decisions by policy and reason",
                                 ["policy", "reason"], registry=r)
        self.placement_seconds = Histogram("baton_router_placement_seconds",
                                           "Time to place one request (hashing, index lookup, scoring)",
                                           buckets=_PLACEMENT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("baton_router_prompt_tokens", "Prompt tokens of placed requests", registry=r)
        self.hit_tokens = Counter("baton_router_prefix_hit_tokens",
                                  "Prompt tokens reusable from a prefix cache: best anywhere (available), on "
                                  "the chosen decode pod (chosen), served by it (delivered)", ["kind"], registry=r)
        self.failovers = Counter("baton_router_failovers",
                                 "Requests moved to another decode pod (refused before a token, or mid-stream)",
                                 ["stage"], registry=r)
        self.events = Counter("baton_router_cache_events", "Cache events applied to the index", registry=r)
        # Every stream the router relays waits while its event loop is held: tokenizing on the loop, a slow handler.
        self.loop_lag = Histogram("baton_router_event_loop_lag_seconds",
                                  "How late the router's event loop wakes a timer (sampled every 10 ms)",
                                  buckets=_LAG_BUCKETS, registry=r)
        r.register(_StateCollector(state))

    def serve(self, host: str, port: int) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

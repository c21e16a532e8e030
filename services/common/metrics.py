"""Prometheus metrics of one pod, served on its own ``/metrics`` port.

Each pod has its own registry (no process-global state): request outcomes, time to first token,
inter-token latency, state hand-over bytes/latency/pages, and gauges read live from the engine (queue
sizes, pool usage, prefix-cache counters).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class _EngineCollector:
    """Reads the engine's counters at scrape time (plain integer reads; no engine lock needed)."""

    def __init__(self, usage: Callable[[], dict[str, int]], cache_stats: Callable[[], object]) -> None:
        self._usage = usage
        self._cache_stats = cache_stats

    def collect(self):
        usage = self._usage()
        queue = GaugeMetricFamily("baton_queue_requests", "Requests by scheduler state", labels=["state"])
        for state in ("running", "waiting", "held"):
            queue.add_metric([state], usage[state])
        yield queue
        pools = GaugeMetricFamily("baton_pool_used", "Pool entries in use (cached included)", labels=["pool"])
        totals = GaugeMetricFamily("baton_pool_capacity", "Pool sizes", labels=["pool"])
        for pool, used, total in (
            ("kv_pages", "pages_used", "pages_total"),
            ("kv_pages_cached", "pages_cached", "pages_total"),
            ("state_slots", "slots_used", "slots_total"),
            ("checkpoint_slots", "checkpoints_used", "checkpoints_total"),
        ):
            pools.add_metric([pool], usage[used])
            totals.add_metric([pool], usage[total])
        yield pools
        yield totals
        quarantined = GaugeMetricFamily(
            "baton_pool_quarantined", "Pool entries a failed prefill pod may still write, out of use until it "
            "confirms or restarts (counted in baton_pool_used too)", labels=["pool"],
        )
        for pool, key in (("kv_pages", "pages_quarantined"), ("state_slots", "slots_quarantined"),
                          ("checkpoint_slots", "checkpoints_quarantined")):
            quarantined.add_metric([pool], usage[key])
        yield quarantined
        stats = self._cache_stats()
        tokens = CounterMetricFamily("baton_prefix_cache_tokens", "Prompt tokens by cache outcome", labels=["kind"])
        tokens.add_metric(["prompt"], stats.prompt_tokens)
        tokens.add_metric(["cached"], stats.cached_tokens)
        tokens.add_metric(["recomputed_missing_state"], stats.recomputed_missing_state_tokens)
        yield tokens


class PodMetrics:
    def __init__(self, role: str, usage: Callable[[], dict[str, int]], cache_stats: Callable[[], object]) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("baton_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("baton_inter_token_latency_seconds", "Between consecutive tokens of a stream",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.transfer_bytes = Counter("baton_transfer_bytes", "Bytes of KV pages + GDN states handed over",
                                      registry=r)
        self.transfer_seconds = Histogram("baton_transfer_seconds", "Duration of one hand-over",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_compute_seconds = Histogram(
            "baton_prefill_compute_seconds", "Prefill pod: a call's arrival to its first token (queue + compute)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.remote_prefill_seconds = Histogram(
            "baton_remote_prefill_seconds", "Decode pod: one answered Prefill call (compute + hand-over + RPC)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.pages_transferred = Counter("baton_kv_pages_transferred", "KV pages (all layers) handed over",
                                         registry=r)
        self.pages_reused = Counter("baton_kv_pages_reused", "Prompt KV pages a decode pod already held",
                                    registry=r)
        self.remote_prefills = Counter("baton_remote_prefills", "Prefills sent to prefill pods, by outcome",
                                       ["outcome"], registry=r)
        r.register(_EngineCollector(usage, cache_stats))

    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP server; returns the bound port (``port`` 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

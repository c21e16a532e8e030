"""Prometheus metrics of one pod, served on its own ``/metrics`` port.

Every metric a pod exposes is defined here, once (README.md, "Metrics", lists them all). Each pod has its own
registry (no process-global state). Conventions (Prometheus' own): a ``baton_`` prefix, the unit in the name
(``_seconds``, ``_bytes``, ``_pages``, ``_slots``, ``_tokens``), counters exposed with ``_total``, one label only
where its values partition one quantity (summing over it means something), and no pod or role label: the scrape
adds ``instance`` and ``job``.

Counting rules that make the numbers add up:
- a decode pod counts every ``Generate`` call once, in ``baton_requests_total{outcome}``, when its stream ends
  (``finished``, ``invalid``, ``overloaded``, ``error``, or ``cancelled``: the caller left first);
- a prefill pod counts every ``Prefill`` call once, in ``baton_prefill_requests_total{outcome}``;
- tokens are counted where they are computed: prompt tokens when a request's first token is produced, generated
  tokens as they are streamed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets reach minutes: a 128K-token prefill behind a queue takes longer than 20 s, and an agentic
# answer of thousands of tokens streams for minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
# Per-request decode speed: the service's floor is 70 tok/s per user (DESIGN.md), so the buckets are dense there.
SPEED_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 125, 150, 200, 300, 500, 1000)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Outcomes of one request (decode pod) or one Prefill call (prefill pod).
REQUEST_OUTCOMES = ("finished", "invalid", "overloaded", "error", "cancelled")
PREFILL_OUTCOMES = ("finished", "invalid", "refused", "aborted", "error")


class _EngineCollector:
    """Reads the engine's state at scrape time (plain integer reads from another thread: no engine lock needed,
    a value may be one step old)."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def collect(self):
        engine = self._engine
        usage = engine.resource_usage()
        requests = GaugeMetricFamily("baton_engine_requests", "Requests in the engine by scheduler state "
                                     "(running includes remote prefills; held: prefill pod, handing over)",
                                     labels=["state"])
        for state in ("running", "waiting", "held"):
            requests.add_metric([state], usage[state])
        yield requests
        # One metric per unit (pages, working slots, checkpoint slots): their counts are never added together.
        for name, help_text, key in (
            ("baton_kv_pages_capacity", "KV pages in the pool", "pages_total"),
            ("baton_kv_pages_used", "KV pages not free (running requests, prefix cache, quarantine)", "pages_used"),
            ("baton_kv_pages_cached", "KV pages held by the prefix cache (part of used; evictable when unlocked)",
             "pages_cached"),
            ("baton_kv_pages_quarantined", "KV pages a failed prefill pod may still write (part of used)",
             "pages_quarantined"),
            ("baton_state_slots_capacity", "Working GDN state slots (one per running request)", "slots_total"),
            ("baton_state_slots_used", "Working GDN state slots in use (quarantined included)", "slots_used"),
            ("baton_state_slots_quarantined", "Working state slots a failed prefill pod may still write",
             "slots_quarantined"),
            ("baton_checkpoint_slots_capacity", "GDN checkpoint slots in the pool", "checkpoints_total"),
            ("baton_checkpoint_slots_used", "Checkpoint slots not free (cache, snapshots, quarantine)",
             "checkpoints_used"),
            ("baton_checkpoint_slots_cached", "Checkpoint slots held by the prefix cache (part of used)",
             "checkpoints_cached"),
            ("baton_checkpoint_slots_quarantined", "Checkpoint slots a failed prefill pod may still write",
             "checkpoints_quarantined"),
        ):
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], usage[key])
            yield gauge
        stats, tree = engine.cache.stats, engine.cache.tree
        for name, help_text, value in (
            ("baton_prefix_cache_query_tokens", "Tokens looked up in the prefix cache at admission (prompt; "
             "prompt + output for a preempted request)", stats.prompt_tokens),
            ("baton_prefix_cache_hit_tokens", "Of the query tokens, those served from the prefix cache",
             stats.cached_tokens),
            ("baton_prefix_cache_recomputed_tokens", "Query tokens whose KV was cached but recomputed: no GDN "
             "checkpoint at the end of the match", stats.recomputed_missing_state_tokens),
            ("baton_prefix_cache_evicted_pages", "KV pages evicted from the prefix cache", tree.num_evicted_pages),
            ("baton_prefix_cache_evicted_checkpoints", "GDN checkpoints evicted from the prefix cache",
             tree.num_evicted_states),
            ("baton_prefix_cache_checkpoints_published", "GDN checkpoints published into the prefix cache",
             stats.checkpoints_published),
            ("baton_preemptions", "Running requests preempted for memory (recomputed later)",
             engine.scheduler.num_preemptions),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], value)
            yield counter


class PodMetrics:
    """A pod's registry. ``role`` selects the request-level metrics its service records (the engine's gauges and
    counters are the same on both roles)."""

    def __init__(self, role: str, engine) -> None:
        if role not in ("decode", "prefill"):
            raise ValueError(f"role must be decode or prefill, got {role!r}")
        self.role = role
        self.registry = r = CollectorRegistry()
        if role == "decode":
            self.requests = Counter("baton_requests", "Generate calls by outcome, counted once when the stream "
                                    "ends", ["outcome"], registry=r)
            for outcome in REQUEST_OUTCOMES:  # every outcome exported from the start: rates of 0, not no data
                self.requests.labels(outcome)
            self.prompt_tokens = Counter("baton_prompt_tokens", "Prompt tokens of requests that produced a first "
                                         "token", registry=r)
            self.generation_tokens = Counter("baton_generation_tokens", "Tokens generated and streamed",
                                             registry=r)
            self.ttft = Histogram("baton_time_to_first_token_seconds", "Arrival at the pod to the first token",
                                  buckets=TTFT_BUCKETS, registry=r)
            self.itl = Histogram("baton_inter_token_latency_seconds", "Between consecutive tokens of a stream",
                                 buckets=ITL_BUCKETS, registry=r)
            self.e2e = Histogram("baton_e2e_request_latency_seconds", "Arrival to the last token, finished requests",
                                 buckets=E2E_BUCKETS, registry=r)
            self.queue_time = Histogram("baton_request_queue_time_seconds", "Arrival in the engine to first "
                                        "scheduled (local prefill or remote prefill sent)", buckets=TTFT_BUCKETS,
                                        registry=r)
            self.decode_speed = Histogram("baton_request_decode_tokens_per_second", "Per finished request of 2+ "
                                          "tokens: tokens after the first / time from first to last token",
                                          buckets=SPEED_BUCKETS, registry=r)
            self.remote_prefills = Counter("baton_remote_prefills", "Remote prefill decisions, one per engine "
                                           "hand-off: ok, retried (attempt failed, another follows), local (no "
                                           "prefill pod, or the last attempt failed), cancelled (client left first)",
                                           ["outcome"], registry=r)
            for outcome in ("ok", "retried", "local", "cancelled"):
                self.remote_prefills.labels(outcome)
            self.remote_prefill_quarantines = Counter("baton_remote_prefill_quarantines", "Failed remote prefills "
                                                      "whose memory was quarantined (the pod may still write)",
                                                      registry=r)
            self.remote_prefill_seconds = Histogram("baton_remote_prefill_seconds", "One answered Prefill call, "
                                                    "seen from the decode pod (compute + hand-over + RPC)",
                                                    buckets=TTFT_BUCKETS, registry=r)
            self.pages_reused = Counter("baton_kv_pages_reused", "Prompt KV pages a decode pod already held when "
                                        "it sent a prompt to a prefill pod (not transferred)", registry=r)
        else:
            self.prefill_requests = Counter("baton_prefill_requests", "Prefill calls by outcome, counted once: "
                                            "finished, invalid, refused (handshake, draining), aborted (the decode "
                                            "pod gave up), error", ["outcome"], registry=r)
            for outcome in PREFILL_OUTCOMES:
                self.prefill_requests.labels(outcome)
            self.prefill_prompt_tokens = Counter("baton_prefill_prompt_tokens", "Prompt tokens of finished prefill "
                                                 "calls", registry=r)
            self.transfers = Counter("baton_transfers", "Hand-over writes to decode pods by outcome (ok, failed)",
                                     ["outcome"], registry=r)
            for outcome in ("ok", "failed"):
                self.transfers.labels(outcome)
            self.transfer_bytes = Counter("baton_transfer_bytes", "Bytes of KV pages + GDN states written to "
                                          "decode pods", registry=r)
            self.transfer_pages = Counter("baton_transfer_kv_pages", "KV pages (all layers) written to decode pods",
                                          registry=r)
            self.prefill_compute_seconds = Histogram("baton_prefill_compute_seconds", "A Prefill call's arrival to "
                                                     "its first token (queue + compute)", buckets=TTFT_BUCKETS,
                                                     registry=r)
            self.transfer_seconds = Histogram("baton_transfer_duration_seconds", "Duration of one successful "
                                              "hand-over write", buckets=TRANSFER_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP server; returns the bound port (``port`` 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

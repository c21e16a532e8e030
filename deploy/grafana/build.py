"""Baton's Grafana dashboards, built from code: ``python deploy/grafana/build.py`` writes ``deploy/grafana/*.json``
(committed); ``--check`` fails if a committed file differs from what this script builds (tests run it).

Why code rather than JSON exported from Grafana: every panel's PromQL lives here as data, so
tests/test_metrics_cluster.py imports ``queries()`` and evaluates each one against a live cluster's Prometheus (a
renamed metric breaks a test, not a dashboard nobody looks at); the layout, data source and units are uniform by
construction; and a change to a panel is a one-line diff instead of hundreds of lines of exported JSON.

Every panel uses the ``${datasource}`` template variable (any Prometheus data source, chosen on import) and
``$__rate_interval`` for rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (legend, PromQL)
    unit: str = "short"
    description: str = ""


def rate(selector: str) -> str:
    return f"rate({selector}[{RATE}])"


def quantiles(histogram: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99), where: str = "") -> tuple[tuple[str, str], ...]:
    """``histogram_quantile`` of a histogram summed over every process, one target per quantile."""
    return tuple((f"p{round(q * 100)}", f"histogram_quantile({q}, sum by (le) ({rate(f'{histogram}_bucket{where}')}))")
                 for q in qs)


def ratio(numerator: str, denominator: str) -> str:
    return f"sum({rate(numerator)}) / sum({rate(denominator)})"


OVERVIEW = (
    Panel("Requests/s by outcome (router)",
          (("{{outcome}}", f"sum by (outcome) ({rate('baton_router_requests_total')})"),), "reqps",
          "Every request the routers were asked to serve, counted once when it ends."),
    Panel("Tokens/s", (("prompt", f"sum({rate('baton_prompt_tokens_total')})"),
                       ("generated", f"sum({rate('baton_generation_tokens_total')})"),
                       ("prompt served from cache", f"sum({rate('baton_prefix_cache_hit_tokens_total')})")),
          "short", "Decode pods: prompt tokens of requests that produced a first token, tokens generated."),
    Panel("Time to first token (router, client view)", quantiles("baton_router_time_to_first_token_seconds"), "s"),
    Panel("Inter-token latency (decode pods)", quantiles("baton_inter_token_latency_seconds"), "s"),
    Panel("End-to-end latency (router, finished requests)", quantiles("baton_router_e2e_request_latency_seconds"),
          "s"),
    Panel("Per-user decode speed (tokens/s per request)",
          quantiles("baton_request_decode_tokens_per_second", (0.1, 0.5, 0.9)), "short",
          "Per finished request: tokens after the first over the time from first to last token. Floor: 70 tok/s."),
    Panel("Errors by outcome (router)",
          (("{{outcome}}", "sum by (outcome) (" + rate('baton_router_requests_total{outcome!="finished"}') + ")"),),
          "reqps", "invalid and cancelled are the client's doing; overloaded, unavailable and error the service's."),
    Panel("Error ratio (overloaded + unavailable + error)",
          (("error ratio", ratio('baton_router_requests_total{outcome=~"error|unavailable|overloaded"}',
                                 "baton_router_requests_total")),), "percentunit"),
    Panel("Running / waiting requests by job",
          (("{{job}} {{state}}", "sum by (job, state) (baton_engine_requests)"),
           ("in flight at routers", "sum(baton_router_requests_in_flight)")), "short"),
    Panel("Queue time (decode pods)", quantiles("baton_request_queue_time_seconds"), "s",
          "Arrival in the engine to first scheduled (local prefill or remote prefill sent)."),
    Panel("Decode pod outcomes", (("{{outcome}}", f"sum by (outcome) ({rate('baton_requests_total')})"),), "reqps"),
    Panel("Preemptions/s", (("{{instance}}", rate("baton_preemptions_total")),), "short"),
)

CACHE = (
    Panel("Prefix hit rate (router: available / chosen / delivered)",
          (("{{kind}}", f"sum by (kind) ({rate('baton_router_prefix_hit_tokens_total')}) / ignoring(kind) "
                        f"group_left sum({rate('baton_router_prompt_tokens_total')})"),),
          "percentunit", "Share of prompt tokens reusable anywhere (available), on the chosen decode pod (chosen), "
                         "served by it (delivered)."),
    Panel("Pod prefix-cache hit rate", (
        ("{{instance}}", f"sum by (instance) ({rate('baton_prefix_cache_hit_tokens_total')}) / sum by (instance) "
                         f"({rate('baton_prefix_cache_query_tokens_total')})"),), "percentunit"),
    Panel("Recomputed for a missing GDN checkpoint", (
        ("share of queried tokens", ratio("baton_prefix_cache_recomputed_tokens_total",
                                          "baton_prefix_cache_query_tokens_total")),), "percentunit"),
    Panel("Evictions/s", (("KV pages", f"sum({rate('baton_prefix_cache_evicted_pages_total')})"),
                          ("GDN checkpoints", f"sum({rate('baton_prefix_cache_evicted_checkpoints_total')})")),
          "short"),
    Panel("KV pages (all pods)", (("capacity", "sum(baton_kv_pages_capacity)"), ("used", "sum(baton_kv_pages_used)"),
                                  ("cached", "sum(baton_kv_pages_cached)"),
                                  ("quarantined", "sum(baton_kv_pages_quarantined)")), "short"),
    Panel("KV pages held by requests (per pod)", (
        ("{{instance}}", "(baton_kv_pages_used - baton_kv_pages_cached) / baton_kv_pages_capacity"),), "percentunit"),
    Panel("Working state slots", (("used {{instance}}", "baton_state_slots_used"),
                                  ("capacity {{instance}}", "baton_state_slots_capacity")), "short"),
    Panel("Checkpoint slots (all pods)", (("capacity", "sum(baton_checkpoint_slots_capacity)"),
                                          ("used", "sum(baton_checkpoint_slots_used)"),
                                          ("cached", "sum(baton_checkpoint_slots_cached)")), "short"),
    Panel("Checkpoints published/s", (("{{instance}}", rate("baton_prefix_cache_checkpoints_published_total")),),
          "short"),
)

TRANSFER = (
    Panel("Hand-over bytes/s", (("{{instance}}", rate("baton_transfer_bytes_total")),), "Bps"),
    Panel("Hand-overs/s by outcome", (("{{outcome}}", f"sum by (outcome) ({rate('baton_transfers_total')})"),),
          "short"),
    Panel("Hand-over duration", quantiles("baton_transfer_duration_seconds"), "s"),
    Panel("KV pages/s: sent vs already on the decode pod", (
        ("sent", f"sum({rate('baton_transfer_kv_pages_total')})"),
        ("reused", f"sum({rate('baton_kv_pages_reused_total')})")), "short"),
    Panel("Remote prefills/s by outcome (decode pods)",
          (("{{outcome}}", f"sum by (outcome) ({rate('baton_remote_prefills_total')})"),
           ("quarantined", f"sum({rate('baton_remote_prefill_quarantines_total')})")), "short"),
    Panel("Prefill calls/s by outcome (prefill pods)",
          (("{{outcome}}", f"sum by (outcome) ({rate('baton_prefill_requests_total')})"),), "short"),
    Panel("Memory quarantined after failed hand-overs", (
        ("KV pages", "sum(baton_kv_pages_quarantined)"), ("state slots", "sum(baton_state_slots_quarantined)"),
        ("checkpoint slots", "sum(baton_checkpoint_slots_quarantined)")), "short"),
)

ROUTER = (
    Panel("Placement latency", quantiles("baton_router_placement_seconds"), "s"),
    Panel("Decisions/s by policy and reason", (
        ("{{policy}} {{reason}}", f"sum by (policy, reason) ({rate('baton_router_decisions_total')})"),), "short"),
    Panel("Workers by eligibility", (("{{role}} eligible={{eligible}}", "max by (role, eligible) "
                                                                          "(baton_router_workers)"),), "short",
          "As the routers see them (max over routers)."),
    Panel("Worker cache-event feeds", (("{{role}} {{state}}", "max by (role, state) (baton_router_worker_feeds)"),),
          "short"),
    Panel("Scrape targets up", (("{{job}} {{instance}}", 'up{job=~"baton-.*"}'),), "short"),
    Panel("Redis up (per router)", (("{{instance}}", "baton_router_redis_up"),), "short"),
    Panel("Cache events ingested/s", (("{{instance}}", rate("baton_router_cache_events_total")),), "short"),
    Panel("Failovers/s", (("{{stage}}", f"sum by (stage) ({rate('baton_router_failovers_total')})"),), "short"),
    Panel("Event-loop lag", quantiles("baton_router_event_loop_lag_seconds", (0.5, 0.99)), "s"),
    Panel("Index size", (("pages", "max(baton_router_index_pages)"), ("(worker, page) entries",
                                                                      "max(baton_router_index_entries)")), "short"),
)

DASHBOARDS = {
    "baton-overview": ("Baton / Cluster overview", OVERVIEW),
    "baton-cache": ("Baton / Prefix cache and memory", CACHE),
    "baton-transfer": ("Baton / PD hand-over", TRANSFER),
    "baton-router": ("Baton / Router", ROUTER),
}


def dashboard(uid: str, title: str, panels: tuple[Panel, ...]) -> dict:
    """Grafana dashboard JSON (schema 39): two time-series panels per row."""
    out = []
    for i, panel in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for j, (legend, expr) in enumerate(panel.targets)],
        })
    return {
        "uid": uid, "title": title, "tags": ["baton"], "timezone": "browser", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1}]},
        "annotations": {"list": []},
        "panels": out,
    }


def build() -> dict[str, dict]:
    """File name -> dashboard JSON."""
    return {f"{uid}.json": dashboard(uid, title, panels) for uid, (title, panels) in DASHBOARDS.items()}


def render(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) of every panel target, for tests."""
    return [(uid, panel.title, expr) for uid, (_, panels) in DASHBOARDS.items() for panel in panels
            for _, expr in panel.targets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed dashboard differs from the build")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    stale = []
    for name, board in build().items():
        path = args.out / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python deploy/grafana/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

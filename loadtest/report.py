"""Tables and plots of load-test results (the JSON ``python -m loadtest run`` writes).

Plots, next to the JSON (``<stem>_<plot>.png``): latency CDFs (TTFT, ITL, end-to-end), throughput and per-user
decode speed against concurrency or rate (when several levels ran), prompt-cache hit rate per turn (served from
the cache, and what a perfect prefix cache could have served), and per-pod load over time (when the servers'
``/metrics`` were followed). Several result files are drawn together (e.g. Baton and a peer on one workload),
and ``compare`` gives the ratios of their headline numbers.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.stats import RequestRecord, inter_token_latencies


def _level_name(level: dict) -> str:
    if "concurrency" in level:
        return f"c={level['concurrency']}"
    return f"rate={level['rate']}/s" if level.get("rate") is not None else "trace"


def _x(level: dict) -> float | None:
    return level.get("concurrency", level.get("rate"))


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: dict, label: str = "") -> str:
    """One line per level: latencies in ms, throughput, decode speed, cache, errors."""
    head = (f"{'level':>12} {'ok':>5} {'err':>4} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>15} "
            f"{'E2E p50/p99 s':>14} {'out tok/s':>9} {'user tok/s p10/p50':>18} {'floor':>5} {'hit':>5} "
            f"{'cached/reusable':>15}")
    lines = [f"{label or results['config']['target']} ({results['workload']['workload']}, "
             f"{results['config']['api']})", head]
    for level in results["levels"]:
        s = level["summary"]
        ttft, itl, e2e, speed = s["ttft_s"] or {}, s["itl_s"] or {}, s["e2e_s"] or {}, s["decode_tok_s_per_user"] or {}
        lines.append(
            f"{_level_name(level):>12} {s['ok']:>5} {s['requests'] - s['ok']:>4} "
            f"{_fmt(ttft.get('p50'), 1e3):>8}/{_fmt(ttft.get('p99'), 1e3):<8} "
            f"{_fmt(itl.get('p50'), 1e3, 2):>7}/{_fmt(itl.get('p99'), 1e3, 2):<7} "
            f"{_fmt(e2e.get('p50'), 1, 2):>6}/{_fmt(e2e.get('p99'), 1, 2):<7} "
            f"{_fmt(s['throughput']['output_tok_s']):>9} "
            f"{_fmt(speed.get('p10')):>8}/{_fmt(speed.get('p50')):<9} {_fmt(s['share_at_decode_floor'], 100, 0):>4}% "
            f"{_fmt(s['cache']['hit_rate'], 100, 0):>4}% {_fmt(s['cache']['cached_of_reusable'], 100, 0):>14}%"
        )
        if s["errors"]:
            lines.append(f"{'':>12} errors: {s['errors']}")
        for pod in level["pods"]:
            deltas = pod["counter_deltas"]
            if "prefix_prompt_tokens" in deltas:
                lines.append(f"{'':>12} {pod['url']}: prefix cache {deltas.get('prefix_cached_tokens', 0):.0f} of "
                             f"{deltas['prefix_prompt_tokens']:.0f} prompt tokens")
    return "\n".join(lines)


def compare(base: dict, other: dict, base_label: str, other_label: str) -> str:
    """Ratios other / base of the headline numbers, level by level (levels matched by position)."""
    keys = (("ttft_s", "p50"), ("ttft_s", "p99"), ("itl_s", "p50"), ("itl_s", "p99"), ("e2e_s", "p50"),
            ("decode_tok_s_per_user", "p50"))
    lines = [f"{other_label} / {base_label}"]
    for a, b in zip(base["levels"], other["levels"], strict=False):
        sa, sb = a["summary"], b["summary"]
        parts = []
        for metric, q in keys:
            va, vb = (sa[metric] or {}).get(q), (sb[metric] or {}).get(q)
            parts.append(f"{metric}.{q} {_fmt(vb / va if va and vb else None, 1, 2)}")
        ta, tb = sa["throughput"]["output_tok_s"], sb["throughput"]["output_tok_s"]
        parts.append(f"output_tok_s {_fmt(tb / ta if ta and tb else None, 1, 2)}")
        lines.append(f"{_level_name(a):>12}: " + ", ".join(parts))
    return "\n".join(lines)


def _cdf(axis, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    axis.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)


def plot(runs: list[tuple[str, dict]], stem: Path) -> list[Path]:
    """Writes the plots of ``runs`` (label, results) as ``<stem>_<plot>.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        path = stem.parent / f"{stem.name}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def label_of(run_label: str, level: dict) -> str:
        return f"{run_label} {_level_name(level)}".strip()

    # Latency CDFs.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run_label, results in runs:
        for level in results["levels"]:
            records = [RequestRecord.from_json(r) for r in level["requests"]]
            ok = [r for r in records if r.ok]
            name = label_of(run_label, level)
            _cdf(axes[0], [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], name)
            _cdf(axes[1], [g * 1e3 for r in ok for g in inter_token_latencies(r.chunks)], name)
            _cdf(axes[2], [r.end_s for r in ok if r.end_s is not None], name)
    for axis, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)", "end-to-end latency (s)"),
                           strict=True):
        axis.set_xscale("log")
        axis.set_xlabel(title)
        axis.set_ylabel("fraction of requests" if axis is axes[0] else "")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle("latency CDFs")
    save(fig, "latency")

    # Throughput and per-user decode speed against load.
    if any(len(results["levels"]) > 1 for _, results in runs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for run_label, results in runs:
            levels = results["levels"]
            xs = [_x(level) for level in levels]
            axes[0].plot(xs, [lv["summary"]["throughput"]["output_tok_s"] or 0 for lv in levels], "o-",
                         label=f"{run_label} output".strip())
            for q, style in (("p50", "o-"), ("p10", "x--")):
                axes[1].plot(xs, [(lv["summary"]["decode_tok_s_per_user"] or {}).get(q) for lv in levels], style,
                             label=f"{run_label} {q}".strip())
        floor = runs[0][1]["levels"][0]["summary"]["decode_floor_tok_s"]
        axes[1].axhline(floor, color="grey", linestyle=":", label=f"floor {floor:g} tok/s")
        xlabel = "concurrent conversations" if "concurrency" in runs[0][1]["levels"][0] else "conversations / s"
        for axis, ylabel in zip(axes, ("total output tokens / s", "per-user decode tokens / s"), strict=True):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        fig.suptitle("throughput against load")
        save(fig, "throughput")

    # Cache hit rate per turn.
    fig, axis = plt.subplots(figsize=(8, 4.2))
    drew = False
    for run_label, results in runs:
        for level in results["levels"]:
            by_turn = level["summary"]["cache_by_turn"]
            turns = sorted(by_turn, key=int)
            hits = [by_turn[t]["hit_rate"] for t in turns]
            if any(h is not None for h in hits):
                axis.plot([int(t) for t in turns], hits, "o-", label=f"{label_of(run_label, level)} served")
                drew = True
            reusable = [by_turn[t]["reusable_rate"] for t in turns]
            if any(r is not None for r in reusable):
                block = results.get("reuse_block", "?")
                axis.plot([int(t) for t in turns], reusable, "x:",
                          label=f"{label_of(run_label, level)} reusable ({block}-token blocks)")
                drew = True
    if drew:
        from matplotlib.ticker import MaxNLocator

        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("turn of the conversation")
        axis.set_ylabel("share of prompt tokens")
        axis.set_ylim(0, 1.05)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_title("prompt tokens served from the prefix cache, per turn")
        save(fig, "hit_rate")
    else:
        plt.close(fig)

    # Per-pod load over time.
    pods = [(run_label, level, pod) for run_label, results in runs for level in results["levels"]
            for pod in level["pods"] if pod["t"]]
    if pods:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        for run_label, level, pod in pods:
            name = f"{label_of(run_label, level)} {pod['url']}"
            for axis, key in zip(axes, ("running", "kv_usage"), strict=True):
                values = pod["series"].get(key)
                if values:
                    axis.plot(pod["t"], values, label=name)
        for axis, ylabel in zip(axes, ("running requests", "KV cache in use (fraction)"), strict=True):
            axis.set_xlabel("seconds into the level")
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6)
        fig.suptitle("per-pod load over time")
        save(fig, "pods")
    return written

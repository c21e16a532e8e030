"""PNG figures of the simulator's results."""

from __future__ import annotations

from pathlib import Path

from .router import ORACLE, POLICIES

_METRICS = [
    ("reusable_served", "reusable tokens served", lambda r: r["reusable_served"]),
    ("ttft_p99", "TTFT p99 (s)", lambda r: r["ttft_s"]["p99"]),
    ("idle_max", "most idle worker's idle fraction", lambda r: r["idle_fraction"]["max"]),
    ("imbalance", "load imbalance (max / mean work)", lambda r: r["load_imbalance"]),
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(result: dict, path: Path) -> None:
    """One column per cache size, one row per metric, one line per policy over the cluster sizes."""
    plt = _pyplot()
    caches = result["cache_sizes"]
    fig, axes = plt.subplots(len(_METRICS), len(caches), figsize=(4.2 * len(caches), 3.0 * len(_METRICS)),
                             squeeze=False)
    for col, tokens in enumerate(caches):
        for row, (_, label, value) in enumerate(_METRICS):
            ax = axes[row][col]
            for policy in sorted(result["policies"], key=POLICIES.index):
                runs = sorted((r for r in result["runs"] if r["policy"] == policy and r["cache_tokens"] == tokens),
                              key=lambda r: r["workers"])
                style = "k--" if policy == ORACLE else "-o"
                ax.plot([r["workers"] for r in runs], [value(r) for r in runs], style, label=policy, markersize=4)
            ax.set_xscale("log")
            ax.set_xlabel("workers")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"cache {tokens / 1e3:.0f}K tokens per worker", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("router simulator: policies by cluster size (agentic trace, calibrated on "
                 f"{result['base']['trace']['token_scale']}x-scaled tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(result: dict, path: Path) -> None:
    """Per cache size: each weight combination as a point (most idle worker, reusable served), the oracle as a
    star, the chosen weights circled."""
    plt = _pyplot()
    caches = result["cache_sizes"]
    chosen = result["choice"]["weights"]
    sessions = sorted(set(result["session"]))
    fig, axes = plt.subplots(1, len(caches), figsize=(4.6 * len(caches), 4.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, tokens in zip(axes[0], caches, strict=True):
        runs = [r for r in result["runs"] if r["cache_tokens"] == tokens]
        labelled: set[str] = set()
        for r in runs:  # one point per run (each workload seed)
            x, y = r["idle_fraction"]["max"], r["reusable_served"]
            if r["policy"] == ORACLE:
                ax.plot(x, y, "r*", markersize=14, label=_once("oracle (balanced sticky)", labelled))
                continue
            w = r["weights"]
            color = cmap(sessions.index(w["session"]) / max(1, len(sessions) - 1))
            ax.plot(x, y, "o", color=color, markersize=5)
            if w == chosen:
                ax.plot(x, y, "o", markerfacecolor="none", markeredgecolor="k", markersize=12,
                        label=_once("chosen", labelled))
        for s in sessions:
            ax.plot([], [], "o", color=cmap(sessions.index(s) / max(1, len(sessions) - 1)), label=f"session {s:g}")
        ax.set_xlabel("most idle worker's idle fraction")
        ax.set_ylabel("reusable tokens served")
        ratio = runs[0]["cache_tokens_per_worker"] / runs[0]["working_set_tokens_per_worker"]
        ax.set_title(f"cache {tokens / 1e3:.0f}K tokens per worker ({ratio:.2f} x working set)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"cache_aware weight sweep at {result['base']['workers']} workers (cache weight 1; "
                 "queue, request, session varied)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seeds(result: dict, path: Path) -> None:
    """Per cache size: each seed's runs as points (most idle worker, reusable served), the two policies' runs of
    one seed joined by a line."""
    plt = _pyplot()
    caches = result["cache_sizes"]
    policy, baseline = result["policies"][0], result["policies"][-1]
    fig, axes = plt.subplots(1, len(caches), figsize=(4.6 * len(caches), 4.0), squeeze=False)
    for ax, tokens in zip(axes[0], caches, strict=True):
        s = result["summary"][str(tokens)]
        for i in range(len(s["seeds"])):
            xs = [s[policy]["idle_max"][i], s[baseline]["idle_max"][i]]
            ys = [s[policy]["served"][i], s[baseline]["served"][i]]
            ax.plot(xs, ys, "-", color="0.8", linewidth=0.8)
        ax.plot(s[policy]["idle_max"], s[policy]["served"], "o", label=policy, markersize=5)
        ax.plot(s[baseline]["idle_max"], s[baseline]["served"], "r*", label=baseline, markersize=9)
        ax.plot(*s["idle_max_mean"][:1], s["served_mean"][0], "kD", markersize=8, markerfacecolor="none",
                label=f"{policy} mean")
        ax.plot(*s["idle_max_mean"][1:], s["served_mean"][1], "ks", markersize=8, markerfacecolor="none",
                label=f"{baseline} mean")
        ax.set_xlabel("most idle worker's idle fraction")
        ax.set_ylabel("reusable tokens served")
        ax.set_title(f"cache {tokens / 1e3:.0f}K tokens per worker ({len(s['seeds'])} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{policy} against {baseline} per workload seed at {result['base']['workers']} workers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _once(name: str, labelled: set[str]) -> str | None:
    """The legend label the first time, none after (one point per seed)."""
    if name in labelled:
        return None
    labelled.add(name)
    return name

"""Grids of simulations: the policy comparison over cluster sizes and cache sizes, and the sweep of cache_aware's
weights. Runs are independent processes' work (``jobs`` at a time); every run replays the same workload (same
seed), so the policies differ only in placement.

Cache sizes are KV tokens per worker; each report says how that compares with the working set it measured (the
histories of the conversations live on a worker, on average): above 1 the caches can hold every live conversation if
placement is balanced; below 1 they cannot (memory pressure).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .config import SimConfig
from .router import ORACLE, POLICIES
from .simulation import run

log = logging.getLogger("loadtest.simulator")
_WEIGHTS = ("cache", "queue", "request", "session", "memory")


def _run_one(config: SimConfig) -> dict:
    return run(config).to_dict()


def run_all(configs: list[SimConfig], jobs: int) -> list[dict]:
    """Each config's report (as a dict), in order; logs progress."""
    started = time.perf_counter()
    results: list[dict | None] = [None] * len(configs)
    if jobs <= 1:
        outputs: Iterable = map(_run_one, configs)
    else:
        pool = ProcessPoolExecutor(max_workers=jobs)
        outputs = pool.map(_run_one, configs)
    try:
        for i, report in enumerate(outputs):
            results[i] = report
            log.info("%d/%d  %-11s %4d workers  cache %8d tokens  weights %s: reusable served %.4f, most idle %.3f, "
                     "TTFT p99 %.2f s  (%.1f s; %.0f s so far)", i + 1, len(configs), report["policy"],
                     report["workers"], report["cache_tokens_per_worker"], _weights_label(report["weights"]),
                     report["reusable_served"], report["idle_fraction"]["max"], report["ttft_s"]["p99"],
                     report["wall_s"], time.perf_counter() - started)
    finally:
        if jobs > 1:
            pool.shutdown()
    return results


def compare(base: SimConfig, workers: list[int], caches: list[int], policies: list[str], jobs: int) -> dict:
    """Every policy at every cluster size and cache size."""
    configs = [
        dataclasses.replace(base, workers=n, policy=p, cache_tokens=c)
        for n, c, p in itertools.product(workers, caches, policies)
    ]
    runs = run_all(configs, jobs)
    for run_, config in zip(runs, configs, strict=True):
        run_["cache_tokens"] = config.cache_tokens
    return {"kind": "compare", "base": _describe(base), "workers": workers, "cache_sizes": caches,
            "policies": policies, "runs": runs}


def seeds(base: SimConfig, caches: list[int], policies: list[str], seeds_: list[int], jobs: int) -> dict:
    """The policies (the first against the last, paired by workload seed) at every cache size and seed, at the
    base config's cluster size; ``summary`` says whether the first met the last (``paired``)."""
    configs = [dataclasses.replace(base, policy=p, cache_tokens=c, seed=s)
               for s, c, p in itertools.product(seeds_, caches, policies)]
    runs = run_all(configs, jobs)
    for run_, config in zip(runs, configs, strict=True):
        run_["cache_tokens"], run_["seed"] = config.cache_tokens, config.seed
    result = {"kind": "seeds", "base": _describe(base), "cache_sizes": caches, "policies": policies,
              "seeds": seeds_, "runs": runs}
    result["summary"] = paired(result, policies[0], policies[-1])
    return result


def paired(result: dict, policy: str, baseline: str) -> dict:
    """Per cache size: ``policy`` against ``baseline`` over the workload seeds both ran. Met: at least the
    baseline's mean reusable tokens served, and a most idle worker no idler on average than the baseline's."""
    by = {(r["policy"], r["cache_tokens"], r["seed"]): r for r in result["runs"]}
    summary = {}
    for tokens in result["cache_sizes"]:
        seeds_ = sorted(s for p, c, s in by if p == policy and c == tokens and (baseline, c, s) in by)
        mine, theirs = ([by[(p, tokens, s)] for s in seeds_] for p in (policy, baseline))
        served = np.array([[r["reusable_served"] for r in runs] for runs in (mine, theirs)])
        idle = np.array([[r["idle_fraction"]["max"] for r in runs] for runs in (mine, theirs)])
        diff = served[0] - served[1]
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
        summary[str(tokens)] = {
            "seeds": seeds_, policy: {"served": served[0].tolist(), "idle_max": idle[0].tolist()},
            baseline: {"served": served[1].tolist(), "idle_max": idle[1].tolist()},
            "served_mean": [float(served[0].mean()), float(served[1].mean())],
            "idle_max_mean": [float(idle[0].mean()), float(idle[1].mean())],
            "served_diff_mean": float(diff.mean()), "served_diff_se": se, "seeds_at_least": int((diff >= 0).sum()),
            "met": bool(diff.mean() >= 0 and idle[0].mean() <= idle[1].mean()),
        }
    return summary


def seeds_table(result: dict) -> str:
    """Markdown: per cache size and seed, both policies' reusable tokens served and most idle worker; then the
    means, the paired difference (with its standard error) and whether the first policy met the second."""
    policy, baseline = result["policies"][0], result["policies"][-1]
    lines = [f"| cache per worker | seed | {policy} served | {baseline} served | {policy} most idle | "
             f"{baseline} most idle |", "|---|---|---|---|---|---|"]
    for tokens in result["cache_sizes"]:
        s = result["summary"][str(tokens)]
        for i, seed in enumerate(s["seeds"]):
            lines.append(f"| {tokens / 1e3:.0f}K | {seed} | {s[policy]['served'][i]:.4f} | "
                         f"{s[baseline]['served'][i]:.4f} | {s[policy]['idle_max'][i]:.3f} | "
                         f"{s[baseline]['idle_max'][i]:.3f} |")
        lines.append(f"| {tokens / 1e3:.0f}K | **mean** | **{s['served_mean'][0]:.4f}** | **{s['served_mean'][1]:.4f}**"
                     f" | **{s['idle_max_mean'][0]:.3f}** | **{s['idle_max_mean'][1]:.3f}** |")
        lines.append(f"| {tokens / 1e3:.0f}K | difference | {s['served_diff_mean']:+.4f} +- {s['served_diff_se']:.4f}"
                     f" ({s['seeds_at_least']}/{len(s['seeds'])} seeds at least) | | "
                     f"{s['idle_max_mean'][0] - s['idle_max_mean'][1]:+.3f} | {'met' if s['met'] else 'not met'} |")
    return "\n".join(lines)


def sweep(base: SimConfig, caches: list[int], queue: list[float], request: list[float], session: list[float],
          jobs: int, seeds: list[int], memory: list[float] | None = None) -> dict:
    """cache_aware at every weight combination (cache weight 1: only ratios of weights matter), and the oracle, per
    cache size and workload seed; then the choice (``choose_weights``). ``memory``: its values (default: the
    base config's)."""
    memory = memory if memory is not None else [base.weight_memory]
    configs = []
    for seed, tokens in itertools.product(seeds, caches):
        configs.append(dataclasses.replace(base, policy=ORACLE, cache_tokens=tokens, seed=seed))
        for q, r, s, m in itertools.product(queue, request, session, memory):
            configs.append(dataclasses.replace(base, policy="cache_aware", cache_tokens=tokens, seed=seed,
                                               weight_cache=1.0, weight_queue=q, weight_request=r, weight_session=s,
                                               weight_memory=m))
    runs = run_all(configs, jobs)
    for run_, config in zip(runs, configs, strict=True):
        run_["cache_tokens"], run_["seed"] = config.cache_tokens, config.seed
    result = {"kind": "sweep", "base": _describe(base), "cache_sizes": caches, "seeds": seeds, "queue": queue,
              "request": request, "session": session, "memory": memory, "runs": runs}
    result["choice"] = choose_weights(result)
    return result


def _mean_by(runs: list[dict], key) -> dict:
    """Per key: the runs' mean reusable served, most idle worker and TTFT p99 (over the workload seeds)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return {k: {"reusable_served": float(np.mean([r["reusable_served"] for r in g])),
                "idle_max": float(np.mean([r["idle_fraction"]["max"] for r in g])),
                "ttft_p99": float(np.mean([r["ttft_s"]["p99"] for r in g]))} for k, g in groups.items()}


def choose_weights(sweep_result: dict) -> dict:
    """The weights to make default: those that, at every cache size, serve at least the oracle's reusable tokens
    with no worker idler than the oracle's most idle one (means over the seeds, within ``slack``); among them the
    lowest worst-case TTFT p99. Without such weights, the ones whose worst shortfall against the oracle is least.
    Load-blind weights (queue = request = 0) are never chosen: a request without a session id would find every
    worker at the same cost and go to the lowest id, every time (``--session-ids false`` runs show it)."""
    slack = 0.002
    runs = sweep_result["runs"]
    oracle = _mean_by([r for r in runs if r["policy"] == ORACLE], lambda r: r["cache_tokens"])
    means = _mean_by([r for r in runs if r["policy"] != ORACLE],
                     lambda r: (tuple(r["weights"].get(k, 0.0) for k in _WEIGHTS), r["cache_tokens"]))
    by_weights: dict[tuple, dict] = {}
    for (weights, tokens), m in means.items():
        if weights[1] or weights[2]:  # queue or request: load-aware
            by_weights.setdefault(weights, {})[tokens] = m

    def shortfall(per_cache: dict) -> float:
        return max(max(oracle[t]["reusable_served"] - m["reusable_served"], m["idle_max"] - oracle[t]["idle_max"])
                   for t, m in per_cache.items())

    def worst_ttft(per_cache: dict) -> float:
        return max(m["ttft_p99"] for m in per_cache.values())

    feasible = [k for k, v in by_weights.items() if shortfall(v) <= slack]
    if feasible:
        best = min(feasible, key=lambda k: (worst_ttft(by_weights[k]), k))
        why = f"meets the oracle at every cache size (within {slack}); lowest worst-case TTFT p99 of those"
    else:
        best = min(by_weights, key=lambda k: (shortfall(by_weights[k]), worst_ttft(by_weights[k]), k))
        why = "no weights meet the oracle at every cache size; the least shortfall"
    return {"weights": dict(zip(_WEIGHTS, best, strict=True)), "why": why, "shortfall": shortfall(by_weights[best]),
            "worst_ttft_p99_s": worst_ttft(by_weights[best]), "feasible": len(feasible),
            "candidates": len(by_weights), "oracle": {str(t): m for t, m in oracle.items()},
            "chosen": {str(t): m for t, m in by_weights[best].items()}}


def table(result: dict, workers: int) -> str:
    """Markdown: per cache size and policy, reusable tokens served and the most idle worker (plus TTFT p99 and
    load imbalance), at ``workers`` workers."""
    rows = [r for r in result["runs"] if r["workers"] == workers]
    lines = ["| cache per worker (/ working set) | policy | reusable served | most idle worker | TTFT p50 / p99 (s) | "
             "load imbalance |", "|---|---|---|---|---|---|"]
    for tokens in result["cache_sizes"]:
        for r in sorted((r for r in rows if r["cache_tokens"] == tokens), key=lambda r: POLICIES.index(r["policy"])):
            ratio = r["cache_tokens_per_worker"] / r["working_set_tokens_per_worker"]
            lines.append(f"| {tokens / 1e3:.0f}K ({ratio:.2f}) | {r['policy']} | "
                         f"{r['reusable_served']:.3f} | {r['idle_fraction']['max']:.3f} | "
                         f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} | {r['load_imbalance']:.2f} |")
    return "\n".join(lines)


def _weights_label(weights: dict) -> str:
    return "/".join(f"{weights.get(k, 0.0):g}" for k in _WEIGHTS)


def _describe(config: SimConfig) -> dict:
    d = dataclasses.asdict(config)
    d["num_users"] = config.num_users
    return d

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

from .config import SimConfig
from .router import ORACLE, POLICIES
from .simulation import run

log = logging.getLogger("loadtest.simulator")


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


def sweep(base: SimConfig, caches: list[int], queue: list[float], request: list[float], session: list[float],
          jobs: int) -> dict:
    """cache_aware at every weight combination (cache weight 1: only ratios of weights matter), and the oracle, per
    cache size; then the choice (``choose_weights``)."""
    configs = []
    for tokens in caches:
        configs.append(dataclasses.replace(base, policy=ORACLE, cache_tokens=tokens))
        for q, r, s in itertools.product(queue, request, session):
            configs.append(dataclasses.replace(base, policy="cache_aware", cache_tokens=tokens, weight_cache=1.0,
                                               weight_queue=q, weight_request=r, weight_session=s))
    runs = run_all(configs, jobs)
    for run_, config in zip(runs, configs, strict=True):
        run_["cache_tokens"] = config.cache_tokens
    result = {"kind": "sweep", "base": _describe(base), "cache_sizes": caches, "queue": queue, "request": request,
              "session": session, "runs": runs}
    result["choice"] = choose_weights(result)
    return result


def choose_weights(sweep_result: dict) -> dict:
    """The weights to make default: those that, at every cache size, serve at least the oracle's reusable tokens
    with no worker idler than the oracle's most idle one (within ``slack``); among them the lowest worst-case TTFT
    p99 over the cache sizes. Without such weights, the ones whose worst shortfall against the oracle is least."""
    slack = 0.002
    oracle = {r["cache_tokens"]: r for r in sweep_result["runs"] if r["policy"] == ORACLE}
    by_weights: dict[tuple, list[dict]] = {}
    for r in sweep_result["runs"]:
        if r["policy"] != ORACLE:
            w = r["weights"]
            by_weights.setdefault((w["cache"], w["queue"], w["request"], w["session"]), []).append(r)

    def shortfall(runs: list[dict]) -> float:
        worst = 0.0
        for r in runs:
            o = oracle[r["cache_tokens"]]
            worst = max(worst, o["reusable_served"] - r["reusable_served"],
                        r["idle_fraction"]["max"] - o["idle_fraction"]["max"])
        return worst

    def worst_ttft(runs: list[dict]) -> float:
        return max(r["ttft_s"]["p99"] for r in runs)

    feasible = {k: v for k, v in by_weights.items() if shortfall(v) <= slack}
    if feasible:
        best = min(feasible, key=lambda k: (worst_ttft(feasible[k]), k))
        why = f"meets the oracle at every cache size (within {slack}); lowest worst-case TTFT p99 of those"
    else:
        best = min(by_weights, key=lambda k: (shortfall(by_weights[k]), worst_ttft(by_weights[k]), k))
        why = "no weights meet the oracle at every cache size; the least shortfall"
    return {"weights": dict(zip(("cache", "queue", "request", "session"), best, strict=True)),
            "why": why, "shortfall": shortfall(by_weights[best]), "worst_ttft_p99_s": worst_ttft(by_weights[best]),
            "feasible": len(feasible), "candidates": len(by_weights)}


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
    return "/".join(f"{weights[k]:g}" for k in ("cache", "queue", "request", "session"))


def _describe(config: SimConfig) -> dict:
    d = dataclasses.asdict(config)
    d["num_users"] = config.num_users
    return d

"""What one simulation measured, over its window (turns sent from ``warmup_s`` to ``duration_s``). Tokens are real
tokens (simulated ones times the token scale), times are simulated seconds.

- ``reusable_served``: cache hits / reusable tokens. A prompt's reusable tokens are those an earlier finished request
  computed (the conversation's history; for a first turn, a shared system prompt), capped so the last prompt token
  is computed; its hit is what the chosen worker's cache served at admission. Hits are page-granular and end at a GDN
  checkpoint, so even a perfect placement stays a little below 1. ``chosen_hit`` and ``available_hit`` are the router's
  view (the hit on the worker it chose; the best on any worker) at the moment it placed the turn.
- ``ttft_s``: from sending a turn (its first attempt, if refused) to its first token: waiting for a running slot or
  memory, the prefill queue, the prefill itself.
- ``idle_fraction``: per worker, the part of the window with no request on it (waiting, prefilling or decoding);
  ``max`` is the most idle worker.
- ``load_imbalance``: the busiest worker's GPU work (prefill seconds + seconds with a decode batch) over the mean.
- ``losses``: where the follow-ups' reusable tokens that were not served went, as fractions of all reusable tokens
  (they add up to 1 - ``reusable_served`` but for first turns' shared prompts): ``gone_before_placement``: not
  usable on the worker that served the previous turn when the router placed this one (evicted between turns, and
  the sub-page remainder a checkpoint cannot cover); ``left_behind``: usable there, but the router placed the turn
  elsewhere with less; ``evicted_before_admission``: usable on the chosen worker when placed, evicted before the
  worker admitted it. With the counts of follow-ups, of those moved to another worker, of those moved away from a
  usable hit, and of follow-ups whose conversation the router's session table had already taken as over.
  ``working_set_overflow``: the part of the live histories (each counted on the worker of its last turn) beyond the
  cache of its worker, over the window: how unevenly placement spread the histories, whatever the eviction order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .simulation import Simulation
    from .worker import SimRequest


class Record(NamedTuple):
    """One finished request (real tokens)."""

    sent_at: float
    first_token_at: float
    finished_at: float
    worker: int
    user: int
    turn: int
    prompt_tokens: int
    answer_tokens: int
    reusable: int
    cached: int
    chosen_hit: int
    available_hit: int
    previous_worker: int  # -1: a first turn
    previous_hit: int

    @classmethod
    def of(cls, sim: SimRequest, scale: int) -> Record:
        return cls(sim.sent_at, sim.first_token_at, sim.finished_at, sim.worker, sim.conversation.user, sim.turn,
                   sim.prompt_len * scale,
                   len(sim.answer) * scale, sim.reusable * scale, sim.cached * scale, sim.chosen_hit,
                   sim.available_hit, sim.previous_worker, sim.previous_hit)


@dataclass(frozen=True)
class Report:
    policy: str
    weights: dict[str, float]
    workers: int
    cache_tokens_per_worker: int
    working_set_tokens_per_worker: float  # live conversations' histories on a worker, averaged over the window
    requests: int  # finished, sent in the window
    requests_all: int  # finished, all
    refusals: int
    conversations_started: int
    conversations_finished: int
    prompt_tokens: int
    reusable_tokens: int
    served_tokens: int
    reusable_served: float
    chosen_hit: float  # of reusable
    available_hit: float  # of reusable
    prompt_served: float  # hits / all prompt tokens
    ttft_s: dict[str, float]
    decode_tok_s_per_request: dict[str, float]
    idle_fraction: dict[str, float]
    load_imbalance: float
    losses: dict[str, float]
    working_set_overflow: float
    requests_per_worker: dict[str, float]
    evicted_tokens: int  # KV evicted from the caches
    evicted_checkpoints: int
    decisions: dict[str, int]
    index: dict[str, Any]
    sim_seconds: float  # simulated time until the last request finished
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _percentiles(values: np.ndarray, points: dict[str, float]) -> dict[str, float]:
    if values.size == 0:
        return {name: float("nan") for name in points}
    return {name: float(np.percentile(values, q)) for name, q in points.items()}


def summarize(sim: Simulation, wall_s: float) -> Report:
    config = sim.config
    scale = config.trace.token_scale
    w0, w1 = config.warmup_s, config.duration_s
    records = [r for r in sim.finished if w0 <= r.sent_at <= w1]
    cols = np.array(records, dtype=float).reshape(-1, len(Record._fields))
    (sent, first, done, worker, _, _, prompt, answer, reusable, cached, chosen, available, previous,
     previous_hit) = cols.T
    reusable_sum = reusable.sum()

    def of_reusable(x: np.ndarray) -> float:
        return float(x.sum() / reusable_sum) if reusable_sum else float("nan")

    decode_s = done - first
    steps = answer - 1
    rates = steps[decode_s > 0] / decode_s[decode_s > 0]
    span = w1 - w0
    idle = np.array([1 - w.busy_s / span for w in sim.workers])
    work = np.array([w.prefilling_s + w.decoding_s for w in sim.workers])
    per_worker = np.bincount(worker.astype(int), minlength=len(sim.workers)) if records else np.zeros(1)
    router = sim.router
    consistent = all(router.index.digest(w.name) == w.cache.tree.digest for w in sim.workers)
    return Report(
        policy=config.policy,
        weights=dataclasses.asdict(config.weights),
        workers=config.workers,
        cache_tokens_per_worker=config.worker_config.num_pages * config.page_size * config.trace.token_scale,
        working_set_tokens_per_worker=sim.live_token_seconds / span / len(sim.workers) * scale,
        requests=len(records),
        requests_all=len(sim.finished),
        refusals=sim.refusals,
        conversations_started=sim.conversations_started,
        conversations_finished=sim.conversations_finished,
        prompt_tokens=int(prompt.sum()),
        reusable_tokens=int(reusable_sum),
        served_tokens=int(cached.sum()),
        reusable_served=of_reusable(cached),
        chosen_hit=of_reusable(chosen),
        available_hit=of_reusable(available),
        prompt_served=float(cached.sum() / prompt.sum()) if prompt.sum() else float("nan"),
        ttft_s=_percentiles(first - sent, {"p50": 50, "p90": 90, "p99": 99}),
        decode_tok_s_per_request=_percentiles(rates, {"p10": 10, "p50": 50}),
        idle_fraction={"max": float(idle.max()), "mean": float(idle.mean()), "min": float(idle.min())},
        load_imbalance=float(work.max() / work.mean()) if work.mean() > 0 else float("nan"),
        losses=_losses(reusable, cached, chosen, worker, previous, previous_hit, router.sessions_forgotten),
        working_set_overflow=(sim.overflow_token_seconds / sim.live_token_seconds
                              if sim.live_token_seconds else float("nan")),
        requests_per_worker={"max": float(per_worker.max()), "mean": float(per_worker.mean()),
                             "min": float(per_worker.min())},
        evicted_tokens=sum(w.cache.tree.num_evicted_pages for w in sim.workers) * config.page_size * scale,
        evicted_checkpoints=sum(w.cache.tree.num_evicted_states for w in sim.workers),
        decisions=dict(sorted(router.decisions.items())),
        index={"events_applied": router.index.events_applied, "resyncs": router.resyncs,
               "matches_caches": consistent},
        sim_seconds=max((r.finished_at for r in sim.finished), default=0.0),
        wall_s=wall_s,
    )


def _losses(reusable: np.ndarray, cached: np.ndarray, chosen: np.ndarray, worker: np.ndarray, previous: np.ndarray,
            previous_hit: np.ndarray, forgotten: int) -> dict[str, float]:
    """``Report.losses``: each follow-up's unserved reusable tokens split exactly into the three causes."""
    total = reusable.sum()
    follow = previous >= 0
    moved = follow & (worker != previous)

    def share(x: np.ndarray) -> float:
        return float(x[follow].sum() / total) if total else float("nan")

    return {
        "follow_ups": int(follow.sum()),
        "moved": int(moved.sum()),
        "moved_off_hit": int((moved & (previous_hit > chosen)).sum()),
        "sessions_forgotten": forgotten,
        "gone_before_placement": share(reusable - previous_hit),
        "left_behind": share(np.where(moved, previous_hit - chosen, 0.0)),
        "evicted_before_admission": share(chosen - cached),
    }

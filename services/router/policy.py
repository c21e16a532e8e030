"""Choosing the decode pod and the prefill pod for one request. Logic only: the caller supplies the live,
eligible workers with their load and each one's usable cache hit for the prompt.

Policies:
- ``cache_aware`` (default): the lowest cost, where cost = ``cache`` x prompt tokens the worker would have to
  compute or receive (the prompt minus its usable hit) + ``queue`` x prompt tokens already queued there +
  ``request`` x requests running or waiting there + ``session`` x other live conversations placed there
  (services/router/sessions.py: between turns a conversation shows no load, yet it will come back), less half a
  ``session`` on the worker the request's own conversation is on (so a conversation that no worker can resume
  moves only where that evens out the conversations). Ties go to the lower worker id, so two routers with the
  same view choose the same worker.
- ``round_robin``: the next eligible worker in id order.
- ``least_load``: the fewest requests, then the fewest queued tokens.
- ``session``: sticky by conversation: rendezvous hashing of the session id over the eligible workers'
  addresses (a worker leaving moves only its own sessions; a restarted pod at the same address keeps them).
  Without a session id, ``least_load``.
"""

from __future__ import annotations

import enum
import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.page_hash import mix


class Policy(enum.StrEnum):
    CACHE_AWARE = "cache_aware"
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    SESSION = "session"


@dataclass(frozen=True)
class Weights:
    # Defaults chosen with the router simulator (loadtest/simulator, DESIGN.md "Router placement"): the sweep's
    # load-aware weights closest to a balanced sticky assignment of conversations at every cache size.
    cache: float = 1.0  # per prompt token the worker would compute (or receive) rather than reuse
    queue: float = 0.0  # per prompt token already queued on the worker
    request: float = 512.0  # per request running or waiting on the worker
    session: float = 8192.0  # per other live conversation placed on the worker

    def __post_init__(self) -> None:
        if min(self.cache, self.queue, self.request, self.session) < 0:
            raise ValueError(f"placement weights must be >= 0, got {self}")


@dataclass(frozen=True)
class Candidate:
    """An eligible worker as placement sees it."""

    name: str  # instance id
    address: str
    active: int  # requests running or waiting there (its report, or routers' in-flight count if higher)
    queued_tokens: int  # prompt tokens queued there
    hit_tokens: int  # usable prefix-cache hit for this prompt
    sessions: int = 0  # live conversations placed there, other than this request's
    holds_session: bool = False  # this request's conversation was last placed there


@dataclass(frozen=True)
class Choice:
    worker: Candidate
    reason: str  # why, as a metrics label: cache_hit, load, no_hit, round_robin, least_load, session, ...
    cost: float = 0.0


_NAME, _HIT = operator.attrgetter("name"), operator.attrgetter("hit_tokens")


def _session_key(session_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "little")


def _address_key(address: str) -> int:
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little")


class Placer:
    """One router's placement state (the round-robin position) and settings."""

    def __init__(self, policy: Policy, weights: Weights) -> None:
        self.policy = policy
        self.weights = weights
        self._next = 0
        self._address_keys: dict[str, int] = {}

    def cost(self, worker: Candidate, prompt_tokens: int) -> float:
        return self.costs([worker], prompt_tokens)[0]

    def costs(self, candidates: Sequence[Candidate], prompt_tokens: int) -> list[float]:
        """Each candidate's cost, in one comprehension rather than a method call per candidate: at 1,000 workers
        this loop is most of a decision's time (15-30% less that way)."""
        w = self.weights
        wc, wq, wr, ws = w.cache, w.queue, w.request, w.session
        return [wc * (prompt_tokens - c.hit_tokens) + wq * c.queued_tokens + wr * c.active
                + ws * (c.sessions - 0.5 * c.holds_session) for c in candidates]

    def choose(self, candidates: Sequence[Candidate], prompt_tokens: int, session_id: str = "",
               policy: Policy | None = None) -> Choice | None:
        """None when there is no candidate. ``policy`` overrides the placer's own for this call."""
        if not candidates:
            return None
        policy = policy or self.policy
        ordered = sorted(candidates, key=_NAME)
        if policy is Policy.ROUND_ROBIN:
            choice = ordered[self._next % len(ordered)]
            self._next += 1
            return Choice(choice, "round_robin")
        if policy is Policy.SESSION and session_id:
            return Choice(self._rendezvous(ordered, session_id), "session")
        if policy is not Policy.CACHE_AWARE:
            least = min(ordered, key=lambda c: (c.active, c.queued_tokens))
            return Choice(least, "least_load" if policy is Policy.LEAST_LOAD else "session_fallback")
        costs = self.costs(ordered, prompt_tokens)
        i = min(range(len(costs)), key=costs.__getitem__)  # the first of equal costs: the lowest name
        best, cost = ordered[i], costs[i]
        top_hit = max(map(_HIT, ordered))
        if top_hit == 0:
            reason = "no_hit"
        elif best.hit_tokens == top_hit:
            reason = "cache_hit"
        else:
            reason = "load"  # a better hit exists, on a worker too busy to be worth it
        return Choice(best, reason, cost)

    def least_load(self, candidates: Sequence[Candidate], reason: str) -> Choice | None:
        if not candidates:
            return None
        return Choice(min(candidates, key=lambda c: (c.active, c.queued_tokens, c.name)), reason)

    def _rendezvous(self, ordered: Sequence[Candidate], session_id: str) -> Candidate:
        key = _session_key(session_id)
        keys = self._address_keys

        def score(c: Candidate) -> int:
            address_key = keys.get(c.address)
            if address_key is None:
                address_key = keys[c.address] = _address_key(c.address)
            return mix(key ^ address_key)

        return max(ordered, key=score)

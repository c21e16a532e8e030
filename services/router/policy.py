"""Choosing the decode pod and the prefill pod for one request. Logic only: the caller supplies the eligible
workers with their load and each one's usable cache hit for the prompt.

Policies:
- ``cache_aware`` (default): the lowest cost, where cost = ``cache`` x prompt tokens the worker would have to
  compute or receive (the prompt minus its usable hit) + ``queue`` x prompt tokens already queued there +
  ``request`` x requests running or waiting there + ``session`` x other live conversations placed there
  (services/router/sessions.py: between turns a conversation shows no load, yet it will come back), less half a
  ``session`` on the worker the request's own conversation is on (a conversation that no worker can resume moves
  only where that evens out the conversations) + ``memory`` x the tokens of live conversations' histories that
  placing this prompt there pushes past the worker's KV capacity (the prompt tokens of the conversations placed
  there, this one's included, beyond the capacity, less what was beyond it already): those histories will be
  evicted before their next turn and computed again. The term is zero wherever everything fits, so it only acts
  under memory pressure, where conversation counts alone put four long conversations where three short ones fit.
- ``round_robin``: the next eligible worker in id order.
- ``least_load``: the fewest requests, then the fewest queued tokens.
- ``session``: sticky by conversation: rendezvous hashing of the session id over the eligible workers'
  addresses (a worker leaving moves only its own sessions; a restarted pod at the same address keeps them).
  Without a session id, ``least_load``.

Ties go to the lower worker id, so two routers with the same view choose the same worker. Workers are scored
as arrays (one numpy operation per term, whatever the cluster size): a router places against a thousand
workers in microseconds. ``Placer.choose`` takes a list of ``Candidate`` for callers with a handful.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.page_hash import mix_array


class Policy(enum.StrEnum):
    CACHE_AWARE = "cache_aware"
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    SESSION = "session"


@dataclass(frozen=True)
class Weights:
    # Defaults chosen with the router simulator (loadtest/simulator; DESIGN.md "Router placement"): the sweep's
    # load-aware weights closest to a balanced sticky assignment of conversations at every cache size.
    cache: float = 1.0  # per prompt token the worker would compute (or receive) rather than reuse
    queue: float = 0.0  # per prompt token already queued on the worker
    request: float = 512.0  # per request running or waiting on the worker
    session: float = 8192.0  # per other live conversation placed on the worker
    # per token of live conversations' histories that the placement pushes past the worker's cache (they will be
    # evicted and computed again): the conversation's own prompt on top of the others placed there. 1: such a
    # token costs what a token computed now costs.
    memory: float = 1.0

    def __post_init__(self) -> None:
        if min(self.cache, self.queue, self.request, self.session, self.memory) < 0:
            raise ValueError(f"placement weights must be >= 0, got {self}")


@dataclass(frozen=True)
class Candidate:
    """An eligible worker, as a list-based caller describes it."""

    name: str  # instance id
    address: str
    active: int  # requests running or waiting there
    queued_tokens: int  # prompt tokens queued there
    hit_tokens: int  # usable prefix-cache hit for this prompt
    sessions: int = 0  # live conversations placed there, other than this request's
    holds_session: bool = False  # this request's conversation was last placed there
    session_tokens: int = 0  # the prompt tokens of those other live conversations
    cache_tokens: int = 0  # the worker's KV capacity in tokens (0: unknown, no memory term)


@dataclass(frozen=True)
class Workers:
    """Workers as placement scores them: parallel arrays in increasing id order (the tie-break order)."""

    names: list[str]
    address_keys: np.ndarray  # uint64, for rendezvous hashing
    active: np.ndarray
    queued_tokens: np.ndarray
    hit_tokens: np.ndarray
    eligible: np.ndarray  # bool
    # live conversations there other than this request's, less 1/2 where this request's is (SessionTable.counts)
    sessions: np.ndarray | None = None
    session_tokens: np.ndarray | None = None  # their prompt tokens (SessionTable.tokens)
    cache_tokens: np.ndarray | None = None  # KV capacity in tokens (0: unknown)

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> Workers:
        ordered = sorted(candidates, key=lambda c: c.name)
        return cls(
            [c.name for c in ordered], np.array([address_key(c.address) for c in ordered], dtype=np.uint64),
            np.array([c.active for c in ordered], dtype=np.float64),
            np.array([c.queued_tokens for c in ordered], dtype=np.float64),
            np.array([c.hit_tokens for c in ordered], dtype=np.float64), np.ones(len(ordered), dtype=bool),
            np.array([c.sessions - 0.5 * c.holds_session for c in ordered], dtype=np.float64),
            np.array([c.session_tokens for c in ordered], dtype=np.float64),
            np.array([c.cache_tokens for c in ordered], dtype=np.float64),
        )


@dataclass(frozen=True)
class Choice:
    index: int  # into Workers.names
    name: str
    reason: str  # why, as a metrics label: cache_hit, load, no_hit, round_robin, least_load, session, ...
    hit_tokens: int
    cost: float = 0.0


def address_key(address: str) -> int:
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little")


def _session_key(session_id: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "little"))


class Placer:
    """One router's placement state (the round-robin position) and settings."""

    def __init__(self, policy: Policy, weights: Weights) -> None:
        self.policy = policy
        self.weights = weights
        self._next = 0

    def choose(self, candidates: Sequence[Candidate], prompt_tokens: int, session_id: str = "",
               policy: Policy | None = None) -> Choice | None:
        return self.choose_among(Workers.of(candidates), prompt_tokens, session_id, policy)

    def costs(self, workers: Workers, prompt_tokens: int) -> np.ndarray:
        w = self.weights
        costs = (w.cache * (prompt_tokens - workers.hit_tokens) + w.queue * workers.queued_tokens
                 + w.request * workers.active)
        if workers.sessions is not None and w.session:
            costs += w.session * workers.sessions
        if workers.session_tokens is not None and workers.cache_tokens is not None and w.memory:
            held, size = workers.session_tokens, workers.cache_tokens
            overflow = np.maximum(held + prompt_tokens - size, 0) - np.maximum(held - size, 0)
            costs += w.memory * np.where(size > 0, overflow, 0.0)
        return costs

    def choose_among(self, workers: Workers, prompt_tokens: int, session_id: str = "",
                     policy: Policy | None = None) -> Choice | None:
        """The chosen worker among ``workers.eligible``; None when none is. ``policy`` overrides the placer's
        own for this call."""
        eligible = np.flatnonzero(workers.eligible)
        if eligible.size == 0:
            return None
        policy = policy or self.policy
        if policy is Policy.ROUND_ROBIN:
            index = int(eligible[self._next % eligible.size])
            self._next += 1
            return self._choice(workers, index, "round_robin")
        if policy is Policy.SESSION and session_id:
            scores = mix_array(workers.address_keys[eligible] ^ _session_key(session_id))
            return self._choice(workers, int(eligible[int(np.argmax(scores))]), "session")
        if policy is not Policy.CACHE_AWARE:
            reason = "least_load" if policy is Policy.LEAST_LOAD else "session_fallback"
            return self.least_load(workers, reason)
        costs = self.costs(workers, prompt_tokens)[eligible]
        index = int(eligible[int(np.argmin(costs))])  # argmin returns the first: the lowest id among ties
        top_hit = workers.hit_tokens[eligible].max()
        hit = workers.hit_tokens[index]
        reason = "no_hit" if top_hit == 0 else "cache_hit" if hit == top_hit else "load"
        return self._choice(workers, index, reason, float(costs.min()))

    def least_load(self, workers: Workers, reason: str) -> Choice | None:
        eligible = np.flatnonzero(workers.eligible)
        if eligible.size == 0:
            return None
        order = np.lexsort((workers.queued_tokens[eligible], workers.active[eligible]))  # stable: id breaks ties
        return self._choice(workers, int(eligible[order[0]]), reason)

    @staticmethod
    def _choice(workers: Workers, index: int, reason: str, cost: float = 0.0) -> Choice:
        return Choice(index, workers.names[index], reason, int(workers.hit_tokens[index]), cost)

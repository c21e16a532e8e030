"""Which worker each live conversation was last placed on, and how many live conversations each worker holds.
Logic only.

Why placement needs it: an agentic conversation spends most of its life between turns (a tool runs, the user
reads), and then its worker shows no load at all, though its cache holds the conversation and its next turn will
come back there. Load alone therefore sends new conversations to the workers whose conversations happen to be
thinking, piling conversations (and cache) onto them. Counting the conversations that stick to each worker lets
``cache_aware`` spread new conversations the way a balanced sticky assignment would.

A conversation is live from a request with its session id until ``ttl_s`` passes after its last request ended
without a new one; a request moves it to the worker it was placed on. While one of its requests is in flight it
cannot expire, however long the request waits or runs: under memory pressure a turn can queue for longer than the
silence that ends a conversation, and forgetting it then would put new conversations on a worker whose
conversations are all still there. Requests without a session id are not counted. Each conversation also keeps
its last prompt's length, the history its worker's cache must hold for its next turn (``tokens``: the policy's
memory term weighs them against the worker's KV capacity).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Session:
    worker: str
    tokens: int  # its last request's prompt: what its worker's cache must keep for its next turn
    in_flight: int  # requests placed and not ended
    seen: float  # when its last request ended (or was placed): its silence counts from here


class SessionTable:
    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"session ttl must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._sessions: dict[str, _Session] = {}
        self._silent: OrderedDict[str, None] = OrderedDict()  # sessions with nothing in flight, oldest silence first
        self._counts: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()

    def expire(self, now: float) -> list[str]:
        """Forget conversations silent for ``ttl_s`` (none with a request in flight); returns the workers whose
        counts fell."""
        silent, horizon = self._silent, now - self.ttl_s
        changed = []
        while silent:
            session_id = next(iter(silent))
            session = self._sessions[session_id]
            if session.seen > horizon:
                break
            del silent[session_id], self._sessions[session_id]
            self._uncount(session)
            changed.append(session.worker)
        return changed

    def worker_of(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return session.worker if session is not None else None

    def in_flight(self, session_id: str) -> int:
        session = self._sessions.get(session_id)
        return session.in_flight if session is not None else 0

    def live(self, worker: str, excluding: str = "") -> int:
        """Live conversations on ``worker``, not counting ``excluding`` (the one being placed)."""
        count = self._counts.get(worker, 0)
        if excluding and self.worker_of(excluding) == worker:
            count -= 1
        return count

    def counts(self, positions: dict[str, int], size: int, session_id: str = "") -> np.ndarray:
        """Per worker at ``positions`` (name -> index, ``size`` workers): live conversations other than
        ``session_id``'s, less one half where ``session_id``'s is (``Workers.sessions``)."""
        counts = np.zeros(size)
        for worker, count in self._counts.items():
            i = positions.get(worker)
            if i is not None:
                counts[i] = count
        own = self.worker_of(session_id) if session_id else None
        if own is not None and own in positions:
            counts[positions[own]] -= 1.5
        return counts

    def tokens(self, positions: dict[str, int], size: int, session_id: str = "") -> np.ndarray:
        """Per worker at ``positions``: the prompt tokens of the live conversations there other than
        ``session_id``'s (``Workers.session_tokens``)."""
        tokens = np.zeros(size)
        for worker, held in self._tokens.items():
            i = positions.get(worker)
            if i is not None:
                tokens[i] = held
        own = self._sessions.get(session_id) if session_id else None
        if own is not None and own.worker in positions:
            tokens[positions[own.worker]] -= own.tokens
        return tokens

    def placed(self, session_id: str, worker: str, now: float, tokens: int = 0) -> None:
        """A request of the conversation (a prompt of ``tokens``) was placed on ``worker``: in flight until
        ``answered``."""
        if not session_id:
            return
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session(worker, tokens, 0, now)
        else:
            self._uncount(session)
            session.worker, session.tokens = worker, tokens
        self._counts[worker] += 1
        self._tokens[worker] += tokens
        session.in_flight += 1
        session.seen = now
        self._silent.pop(session_id, None)

    def answered(self, session_id: str, now: float) -> None:
        """A request of the conversation ended now (answered, failed or abandoned): once none is in flight, its
        silence (the time it thinks) counts from here."""
        session = self._sessions.get(session_id)
        if session is None or session.in_flight == 0:
            return  # forgotten meanwhile (its worker left), or already ended
        session.in_flight -= 1
        session.seen = now
        if session.in_flight == 0:
            self._silent[session_id] = None  # now is the latest silence: the end of the order

    def ended(self, session_id: str) -> None:
        """The client says the conversation is over (no client does yet; the simulator measures what it would
        be worth)."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._silent.pop(session_id, None)
            self._uncount(session)

    def drop_worker(self, worker: str) -> None:
        """The worker is gone: its conversations will land elsewhere."""
        for session_id in [s for s, session in self._sessions.items() if session.worker == worker]:
            del self._sessions[session_id]
            self._silent.pop(session_id, None)
        self._counts.pop(worker, None)
        self._tokens.pop(worker, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _uncount(self, session: _Session) -> None:
        worker = session.worker
        self._counts[worker] -= 1
        self._tokens[worker] -= session.tokens
        if not self._counts[worker]:
            del self._counts[worker], self._tokens[worker]

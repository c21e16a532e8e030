"""Which worker each live conversation was last placed on, and how many live conversations each worker holds.
Logic only.

Why placement needs it: an agentic conversation spends most of its life between turns (a tool runs, the user
reads), and then its worker shows no load at all, though its cache holds the conversation and its next turn will
come back there. Load alone therefore sends new conversations to the workers whose conversations happen to be
thinking, piling conversations (and cache) onto them. Counting the conversations that stick to each worker lets
``cache_aware`` spread new conversations the way a balanced sticky assignment would.

A conversation is live from a request with its session id until ``ttl_s`` passes after its last answer without a
new request; a request moves it to the worker it was placed on. Requests without a session id are not counted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np


class SessionTable:
    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"session ttl must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (worker, last seen); oldest first
        self._counts: Counter[str] = Counter()

    def expire(self, now: float) -> list[str]:
        """Forget conversations silent for ``ttl_s``; returns the workers whose counts fell."""
        sessions, horizon = self._sessions, now - self.ttl_s
        changed = []
        while sessions:
            session_id, (worker, seen) = next(iter(sessions.items()))
            if seen > horizon:
                break
            del sessions[session_id]
            self._uncount(worker)
            changed.append(worker)
        return changed

    def worker_of(self, session_id: str) -> str | None:
        held = self._sessions.get(session_id)
        return held[0] if held is not None else None

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

    def placed(self, session_id: str, worker: str, now: float) -> None:
        if not session_id:
            return
        previous = self._sessions.pop(session_id, None)
        if previous is not None:
            self._uncount(previous[0])
        self._sessions[session_id] = (worker, now)
        self._counts[worker] += 1

    def answered(self, session_id: str, now: float) -> None:
        """The conversation's request finished now: its silence (the time it thinks) counts from here."""
        held = self._sessions.pop(session_id, None)
        if held is not None:
            self._sessions[session_id] = (held[0], now)

    def ended(self, session_id: str) -> None:
        """The client says the conversation is over (no client does yet; the simulator measures what it would
        be worth)."""
        held = self._sessions.pop(session_id, None)
        if held is not None:
            self._uncount(held[0])

    def drop_worker(self, worker: str) -> None:
        """The worker is gone: its conversations will land elsewhere."""
        for session_id in [s for s, (w, _) in self._sessions.items() if w == worker]:
            del self._sessions[session_id]
        self._counts.pop(worker, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _uncount(self, worker: str) -> None:
        self._counts[worker] -= 1
        if not self._counts[worker]:
            del self._counts[worker]

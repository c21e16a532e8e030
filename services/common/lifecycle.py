"""A serving process's lifecycle (pods and the router): one state machine with checked transitions.

    LOADING --> SERVING --> DRAINING --> STOPPED
       |           |            |
       +-----------+------------+-----> FAILED

- LOADING: listening (health checks answer NOT_SERVING), the model or the router's state not ready yet.
- SERVING: takes new requests.
- DRAINING: SIGTERM came; new requests are refused, the ones running finish within the grace period.
- STOPPED: drained (or stopped while loading); the process exits 0.
- FAILED: it can no longer serve (the engine thread died, loading failed); the process exits non-zero.

LOADING -> STOPPED is a signal while loading (nothing to drain). Health, the refusal of new requests and the
exit status are all read from this one object, so they cannot disagree. Event-loop thread only: callers on
other threads (the engine thread's fatal callback) go through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

log = logging.getLogger("baton.lifecycle")


class ServingState(enum.StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


_TRANSITIONS: dict[ServingState, frozenset[ServingState]] = {
    ServingState.LOADING: frozenset({ServingState.SERVING, ServingState.STOPPED, ServingState.FAILED}),
    ServingState.SERVING: frozenset({ServingState.DRAINING, ServingState.FAILED}),
    ServingState.DRAINING: frozenset({ServingState.STOPPED, ServingState.FAILED}),
    ServingState.STOPPED: frozenset(),
    ServingState.FAILED: frozenset(),
}


class IllegalLifecycleTransition(RuntimeError):
    """A transition the lifecycle does not allow: a bug in the caller."""


class Lifecycle:
    def __init__(self, name: str) -> None:
        self.name = name  # for logs and refusal messages: "decode pod", "prefill pod", "router"
        self._state = ServingState.LOADING
        self.reason = "loading"  # why it is in this state, for refusal messages and logs
        self._listeners: list[Callable[[ServingState], None]] = []

    @property
    def state(self) -> ServingState:
        return self._state

    @property
    def accepting(self) -> bool:
        """New requests are taken."""
        return self._state is ServingState.SERVING

    @property
    def alive(self) -> bool:
        """Not failed: a liveness probe passes (loading and draining are alive, and must not be restarted)."""
        return self._state is not ServingState.FAILED

    @property
    def terminal(self) -> bool:
        return not _TRANSITIONS[self._state]

    def add_listener(self, listener: Callable[[ServingState], None]) -> None:
        """Called with the new state after every transition (health watchers)."""
        self._listeners.append(listener)

    def to(self, state: ServingState, reason: str = "") -> None:
        """Raises IllegalLifecycleTransition for a transition not in the diagram above."""
        if state not in _TRANSITIONS[self._state]:
            raise IllegalLifecycleTransition(
                f"{self.name}: {self._state.value} -> {state.value} is not a legal transition"
            )
        log.info("%s: %s -> %s%s", self.name, self._state.value, state.value, f" ({reason})" if reason else "")
        self._state = state
        self.reason = reason or state.value
        for listener in self._listeners:
            listener(state)

    def fail(self, reason: str) -> None:
        """FAILED from any state that is not terminal yet (the engine may die while loading, serving or
        draining); once stopped or failed there is nothing left to fail."""
        if not self.terminal:
            self.to(ServingState.FAILED, reason)

    def refusal(self) -> str:
        """Why a new request is refused now (UNAVAILABLE's message)."""
        if self._state is ServingState.LOADING:
            return f"the {self.name} is still loading: try again shortly or another replica"
        if self._state is ServingState.FAILED:
            return f"the {self.name} has failed ({self.reason}) and is stopping: send the request elsewhere"
        return f"the {self.name} is shutting down (draining): send new requests to another replica"

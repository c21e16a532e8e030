"""A call's outcome is counted once, and before grpc sends the status that ends the call: ``context.abort`` sends
it before raising, so a count taken afterwards could come after a client had read the metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter

from services.common.grpc_util import CallOutcome


class _Aborted(Exception):
    pass


class _Context:
    """What a servicer context does on abort, seen from the server: the status goes out, then it raises."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.counted_when_status_sent: float | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.counted_when_status_sent = sum(s.value for m in self.counter.collect() for s in m.samples
                                            if s.name.endswith("_total"))
        raise _Aborted(details)


def _counter() -> Counter:
    return Counter("calls", "calls by outcome", ["outcome"], registry=CollectorRegistry())


def _value(counter: Counter, outcome: str) -> float:
    return counter.labels(outcome)._value.get()


def test_an_aborted_call_is_counted_before_its_status_goes_out_and_only_once():
    counter = _counter()
    call = CallOutcome(counter, {grpc.StatusCode.FAILED_PRECONDITION: "refused"})
    context = _Context(counter)
    with pytest.raises(_Aborted):
        asyncio.run(call.abort(context, grpc.StatusCode.FAILED_PRECONDITION, "handshake first"))
    assert context.counted_when_status_sent == 1
    call.count("error")  # the handler's except / finally count again: ignored
    call.count("cancelled")
    assert _value(counter, "refused") == 1 and _value(counter, "error") == 0 and _value(counter, "cancelled") == 0


def test_the_outcome_named_at_the_abort_wins_over_the_status_map_and_unmapped_statuses_are_errors():
    counter = _counter()
    with pytest.raises(_Aborted):
        asyncio.run(CallOutcome(counter).abort(_Context(counter), grpc.StatusCode.RESOURCE_EXHAUSTED, "full",
                                               "overloaded"))
    with pytest.raises(_Aborted):
        asyncio.run(CallOutcome(counter).abort(_Context(counter), grpc.StatusCode.INTERNAL, "bug"))
    assert _value(counter, "overloaded") == 1 and _value(counter, "error") == 1

"""Running a gRPC server through its lifecycle (services/common/lifecycle.py): until SIGTERM/SIGINT, then a
graceful drain (Kubernetes sends SIGTERM and waits ``terminationGracePeriodSeconds``), or until the process can
no longer serve (its engine died), then stopping it so that it is restarted.

The drain: the lifecycle goes DRAINING at once (health NOT_SERVING, new requests refused with UNAVAILABLE by
the LifecycleGate or the router's own check), the process leaves the cluster registry, the requests it is
running get ``drain_grace_s`` to finish, then the server stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from .lifecycle import Lifecycle, ServingState

Loaded = TypeVar("Loaded")

log = logging.getLogger("baton.serving")

# After the drain, calls still open (past the grace period) get this long before they are cancelled.
STOP_GRACE_S = 1.0


def stop_on_signals(lifecycle: Lifecycle) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT. Installed first thing, so that a signal while the model loads is
    handled too (the process then stops once loading returns: nothing to drain)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: %s received while %s", lifecycle.name, sig.name, lifecycle.state.value)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


class Streams:
    """Calls in flight that a drain waits for (a decode pod's or a router's Generate streams)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once none is in flight; False if some still are after ``timeout_s``."""
        if self.count == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


async def serve_until_stopped(
    server: grpc.aio.Server, lifecycle: Lifecycle, stop: asyncio.Event, fatal: asyncio.Event | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """The lifecycle must be SERVING. Serve until ``stop`` (a signal) or ``fatal`` is set; on a signal drain:
    DRAINING, ``drain()`` (leave the registry, wait for running calls within the grace period), STOPPED. Returns
    True when the process failed (``fatal``, also during the drain): the caller then exits non-zero."""
    waits = [asyncio.ensure_future(stop.wait())]
    if fatal is not None:
        waits.append(asyncio.ensure_future(fatal.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waits:
        waiter.cancel()
    if fatal is not None and fatal.is_set():
        lifecycle.fail("the engine thread died")
    else:
        lifecycle.to(ServingState.DRAINING, "signal")
        if drain is not None:
            await drain()
        if fatal is not None and fatal.is_set():
            lifecycle.fail("the engine thread died while draining")
        else:
            lifecycle.to(ServingState.STOPPED, "drained")
    await server.stop(STOP_GRACE_S)  # calls still open get STOP_GRACE_S, then are cancelled
    return lifecycle.state is ServingState.FAILED


async def cancel_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel background loops and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def load_while_listening(
    load: Callable[[], Loaded], lifecycle: Lifecycle, stop: asyncio.Event, servers: list[grpc.aio.Server | None],
    close: Callable[[Loaded], None],
) -> Loaded | None:
    """``load()`` off the event loop (minutes with real weights), so that the already listening ``servers`` answer
    health checks meanwhile. Returns what it loaded; None when a signal came while loading (then ``close`` gets it,
    the servers are stopped and the lifecycle is STOPPED: nothing to drain). A failed load is FAILED, stops the
    servers and raises."""
    try:
        loaded = await asyncio.to_thread(load)
    except Exception as err:
        lifecycle.fail(f"loading failed: {err}")
        await _stop_all(servers)
        raise
    if not stop.is_set():
        return loaded
    lifecycle.to(ServingState.STOPPED, "signal while loading")
    await _stop_all(servers)
    close(loaded)
    return None


async def _stop_all(servers: list[grpc.aio.Server | None]) -> None:
    for server in servers:
        if server is not None:
            await server.stop(0)

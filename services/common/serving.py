"""Running a gRPC server until SIGTERM/SIGINT, then stopping it gracefully (Kubernetes sends SIGTERM), or
until the pod can no longer serve (its engine died), then stopping it so that it is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

import grpc


async def run_until_signal(
    server: grpc.aio.Server, grace_s: float = 5.0, fatal: asyncio.Event | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """Serve until a signal or ``fatal`` is set. ``drain`` runs before the server stops listening (a prefill
    pod lets its hand-overs end: once its port is closed, decode pods take it for gone). Returns True when
    stopped by ``fatal``: the caller then exits non-zero."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    if fatal is not None:
        waits.append(asyncio.ensure_future(fatal.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waits:
        waiter.cancel()
    failed = fatal is not None and fatal.is_set()
    if drain is not None and not failed:
        await drain()
    await server.stop(grace_s)  # in-flight calls get ``grace_s`` to finish; new ones are refused
    return failed


async def cancel_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel background loops and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task

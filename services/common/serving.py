"""Running a gRPC server until SIGTERM/SIGINT, then stopping it gracefully (Kubernetes sends SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc


async def run_until_signal(server: grpc.aio.Server, grace_s: float = 5.0) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace_s)  # in-flight calls get ``grace_s`` to finish; new ones are refused


async def cancel_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel background loops and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task

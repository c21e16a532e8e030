"""Drives an Engine on its own thread and streams each request's outputs to asyncio callers.

The engine is not thread-safe; only the loop thread touches it. Callers post commands (add, abort) on a
queue and receive outputs on a per-request asyncio queue, filled with ``call_soon_threadsafe``. The thread
blocks on the command queue while there is no work, so an idle engine burns no CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import Engine
from .request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class EngineError(RuntimeError):
    """The engine failed while running a request (a bug, or a device error); the request was dropped."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread, any event loop) ----------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; the last one has ``finished`` set.

        Raises InvalidRequestError before yielding anything if the engine refuses the request. Leaving the
        iteration early (client gone, task cancelled) aborts the request and frees its memory.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", (prompt, params, request_id, stream, accepted)))
        await asyncio.wrap_future(accepted)
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn, *args):
        """Run ``fn(engine, *args)`` on the engine thread and return a concurrent Future of its result
        (for reads of engine state that must not race with a step)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", (fn, args, done)))
        return done

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join()

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                while True:
                    kind, payload = self._commands.get(block=block)
                    block = False
                    if kind == "stop":
                        self._fail_all(EngineError("engine shut down"))
                        return
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: drop what was in flight, report it to its callers
                log.exception("engine step failed; failing in-flight requests")
                self._fail_all(EngineError(f"engine step failed: {exc}"))
                continue
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
                    if output.finished:
                        del self._streams[output.request_id]

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            prompt, params, request_id, stream, accepted = payload
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as exc:
                accepted.set_exception(exc)
                return
            self._streams[request_id] = stream
            accepted.set_result(request_id)
        elif kind == "abort":
            output = self.engine.abort_request(payload)
            stream = self._streams.pop(payload, None)
            if stream is not None and output is not None:
                stream.put(output)
        elif kind == "call":
            fn, args, done = payload
            try:
                done.set_result(fn(self.engine, *args))
            except Exception as exc:
                done.set_exception(exc)

    def _fail_all(self, error: EngineError) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()

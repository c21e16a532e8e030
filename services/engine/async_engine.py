"""Drives an Engine on its own thread and streams each request's outputs to asyncio callers.

The engine is not thread-safe; only the loop thread touches it. Callers post commands (add, abort) on a
queue and receive outputs on a per-request asyncio queue, filled with ``call_soon_threadsafe``. The thread
blocks on the command queue while there is no work, so an idle engine burns no CPU.

A failed step fails the requests that were in it and the engine goes on. Anything else that raises on the
loop thread (handling a command: an abort, a remote prefill's result) leaves the engine in a state nobody
can vouch for: the thread stops, every stream and every later call fails with EngineError saying why, and
``on_fatal`` tells the pod, which reports not-serving and exits non-zero so that it is restarted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .engine import Engine, LoadReport
from .radix_cache import CacheDigest, CacheEvent
from .request import Request, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class EngineError(RuntimeError):
    """The engine failed while running a request (a bug, or a device error); the request was dropped."""


class EngineDeadError(EngineError):
    """The engine's loop thread stopped on an unexpected error; nothing is served any more."""


@dataclass(frozen=True)
class RemotePrefillTask:
    """Decode side: what a prefill pod must compute and where to write it (copied off the engine thread)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_cached_tokens: int  # D holds the KV of the tokens before this (page aligned)
    dest_page_ids: list[int]  # D's pages for tokens [num_cached_tokens, len(token_ids))
    dest_state_slot: int
    dest_checkpoint_slot: int | None  # D's checkpoint slot for the state at the prompt's resume boundary

    @classmethod
    def of(cls, request: Request, page_size: int) -> RemotePrefillTask:
        return cls(
            request.request_id, list(request.all_token_ids), request.params, request.num_computed_tokens,
            list(request.page_ids[request.num_computed_tokens // page_size :]), request.state_slot,
            request.snapshot_slot,
        )


# How often a busy engine refreshes ``AsyncEngine.load`` (an idle one does it before it waits).
LOAD_REPORT_INTERVAL_S = 0.02


class AsyncEngine:
    def __init__(
        self, engine: Engine, on_remote_prefill: Callable[[RemotePrefillTask], None] | None = None,
        on_cache_events: Callable[[list[CacheEvent], CacheDigest], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``on_remote_prefill`` is called on the engine thread for each request a decode pod's scheduler
        sends to a prefill pod; it must only hand the task over (e.g. ``loop.call_soon_threadsafe``).
        ``on_cache_events`` is called on the engine thread with the prefix cache's events of each step (and of
        the commands before it) and the cache's digest after them; the engine must record events for it.
        ``on_fatal`` is called on the engine thread, once, if the thread stops on an unexpected error."""
        self.engine = engine
        self._on_remote_prefill = on_remote_prefill
        self._on_cache_events = on_cache_events
        self._on_fatal = on_fatal
        # Read by other threads (heartbeats) without a round trip through the command queue: replaced whole,
        # never mutated, so a reader sees one consistent report.
        self.load: LoadReport = engine.load_report()
        self._next_load_report = 0.0
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        # Set once when the thread stops on an error; guarded by _post_lock so that no command is queued
        # after the thread drained the queue for the last time (it would wait forever).
        self._dead: EngineDeadError | None = None
        self._post_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> EngineDeadError | None:
        """Why the engine thread stopped, or None while it serves."""
        return self._dead

    # ---- caller side (any thread, any event loop) ----------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        hold_memory: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; the last one has ``finished`` set.

        Raises InvalidRequestError before yielding anything if the engine refuses the request, and
        EngineError if the engine fails it (EngineDeadError: the engine stopped). Leaving the iteration
        early (client gone, task cancelled) aborts the request and frees its memory.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._post("add", (prompt, params, request_id, hold_memory, stream, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            # The caller left while the engine thread had not answered yet: if the request was (or is being)
            # added, nobody will read it, so abort it (after the add: one queue, in order; a no-op otherwise).
            if self._dead is None:
                self.abort(request_id)
            raise
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished and self._dead is None:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def complete_remote_prefill(
        self, request_id: str, token: int, logprob: float | None, checkpoint_written: bool = False
    ) -> None:
        self._post("remote_done", (request_id, token, logprob, checkpoint_written))

    def fail_remote_prefill(
        self, request_id: str, quarantine_key: str | None = None, prefill_locally: bool = True
    ) -> None:
        """See Engine.fail_remote_prefill."""
        self._post("remote_failed", (request_id, quarantine_key, prefill_locally))

    def reclaim_quarantined(self, quarantine_key: str) -> None:
        self._post("reclaim", quarantine_key)

    def release_held(self, request_id: str) -> None:
        self._post("release_held", request_id)

    def call(self, fn, *args):
        """Run ``fn(engine, *args)`` on the engine thread and return a concurrent Future of its result
        (for reads of engine state that must not race with a step)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post("call", (fn, args, done))
        return done

    def shutdown(self) -> None:
        with self._post_lock:
            if self._dead is None:
                self._commands.put(("stop", None))
        self._thread.join()

    def _post(self, kind: str, payload) -> None:
        with self._post_lock:
            if self._dead is not None:
                raise EngineDeadError(str(self._dead))
            self._commands.put((kind, payload))

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            log.critical("the engine thread stopped on an unexpected error; the engine serves nothing more",
                         exc_info=True)
            self._die(EngineDeadError(f"engine thread died: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        while True:
            # Block when there is nothing to run, or when the last step could schedule nothing (e.g. all
            # requests wait on prefill pods): only a command can change that, so don't spin.
            block = not self.engine.has_unfinished() or self.engine.last_step_scheduled == 0
            self._report(block)
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
                self._dispatch_remote_prefills()
            except Exception as exc:  # keep serving: drop what was in flight, report it to its callers
                log.exception("engine step failed; failing in-flight requests")
                self._fail_all(EngineError(f"engine step failed: {exc}"))
                continue
            for output in outputs:
                self._deliver(output)

    def _report(self, idle: bool) -> None:
        """Hand the cache events of the last step and commands to their consumer; refresh ``load`` (always
        before waiting idle, so an idle engine's report is exact)."""
        if self._on_cache_events is not None:
            events = self.engine.drain_cache_events()
            if events:
                self._on_cache_events(events, self.engine.cache_digest)
        now = time.monotonic()
        if idle or now >= self._next_load_report:
            self.load = self.engine.load_report()
            self._next_load_report = now + LOAD_REPORT_INTERVAL_S

    def _die(self, error: EngineDeadError) -> None:
        """Fail every stream and every queued or later command with ``error``; tell the owner."""
        with self._post_lock:
            self._dead = error
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        while True:
            try:
                kind, payload = self._commands.get(block=False)
            except queue.Empty:
                break
            # Their callers wait on the future that ends the payload (unless they left: it is cancelled).
            if kind in ("add", "call") and payload[-1].set_running_or_notify_cancel():
                payload[-1].set_exception(error)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _dispatch_remote_prefills(self) -> None:
        page_size = self.engine.config.page_size
        for request in self.engine.pop_remote_prefills():
            if self._on_remote_prefill is None:  # nobody to send it to: prefill here
                self.engine.fail_remote_prefill(request.request_id)
            else:
                self._on_remote_prefill(RemotePrefillTask.of(request, page_size))

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            prompt, params, request_id, hold_memory, stream, accepted = payload
            # A future its caller cancelled (it left before this ran) cannot take a result, and setting one would
            # raise here, on the engine thread, and end it: skip the request instead.
            if not accepted.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(prompt, params, request_id, hold_memory=hold_memory)
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
        elif kind == "remote_done":
            self._deliver(self.engine.complete_remote_prefill(*payload))
        elif kind == "remote_failed":
            self.engine.fail_remote_prefill(*payload)
        elif kind == "reclaim":
            self.engine.reclaim_quarantined(payload)
        elif kind == "release_held":
            self.engine.release_held(payload)
        elif kind == "call":
            fn, args, done = payload
            if not done.set_running_or_notify_cancel():  # its caller left (e.g. a Health call timed out)
                return
            try:
                done.set_result(fn(self.engine, *args))
            except Exception as exc:
                done.set_exception(exc)
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def _fail_all(self, error: EngineError) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()

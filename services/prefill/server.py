"""The prefill pod: computes prompts for decode pods and writes the result into their memory.

Per ``Prefill`` call: run the prompt through the engine (with its own prefix cache) as a one-token
request whose pages and state slots are *held* when it finishes (HANDING_OVER), write the pages the decode
pod lacks, the final conv/SSM state and the state at the prompt's resume boundary into the decode pod's
registered memory with one batched Mooncake write, release the held memory (the pages and that state join
this pod's prefix cache), answer with the first token.

What the decode pod relies on: any answer to ``Abort`` (and any ``ABORTED`` failure) means nothing more is
written for that request. So a call stays known, its memory held, until its write has really ended: the
write runs on a thread, and neither a cancelled handler (the decode pod's deadline passed) nor a write
given up at its timeout (Mooncake may still be running it) ends it early. A request aborted before it
arrived is refused when it does arrive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.cluster.publisher import ClusterPublisher, advertised_address, worker_record
from services.common.grpc_util import CallOutcome, add_servicer, pool_usage, sampling_from_proto
from services.common.health import LifecycleGate, add_health_and_reflection, start_health_port
from services.common.lifecycle import Lifecycle, ServingState
from services.common.metrics import PodMetrics
from services.common.pod_config import PodConfig
from services.common.protos import inference_pb2, pd_pb2, pd_pb2_grpc
from services.common.serving import load_while_listening, serve_until_stopped, stop_on_signals
from services.common.tls import bind
from services.engine.async_engine import AsyncEngine, EngineError
from services.engine.engine import Engine
from services.engine.prefix_cache import resume_boundary
from services.engine.request import FinishReason, InvalidRequestError
from services.transfer.engine import TransferEngine, TransferError
from services.transfer.handover import (
    PoolRegions,
    handover_regions,
    layout_mismatches,
    load_pod_engines,
    local_regions,
    remote_regions,
    state_layout,
)

log = logging.getLogger("baton.prefill")

_ABORTED_REMEMBERED = 4096  # aborted request keys kept to refuse a Prefill that arrives after its Abort
# A Prefill call's metrics outcome by the status it was aborted with (anything else: "error").
_OUTCOME_OF_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.FAILED_PRECONDITION: "refused",
                      grpc.StatusCode.ABORTED: "aborted"}


@dataclass(frozen=True)
class PrefillConfig(PodConfig):
    max_decode_pods: int = field(
        default=256, metadata={"help": "decode pods remembered (least recently used forgotten; they handshake again)"}
    )
    fault_transfer_pause_s: float = field(
        default=0.0, metadata={"help": "fault testing only: pause this long halfway through every hand-over"}
    )
    fault_transfer_resume_file: str = field(
        default="", metadata={"help": "fault testing only: end that pause early once this file exists"}
    )
    fault_first_token: int = field(
        default=-1, metadata={"help": "fault testing only: answer every prefill with this first token (-1: off)"}
    )


@dataclass
class _Decode:
    regions: PoolRegions
    session: str


@dataclass
class _Inflight:
    """One Prefill call, from its arrival until nothing more can be written for it."""

    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once nothing more is written
    writes: list[asyncio.Future] = field(default_factory=list)  # what may still write: the write, an abandoned call


class PrefillService(pd_pb2_grpc.PrefillServicer):
    def __init__(
        self, config: PrefillConfig, engine: Engine, transfer: TransferEngine, metrics: PodMetrics,
        fatal: asyncio.Event | None = None, on_cache_events=None,
    ) -> None:
        self.config = config
        self.engine = engine
        loop = asyncio.get_running_loop()
        self.async_engine = AsyncEngine(
            engine, on_cache_events=on_cache_events,
            on_fatal=(lambda _: loop.call_soon_threadsafe(fatal.set)) if fatal is not None else None,
        )
        self.transfer = transfer
        self.metrics = metrics
        self.layout = state_layout(engine)
        self.regions = local_regions(engine)
        self.prefill_id = uuid.uuid4().hex
        self.decodes: OrderedDict[str, _Decode] = OrderedDict()  # least recently used first
        self.inflight: dict[str, _Inflight] = {}
        self.aborted: OrderedDict[str, None] = OrderedDict()  # keys aborted before (or without) arriving
        self.draining = False
        self.lifecycle: Lifecycle | None = None  # set by ``serve``: Health reports it
        self._tasks: set[asyncio.Task] = set()

    # ---- handshake ----------------------------------------------------------------------------------
    async def Handshake(self, request: pd_pb2.HandshakeRequest, context) -> pd_pb2.HandshakeResponse:
        problems = layout_mismatches(self.layout, request.layout, ("prefill", "decode"))
        if problems:
            log.warning("refusing decode pod %s: %s", request.decode_id, "; ".join(problems))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "state layout mismatch: " + "; ".join(problems))
        session = request.memory.transfer_session
        # A decode pod that restarted on the same address has a new id: its old entry is dead.
        for stale in [d for d, known in self.decodes.items() if known.session == session and d != request.decode_id]:
            del self.decodes[stale]
        self.decodes[request.decode_id] = _Decode(remote_regions(request.memory, request.layout), session)
        self.decodes.move_to_end(request.decode_id)
        while len(self.decodes) > self.config.max_decode_pods:
            forgotten, _ = self.decodes.popitem(last=False)
            log.info("forgetting decode pod %s (least recently used of %d)", forgotten, self.config.max_decode_pods)
        log.info("decode pod %s connected (transfer session %s)", request.decode_id, session)
        return pd_pb2.HandshakeResponse(layout=self.layout, prefill_id=self.prefill_id)

    # ---- prefill ------------------------------------------------------------------------------------
    def _validate(self, request: pd_pb2.PrefillRequest, decode: _Decode) -> None:
        n, page = len(request.token_ids), self.engine.config.page_size
        vocab = self.engine.model_config.vocab_size
        if not request.request_id:
            raise InvalidRequestError("request_id is empty")
        if n == 0:
            raise InvalidRequestError("token_ids is empty")
        if max(request.token_ids) >= vocab:
            raise InvalidRequestError(f"token ids out of range [0, {vocab})")
        if request.num_cached_tokens % page or request.num_cached_tokens >= n:
            raise InvalidRequestError(
                f"num_cached_tokens {request.num_cached_tokens} must be a multiple of {page} below {n}"
            )
        expected = -(-n // page) - request.num_cached_tokens // page
        if len(request.dest_page_ids) != expected:
            raise InvalidRequestError(f"{len(request.dest_page_ids)} destination pages, expected {expected}")
        if max(request.dest_page_ids) >= decode.regions.kv_num_pages:
            raise InvalidRequestError(f"destination page id beyond the decode pod's {decode.regions.kv_num_pages}")
        slots = [request.dest_state_slot]
        if request.HasField("dest_checkpoint_slot"):
            if resume_boundary(n, page) == 0:
                raise InvalidRequestError(f"a {n}-token prompt has no resume boundary to checkpoint")
            slots.append(request.dest_checkpoint_slot)
        for slot in slots:
            if slot >= decode.regions.num_slots:
                raise InvalidRequestError(f"destination slot {slot} beyond {decode.regions.num_slots}")
        if len(set(slots)) != len(slots):
            raise InvalidRequestError("dest_checkpoint_slot is the same slot as dest_state_slot")

    async def Prefill(self, request: pd_pb2.PrefillRequest, context) -> pd_pb2.PrefillResponse:
        # Counted once per call. A handler cancelled (the decode pod's deadline passed, or it went away) stays
        # "aborted"; an abort's status says which outcome it was.
        call = CallOutcome(self.metrics.prefill_requests, _OUTCOME_OF_STATUS)
        try:
            response = await self._prefill_call(request, context, call)
            call.count("finished")
            return response
        except Exception:
            call.count(_OUTCOME_OF_STATUS.get(context.code(), "error"))
            raise
        finally:
            call.count("aborted")  # cancelled: CancelledError is no Exception

    async def _prefill_call(self, request: pd_pb2.PrefillRequest, context, call: CallOutcome
                            ) -> pd_pb2.PrefillResponse:
        if self.draining:
            await call.abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the prefill pod is shutting down")
        decode = self.decodes.get(request.decode_id)
        if decode is None:
            await call.abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                             f"unknown decode pod {request.decode_id!r}: handshake first")
        self.decodes.move_to_end(request.decode_id)
        key = f"{request.decode_id}/{request.request_id}"
        arrived = time.monotonic()
        try:
            self._validate(request, decode)
            params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=())
            if key in self.inflight:
                raise InvalidRequestError(f"request {request.request_id!r} is already being prefilled")
        except InvalidRequestError as err:
            await call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if key in self.aborted:
            await call.abort(context, grpc.StatusCode.ABORTED, "prefill aborted before it arrived")
        inflight = self.inflight[key] = _Inflight()
        try:
            return await self._prefill(request, key, params, decode, inflight, context, call, arrived)
        finally:
            pending = [w for w in inflight.writes if not w.done()]
            if pending:
                # The handler was cancelled (the decode pod's deadline passed) or gave up on a write that
                # Mooncake still runs: the call stays known and its memory held until that has ended.
                log.warning("%s: the call ended while its hand-over still writes; settling when it ends", key)
                settle = asyncio.ensure_future(self._settle_after(pending, key, inflight))
                self._tasks.add(settle)
                settle.add_done_callback(self._tasks.discard)
            else:
                self._settle(key, inflight)

    async def _settle_after(self, pending: list[asyncio.Future], key: str, inflight: _Inflight) -> None:
        await asyncio.wait(pending)
        self._settle(key, inflight)

    def _settle(self, key: str, inflight: _Inflight) -> None:
        """Nothing more is written for ``key``: free its memory and forget it."""
        self.async_engine.release_held(key)
        inflight.done.set()
        del self.inflight[key]
        log.info("hand-over settled: %s", key)

    async def _prefill(self, request, key, params, decode: _Decode, inflight: _Inflight, context, call: CallOutcome,
                       arrived: float):
        last = None
        try:
            async for out in self.async_engine.generate(list(request.token_ids), params, key, hold_memory=True):
                last = out
        except InvalidRequestError as err:
            await call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EngineError as err:
            await call.abort(context, grpc.StatusCode.INTERNAL, str(err))
        if inflight.aborted or last is None or last.finish_reason == FinishReason.ABORT:
            await call.abort(context, grpc.StatusCode.ABORTED, "prefill aborted")

        def held_memory(engine: Engine):
            held = engine.held[key]
            return list(held.page_ids), held.state_slot, held.num_cached_tokens, held.snapshot_slot, \
                held.snapshot_position

        try:
            page_ids, slot, own_cached, snapshot_slot, snapshot_position = await asyncio.wrap_future(
                self.async_engine.call(held_memory)
            )
        except KeyError:  # aborted between finishing and here: its memory is already released
            await call.abort(context, grpc.StatusCode.ABORTED, "prefill aborted")
        page, n = self.engine.config.page_size, len(request.token_ids)
        first, end = request.num_cached_tokens // page, -(-n // page)
        slots = [(slot, request.dest_state_slot)]
        checkpoint = (request.HasField("dest_checkpoint_slot") and snapshot_slot is not None
                      and snapshot_position == resume_boundary(n, page))
        if checkpoint:
            slots.append((snapshot_slot, request.dest_checkpoint_slot))
        regions = handover_regions(
            self.regions, decode.regions, page_ids[first:end], list(request.dest_page_ids), slots
        )
        if inflight.aborted:
            await call.abort(context, grpc.StatusCode.ABORTED, "prefill aborted")
        started = time.monotonic()
        compute = started - arrived
        log.info("hand-over started: %s, %d pages, %d state slots to %s", key, end - first, len(slots), decode.session)
        write = asyncio.ensure_future(asyncio.to_thread(self._write, key, decode.session, *regions))
        inflight.writes.append(write)
        try:
            nbytes = await asyncio.shield(write)  # a cancelled handler leaves the write running (see Prefill)
        except TransferError as err:
            if err.still_running is not None:  # given up at its timeout, Mooncake may still be writing
                inflight.writes.append(asyncio.ensure_future(asyncio.to_thread(err.still_running.wait)))
            # DATA_LOSS tells the decode pod its destination memory now holds unknown bytes, some of which
            # may still land late (see services/transfer/engine.py): it must not reuse that memory.
            self.metrics.transfers.labels("failed").inc()
            log.error("hand-over of %s failed: %s", key, err)
            await call.abort(context, grpc.StatusCode.DATA_LOSS, f"hand-over to the decode pod failed: {err}")
        elapsed = time.monotonic() - started
        self.metrics.transfers.labels("ok").inc()
        self.metrics.transfer_bytes.inc(nbytes)
        self.metrics.transfer_seconds.observe(elapsed)
        self.metrics.prefill_compute_seconds.observe(compute)
        self.metrics.transfer_pages.inc(end - first)
        if inflight.aborted:  # everything was written, but the decode pod gave up on it meanwhile
            await call.abort(context, grpc.StatusCode.ABORTED, "prefill aborted")
        self.metrics.prefill_prompt_tokens.inc(n)
        logprob = last.new_logprobs[0] if last.new_logprobs else 0.0
        first_token = last.new_token_ids[0] if self.config.fault_first_token < 0 else self.config.fault_first_token
        return pd_pb2.PrefillResponse(
            first_token=first_token, first_logprob=logprob, has_logprob=bool(last.new_logprobs),
            bytes_transferred=nbytes, pages_transferred=end - first, prefill_cached_tokens=own_cached,
            transfer_seconds=elapsed, checkpoint_written=checkpoint, compute_seconds=compute,
        )

    def _write(self, key: str, session: str, src: list[int], dst: list[int], lengths: list[int]) -> int:
        """One batched write; with the fault-testing pause, two halves of the hand-over (in its order: pages,
        then state slots) with a pause between them."""
        pause = self.config.fault_transfer_pause_s
        if pause <= 0 or len(lengths) < 2:
            return self.transfer.write(session, src, dst, lengths)
        half = len(lengths) // 2
        written = self.transfer.write(session, src[:half], dst[:half], lengths[:half])
        log.info("fault testing: pausing %.1fs halfway through the hand-over of %s", pause, key)
        resume = Path(self.config.fault_transfer_resume_file) if self.config.fault_transfer_resume_file else None
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and not (resume is not None and resume.exists()):
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # a fault being injected, not a wait
        written += self.transfer.write(session, src[half:], dst[half:], lengths[half:])
        log.info("fault testing: the paused hand-over of %s wrote its second half", key)
        return written

    async def Abort(self, request: pd_pb2.AbortRequest, context) -> pd_pb2.AbortResponse:
        key = f"{request.decode_id}/{request.request_id}"
        self.aborted[key] = None
        self.aborted.move_to_end(key)
        while len(self.aborted) > _ABORTED_REMEMBERED:
            self.aborted.popitem(last=False)
        inflight = self.inflight.get(key)
        if inflight is None:
            return pd_pb2.AbortResponse(found=False)
        inflight.aborted = True
        if not inflight.writes:  # still computing; once writing, its memory is released when the write ends
            self.async_engine.abort(key)
        await inflight.done.wait()  # after this, nothing more is written for it
        return pd_pb2.AbortResponse(found=True)

    async def drain(self, timeout_s: float) -> None:
        """Shutting down: refuse new prefills and let running hand-overs end (a decode pod takes a pod whose
        port is closed for one that writes nothing more)."""
        self.draining = True
        pending = [inflight.done.wait() for inflight in self.inflight.values()]
        if pending:
            log.info("draining %d hand-overs before stopping", len(pending))
            await asyncio.wait([asyncio.ensure_future(p) for p in pending], timeout=timeout_s)

    async def Health(self, request, context) -> inference_pb2.HealthResponse:
        if self.async_engine.dead is not None:
            return inference_pb2.HealthResponse(serving=False, role="prefill")
        # Read on the engine thread, so the answer reflects every command sent before it.
        usage = await asyncio.wrap_future(self.async_engine.call(Engine.resource_usage))
        # The same answer as grpc.health.v1 (services/common/health.py): not serving while draining.
        serving = not self.draining and (self.lifecycle is None or self.lifecycle.accepting)
        return inference_pb2.HealthResponse(serving=serving, role="prefill", usage=pool_usage(usage))


async def serve(config: PrefillConfig) -> int:
    """Returns the process's exit status: non-zero when the engine died.

    The gRPC port listens before the model loads: health checks answer NOT_SERVING (not "connection refused")
    while it loads, and ``baton.v1.Prefill`` calls are refused with UNAVAILABLE until it serves."""
    cluster = config.cluster
    lifecycle = Lifecycle("prefill pod")
    stop = stop_on_signals(lifecycle)
    api = pd_pb2.DESCRIPTOR.services_by_name["Prefill"]
    # While draining, a decode pod may still abort (and must be answered); new hand-overs go elsewhere.
    gate = LifecycleGate(lifecycle, [api], [f"/{api.full_name}/Prefill", f"/{api.full_name}/Handshake"])
    server = grpc.aio.server(interceptors=[gate])
    health = add_health_and_reflection(server, lifecycle, [api])
    port = bind(server, f"{config.host}:{config.port}", config.internal_tls)
    await server.start()
    health_server, health_port = await start_health_port(config.host, config.health_port, health)
    print("BATON_LISTENING " + json.dumps({"role": "prefill", "port": port, "health_port": health_port}), flush=True)
    publisher = ClusterPublisher(cluster, asyncio.get_running_loop()) if cluster.redis_url else None

    def load() -> tuple[Engine, TransferEngine]:
        return load_pod_engines(config.engine, config.transfer, publisher is not None)

    loaded = await load_while_listening(load, lifecycle, stop, [server, health_server], lambda pair: pair[1].close())
    if loaded is None:  # a signal while loading
        return 0
    engine, transfer = loaded
    metrics = PodMetrics("prefill", engine)
    metrics_port = metrics.serve(config.host, config.metrics_port)
    fatal = asyncio.Event()
    service = PrefillService(config, engine, transfer, metrics, fatal,
                             on_cache_events=publisher.event_log.on_events if publisher else None)
    service.lifecycle = lifecycle
    health.ready = lambda: service.async_engine.dead is None
    add_servicer(server, api, service)
    lifecycle.to(ServingState.SERVING)
    if publisher is not None:
        publisher.start(service.async_engine, worker_record(
            "prefill", service.prefill_id, advertised_address(cluster, config.host, port),
            cluster.served_model_name or config.engine.model, service.layout.model_id, engine,
            f"{config.host}:{metrics_port}", 0,
        ))
    ready = {"role": "prefill", "port": port, "metrics_port": metrics_port, "transfer_session": transfer.session_id,
             "instance_id": service.prefill_id, "health_port": health_port}
    print("BATON_READY " + json.dumps(ready), flush=True)
    log.info("prefill pod serving on %s:%d (metrics %d%s)", config.host, port, metrics_port,
             ", TLS" if config.internal_tls.serves_tls else "")

    async def drain() -> None:
        if publisher is not None:  # routers stop naming this pod at their next poll
            await publisher.stop()
        await service.drain(config.drain_grace_s)

    try:
        failed = await serve_until_stopped(server, lifecycle, stop, fatal, drain)
    finally:
        if health_server is not None:
            await health_server.stop(0)
        if publisher is not None:
            await publisher.stop()
        if service.async_engine.dead is None:
            service.async_engine.shutdown()
        transfer.close()
    if failed:
        log.critical("stopping: %s", service.async_engine.dead)
    return 1 if failed else 0

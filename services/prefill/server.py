"""The prefill pod: computes prompts for decode pods and writes the result into their memory.

Per ``Prefill`` call: run the prompt through the engine (with its own prefix cache) as a one-token
request whose pages and state slot are *held* when it finishes, write the pages the decode pod lacks
and the final conv/SSM state into the decode pod's registered memory with one batched Mooncake write,
release the held memory (the pages join this pod's prefix cache), answer with the first token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from services.cluster.publisher import ClusterPublisher, advertised_address, worker_record
from services.common.grpc_util import pool_usage, sampling_from_proto
from services.common.metrics import PodMetrics
from services.common.pod_config import PodConfig
from services.common.protos import inference_pb2, pd_pb2, pd_pb2_grpc
from services.common.serving import run_until_signal
from services.engine.async_engine import AsyncEngine
from services.engine.engine import Engine
from services.engine.request import FinishReason, InvalidRequestError
from services.transfer.engine import TransferEngine, TransferError, coalesce
from services.transfer.handover import (
    PoolRegions,
    handover_regions,
    layout_mismatches,
    local_regions,
    remote_regions,
    state_layout,
)

log = logging.getLogger("baton.prefill")


@dataclass(frozen=True)
class PrefillConfig(PodConfig):
    fault_transfer_pause_s: float = field(
        default=0.0, metadata={"help": "fault testing only: pause this long halfway through every hand-over"}
    )


@dataclass
class _Decode:
    regions: PoolRegions
    session: str


@dataclass
class _Inflight:
    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class PrefillService(pd_pb2_grpc.PrefillServicer):
    def __init__(self, config: PrefillConfig, engine: Engine, transfer: TransferEngine, metrics: PodMetrics,
                 on_cache_events=None) -> None:
        self.config = config
        self.engine = engine
        self.async_engine = AsyncEngine(engine, on_cache_events=on_cache_events)
        self.transfer = transfer
        self.metrics = metrics
        self.layout = state_layout(engine)
        self.regions = local_regions(engine)
        self.prefill_id = uuid.uuid4().hex
        self.decodes: dict[str, _Decode] = {}
        self.inflight: dict[str, _Inflight] = {}

    # ---- handshake ----------------------------------------------------------------------------------
    async def Handshake(self, request: pd_pb2.HandshakeRequest, context) -> pd_pb2.HandshakeResponse:
        problems = layout_mismatches(self.layout, request.layout)
        if problems:
            log.warning("refusing decode pod %s: %s", request.decode_id, "; ".join(problems))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "state layout mismatch: " + "; ".join(problems))
        self.decodes[request.decode_id] = _Decode(
            remote_regions(request.memory, request.layout), request.memory.transfer_session
        )
        log.info("decode pod %s connected (transfer session %s)", request.decode_id, request.memory.transfer_session)
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
        if request.dest_state_slot >= decode.regions.num_slots:
            raise InvalidRequestError(f"destination slot {request.dest_state_slot} beyond {decode.regions.num_slots}")

    async def Prefill(self, request: pd_pb2.PrefillRequest, context) -> pd_pb2.PrefillResponse:
        decode = self.decodes.get(request.decode_id)
        if decode is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"unknown decode pod {request.decode_id!r}: handshake first"
            )
        key = f"{request.decode_id}/{request.request_id}"
        try:
            self._validate(request, decode)
            params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=())
            if key in self.inflight:
                raise InvalidRequestError(f"request {request.request_id!r} is already being prefilled")
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        inflight = self.inflight[key] = _Inflight()
        try:
            return await self._prefill(request, key, params, decode, inflight, context)
        finally:
            self.async_engine.release_held(key)
            inflight.done.set()
            del self.inflight[key]

    async def _prefill(self, request, key, params, decode: _Decode, inflight: _Inflight, context):
        last = None
        try:
            async for out in self.async_engine.generate(list(request.token_ids), params, key, hold_memory=True):
                last = out
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if inflight.aborted or last is None or last.finish_reason == FinishReason.ABORT:
            await context.abort(grpc.StatusCode.ABORTED, "prefill aborted")

        def held_memory(engine: Engine):
            held = engine.held[key]
            return list(held.page_ids), held.state_slot, held.num_cached_tokens

        try:
            page_ids, slot, own_cached = await asyncio.wrap_future(self.async_engine.call(held_memory))
        except KeyError:  # aborted between finishing and here: its memory is already released
            await context.abort(grpc.StatusCode.ABORTED, "prefill aborted")
        page = self.engine.config.page_size
        first, end = request.num_cached_tokens // page, -(-len(request.token_ids) // page)
        regions = handover_regions(
            self.regions, decode.regions, page_ids[first:end], list(request.dest_page_ids), slot,
            request.dest_state_slot,
        )
        started = time.monotonic()
        log.info("hand-over started: %s, %d pages to %s", key, end - first, decode.session)
        try:
            nbytes = await asyncio.to_thread(self._write, decode.session, *regions)
        except TransferError as err:
            # DATA_LOSS tells the decode pod its destination memory now holds unknown bytes, some of which
            # may still land late (see services/transfer/engine.py): it must not reuse that memory.
            log.error("hand-over of %s failed: %s", key, err)
            await context.abort(grpc.StatusCode.DATA_LOSS, f"hand-over to the decode pod failed: {err}")
        elapsed = time.monotonic() - started
        if inflight.aborted:  # everything was written, but the decode pod gave up on it meanwhile
            await context.abort(grpc.StatusCode.ABORTED, "prefill aborted")
        self.metrics.transfer_bytes.inc(nbytes)
        self.metrics.transfer_seconds.observe(elapsed)
        self.metrics.pages_transferred.inc(end - first)
        self.metrics.requests.labels("finished").inc()
        logprob = last.new_logprobs[0] if last.new_logprobs else 0.0
        return pd_pb2.PrefillResponse(
            first_token=last.new_token_ids[0], first_logprob=logprob, has_logprob=bool(last.new_logprobs),
            bytes_transferred=nbytes, pages_transferred=end - first, prefill_cached_tokens=own_cached,
            transfer_seconds=elapsed,
        )

    def _write(self, session: str, src: list[int], dst: list[int], lengths: list[int]) -> int:
        """One batched write; with the fault-testing pause, two halves with a pause between them."""
        src, dst, lengths = coalesce(src, dst, lengths)  # so that the halves split real descriptors
        pause = self.config.fault_transfer_pause_s
        if pause <= 0 or len(lengths) < 2:
            return self.transfer.write(session, src, dst, lengths)
        half = len(lengths) // 2
        written = self.transfer.write(session, src[:half], dst[:half], lengths[:half])
        log.info("fault testing: pausing %.1fs halfway through the hand-over", pause)
        time.sleep(pause)
        return written + self.transfer.write(session, src[half:], dst[half:], lengths[half:])

    async def Abort(self, request: pd_pb2.AbortRequest, context) -> pd_pb2.AbortResponse:
        key = f"{request.decode_id}/{request.request_id}"
        inflight = self.inflight.get(key)
        if inflight is None:
            return pd_pb2.AbortResponse(found=False)
        inflight.aborted = True
        self.async_engine.abort(key)
        await inflight.done.wait()  # after this, nothing more is written for it
        return pd_pb2.AbortResponse(found=True)

    async def Health(self, request, context) -> inference_pb2.HealthResponse:
        # Read on the engine thread, so the answer reflects every command sent before it.
        usage = await asyncio.wrap_future(self.async_engine.call(Engine.resource_usage))
        return inference_pb2.HealthResponse(serving=True, role="prefill", usage=pool_usage(usage))


def register_memory(engine: Engine, transfer: TransferEngine) -> None:
    """Register the KV and state pools with Mooncake once, at start."""
    transfer.register(engine.runner.kv_cache.buffer)
    transfer.register(engine.runner.state_cache.conv)
    transfer.register(engine.runner.state_cache.ssm)


async def serve(config: PrefillConfig) -> None:
    cluster = config.cluster
    publisher = ClusterPublisher(cluster, asyncio.get_running_loop()) if cluster.redis_url else None
    engine = Engine(config.engine, record_cache_events=publisher is not None)
    transfer = TransferEngine(config.transfer)
    register_memory(engine, transfer)
    metrics = PodMetrics("prefill", engine.resource_usage, lambda: engine.cache.stats)
    metrics_port = metrics.serve(config.host, config.metrics_port)
    service = PrefillService(config, engine, transfer, metrics,
                             on_cache_events=publisher.event_log.on_events if publisher else None)
    server = grpc.aio.server()
    pd_pb2_grpc.add_PrefillServicer_to_server(service, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    if publisher is not None:
        publisher.start(service.async_engine, worker_record(
            "prefill", service.prefill_id, advertised_address(cluster, config.host, port),
            cluster.served_model_name or config.engine.model, service.layout.model_id, engine,
            f"{config.host}:{metrics_port}", 0,
        ))
    ready = {"role": "prefill", "port": port, "metrics_port": metrics_port, "transfer_session": transfer.session_id,
             "instance_id": service.prefill_id}
    print("BATON_READY " + json.dumps(ready), flush=True)
    log.info("prefill pod serving on %s:%d (metrics %d)", config.host, port, metrics_port)
    try:
        await run_until_signal(server)
    finally:
        if publisher is not None:
            await publisher.stop()
        service.async_engine.shutdown()
        transfer.close()

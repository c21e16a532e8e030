"""The decode pod: serves ``Generate``, decodes in its continuous batch, and sends long prompts to
prefill pods (see DESIGN.md, "Processes").

A request whose uncached prompt is long is admitted by the engine with pages for the whole prompt and a
working slot reserved; this service then asks a prefill pod to compute it and write the missing pages and
the final GDN state into those reservations. Failure handling, in order of preference: retry on another
prefill pod, then prefill locally. The reserved memory is reused only once the prefill pod can no longer
write into it (it answered, confirmed an abort, or is gone); if none of that can be established, the
memory is quarantined instead of risking a late write into another request's pages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from services.cluster.publisher import ClusterPublisher, advertised_address, worker_record
from services.common.grpc_util import (
    FINISH_REASONS,
    MalformedRequest,
    inference_handler,
    pool_usage,
    prompt_from_request,
    sampling_from_proto,
    sampling_to_proto,
)
from services.common.metrics import PodMetrics
from services.common.pod_config import PodConfig
from services.common.protos import inference_pb2, inference_pb2_grpc, pd_pb2, pd_pb2_grpc
from services.common.serving import run_until_signal
from services.engine.async_engine import AsyncEngine, EngineError, RemotePrefillTask
from services.engine.engine import Engine
from services.engine.request import InvalidRequestError, OverloadedError
from services.prefill.server import register_memory
from services.transfer.engine import TransferEngine
from services.transfer.handover import layout_mismatches, local_regions, state_layout

log = logging.getLogger("baton.decode")

# Outcomes of one attempt on one prefill pod.
_OK, _RETRY, _LOCAL, _QUARANTINE = "ok", "retry", "local", "quarantine"


@dataclass(frozen=True)
class DecodeConfig(PodConfig):
    prefill_addrs: str = field(default="", metadata={"help": "prefill pods, comma-separated host:port"})
    prefill_timeout_s: float = field(default=120.0, metadata={"help": "deadline of one Prefill call"})
    rpc_timeout_s: float = field(default=5.0, metadata={"help": "deadline of Handshake and Abort calls"})
    max_prefill_attempts: int = field(default=2, metadata={"help": "prefill pods tried before prefilling locally"})
    forget_peer_s: float = field(
        default=60.0, metadata={"help": "a prefill pod named by a router and unreachable this long is forgotten"}
    )

    @property
    def remote_prefill(self) -> bool:
        """Prefill pods may be used: listed, or named per request by a router (registered in a cluster)."""
        return bool(self.prefill_addrs.strip() or self.cluster.redis_url)


class PrefillPeer:
    """One prefill pod: its channel, and whether its handshake accepted our layout. ``named`` peers were
    introduced by a router's request rather than configured."""

    def __init__(self, address: str, named: bool = False) -> None:
        self.address = address
        self.named = named
        # Reconnect quickly after a pod restarts (gRPC's default backoff grows to two minutes).
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        )
        self.stub = pd_pb2_grpc.PrefillStub(self.channel)
        self.usable = False
        self.reason = "not connected yet"
        self.prefill_id = ""
        self.inflight = 0
        self.last_handshake = 0.0
        self.usable_since = time.monotonic()  # last time it was usable (or created)

    async def handshake(self, request: pd_pb2.HandshakeRequest, timeout: float, wait: bool = False) -> None:
        """``wait``: wait up to ``timeout`` for the connection to come up instead of failing at once."""
        self.last_handshake = time.monotonic()
        try:
            response = await self.stub.Handshake(request, timeout=timeout, wait_for_ready=wait)
        except grpc.aio.AioRpcError as err:
            self.usable = False
            refused = err.code() == grpc.StatusCode.FAILED_PRECONDITION
            self.reason = ("handshake refused: " if refused else "unreachable: ") + (err.details() or str(err.code()))
            log.warning("prefill pod %s not usable: %s", self.address, self.reason)
            return
        problems = layout_mismatches(request.layout, response.layout)
        if problems:
            self.usable, self.reason = False, "handshake refused: " + "; ".join(problems)
            log.warning("prefill pod %s not usable: %s", self.address, self.reason)
            return
        log.info("prefill pod %s ready (id %s)", self.address, response.prefill_id)
        self.usable, self.reason, self.prefill_id = True, "", response.prefill_id
        self.usable_since = time.monotonic()

    def status(self) -> inference_pb2.PeerStatus:
        return inference_pb2.PeerStatus(address=self.address, usable=self.usable, reason=self.reason)


class DecodeService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, config: DecodeConfig, engine: Engine, transfer: TransferEngine, metrics: PodMetrics,
                 on_cache_events=None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.decode_id = uuid.uuid4().hex
        regions = local_regions(engine)
        self.handshake_request = pd_pb2.HandshakeRequest(
            layout=state_layout(engine),
            memory=pd_pb2.MemoryRegions(
                transfer_session=transfer.session_id, kv_base=regions.kv_base, kv_num_pages=regions.kv_num_pages,
                conv_base=regions.conv_base, ssm_base=regions.ssm_base, num_slots=regions.num_slots,
            ),
            decode_id=self.decode_id,
        )
        self.peers = [PrefillPeer(a.strip()) for a in config.prefill_addrs.split(",") if a.strip()]
        self.async_engine = AsyncEngine(
            engine, on_remote_prefill=self._on_remote_prefill if config.remote_prefill else None,
            on_cache_events=on_cache_events,
        )
        self.remote_peer: dict[str, PrefillPeer] = {}  # request id -> pod computing it now
        self.named_prefill: dict[str, str] = {}  # request id -> prefill pod a router chose for it
        self.direct_requests = 0  # Generate calls in flight that no router placed
        self.cancelled: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    async def connect(self) -> None:
        await asyncio.gather(*(p.handshake(self.handshake_request, self.config.rpc_timeout_s) for p in self.peers))

    async def watch_peers(self, interval_s: float = 1.0) -> None:
        """Reconnect pods that were down or refused (restarted, redeployed), off the request path; forget pods
        a router once named that have stayed unreachable (scaled down)."""
        while True:
            await asyncio.sleep(interval_s)  # a polling period, not synchronisation
            now = time.monotonic()
            for peer in [p for p in self.peers if p.named and not p.usable and p.inflight == 0
                         and now - p.usable_since > self.config.forget_peer_s]:
                log.info("forgetting prefill pod %s: %s", peer.address, peer.reason)
                self.peers.remove(peer)
                await peer.channel.close()
            down = [p for p in self.peers if not p.usable]
            await asyncio.gather(*(p.handshake(self.handshake_request, interval_s, wait=True) for p in down))

    # ---- public API ---------------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequestError(request.error)
            prompt = prompt_from_request(request)
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        request_id = request.request_id or uuid.uuid4().hex
        arrival, last_token_at, finished = time.monotonic(), None, False
        named = request.routing.prefill_address
        if named and request_id not in self.named_prefill:
            self.named_prefill[request_id] = named
        direct = not request.routing.router_id  # a router counts its own requests in flight
        self.direct_requests += direct
        try:
            async for out in self.async_engine.generate(prompt, params, request_id):
                now = time.monotonic()
                if out.new_token_ids:
                    if last_token_at is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe((now - last_token_at) / len(out.new_token_ids))
                    last_token_at = now
                finished = out.finished
                yield inference_pb2.GenerateResponse(
                    request_id=request_id, token_ids=out.new_token_ids, text=out.new_text,
                    logprobs=out.new_logprobs or [], finished=out.finished,
                    finish_reason=FINISH_REASONS[out.finish_reason],
                    usage=inference_pb2.Usage(
                        prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                        cached_tokens=out.num_cached_tokens,
                    ),
                )
            self.metrics.requests.labels("finished").inc()
        except InvalidRequestError as err:
            self.metrics.requests.labels("rejected").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except OverloadedError as err:
            self.metrics.requests.labels("overloaded").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except EngineError as err:
            self.metrics.requests.labels("error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        finally:
            self.direct_requests -= direct
            if named and self.named_prefill.get(request_id) == named:
                del self.named_prefill[request_id]
            if not finished:
                self.metrics.requests.labels("cancelled").inc()
                self._cancel_remote(request_id)

    async def Health(self, request, context) -> inference_pb2.HealthResponse:
        # Read on the engine thread, so the answer reflects every command sent before it.
        usage = await asyncio.wrap_future(self.async_engine.call(Engine.resource_usage))
        return inference_pb2.HealthResponse(
            serving=True, role="decode", usage=pool_usage(usage), prefill_peers=[p.status() for p in self.peers]
        )

    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        cfg = self.engine.config
        return inference_pb2.ModelInfoResponse(
            model=cfg.model, family=self.engine.model_config.family, vocab_size=self.engine.model_config.vocab_size,
            max_model_len=self.engine.max_model_len, page_size=cfg.page_size,
        )

    # ---- remote prefill -----------------------------------------------------------------------------
    def _on_remote_prefill(self, task: RemotePrefillTask) -> None:
        """Engine thread: hand the task to the event loop."""
        self.loop.call_soon_threadsafe(self._start_remote, task)

    def _start_remote(self, task: RemotePrefillTask) -> None:
        page = self.engine.config.page_size
        self.metrics.pages_reused.inc(task.num_cached_tokens // page)
        runner = asyncio.ensure_future(self._remote_prefill(task))
        self._tasks.add(runner)
        runner.add_done_callback(self._tasks.discard)

    def _cancel_remote(self, request_id: str) -> None:
        """The client left: ask the pod computing this request to stop (the engine frees the memory once
        the pod's call has ended)."""
        peer = self.remote_peer.get(request_id)
        if peer is None:
            return
        self.cancelled.add(request_id)
        abort = asyncio.ensure_future(self._confirm_abort(peer, request_id))
        self._tasks.add(abort)
        abort.add_done_callback(self._tasks.discard)

    def _pick_peer(self) -> PrefillPeer | None:
        usable = [p for p in self.peers if p.usable]
        return min(usable, key=lambda p: p.inflight) if usable else None

    async def _named_peer(self, address: str) -> PrefillPeer | None:
        """The prefill pod a router named, connected on first use; None if it cannot be used."""
        peer = next((p for p in self.peers if p.address == address), None)
        if peer is None:
            peer = PrefillPeer(address, named=True)
            self.peers.append(peer)
            await peer.handshake(self.handshake_request, self.config.rpc_timeout_s, wait=True)
        return peer if peer.usable else None

    async def _remote_prefill(self, task: RemotePrefillTask) -> None:
        named = self.named_prefill.get(task.request_id)
        for attempt in range(self.config.max_prefill_attempts):
            if task.request_id in self.cancelled:
                break
            # The router's choice first (it knows every prefill pod's cache); then this pod's own.
            peer = (await self._named_peer(named) if named and attempt == 0 else None) or self._pick_peer()
            if peer is None:
                break
            outcome = await self._try_peer(peer, task)
            if outcome == _OK:
                self.metrics.remote_prefills.labels("ok").inc()
                return
            if outcome == _QUARANTINE:
                self.metrics.remote_prefills.labels("quarantined").inc()
                self.cancelled.discard(task.request_id)
                self.async_engine.quarantine_remote_prefill(task.request_id)
                return
            if outcome == _LOCAL:
                break
            self.metrics.remote_prefills.labels("retried").inc()
        self.metrics.remote_prefills.labels("local").inc()
        self.cancelled.discard(task.request_id)
        self.async_engine.fail_remote_prefill(task.request_id)

    async def _try_peer(self, peer: PrefillPeer, task: RemotePrefillTask) -> str:
        request = pd_pb2.PrefillRequest(
            request_id=task.request_id, decode_id=self.decode_id, token_ids=task.token_ids,
            sampling=sampling_to_proto(task.params), num_cached_tokens=task.num_cached_tokens,
            dest_page_ids=task.dest_page_ids, dest_state_slot=task.dest_state_slot,
        )
        peer.inflight += 1
        self.remote_peer[task.request_id] = peer
        try:
            response = await peer.stub.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            log.warning("prefill of %s on %s failed: %s %s", task.request_id, peer.address, code, err.details())
            if code == grpc.StatusCode.FAILED_PRECONDITION:  # refused before writing anything
                await peer.handshake(self.handshake_request, self.config.rpc_timeout_s)
                return _RETRY
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # a bug on one side: another pod would say the same
                return _LOCAL
            if code == grpc.StatusCode.ABORTED:  # stopped on request; it writes nothing more
                return _RETRY
            if code == grpc.StatusCode.DATA_LOSS:  # its write failed: late bytes may still land here
                return _QUARANTINE
            if code == grpc.StatusCode.UNAVAILABLE:
                peer.usable, peer.reason = False, f"unavailable: {err.details()}"
            # Anything else may leave the pod still writing: make sure it stopped before reusing memory.
            return _RETRY if await self._confirm_abort(peer, task.request_id) else _QUARANTINE
        finally:
            peer.inflight -= 1
            self.remote_peer.pop(task.request_id, None)
        self.metrics.pages_transferred.inc(response.pages_transferred)
        logprob = response.first_logprob if response.has_logprob else None
        self.async_engine.complete_remote_prefill(task.request_id, response.first_token, logprob)
        return _OK

    async def _confirm_abort(self, peer: PrefillPeer, request_id: str) -> bool:
        """True once the pod will write nothing more for the request: it confirmed, or it is gone."""
        try:
            await peer.stub.Abort(
                pd_pb2.AbortRequest(request_id=request_id, decode_id=self.decode_id), timeout=self.config.rpc_timeout_s
            )
            return True
        except grpc.aio.AioRpcError as err:
            # Connection refused: the process is gone and cannot write. A timeout proves nothing.
            return err.code() == grpc.StatusCode.UNAVAILABLE


async def serve(config: DecodeConfig) -> None:
    cluster = config.cluster
    publisher = ClusterPublisher(cluster, asyncio.get_running_loop()) if cluster.redis_url else None
    engine = Engine(config.engine, remote_prefill=config.remote_prefill, record_cache_events=publisher is not None)
    transfer = TransferEngine(config.transfer)
    register_memory(engine, transfer)
    metrics = PodMetrics("decode", engine.resource_usage, lambda: engine.cache.stats)
    metrics_port = metrics.serve(config.host, config.metrics_port)
    service = DecodeService(config, engine, transfer, metrics,
                            on_cache_events=publisher.event_log.on_events if publisher else None)
    await service.connect()
    watcher = asyncio.ensure_future(service.watch_peers())
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((inference_handler(service),))
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    if publisher is not None:
        publisher.direct_requests_of = lambda: service.direct_requests
        publisher.start(service.async_engine, worker_record(
            "decode", service.decode_id, advertised_address(cluster, config.host, port),
            cluster.served_model_name or config.engine.model, service.handshake_request.layout.model_id, engine,
            f"{config.host}:{metrics_port}",
            config.engine.remote_prefill_threshold if config.remote_prefill else 0,
        ))
    ready = {"role": "decode", "port": port, "metrics_port": metrics_port, "transfer_session": transfer.session_id,
             "instance_id": service.decode_id}
    print("BATON_READY " + json.dumps(ready), flush=True)
    log.info("decode pod serving on %s:%d (metrics %d), prefill pods: %s", config.host, port, metrics_port,
             [f"{p.address} ({'ok' if p.usable else p.reason})" for p in service.peers])
    try:
        await run_until_signal(server)
    finally:
        if publisher is not None:
            await publisher.stop()
        watcher.cancel()
        service.async_engine.shutdown()
        transfer.close()

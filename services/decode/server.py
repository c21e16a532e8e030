"""The decode pod: serves ``Generate``, decodes in its continuous batch, and sends long prompts to
prefill pods (see DESIGN.md, "Processes").

A request whose uncached prompt is long is admitted by the engine with pages for the whole prompt and a
working slot reserved (REMOTE_PREFILL); this service then asks a prefill pod to compute it and write the
missing pages, the final GDN state and the state at the prompt's resume boundary into those reservations.
One attempt per admission: when it fails, the engine takes the request back (WAITING) and admits it again,
for another attempt on a prefill pod or, after ``max_prefill_attempts`` or a bug on either side, for a
local prefill.

The reserved memory is reused only once the prefill pod can no longer write into it: it answered, it
failed saying it stopped (ABORTED, refused), or it answered an ``Abort``. Anything else (its write failed,
its call timed out, it became unreachable) quarantines the memory under that pod's process id; it comes
back when that process answers an ``Abort`` for the request, or when the pod is found restarted (a
handshake returns a new id), checked every ``peer_check_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from services.cluster.publisher import ClusterPublisher, advertised_address, worker_record
from services.common.grpc_util import (
    FINISH_REASONS,
    CallOutcome,
    add_servicer,
    pool_usage,
    prompt_from_request,
    sampling_from_proto,
    sampling_to_proto,
)
from services.common.health import LifecycleGate, add_health_and_reflection, start_health_port
from services.common.lifecycle import Lifecycle, ServingState
from services.common.metrics import PodMetrics
from services.common.pod_config import PodConfig
from services.common.protos import inference_pb2, inference_pb2_grpc, pd_pb2, pd_pb2_grpc
from services.common.serving import Streams, load_while_listening, serve_until_stopped, stop_on_signals
from services.common.tls import InternalTLSConfig, bind, channel
from services.engine.async_engine import AsyncEngine, EngineDeadError, EngineError, RemotePrefillTask
from services.engine.engine import Engine
from services.engine.request import InvalidRequestError, OverloadedError
from services.transfer.engine import TransferEngine
from services.transfer.handover import layout_mismatches, load_pod_engines, local_regions, state_layout

log = logging.getLogger("baton.decode")

# Outcomes of one attempt on one prefill pod.
_OK, _RETRY, _LOCAL, _QUARANTINE = "ok", "retry", "local", "quarantine"
# Engine commands a test can make fail (``fault_engine_error``), by the Engine method that handles them.
_FAULT_COMMANDS = {"abort": "abort_request", "remote_done": "complete_remote_prefill"}


# One INFO line per answered Prefill call (loadtest.bench_pd_gpu parses it for the TTFT split).
HANDOVER_LOG = ("remote prefill %s: %d tokens (%d cached here) from %s: call %.4f s = compute %.4f s + "
                "transfer %.4f s (%d bytes, %d pages) + rest")


@dataclass(frozen=True)
class DecodeConfig(PodConfig):
    prefill_addrs: str = field(default="", metadata={"help": "prefill pods, comma-separated host:port"})
    prefill_timeout_s: float = field(default=120.0, metadata={"help": "deadline of one Prefill call"})
    rpc_timeout_s: float = field(default=5.0, metadata={"help": "deadline of Handshake and Abort calls"})
    max_prefill_attempts: int = field(default=2, metadata={"help": "prefill pods tried before prefilling locally"})
    forget_peer_s: float = field(
        default=60.0, metadata={"help": "a prefill pod named by a router and unreachable this long is forgotten"}
    )
    peer_check_interval_s: float = field(
        default=1.0, metadata={"help": "how often unusable prefill pods and quarantined memory are checked again"}
    )
    fault_engine_error: str = field(
        default="", metadata={"help": "fault testing only: the engine thread raises on this command (abort, "
                                      "remote_done)"}
    )

    @property
    def remote_prefill(self) -> bool:
        """Prefill pods may be used: listed, or named per request by a router (registered in a cluster)."""
        return bool(self.prefill_addrs.strip() or self.cluster.redis_url)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prefill_attempts < 1:
            raise ValueError(f"max_prefill_attempts must be >= 1, got {self.max_prefill_attempts}")
        for name in ("prefill_timeout_s", "rpc_timeout_s", "peer_check_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.fault_engine_error not in ("", *_FAULT_COMMANDS):
            raise ValueError(f"fault_engine_error must be one of {sorted(_FAULT_COMMANDS)}, got "
                             f"{self.fault_engine_error!r}")


class PrefillPeer:
    """One prefill pod: its channel, and whether its handshake accepted our layout. ``named`` peers were
    introduced by a router's request rather than configured."""

    def __init__(self, address: str, named: bool = False, tls: InternalTLSConfig | None = None) -> None:
        self.address = address
        self.named = named
        self.channel = channel(address, tls or InternalTLSConfig())  # reconnects quickly after a pod restarts
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
        problems = layout_mismatches(request.layout, response.layout, ("decode", "prefill"))
        if problems:
            self.usable, self.reason = False, "handshake refused: " + "; ".join(problems)
            log.warning("prefill pod %s not usable: %s", self.address, self.reason)
            return
        log.info("prefill pod %s ready (id %s)", self.address, response.prefill_id)
        self.usable, self.reason, self.prefill_id = True, "", response.prefill_id
        self.usable_since = time.monotonic()

    def status(self) -> inference_pb2.PeerStatus:
        return inference_pb2.PeerStatus(address=self.address, usable=self.usable, reason=self.reason)


@dataclass
class _RemotePrefill:
    """One request's remote prefill, across its attempts (one per admission)."""

    attempts: int = 0
    peer: PrefillPeer | None = None  # the pod computing the current attempt
    call_id: str = ""  # the current attempt's id on that pod (a fresh one per attempt)


@dataclass(frozen=True)
class _QuarantinedCall:
    peer: PrefillPeer
    writer: str  # the pod's process id when the call was made
    request_id: str  # the engine's
    call_id: str  # the pod's


class DecodeService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, config: DecodeConfig, engine: Engine, transfer: TransferEngine, metrics: PodMetrics,
        fatal: asyncio.Event | None = None, on_cache_events=None,
    ) -> None:
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
        self.peers = [PrefillPeer(a.strip(), tls=config.internal_tls) for a in config.prefill_addrs.split(",")
                      if a.strip()]
        if config.fault_engine_error:
            _inject_engine_fault(engine, config.fault_engine_error)
        on_fatal = (lambda _: self.loop.call_soon_threadsafe(fatal.set)) if fatal is not None else None
        self.async_engine = AsyncEngine(
            engine, on_remote_prefill=self._on_remote_prefill if config.remote_prefill else None, on_fatal=on_fatal,
            on_cache_events=on_cache_events,
        )
        # All three hold entries only for live requests or outstanding quarantine: they stay bounded.
        self.live: set[str] = set()  # engine request ids whose client stream is open
        self.remote: dict[str, _RemotePrefill] = {}  # engine request id -> its remote prefill
        self.quarantined: dict[str, _QuarantinedCall] = {}  # by call id
        self.named_prefill: dict[str, str] = {}  # engine request id -> prefill pod a router chose for it
        self.direct_requests = 0  # Generate calls in flight that no router placed
        self.streams = Streams()  # Generate calls in flight, which a drain lets finish
        self.lifecycle: Lifecycle | None = None  # set by ``serve``: Health reports it
        self._tasks: set[asyncio.Task] = set()

    async def connect(self) -> None:
        await asyncio.gather(*(p.handshake(self.handshake_request, self.config.rpc_timeout_s) for p in self.peers))

    async def watch_peers(self) -> None:
        """Off the request path: reconnect pods that were down or refused (restarted, redeployed), give back
        quarantined memory whose writer confirmed it stopped or restarted, and forget pods a router once named
        that have stayed unreachable (scaled down) and hold none of our quarantined memory."""
        interval = self.config.peer_check_interval_s
        while True:
            await asyncio.sleep(interval)  # a polling period, not synchronisation
            now = time.monotonic()
            owing = {call.peer for call in self.quarantined.values()}
            for peer in [p for p in self.peers if p.named and not p.usable and p.inflight == 0 and p not in owing
                         and now - p.usable_since > self.config.forget_peer_s]:
                log.info("forgetting prefill pod %s: %s", peer.address, peer.reason)
                self.peers.remove(peer)
                await peer.channel.close()
            down = [p for p in self.peers if not p.usable]
            await asyncio.gather(*(p.handshake(self.handshake_request, interval, wait=True) for p in down))
            await asyncio.gather(*(self._check_quarantined(call) for call in list(self.quarantined.values())))

    async def _check_quarantined(self, call: _QuarantinedCall) -> None:
        peer = call.peer
        if not peer.usable:  # wait until it answers a handshake again
            return
        if peer.prefill_id != call.writer:
            reason = f"restarted (now {peer.prefill_id})"
        elif await self._confirm_stopped(peer, call.call_id):
            reason = "confirmed it stopped"
        else:
            return
        if self.quarantined.pop(call.call_id, None) is not None:
            log.info("prefill pod %s %s: reclaiming the memory of %s", peer.address, reason, call.call_id)
            self.async_engine.reclaim_quarantined(call.call_id)

    # ---- public API ---------------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        arrival = time.monotonic()
        # Counted once, when the stream ends, before the caller can see it end (see CallOutcome); a stream that
        # ends any other way (the caller cancelled, its deadline passed) stays "cancelled".
        call = CallOutcome(self.metrics.requests)
        try:
            try:
                prompt = prompt_from_request(request)
                params = sampling_from_proto(request.sampling)
            except InvalidRequestError as err:
                await call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err), "invalid")
            # aclosing: a caller that leaves ends the engine's stream now, not when the generator is collected.
            async with contextlib.aclosing(self._generate(request, prompt, params, arrival)) as responses:
                async for response in responses:
                    if response.finished:  # before the last yield: the caller may stop right there
                        call.count("finished")
                    yield response
        except InvalidRequestError as err:
            await call.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err), "invalid")
        except OverloadedError as err:
            await call.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), "overloaded")
        except EngineDeadError as err:
            await call.abort(context, grpc.StatusCode.UNAVAILABLE, f"the decode pod stopped serving: {err}", "error")
        except EngineError as err:
            await call.abort(context, grpc.StatusCode.INTERNAL, str(err), "error")
        except grpc.aio.AbortError:
            raise  # the validation's abort above: counted there
        except Exception:
            call.count("error")  # a bug: gRPC answers UNKNOWN
            raise
        finally:
            call.count("cancelled")

    async def _generate(self, request: inference_pb2.GenerateRequest, prompt, params, arrival: float):
        """The engine's stream as responses, with its latency and token metrics."""
        metrics = self.metrics
        # The engine's id is unique even when a client reuses its request id: two requests never share a
        # stream, a remote prefill or an abort.
        request_id = request.request_id or uuid.uuid4().hex
        engine_id = f"{request.request_id}.{uuid.uuid4().hex[:12]}" if request.request_id else request_id
        first_token_at = last_token_at = None
        num_tokens, finished, queue_seen = 0, False, False
        self.live.add(engine_id)
        self.streams.enter()
        named = request.routing.prefill_address
        if named:
            self.named_prefill[engine_id] = named
        direct = not request.routing.router_id  # a router counts its own requests in flight
        self.direct_requests += direct
        try:
            async for out in self.async_engine.generate(prompt, params, engine_id):
                now = time.monotonic()
                if not queue_seen and out.queue_time is not None:
                    queue_seen = True
                    metrics.queue_time.observe(out.queue_time)
                if out.new_token_ids:
                    if first_token_at is None:
                        first_token_at = now
                        metrics.ttft.observe(now - arrival)
                        metrics.prompt_tokens.inc(out.num_prompt_tokens)
                    else:
                        metrics.itl.observe((now - last_token_at) / len(out.new_token_ids))
                    last_token_at = now
                    num_tokens += len(out.new_token_ids)
                    metrics.generation_tokens.inc(len(out.new_token_ids))
                finished = out.finished
                if finished:
                    metrics.e2e.observe(now - arrival)
                    if num_tokens >= 2 and last_token_at > first_token_at:
                        metrics.decode_speed.observe((num_tokens - 1) / (last_token_at - first_token_at))
                yield inference_pb2.GenerateResponse(
                    request_id=request_id, token_ids=out.new_token_ids, text=out.new_text,
                    logprobs=out.new_logprobs or [], finished=out.finished,
                    finish_reason=FINISH_REASONS[out.finish_reason],
                    usage=inference_pb2.Usage(
                        prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                        cached_tokens=out.num_cached_tokens,
                    ),
                )
        finally:
            self.direct_requests -= direct
            self.named_prefill.pop(engine_id, None)
            self.live.discard(engine_id)
            self.streams.exit()
            self._stream_ended(engine_id, finished)

    async def Health(self, request, context) -> inference_pb2.HealthResponse:
        peers = [p.status() for p in self.peers]
        if self.async_engine.dead is not None:
            return inference_pb2.HealthResponse(serving=False, role="decode", prefill_peers=peers)
        # Read on the engine thread, so the answer reflects every command sent before it.
        usage = await asyncio.wrap_future(self.async_engine.call(Engine.resource_usage))
        # Not serving while draining: the same answer as grpc.health.v1 (services/common/health.py).
        serving = self.lifecycle is None or self.lifecycle.accepting
        return inference_pb2.HealthResponse(serving=serving, role="decode", usage=pool_usage(usage),
                                            prefill_peers=peers)

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
        self._spawn(self._remote_attempt(task))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stream_ended(self, request_id: str, finished: bool) -> None:
        """The client's stream is over. If the client left while a prefill pod computes the request, ask
        that pod to stop (the engine frees the memory once the pod's call has ended)."""
        record = self.remote.get(request_id)
        if record is None:
            return
        if record.peer is None:  # between attempts: nothing to stop, nothing more will be sent
            del self.remote[request_id]
        elif not finished:
            self._spawn(self._confirm_stopped(record.peer, record.call_id))

    def _pick_peer(self) -> PrefillPeer | None:
        usable = [p for p in self.peers if p.usable]
        return min(usable, key=lambda p: p.inflight) if usable else None

    async def _named_peer(self, address: str) -> PrefillPeer | None:
        """The prefill pod a router named, connected on first use; None if it cannot be used."""
        peer = next((p for p in self.peers if p.address == address), None)
        if peer is None:
            peer = PrefillPeer(address, named=True, tls=self.config.internal_tls)
            self.peers.append(peer)
            await peer.handshake(self.handshake_request, self.config.rpc_timeout_s, wait=True)
        return peer if peer.usable else None

    async def _remote_attempt(self, task: RemotePrefillTask) -> None:
        request_id = task.request_id
        record = self.remote.setdefault(request_id, _RemotePrefill())
        peer = None
        if request_id in self.live:
            # The router's choice first (it knows every prefill pod's cache); then this pod's own.
            named = self.named_prefill.get(request_id) if record.attempts == 0 else None
            peer = (await self._named_peer(named) if named else None) or self._pick_peer()
        if peer is None:  # the client left before it was sent, or no pod to send it to: nothing was written
            self.metrics.remote_prefills.labels("local" if request_id in self.live else "cancelled").inc()
            self._settle(request_id, None, prefill_locally=True)
            return
        record.attempts += 1
        record.peer, record.call_id, writer = peer, f"{request_id}.{record.attempts}", peer.prefill_id
        try:
            outcome = await self._try_peer(peer, task, record.call_id)
        finally:
            record.peer = None
        if outcome == _OK:
            self.metrics.remote_prefills.labels("ok").inc()
            self.remote.pop(request_id, None)
            return
        if outcome == _QUARANTINE:
            self.metrics.remote_prefill_quarantines.inc()
            self.quarantined[record.call_id] = _QuarantinedCall(peer, writer, request_id, record.call_id)
        again = outcome != _LOCAL and record.attempts < self.config.max_prefill_attempts and request_id in self.live
        self.metrics.remote_prefills.labels(
            "retried" if again else "local" if request_id in self.live else "cancelled"
        ).inc()
        self._settle(request_id, record.call_id if outcome == _QUARANTINE else None, prefill_locally=not again)

    def _settle(self, request_id: str, quarantine_key: str | None, prefill_locally: bool) -> None:
        """The attempt failed: the engine frees (``quarantine_key`` None) or quarantines the memory and admits
        the request again (another attempt unless ``prefill_locally``), or drops it if the client left."""
        if prefill_locally or request_id not in self.live:
            self.remote.pop(request_id, None)
        self.async_engine.fail_remote_prefill(request_id, quarantine_key, prefill_locally)

    async def _try_peer(self, peer: PrefillPeer, task: RemotePrefillTask, call_id: str) -> str:
        request = pd_pb2.PrefillRequest(
            request_id=call_id, decode_id=self.decode_id, token_ids=task.token_ids,
            sampling=sampling_to_proto(task.params), num_cached_tokens=task.num_cached_tokens,
            dest_page_ids=task.dest_page_ids, dest_state_slot=task.dest_state_slot,
        )
        if task.dest_checkpoint_slot is not None:
            request.dest_checkpoint_slot = task.dest_checkpoint_slot
        peer.inflight += 1
        sent = time.monotonic()
        try:
            response = await peer.stub.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            log.warning("prefill of %s on %s failed: %s %s", call_id, peer.address, code, err.details())
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
            return _RETRY if await self._confirm_stopped(peer, call_id) else _QUARANTINE
        finally:
            peer.inflight -= 1
        # Answered: everything is written. A first token outside the vocabulary is a bug on its side.
        vocab = self.engine.model_config.vocab_size
        if not 0 <= response.first_token < vocab:
            log.error("prefill pod %s answered %s with first token %d, outside [0, %d): prefilling locally",
                      peer.address, call_id, response.first_token, vocab)
            return _LOCAL
        call = time.monotonic() - sent
        self.metrics.remote_prefill_seconds.observe(call)
        # One line per hand-over, for a TTFT split (loadtest.bench_pd_gpu parses it): the call's time here,
        # and the prefill pod's own compute and write times within it (the rest is gRPC and scheduling).
        log.info(HANDOVER_LOG, call_id, len(task.token_ids), task.num_cached_tokens, peer.address, call,
                 response.compute_seconds, response.transfer_seconds, response.bytes_transferred,
                 response.pages_transferred)
        logprob = response.first_logprob if response.has_logprob else None
        self.async_engine.complete_remote_prefill(
            task.request_id, response.first_token, logprob,
            response.checkpoint_written and task.dest_checkpoint_slot is not None,
        )
        return _OK

    async def _confirm_stopped(self, peer: PrefillPeer, call_id: str) -> bool:
        """True once the pod promised to write nothing more for the call (it answered an Abort). A timeout
        or an unreachable pod proves nothing: a partitioned or stopped process may still write later."""
        try:
            await peer.stub.Abort(
                pd_pb2.AbortRequest(request_id=call_id, decode_id=self.decode_id), timeout=self.config.rpc_timeout_s
            )
            return True
        except grpc.aio.AioRpcError as err:
            log.warning("prefill pod %s did not confirm it stopped %s: %s", peer.address, call_id, err.code())
            return False


def _inject_engine_fault(engine: Engine, command: str) -> None:
    """Fault testing only: the engine raises while handling ``command``, as a bug there would."""
    name = _FAULT_COMMANDS[command]

    def fail(*args, **kwargs):
        raise RuntimeError(f"fault testing: injected error in Engine.{name}")

    setattr(engine, name, fail)


async def serve(config: DecodeConfig) -> int:
    """Returns the process's exit status: non-zero when the engine died.

    The gRPC port listens before the model loads: health checks answer NOT_SERVING (not "connection refused")
    while it loads, and ``baton.v1.Inference`` calls are refused with UNAVAILABLE until it serves."""
    cluster = config.cluster
    lifecycle = Lifecycle("decode pod")
    stop = stop_on_signals(lifecycle)
    api = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    server = grpc.aio.server(interceptors=[LifecycleGate(lifecycle, [api], [f"/{api.full_name}/Generate"])])
    health = add_health_and_reflection(server, lifecycle, [api])
    port = bind(server, f"{config.host}:{config.port}", config.internal_tls)
    await server.start()
    health_server, health_port = await start_health_port(config.host, config.health_port, health)
    print("BATON_LISTENING " + json.dumps({"role": "decode", "port": port, "health_port": health_port}), flush=True)
    publisher = ClusterPublisher(cluster, asyncio.get_running_loop()) if cluster.redis_url else None

    def load() -> tuple[Engine, TransferEngine]:
        return load_pod_engines(config.engine, config.transfer, publisher is not None,
                                remote_prefill=config.remote_prefill)

    loaded = await load_while_listening(load, lifecycle, stop, [server, health_server], lambda pair: pair[1].close())
    if loaded is None:  # a signal while loading
        return 0
    engine, transfer = loaded
    metrics = PodMetrics("decode", engine)
    metrics_port = metrics.serve(config.host, config.metrics_port)
    fatal = asyncio.Event()
    service = DecodeService(config, engine, transfer, metrics, fatal,
                            on_cache_events=publisher.event_log.on_events if publisher else None)
    service.lifecycle = lifecycle
    health.ready = lambda: service.async_engine.dead is None
    await service.connect()
    watcher = asyncio.ensure_future(service.watch_peers())
    add_servicer(server, api, service)
    lifecycle.to(ServingState.SERVING)
    if publisher is not None:
        publisher.direct_requests_of = lambda: service.direct_requests
        publisher.start(service.async_engine, worker_record(
            "decode", service.decode_id, advertised_address(cluster, config.host, port),
            cluster.served_model_name or config.engine.model, service.handshake_request.layout.model_id, engine,
            f"{config.host}:{metrics_port}",
            config.engine.remote_prefill_threshold if config.remote_prefill else 0,
        ))
    ready = {"role": "decode", "port": port, "metrics_port": metrics_port, "transfer_session": transfer.session_id,
             "instance_id": service.decode_id, "health_port": health_port}
    print("BATON_READY " + json.dumps(ready), flush=True)
    log.info("decode pod serving on %s:%d (metrics %d%s), prefill pods: %s", config.host, port, metrics_port,
             ", TLS" if config.internal_tls.serves_tls else "",
             [f"{p.address} ({'ok' if p.usable else p.reason})" for p in service.peers])

    async def drain() -> None:
        if publisher is not None:  # routers stop placing requests here at their next poll
            await publisher.stop()
        if service.streams.count:
            log.info("draining %d streams (up to %.0fs)", service.streams.count, config.drain_grace_s)
        if not await service.streams.wait_idle(config.drain_grace_s):
            log.warning("%d streams still running after %.0fs: stopping them", service.streams.count,
                        config.drain_grace_s)

    try:
        failed = await serve_until_stopped(server, lifecycle, stop, fatal, drain)
    finally:
        if health_server is not None:
            await health_server.stop(0)
        if publisher is not None:
            await publisher.stop()
        watcher.cancel()
        if service.async_engine.dead is None:
            service.async_engine.shutdown()
        transfer.close()
    if failed:
        log.critical("stopping: %s", service.async_engine.dead)
    return 1 if failed else 0

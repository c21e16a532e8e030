"""The router: the one address clients use. It serves ``baton.v1.Inference`` (streaming Generate, Health,
ModelInfo) as a proxy in front of the decode pods.

Per request: validate and tokenize (engines receive token ids), hash the prompt's pages, ask the index how much
of it each worker can reuse, choose a decode pod and (for prompts it will send away) a prefill pod, forward the
request to the decode pod with the prefill pod named in ``routing``, and relay the stream.

Failures: a decode pod that refuses (full) or cannot be reached before the first token is replaced by the next
choice; one that dies mid-stream is replaced too, with the prompt plus the tokens already sent as the new
prompt, so the client's stream continues with nothing lost or repeated (greedy output is unchanged by this).
When every pod is full the router answers RESOURCE_EXHAUSTED at once, with a retry hint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.common.grpc_util import add_servicer, prompt_from_request, sampling_from_proto
from services.common.health import LifecycleGate, add_health_and_reflection, start_health_port
from services.common.lifecycle import Lifecycle, ServingState
from services.common.page_hash import SCHEME, extend_page_hashes, page_hashes
from services.common.protos import inference_pb2, inference_pb2_grpc
from services.common.serving import Streams, cancel_tasks, serve_until_stopped, stop_on_signals
from services.common.tls import channel as channel_to
from services.engine.presets import PRESETS, model_config_for
from services.engine.request import InvalidRequestError
from services.engine.tokenizer import TextStream, load_tokenizer
from services.gateway.auth import ApiKeys, GrpcKeyInterceptor, grpc_server_credentials

from .config import RouterConfig
from .index import CacheIndex
from .metrics import RouterMetrics
from .policy import Choice, Placer, Policy, Workers
from .sessions import SessionTable
from .sync import ClusterSync
from .workers import Worker, WorkerTable

log = logging.getLogger("baton.router")

# Work that would hold the event loop (and every other stream) for milliseconds goes to a thread.
_OFFLOAD_TOKENS = 4096
_OFFLOAD_CHARS = 16384
# A pod failing with one of these mid-stream is taken for dead: the stream continues elsewhere.
_POD_FAILED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
               grpc.StatusCode.CANCELLED}


# A refused or failed request's outcome in the metrics, by its status (anything else: "error").
_OUTCOME_OF_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.OUT_OF_RANGE: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid", grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _PodFailed(Exception):
    def __init__(self, worker: Worker, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{worker.record.address}: {code.name} {details}")
        self.worker = worker
        self.code = code


@dataclass
class Placement:
    decode: Worker
    prefill: Worker | None
    choice: Choice
    policy: str
    available_tokens: int  # best usable hit on any worker


class RouterError(Exception):
    """A request the router cannot serve: the status to answer with (gRPC code; the HTTP gateway maps it)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # set with RESOURCE_EXHAUSTED: when trying again may succeed

    @property
    def outcome(self) -> str:
        """The request metrics' outcome (services/router/metrics.py)."""
        return _OUTCOME_OF_STATUS.get(self.code, "error")


@dataclass
class RouteRequest:
    """One request as the router serves it, from the gRPC API or the HTTP gateway: a tokenized prompt and the
    client's sampling settings (validated by ``generate``)."""

    prompt: list[int]
    sampling: inference_pb2.SamplingParams
    session_id: str = ""
    request_id: str = ""
    served_by: str = ""  # the decode pod that served it (the last one, after a failover); set by ``generate``
    arrival: float = field(default_factory=time.monotonic)  # when the router received it (for latencies)


@dataclass
class _Stream:
    """What the client has been sent so far (to continue it on another pod), and its text."""

    prompt: list[int]
    max_tokens: int
    text: TextStream  # detokenization and stop strings: the pods stream token ids only
    stop_ids: frozenset[int]  # a last token in these ends the stream without text (EOS, stop_token_ids)
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int | None = None
    first_decode: Worker | None = None


class RouterService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, config: RouterConfig, table: WorkerTable, sync: ClusterSync, metrics: RouterMetrics,
                 lifecycle: Lifecycle | None = None) -> None:
        self.config = config
        self.table = table
        self.index = table.index
        self.sync = sync
        self.metrics = metrics
        dummy = config.model.partition(":")[0] in PRESETS
        self.model_config = model_config_for(config.model, dummy=dummy)
        self.tokenizer = load_tokenizer(config.tokenizer, config.model, self.model_config.vocab_size,
                                        self.model_config.eos_token_ids)
        self.placer = Placer(Policy(config.policy), config.weights)
        self.sessions = SessionTable(config.session_ttl_s)  # this replica's view of live conversations
        self._channels: dict[str, grpc.aio.Channel] = {}
        if lifecycle is None:  # used without a server (benchmarks): serving from the start
            lifecycle = Lifecycle("router")
            lifecycle.to(ServingState.SERVING)
        self.lifecycle = lifecycle
        self.streams = Streams()  # requests in flight (gRPC and HTTP), which a drain lets finish

    # ---- public API ---------------------------------------------------------------------------------
    async def Generate(self, request, context):
        arrival = time.monotonic()
        try:
            prompt = await self.prompt_ids(request)
        except InvalidRequestError as err:
            self.metrics.requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        route = RouteRequest(prompt, request.sampling, request.session_id, request.request_id, arrival=arrival)

        async def placed(address: str) -> None:  # which pod serves it, for clients and operators
            await context.send_initial_metadata((("baton-decode-pod", address),))

        try:
            async for response in self.generate(route, on_placed=placed):
                yield response
            context.set_trailing_metadata((("baton-decode-pod", route.served_by),))  # the last pod
        except RouterError as err:
            if err.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_s * 1000))),))
            await context.abort(err.code, err.message)

    async def generate(self, route: RouteRequest, on_placed=None) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Place the request, relay its stream (moving it to another pod if one fails), and yield the client's view
        of it: tokens, text, usage. Raises RouterError when it cannot be served, UNAVAILABLE once the router drains.
        ``on_placed(address)`` is awaited once the first decode pod is chosen. Leaving the iteration early (the
        client left) cancels the pod's call, which frees the request there. Counted once in the request metrics,
        when it ends, and among the streams a drain waits for while it runs."""
        metrics = self.metrics
        if not self.lifecycle.accepting:
            metrics.requests.labels("unavailable").inc()
            raise RouterError(grpc.StatusCode.UNAVAILABLE, self.lifecycle.refusal())
        outcome = "cancelled"  # unless it ends otherwise: the client left (the generator was closed or cancelled)
        first_token = True
        self.streams.enter()
        metrics.in_flight.inc()
        try:
            # aclosing: a client that leaves cancels the pod's call now, not when the generator is collected.
            async with aclosing(self._generate(route, on_placed)) as responses:
                async for response in responses:
                    if response.token_ids:
                        metrics.generation_tokens.inc(len(response.token_ids))
                        if first_token:
                            first_token = False
                            metrics.ttft.observe(time.monotonic() - route.arrival)
                    if response.finished:  # counted before the last yield: a consumer may stop right there
                        outcome = "finished"
                        metrics.e2e.observe(time.monotonic() - route.arrival)
                    yield response
                    if response.finished:
                        return
        except RouterError as err:
            outcome = err.outcome
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(outcome).inc()
            self.streams.exit()

    async def _generate(self, route: RouteRequest, on_placed) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            params = sampling_from_proto(route.sampling)
            self.check_prompt(route.prompt)
            limit = self.max_model_len()
            if limit and len(route.prompt) + params.max_tokens > limit:  # no pod could take it: refuse it here
                raise InvalidRequestError(
                    f"prompt ({len(route.prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum "
                    f"context of {limit} tokens"
                )
        except InvalidRequestError as err:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        prompt = route.prompt
        request_id = route.request_id or uuid.uuid4().hex
        page = self.config.page_size
        hashes = (await asyncio.to_thread(page_hashes, prompt, page) if len(prompt) > _OFFLOAD_TOKENS
                  else page_hashes(prompt, page))
        eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
        stream = _Stream(prompt, params.max_tokens, TextStream(self.tokenizer, prompt, params.stop),
                         frozenset(params.stop_token_ids) | frozenset(eos))
        excluded: set[str] = set()
        try:
            for _attempt in range(self.config.max_attempts):
                current = prompt + stream.tokens
                if stream.tokens:
                    hashes = extend_page_hashes(list(hashes), current, page)
                try:
                    placement = self._place(current, hashes, route.session_id, excluded)
                except _Refusal as refusal:
                    if refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        hint = self.config.retry_after_s
                        raise RouterError(refusal.code, f"{refusal}; retry after {hint:g} s", hint) from None
                    raise RouterError(refusal.code, str(refusal)) from None
                # In flight from the moment of the choice, not from the pod call: requests placed while this one
                # awaits (metadata, the channel) must see it, or several pile onto one pod that was free.
                self.table.started(placement.decode)
                try:
                    sampling = inference_pb2.SamplingParams()
                    sampling.CopyFrom(route.sampling)
                    del sampling.stop[:]  # the router finds stop strings in the text it makes
                    sampling.skip_detokenize = True
                    sampling.max_tokens = stream.max_tokens - len(stream.tokens)
                    pod_request = inference_pb2.GenerateRequest(
                        request_id=request_id, token_ids=inference_pb2.TokenIds(ids=current), sampling=sampling,
                        session_id=route.session_id,
                        routing=inference_pb2.RoutingHints(
                            prefill_address=placement.prefill.record.address if placement.prefill else "",
                            router_id=self.sync.router_id,
                        ),
                    )
                    if stream.first_decode is None and on_placed is not None:
                        await on_placed(placement.decode.record.address)
                    try:
                        async for response in self._relay(placement, pod_request, stream):
                            if response.finished:
                                route.served_by = placement.decode.record.address
                            yield response
                            if response.finished:
                                return
                        raise _PodFailed(placement.decode, grpc.StatusCode.UNAVAILABLE, "stream ended unfinished")
                    except _PodFailed as failure:
                        stage = "mid_stream" if stream.tokens else "before_first_token"
                        log.warning("request %s: decode pod %s (%s); moving it to another pod", request_id, failure,
                                    stage)
                        self.metrics.failovers.labels(stage).inc()
                        self.table.failed(failure.worker, time.monotonic() + self.config.unavailable_s)
                        excluded.add(failure.worker.name)
                finally:
                    self.table.ended(placement.decode)
                    # Answered, failed or abandoned: the conversation's silence counts from now (sessions.py).
                    self.sessions.answered(route.session_id, time.monotonic())
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              f"no decode pod completed the request after {self.config.max_attempts} attempts")
        except grpc.aio.AioRpcError as err:  # the pod refused the request itself (bad for this model, ...)
            raise RouterError(err.code(), err.details() or "") from err

    async def Health(self, request, context) -> inference_pb2.HealthResponse:
        now = time.monotonic()
        eligible = {w.name for role in ("decode", "prefill") for w in self.table.eligible(role, now)}
        workers = []
        for worker in sorted(self.table.workers.values(), key=lambda w: w.name):
            digest = self.index.digest(worker.name)
            workers.append(inference_pb2.WorkerStatus(
                instance_id=worker.name, role=worker.record.role, address=worker.record.address,
                eligible=worker.name in eligible, feed_state=worker.feed.state.value,
                applied_seq=worker.feed.applied_seq, reported_seq=worker.record.event_seq,
                index_pages=digest.pages, index_states=digest.states, index_page_digest=digest.page_sum,
                index_state_digest=digest.state_sum, active=worker.active, resyncs=worker.feed.resyncs,
            ))
        return inference_pb2.HealthResponse(serving=self.serving(), role="router", workers=workers,
                                            redis_up=self.sync.up)

    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        return inference_pb2.ModelInfoResponse(
            model=self.config.model_name, family=self.model_config.family, vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len(), page_size=self.config.page_size,
        )

    def serving(self) -> bool:
        """Not draining, and a decode pod that is not draining is registered. Pods that are full or just failed a
        call still count: a full cluster answers RESOURCE_EXHAUSTED (429), and a readiness probe that followed load
        would take every router out of service at peak. The gRPC health service, this router's Health and its
        HTTP /health all answer this."""
        return self.lifecycle.accepting and any(not w.record.draining for w in self.table.by_role("decode"))

    def max_model_len(self) -> int:
        """The longest prompt + output every decode pod accepts (0 while none is known)."""
        return min((w.record.max_model_len for w in self.table.by_role("decode")), default=0)

    # ---- request path -------------------------------------------------------------------------------
    async def prompt_ids(self, request: inference_pb2.GenerateRequest) -> list[int]:
        prompt = prompt_from_request(request)
        return await self.encode(prompt) if isinstance(prompt, str) else prompt

    async def encode(self, text: str) -> list[int]:
        """Tokenize off the event loop when the text is long (the tokenizer releases the GIL while it works),
        so a long prompt does not hold up other streams."""
        encode = self.tokenizer.encode
        return await asyncio.to_thread(encode, text) if len(text) > _OFFLOAD_CHARS else encode(text)

    def check_prompt(self, ids: list[int]) -> None:
        """Raises InvalidRequestError for an empty prompt or ids outside the vocabulary."""
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {vocab}): {bad[:8]}")

    def _place(self, prompt: list[int], hashes: list[int], session_id: str, excluded: set[str]) -> Placement:
        started = time.perf_counter()
        now = time.monotonic()
        decodes = self.table.arrays["decode"]
        eligible = decodes.eligible(now, excluded)
        if not eligible.any():
            known = [w for w in decodes.workers if w.name not in excluded]
            if known and all(w.full for w in known):
                raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"all {len(known)} decode pods are at capacity (running + waiting)")
            raise _Refusal(grpc.StatusCode.UNAVAILABLE,
                           f"no decode pod serving {self.config.model_name!r} is available")
        policy = self.placer.policy
        cache_known = self.sync.up
        self.sessions.expire(now)
        page = self.config.page_size
        cap = (len(prompt) - 1) // page  # the last token is always computed: its logits are needed
        if cache_known:
            slots, pages = self.index.usable(hashes)
            pages = np.minimum(pages, cap) * page
        else:
            slots = pages = np.zeros(0, dtype=np.int64)

        def scored(arrays, mask) -> Workers:
            return Workers(arrays.names, arrays.address_keys, arrays.active, arrays.queued_tokens,
                           arrays.hits(slots, pages), mask)

        size = len(decodes.names)
        candidates = dataclasses.replace(
            scored(decodes, eligible), sessions=self.sessions.counts(decodes.slot, size, session_id),
            session_tokens=self.sessions.tokens(decodes.slot, size, session_id), cache_tokens=decodes.cache_tokens,
        )
        if policy is Policy.CACHE_AWARE and not cache_known:
            choice = self.placer.least_load(candidates, "redis_down")
        else:
            choice = self.placer.choose_among(candidates, len(prompt), session_id)
        decode = decodes.workers[choice.index]
        self.sessions.placed(session_id, decode.name, now, len(prompt))
        prefill = None
        prefills = self.table.arrays["prefill"]
        p_eligible = prefills.eligible(now, fingerprint=decode.record.fingerprint)
        if p_eligible.any():
            p_candidates = scored(prefills, p_eligible)
            if policy is Policy.CACHE_AWARE and cache_known:
                p_choice = self.placer.choose_among(p_candidates, len(prompt), policy=Policy.CACHE_AWARE)
            else:
                p_choice = self.placer.least_load(p_candidates, "least_load")
            prefill = prefills.workers[p_choice.index]
        self.metrics.placement_seconds.observe(time.perf_counter() - started)
        self.metrics.decisions.labels(policy.value, choice.reason).inc()
        return Placement(decode, prefill, choice, policy.value, int(pages.max(initial=0)))

    def _stub(self, address: str) -> inference_pb2_grpc.InferenceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = channel_to(address, self.config.internal_tls)
        return inference_pb2_grpc.InferenceStub(channel)

    async def _relay(self, placement: Placement, pod_request, stream: _Stream):
        """Forward to the placed decode pod and yield the client's view of its responses: token ids from the
        pod, text made here (cut at a stop string, which ends the stream and the pod's call). Raises _PodFailed if
        the pod refused, could not be reached or died; other errors of the pod (AioRpcError) go to the client as
        they are."""
        worker = placement.decode
        if stream.first_decode is None:
            self.metrics.prompt_tokens.inc(len(stream.prompt))
            self.metrics.hit_tokens.labels("available").inc(placement.available_tokens)
            self.metrics.hit_tokens.labels("chosen").inc(placement.choice.hit_tokens)
            stream.first_decode = worker
        call = self._stub(worker.record.address).Generate(pod_request)
        try:
            async for response in call:
                if stream.cached_tokens is None:
                    stream.cached_tokens = response.usage.cached_tokens
                    self.metrics.hit_tokens.labels("delivered").inc(stream.cached_tokens)
                tokens, logprobs = list(response.token_ids), list(response.logprobs)
                finished, reason = response.finished, response.finish_reason
                # A stop token (EOS, stop_token_ids) ends the stream with no text, as in the engine.
                ends_on_stop_id = (finished and reason == inference_pb2.FINISH_REASON_STOP and tokens
                                   and tokens[-1] in stream.stop_ids)
                taken = stream.text.num_tokens
                text = stream.text.add(tokens[:-1] if ends_on_stop_id else tokens)
                if stream.text.stopped:  # a stop string: drop what the pod generated past it
                    taken = stream.text.num_tokens - taken
                    tokens, logprobs = tokens[:taken], logprobs[:taken]
                    finished, reason = True, inference_pb2.FINISH_REASON_STOP
                elif finished:
                    text += stream.text.finish()
                    if stream.text.stopped:
                        reason = inference_pb2.FINISH_REASON_STOP
                stream.tokens.extend(tokens)
                yield inference_pb2.GenerateResponse(
                    request_id=pod_request.request_id, token_ids=tokens, text=text, logprobs=logprobs,
                    finished=finished, finish_reason=reason,
                    usage=inference_pb2.Usage(
                        prompt_tokens=len(stream.prompt), completion_tokens=len(stream.tokens),
                        cached_tokens=stream.cached_tokens,
                    ),
                )
                if finished:
                    return
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in _POD_FAILED or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and not stream.tokens):
                raise _PodFailed(worker, code, err.details() or "") from err
            raise
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def state(self) -> dict:
        """For the metrics' gauges."""
        now = time.monotonic()
        eligible = {w.name for role in ("decode", "prefill") for w in self.table.eligible(role, now)}
        workers = self.table.workers.values()
        counts = Counter((w.record.role, "true" if w.name in eligible else "false") for w in workers)
        feeds = Counter((w.record.role, w.feed.state.value) for w in workers)
        return {"redis_up": self.sync.up, "workers": dict(counts), "feeds": dict(feeds),
                "index_pages": self.index.num_pages, "index_entries": self.index.num_page_entries}


async def _watch_loop_lag(metrics: RouterMetrics, period_s: float = 0.01) -> None:
    """How late the loop runs a timer: the delay every stream relayed by this router sees at that moment."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)  # a sampling period, not synchronisation
        metrics.loop_lag.observe(max(0.0, loop.time() - due))


async def serve(config: RouterConfig) -> int:
    """Returns the process's exit status. The gRPC port listens first (health NOT_SERVING while the tokenizer
    loads and the registry is read for the first time)."""
    router_id = uuid.uuid4().hex
    lifecycle = Lifecycle("router")
    stop = stop_on_signals(lifecycle)
    api = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    keys = ApiKeys(config.gateway.load_api_keys())
    # The router's Generate refusal while draining is in RouterService.generate (it serves HTTP too).
    interceptors = [GrpcKeyInterceptor(keys)] if keys.required else []
    server = grpc.aio.server(interceptors=[*interceptors, LifecycleGate(lifecycle, [api], ())])
    health = add_health_and_reflection(server, lifecycle, [api])
    address = f"{config.host}:{config.port}"
    credentials = grpc_server_credentials(config.gateway)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    health_server, health_port = await start_health_port(config.host, config.health_port, health)
    print("BATON_LISTENING " + json.dumps({"role": "router", "port": port, "health_port": health_port}), flush=True)
    index = CacheIndex()
    table = WorkerTable(index, config.model_name, SCHEME, config.page_size, config.heartbeat_ttl_s,
                        config.snapshot_retry_s)
    holder: dict[str, RouterService] = {}
    metrics = RouterMetrics(lambda: holder["service"].state())
    sync = ClusterSync(config.redis_url, config.redis_namespace, router_id, table, config.poll_interval_s,
                       config.heartbeat_ttl_s, on_batches=metrics.events.inc)
    service = holder["service"] = RouterService(config, table, sync, metrics, lifecycle)
    health.ready = service.serving
    metrics_port = metrics.serve(config.host, config.metrics_port)
    sync.start()
    lag_monitor = asyncio.ensure_future(_watch_loop_lag(metrics))
    await sync.wait_first_poll(timeout=5.0)
    add_servicer(server, api, service)
    gateway = None
    http_port = -1
    if config.gateway.http_port >= 0:
        from services.gateway.server import OpenAIGateway  # aiohttp is only needed with the HTTP API

        gateway = OpenAIGateway(service, config.gateway, keys)
        http_port = await gateway.start(config.host, config.gateway.http_port)
    if stop.is_set():  # a signal while starting: nothing to drain
        lifecycle.to(ServingState.STOPPED, "signal while starting")
    else:
        lifecycle.to(ServingState.SERVING)
        ready = {"role": "router", "port": port, "http_port": http_port, "metrics_port": metrics_port,
                 "router_id": router_id, "tls": config.gateway.tls, "api_keys": keys.required,
                 "health_port": health_port}
        print("BATON_READY " + json.dumps(ready), flush=True)
        log.info("router %s serving gRPC on %s:%d, HTTP on %s, metrics %d%s%s; policy %s, Redis %s (%s), workers: "
                 "%s", router_id, config.host, port, http_port if gateway else "-", metrics_port,
                 ", TLS" if config.gateway.tls else "", ", API keys" if keys.required else "", config.policy,
                 config.redis_url, "up" if sync.up else "down",
                 sorted(f"{w.record.role}@{w.record.address}" for w in table.workers.values()))

    async def drain() -> None:
        # The router stays in Redis while it drains: its in-flight counts there are still real load on the pods,
        # and it keeps reading the registry (a stream whose pod dies mid-drain fails over). It leaves at the end.
        if service.streams.count:
            log.info("draining %d streams (up to %.0fs)", service.streams.count, config.drain_grace_s)
        if not await service.streams.wait_idle(config.drain_grace_s):
            log.warning("%d streams still running after %.0fs: stopping them", service.streams.count,
                        config.drain_grace_s)

    try:
        if lifecycle.state is ServingState.SERVING:
            await serve_until_stopped(server, lifecycle, stop, drain=drain)
        else:
            await server.stop(0)
    finally:
        if health_server is not None:
            await health_server.stop(0)
        if gateway is not None:
            await gateway.stop()
        await cancel_tasks([lag_monitor])
        await sync.stop()
        await service.close()
    return 0

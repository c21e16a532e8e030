"""The standard gRPC health service (``grpc.health.v1.Health``) and server reflection on every Baton process,
and the gate that refuses calls the lifecycle does not allow now.

Health statuses are computed from the process's ``Lifecycle`` at the moment they are asked for (not stored
and pushed), so they always agree with the process's own ``Health`` RPC and with what it does with a request:

- ``""`` (the whole server) and each served API (``baton.v1.Inference``, ``baton.v1.Prefill``): SERVING only
  while the lifecycle is SERVING (and, for a router, ``ready()``: it knows a decode pod); NOT_SERVING while
  loading, draining, stopped or failed. Kubernetes' readiness probe.
- ``liveness``: SERVING unless FAILED (loading and draining are alive: a liveness probe must not restart a pod
  that is loading its weights or finishing its streams). Kubernetes' liveness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .lifecycle import Lifecycle, ServingState

LIVENESS = "liveness"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
# Open without an API key: probes carry none, and the statuses say nothing about any request.
HEALTH_METHODS = frozenset({f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"})

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    """``ready``: an extra condition for SERVING besides the lifecycle (the router: a decode pod is known). It may
    change without a lifecycle transition, so watchers re-evaluate every ``refresh_s`` as well."""

    def __init__(self, lifecycle: Lifecycle, services: Iterable[str], ready: Callable[[], bool] | None = None,
                 refresh_s: float = 1.0) -> None:
        self.lifecycle = lifecycle
        self.services = frozenset(services)
        self.ready = ready
        self.refresh_s = refresh_s
        # Replaced and set on every lifecycle transition: a watcher takes the current one before it reads the
        # status, so a transition between its read and its wait still wakes it.
        self._changed = asyncio.Event()
        lifecycle.add_listener(self._on_transition)

    def _on_transition(self, _state) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self, service: str) -> int | None:
        """The status of ``service``; None for a name this server does not know."""
        if service == LIVENESS:
            return _SERVING if self.lifecycle.alive else _NOT_SERVING
        if service != "" and service not in self.services:
            return None
        ready = self.lifecycle.accepting and (self.ready is None or self.ready())
        return _SERVING if ready else _NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        """The status now, then each change (an unknown name is SERVICE_UNKNOWN, as the protocol says)."""
        last = None
        while True:
            changed = self._changed
            status = self.status(request.service)
            status = _UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            # Woken by a transition; the timeout is the period at which ``ready`` is looked at again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.refresh_s)


def add_health_and_reflection(server: grpc.aio.Server, lifecycle: Lifecycle, services: list[ServiceDescriptor],
                              ready: Callable[[], bool] | None = None) -> HealthService:
    """Register ``grpc.health.v1.Health`` and server reflection (v1alpha, what grpcurl and most generic clients
    speak) for ``services`` (the Baton APIs this server serves) on ``server``."""
    names = [s.full_name for s in services]
    health = HealthService(lifecycle, names, ready)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    return health


class LifecycleGate(grpc.aio.ServerInterceptor):
    """Refuses, with UNAVAILABLE and a message saying why, calls the lifecycle does not allow now: every call to
    ``services`` while loading (the handlers are registered once the model is loaded), and calls that start new
    work (``new_work``: full method names, e.g. ``/baton.v1.Inference/Generate``) unless SERVING. The rest (Health,
    ModelInfo, a prefill pod's Abort) keep answering while draining. Health and reflection are never gated."""

    def __init__(self, lifecycle: Lifecycle, services: list[ServiceDescriptor], new_work: Iterable[str]) -> None:
        self.lifecycle = lifecycle
        self.new_work = frozenset(new_work)
        # full method name -> whether it streams (a refusal must be a handler of the same kind)
        self.streaming = {f"/{s.full_name}/{m.name}": m.server_streaming for s in services for m in s.methods}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        streaming = self.streaming.get(method)
        if streaming is None:  # health, reflection, or a method that does not exist
            return await continuation(handler_call_details)
        loading = self.lifecycle.state is ServingState.LOADING
        if loading or (method in self.new_work and not self.lifecycle.accepting):
            return _refuse(streaming, self.lifecycle.refusal())
        return await continuation(handler_call_details)


def _refuse(streaming: bool, message: str) -> grpc.RpcMethodHandler:
    # The request is not deserialised: nothing of a refused call is parsed.
    if streaming:
        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
            yield  # pragma: no cover  (makes this an async generator, as a server-streaming handler is)

        return grpc.unary_stream_rpc_method_handler(refuse_stream)

    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    return grpc.unary_unary_rpc_method_handler(refuse_unary)


async def start_health_port(host: str, port: int, health: HealthService) -> tuple[grpc.aio.Server | None, int]:
    """A plaintext port serving only ``grpc.health.v1`` (``port`` -1: none). Kubernetes' native gRPC probes present
    no client certificate, so a pod whose gRPC port requires one (internal mutual TLS) is probed here instead;
    the statuses say nothing about any request. Returns the server (to stop it) and the bound port (-1: none)."""
    if port < 0:
        return None, -1
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound

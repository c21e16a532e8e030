"""The serving lifecycle and what the outside sees of it, in one process on a real gRPC server (no model): the
standard health service's statuses (Check and Watch) in every state, the gate refusing calls while loading and new
work while draining, illegal transitions refused, and the internal TLS settings checked."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_util import add_servicer
from services.common.health import LIVENESS, LifecycleGate, add_health_and_reflection
from services.common.lifecycle import IllegalLifecycleTransition, Lifecycle, ServingState
from services.common.protos import inference_pb2, inference_pb2_grpc
from services.common.serving import Streams
from services.common.tls import InternalTLSConfig
from services.gateway.auth import ApiKeys, GrpcKeyInterceptor

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
API = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
NAMED = API.full_name  # baton.v1.Inference


class _Echo(inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(token_ids=[7], finished=True)

    async def Health(self, request, context):
        return inference_pb2.HealthResponse(serving=True)

    async def ModelInfo(self, request, context):
        return inference_pb2.ModelInfoResponse(model="echo")


def test_transitions_are_checked():
    life = Lifecycle("pod")
    seen = []
    life.add_listener(seen.append)
    with pytest.raises(IllegalLifecycleTransition):
        life.to(ServingState.DRAINING)  # draining what was never served
    life.to(ServingState.SERVING)
    with pytest.raises(IllegalLifecycleTransition):
        life.to(ServingState.STOPPED)  # stopping without draining
    life.to(ServingState.DRAINING)
    life.fail("engine died")
    assert life.state is ServingState.FAILED and not life.alive and life.terminal
    life.fail("again")  # nothing left to fail: a no-op, not an error
    with pytest.raises(IllegalLifecycleTransition):
        life.to(ServingState.SERVING)
    assert seen == [ServingState.SERVING, ServingState.DRAINING, ServingState.FAILED]


def test_health_gate_and_watch_follow_the_lifecycle():
    async def scenario() -> None:
        life = Lifecycle("decode pod")
        server = grpc.aio.server(interceptors=[LifecycleGate(life, [API], [f"/{NAMED}/Generate"])])
        health_service = add_health_and_reflection(server, life, [API])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        api = inference_pb2_grpc.InferenceStub(channel)

        async def statuses() -> tuple[int, int, int]:
            return tuple([(await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                          for name in ("", NAMED, LIVENESS)])

        async def generate_refusal() -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in api.Generate(inference_pb2.GenerateRequest()):
                    pass
            return err.value

        try:
            watch = health.Watch(health_pb2.HealthCheckRequest(service=NAMED))
            assert (await watch.read()).status == NOT_SERVING
            # Loading: listening, not ready, alive; every API call refused (the handlers are not there yet).
            assert await statuses() == (NOT_SERVING, NOT_SERVING, SERVING)
            err = await generate_refusal()
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
            with pytest.raises(grpc.aio.AioRpcError) as info_err:
                await api.ModelInfo(inference_pb2.ModelInfoRequest())
            assert info_err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            add_servicer(server, API, _Echo())  # loaded: as a pod registers its service after loading
            life.to(ServingState.SERVING)
            assert (await watch.read()).status == SERVING  # woken by the transition, not a poll
            assert await statuses() == (SERVING, SERVING, SERVING)
            assert [r.token_ids for r in [r async for r in api.Generate(inference_pb2.GenerateRequest())]] == [[7]]

            # A readiness condition besides the lifecycle (the router: a decode pod is known).
            health_service.ready = lambda: False
            assert await statuses() == (NOT_SERVING, NOT_SERVING, SERVING)
            health_service.ready = None

            life.to(ServingState.DRAINING)
            assert (await watch.read()).status == NOT_SERVING
            assert await statuses() == (NOT_SERVING, NOT_SERVING, SERVING)  # alive: no restart mid-drain
            err = await generate_refusal()
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
            # Calls that start no new work still answer while draining.
            assert (await api.ModelInfo(inference_pb2.ModelInfoRequest())).model == "echo"

            life.fail("the engine thread died")
            assert await statuses() == (NOT_SERVING, NOT_SERVING, NOT_SERVING)
            err = await generate_refusal()
            assert "failed" in err.details()
            watch.cancel()
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_streams_wait_idle():
    async def scenario() -> None:
        streams = Streams()
        assert await streams.wait_idle(0.0)
        streams.enter()
        streams.enter()
        assert not await streams.wait_idle(0.01)
        waiter = asyncio.ensure_future(streams.wait_idle(30))
        streams.exit()
        await asyncio.wait([waiter], timeout=0.05)  # one stream is still in flight: it must still wait
        assert not waiter.done()
        streams.exit()
        assert await waiter

    asyncio.run(scenario())


def test_internal_tls_settings_are_checked(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        InternalTLSConfig(cert_file=str(cert))
    with pytest.raises(ValueError, match="require_client_cert"):
        InternalTLSConfig(cert_file=str(cert), key_file=str(cert), require_client_cert=True)
    with pytest.raises(ValueError, match="no such file"):
        InternalTLSConfig(ca_file=str(tmp_path / "missing.pem"))
    config = InternalTLSConfig(ca_file=str(cert))
    assert config.calls_tls and not config.serves_tls


def test_with_api_keys_health_is_open_and_reflection_needs_the_key():
    """Probes carry no key; reflection describes the API and is keyed like it (grpcurl sends its -H headers with
    reflection requests too)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def scenario() -> None:
        life = Lifecycle("router")
        server = grpc.aio.server(interceptors=[GrpcKeyInterceptor(ApiKeys(frozenset({"k1"}))),
                                               LifecycleGate(life, [API], ())])
        add_health_and_reflection(server, life, [API])
        add_servicer(server, API, _Echo())
        life.to(ServingState.SERVING)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=NAMED))
            assert status.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in reflect.ServerReflectionInfo(iter([ask])):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answers = [a async for a in reflect.ServerReflectionInfo(iter([ask]),
                                                                     metadata=(("authorization", "Bearer k1"),))]
            names = {s.name for s in answers[0].list_services_response.service}
            assert names == {NAMED, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_router_readiness_needs_a_decode_pod_not_spare_capacity():
    """A router is ready while a decode pod (not draining) is registered, full or not: a full cluster answers
    RESOURCE_EXHAUSTED, and a readiness that followed load would take every router out of service at peak."""
    import dataclasses
    from types import SimpleNamespace

    from services.cluster.schema import WorkerRecord
    from services.common.page_hash import SCHEME
    from services.router.config import RouterConfig
    from services.router.index import CacheIndex
    from services.router.metrics import RouterMetrics
    from services.router.server import RouterService
    from services.router.workers import WorkerTable

    config = RouterConfig()
    table = WorkerTable(CacheIndex(), config.model_name, SCHEME, config.page_size, 3.0)
    life = Lifecycle("router")
    router = RouterService(config, table, SimpleNamespace(up=True, router_id="r"), RouterMetrics(lambda: {}), life)
    life.to(ServingState.SERVING)
    assert not router.serving()  # no decode pod
    record = WorkerRecord("d1", "decode", "127.0.0.1:1", config.model_name, "fp", SCHEME, config.page_size,
                          max_running=1, max_waiting=0, max_model_len=64, pages_total=8, slots_total=1,
                          remote_prefill_threshold=0, metrics_address="", started_at=0.0, direct_requests=1)
    table.update([record], now=0.0)
    assert router.serving() and not table.eligible("decode", 0.0)  # full, still ready
    table.update([dataclasses.replace(record, draining=True)], now=0.0)
    assert not router.serving()
    table.update([record], now=0.0)
    life.to(ServingState.DRAINING)
    assert not router.serving()

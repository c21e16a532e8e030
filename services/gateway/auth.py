"""Who may call the public endpoints: API keys as ``Authorization: Bearer <key>`` (an HTTP header, or the same
gRPC metadata), and TLS server credentials from PEM files. A call without a valid key is refused before anything
of it is parsed or placed (HTTP 401, gRPC UNAUTHENTICATED). Health checks stay open (load balancers and
orchestrators probe them without keys); they carry no request data."""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

import grpc

from .config import GatewayConfig

# gRPC methods open without a key (the HTTP gateway's /health and /metrics are open too): Baton's Health and
# the standard grpc.health.v1 Check/Watch that Kubernetes probes call. Reflection needs the key like the API.
OPEN_GRPC_METHODS = frozenset({"/baton.v1.Inference/Health", "/grpc.health.v1.Health/Check",
                               "/grpc.health.v1.Health/Watch"})


class ApiKeys:
    """The accepted keys; an empty set means no key is needed."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """``authorization``: the header's value (``Bearer <key>``)."""
        if not self._keys:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        given = key.strip().encode()
        # Compare with every key, in constant time each: how long a refusal takes says nothing about the keys.
        return any([hmac.compare_digest(given, k) for k in self._keys])  # noqa: C419 (no short-circuit on purpose)


class GrpcKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key with UNAUTHENTICATED, before the handler sees the request."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self._keys.allows(metadata.get("authorization")):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or invalid API key: send 'authorization: Bearer <key>' metadata"

    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a server-streaming handler is)

    async def refuse_bidi(request_iterator, context):  # server reflection streams both ways
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    # Requests are not deserialised: nothing of a refused call is parsed.
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(refuse_bidi, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, response_serializer=handler.response_serializer)


def grpc_server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())]
    )


def http_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context

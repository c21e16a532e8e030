"""Conversions between the protobuf messages and the engine's types, and servicer registration, shared by the
pods."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from services.common.protos import inference_pb2
from services.engine.request import FinishReason, InvalidRequestError, SamplingParams

_OPTIONAL_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

FINISH_REASONS = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


class CallOutcome:
    """One call's outcome in a requests counter, counted once, and before the caller can see the call end: grpc's
    ``abort`` sends the status before it raises, so a count taken after it (in a ``finally``) could come after a
    client had already read the metrics (tests/test_pd_cluster.py saw it)."""

    def __init__(self, counter, outcome_of_status: dict[grpc.StatusCode, str] | None = None) -> None:
        self._counter = counter
        self._outcome_of_status = outcome_of_status or {}
        self._counted = False

    def count(self, outcome: str) -> None:
        """Count ``outcome`` unless the call is counted already."""
        if not self._counted:
            self._counted = True
            self._counter.labels(outcome).inc()

    async def abort(self, context, code: grpc.StatusCode, details: str, outcome: str | None = None) -> None:
        """Count (``outcome``, else the one ``code`` maps to, else "error"), then ``context.abort``, which raises."""
        self.count(outcome or self._outcome_of_status.get(code, "error"))
        await context.abort(code, details)


def sampling_from_proto(msg: inference_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError naming the bad field."""
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_FLOATS if msg.HasField(name)}
    if msg.HasField("max_tokens"):
        kwargs["max_tokens"] = msg.max_tokens
    if msg.HasField("top_k"):
        kwargs["top_k"] = msg.top_k
    if msg.HasField("seed"):
        kwargs["seed"] = msg.seed
    return SamplingParams(
        stop_token_ids=tuple(msg.stop_token_ids), stop=tuple(msg.stop), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs, detokenize=not msg.skip_detokenize, **kwargs,
    )


def sampling_to_proto(params: SamplingParams) -> inference_pb2.SamplingParams:
    msg = inference_pb2.SamplingParams(
        max_tokens=params.max_tokens, top_k=params.top_k, stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        skip_detokenize=not params.detokenize,
        **{name: getattr(params, name) for name in _OPTIONAL_FLOATS},
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def prompt_from_request(request: inference_pb2.GenerateRequest) -> str | list[int]:
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return list(request.token_ids.ids)
    raise InvalidRequestError("request has no prompt: set text or token_ids")


def pool_usage(usage: dict[str, int]) -> inference_pb2.PoolUsage:
    return inference_pb2.PoolUsage(**{k: usage[k] for k in inference_pb2.PoolUsage.DESCRIPTOR.fields_by_name})


# ---- servicers -----------------------------------------------------------------------------------------
class MalformedRequest:
    """A request whose bytes do not parse (e.g. invalid UTF-8 in a proto3 string field)."""

    def __init__(self, message_name: str, error: str) -> None:
        self.message_name = message_name
        self.error = error

    def __str__(self) -> str:
        return f"malformed {self.message_name}: {self.error}"


def _lenient_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as err:
            return MalformedRequest(message_cls.DESCRIPTOR.full_name, str(err))

    return parse


def _refusing_malformed(method, streaming: bool):
    if streaming:
        async def stream_handler(request, context):
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
            async for response in method(request, context):
                yield response

        return stream_handler

    async def unary_handler(request, context):
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await method(request, context)

    return unary_handler


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer) -> None:
    """What the generated ``add_<Service>Servicer_to_server`` does, except for requests that do not parse:
    with the generated deserializers they fail before any handler runs, and the client gets UNKNOWN with no
    word on why; here the handler's caller answers INVALID_ARGUMENT naming the parse error, and the service
    goes on serving the others. Unary-unary and unary-stream methods (all Baton has)."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}.{method.name}: client streaming is not supported here")
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing_malformed(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=_lenient_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)

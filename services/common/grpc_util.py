"""Conversions between the protobuf messages and the engine's types, shared by the pods."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from services.common.protos import inference_pb2
from services.engine.request import FinishReason, InvalidRequestError, SamplingParams

_OPTIONAL_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

FINISH_REASONS = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


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


class MalformedRequest:
    """A request whose bytes did not parse (e.g. a ``string`` field that is not valid UTF-8): the handler
    answers INVALID_ARGUMENT with ``error`` instead of gRPC failing the call as UNKNOWN before it runs."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return MalformedRequest(f"malformed {message_type.DESCRIPTOR.name} ({err}); text must be valid UTF-8")

    return parse


def inference_handler(servicer) -> grpc.GenericRpcHandler:
    """``baton.v1.Inference`` served by ``servicer`` with requests parsed leniently (see MalformedRequest)."""
    msgs = inference_pb2
    methods = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(msgs.GenerateRequest),
            response_serializer=msgs.GenerateResponse.SerializeToString,
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=_lenient(msgs.HealthRequest),
            response_serializer=msgs.HealthResponse.SerializeToString,
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=_lenient(msgs.ModelInfoRequest),
            response_serializer=msgs.ModelInfoResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler("baton.v1.Inference", methods)

"""OpenAI's HTTP API as Baton speaks it: request bodies of ``/v1/completions`` and ``/v1/chat/completions``
checked field by field and mapped to Baton's sampling settings, and the response, chunk, usage and error objects
built as OpenAI's clients read them. No I/O here: the server (``server.py``) does the serving.

Mapped: temperature, top_p, top_k, min_p, seed, stop, max_tokens / max_completion_tokens, presence_penalty,
frequency_penalty, repetition_penalty, logprobs (the chosen token's log-probability), stop_token_ids, ignore_eos,
stream and stream_options.include_usage; ``return_token_ids`` (as vLLM) adds each choice's token ids;
``session_id`` (or ``user``) keys the router's ``session`` policy. Refused with a 400 naming the field: what Baton
cannot do faithfully (n > 1, best_of > 1, echo, suffix, logit_bias, top-k alternatives of logprobs, structured
output, forced tool calls). Unknown fields are ignored, as OpenAI's own server does with extensions of others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.protos import inference_pb2

# gRPC status of a router refusal -> HTTP status, OpenAI error type and code.
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
_MAX_UINT32 = 2**32 - 1


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> ApiError:
        status, type_, err_code = _HTTP.get(code, (500, "server_error", None))
        return cls(status, message, type_, code=err_code, retry_after_s=retry_after_s)


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass
class ParsedRequest:
    """A completion or chat request, checked: what the server needs to build the prompt and serve it."""

    chat: bool
    model: str
    sampling: inference_pb2.SamplingParams
    max_tokens_set: bool
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    return_token_ids: bool = False
    session_id: str = ""
    prompt_text: str | None = None  # completions: a text prompt ...
    prompt_ids: list[int] | None = None  # ... or token ids
    messages: list[dict] = field(default_factory=list)  # chat
    tools: list[dict] | None = None
    add_generation_prompt: bool = True
    template_kwargs: dict = field(default_factory=dict)


# ---- field checks ---------------------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_field(name, f"must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_field(name, f"must be in [{lo}, {hi}], got {value}")
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field(name, f"must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_field(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_field(name, f"must be true or false, got {value!r}")
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_field(name, "must be a list of integer token ids")
    if any(not 0 <= t <= _MAX_UINT32 for t in value):
        raise bad_field(name, "token ids must be non-negative")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_field("stop", "must be a string or a list of strings")
    if any(not s for s in stops):
        raise bad_field("stop", "stop strings must be non-empty")
    return stops


def _refuse_unsupported(body: dict) -> None:
    n = _integer(body, "n", lo=1)
    if n not in (None, 1):
        raise bad_field("n", "only n = 1 is supported (send several requests; they share the cached prompt)")
    best_of = _integer(body, "best_of", lo=1)
    if best_of not in (None, 1):
        raise bad_field("best_of", "only best_of = 1 is supported")
    if body.get("echo"):
        raise bad_field("echo", "echo is not supported")
    if body.get("suffix"):
        raise bad_field("suffix", "suffix (insertion) is not supported")
    if body.get("logit_bias"):
        raise bad_field("logit_bias", "logit_bias is not supported")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_field("response_format", "structured output is not supported (only {'type': 'text'})")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise bad_field("tool_choice", "only 'auto' and 'none' are supported (tool calls come back as text)")


def _sampling(body: dict, chat: bool) -> tuple[inference_pb2.SamplingParams, bool, bool]:
    """The sampling settings, whether max_tokens was given, and whether logprobs were asked for."""
    sampling = inference_pb2.SamplingParams()
    max_tokens = _integer(body, "max_completion_tokens", lo=1, hi=_MAX_UINT32) if chat else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", lo=1, hi=_MAX_UINT32)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for name, lo, hi in (("temperature", 0, None), ("top_p", None, None), ("min_p", 0, 1),
                         ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2), ("repetition_penalty", None, None)):
        value = _number(body, name, lo, hi)
        if value is not None:
            setattr(sampling, name, value)
    if (top_p := body.get("top_p")) is not None and not 0 < top_p <= 1:
        raise bad_field("top_p", f"must be in (0, 1], got {top_p}")
    if (penalty := body.get("repetition_penalty")) is not None and penalty <= 0:
        raise bad_field("repetition_penalty", f"must be > 0, got {penalty}")
    top_k = _integer(body, "top_k", lo=-1, hi=_MAX_UINT32)
    if top_k is not None:
        sampling.top_k = max(top_k, 0)  # -1 (vLLM's "off") is 0 here
    seed = _integer(body, "seed", lo=0, hi=2**64 - 1)
    if seed is not None:
        sampling.seed = seed
    sampling.stop.extend(_stop(body))
    if body.get("stop_token_ids") is not None:
        sampling.stop_token_ids.extend(_token_ids(body["stop_token_ids"], "stop_token_ids"))
    sampling.ignore_eos = _boolean(body, "ignore_eos")
    if chat:
        logprobs = _boolean(body, "logprobs")
        if _integer(body, "top_logprobs", lo=0, hi=20):
            raise bad_field("top_logprobs", "alternatives are not reported: only each chosen token's logprob")
    else:
        n = _integer(body, "logprobs", lo=0, hi=5)
        if n:
            raise bad_field("logprobs", "alternatives are not reported: logprobs = 0 gives each chosen token's")
        logprobs = n is not None
    sampling.logprobs = logprobs
    return sampling, max_tokens is not None, logprobs


def _common(body: Any, served_model: str, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise bad_field("model", "must be a string")
    if model != served_model:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    sampling, max_tokens_set, logprobs = _sampling(body, chat)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad_field("stream_options", "must be an object, and only with stream = true")
    include_usage = _boolean(options or {}, "include_usage")
    session = body.get("session_id", body.get("user", ""))
    if not isinstance(session, str):
        raise bad_field("session_id", "must be a string")
    return ParsedRequest(chat=chat, model=model, sampling=sampling, max_tokens_set=max_tokens_set, stream=stream,
                         include_usage=include_usage, logprobs=logprobs,
                         return_token_ids=_boolean(body, "return_token_ids"), session_id=session)


def parse_completion(body: Any, served_model: str) -> ParsedRequest:
    parsed = _common(body, served_model, chat=False)
    if not parsed.max_tokens_set:
        parsed.sampling.max_tokens = 16  # OpenAI's documented default for completions
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed.prompt_text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        parsed.prompt_ids = _token_ids(prompt, "prompt")
    elif isinstance(prompt, list):
        raise bad_field("prompt", "batches of several prompts are not supported: send one request per prompt")
    else:
        raise bad_field("prompt", "must be a string or a list of token ids")
    return parsed


def _message_text(content: Any, where: str) -> str | None:
    """A message's content as the template sees it: a string, or text parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_field(where, "only text content parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_field(where, "content must be a string or a list of text parts")


def parse_chat(body: Any, served_model: str) -> ParsedRequest:
    parsed = _common(body, served_model, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "must be a non-empty list of messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_field(where, "must be an object with a string 'role'")
        parsed.messages.append({**message, "content": _message_text(message.get("content"), f"{where}.content")})
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise bad_field("tools", "must be a list of tool objects")
    parsed.tools = tools if body.get("tool_choice") != "none" else None
    parsed.add_generation_prompt = _boolean(body, "add_generation_prompt", default=True)
    if body.get("continue_final_message"):
        raise bad_field("continue_final_message", "not supported")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad_field("chat_template_kwargs", "must be an object")
    parsed.template_kwargs = kwargs
    return parsed


# ---- responses ------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class ResponseBuilder:
    """The objects of one response, in the shape of its endpoint (``text_completion`` or ``chat.completion``)."""

    def __init__(self, parsed: ParsedRequest, request_id: str, token_text) -> None:
        self.parsed = parsed
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self._token_text = token_text  # token id -> its text alone (for logprobs)
        self._text_offset = 0

    def _logprobs(self, token_ids: list[int], logprobs: list[float], text: str) -> dict | None:
        if not self.parsed.logprobs:
            return None
        tokens = [self._token_text(t) for t in token_ids]
        if self.parsed.chat:
            return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                                for tok, lp in zip(tokens, logprobs, strict=False)]}
        offsets = []
        for tok in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def _choice(self, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str | None,
                chunk: bool, first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.parsed.chat:
            if chunk:
                choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(token_ids, logprobs, text)
        choice["finish_reason"] = finish_reason
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def _object(self, chunk: bool) -> str:
        if self.parsed.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def chunk(self, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str | None,
              first: bool = False) -> dict:
        obj = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.parsed.model,
               "choices": [self._choice(text, token_ids, logprobs, finish_reason, chunk=True, first=first)]}
        if self.parsed.include_usage:
            obj["usage"] = None  # as OpenAI: every chunk has the key; only the last one fills it
        return obj

    def usage_chunk(self, usage_obj: dict) -> dict:
        return {"id": self.id, "object": self._object(True), "created": self.created, "model": self.parsed.model,
                "choices": [], "usage": usage_obj}

    def complete(self, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str,
                 usage_obj: dict) -> dict:
        return {"id": self.id, "object": self._object(False), "created": self.created, "model": self.parsed.model,
                "choices": [self._choice(text, token_ids, logprobs, finish_reason, chunk=False)], "usage": usage_obj}

"""Streaming clients the runner drives: Baton's gRPC API (``baton.v1.Inference``) and any OpenAI-compatible HTTP
server (``/v1/completions`` with ``stream=true`` and ``stream_options.include_usage``), so the same run can be
pointed at a peer (vLLM, SGLang, ...).

Both yield ``Chunk``s (new tokens, usage, finish) and raise ``RequestError`` whose ``kind`` names the failure
as the caller counts it: ``grpc:RESOURCE_EXHAUSTED``, ``http:429``, ``http:stream_error``, ``connection``,
``timeout``. Building requests and reading responses are plain functions, testable without a server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

Prompt = list[int] | str


class RequestError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not say


@dataclass
class Chunk:
    num_tokens: int  # new tokens in this chunk
    token_ids: list[int] | None = None  # None when the server sent only text
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # greedy: runs against two servers ask for the same work
    ignore_eos: bool = True  # answers as long as the workload says
    extra: dict = field(default_factory=dict)  # more fields for the HTTP body (server-specific knobs)


class Client(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def model_info(self) -> dict: ...
    def stream(self, prompt: Prompt, max_tokens: int, request_id: str, session_id: str = "") -> AsyncIterator[Chunk]:
        """``session_id`` names the conversation (routers keep a conversation's turns together)."""
        ...


# ---- Baton gRPC ---------------------------------------------------------------------------------------------

_FINISH = {0: None, 1: "stop", 2: "length", 3: "abort"}
_MAX_MESSAGE = 256 << 20  # prompts of 128K+ tokens as text or ids


def generate_request(prompt: Prompt, max_tokens: int, request_id: str, sampling: Sampling, session_id: str = ""):
    from services.common.protos import inference_pb2

    params = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature,
                                          ignore_eos=sampling.ignore_eos)
    if isinstance(prompt, str):
        return inference_pb2.GenerateRequest(request_id=request_id, text=prompt, sampling=params,
                                             session_id=session_id)
    return inference_pb2.GenerateRequest(request_id=request_id, token_ids=inference_pb2.TokenIds(ids=prompt),
                                         sampling=params, session_id=session_id)


def chunk_from_response(response) -> Chunk:
    usage = None
    if response.HasField("usage"):
        u = response.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    ids = list(response.token_ids)
    return Chunk(len(ids), ids, response.text, response.finished, _FINISH.get(response.finish_reason), usage)


class GrpcClient:
    """Streams from ``baton.v1.Inference/Generate`` over a few HTTP/2 channels used in turn (one connection
    would serialise hundreds of streams' frames)."""

    def __init__(self, target: str, sampling: Sampling, timeout_s: float = 600.0, channels: int = 4) -> None:
        self.target = target
        self.sampling = sampling
        self.timeout_s = timeout_s
        self.num_channels = channels
        self._channels: list = []
        self._next = 0

    async def start(self) -> None:
        import grpc

        options = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        # Distinct channel arguments keep grpc from sharing one subchannel between the channels.
        self._channels = [grpc.aio.insecure_channel(self.target, options=[*options, ("baton.loadtest.channel", i)])
                          for i in range(self.num_channels)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    def _stub(self):
        from services.common.protos import inference_pb2_grpc

        channel = self._channels[self._next % len(self._channels)]
        self._next += 1
        return inference_pb2_grpc.InferenceStub(channel)

    async def model_info(self) -> dict:
        import grpc

        from services.common.protos import inference_pb2

        try:
            info = await self._stub().ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as err:
            raise RequestError(f"grpc:{err.code().name}", err.details() or "") from None
        return {"model": info.model, "family": info.family, "vocab_size": info.vocab_size,
                "max_model_len": info.max_model_len, "page_size": info.page_size}

    async def stream(self, prompt: Prompt, max_tokens: int, request_id: str,
                     session_id: str = "") -> AsyncIterator[Chunk]:
        import grpc

        call = self._stub().Generate(generate_request(prompt, max_tokens, request_id, self.sampling, session_id),
                                     timeout=self.timeout_s)
        try:
            async for response in call:
                yield chunk_from_response(response)
        except grpc.aio.AioRpcError as err:
            raise RequestError(f"grpc:{err.code().name}", err.details() or "") from None
        finally:
            call.cancel()  # a consumer that stops early frees the request on the server; no-op once done


# ---- OpenAI-compatible HTTP ---------------------------------------------------------------------------------

def completion_body(prompt: Prompt, max_tokens: int, model: str, sampling: Sampling,
                    return_token_ids: bool = False, session_id: str = "") -> dict:
    """The ``/v1/completions`` body: a prompt as text or as token ids (OpenAI accepts a list of ints); the
    conversation goes in OpenAI's standard ``user`` field."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": sampling.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if session_id:
        body["user"] = session_id
    if sampling.ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang extension; strict servers: --no-ignore-eos
    if return_token_ids:
        body["return_token_ids"] = True  # vLLM extension: each choice carries its token ids
    body.update(sampling.extra)
    return body


def usage_from_json(usage: dict) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), cached)


def chunk_from_completion(obj: dict) -> Chunk:
    """One streamed ``text_completion`` object. Servers stream about one token per chunk; where a chunk has no
    token ids, a chunk with text counts as one token (the final usage gives the exact total)."""
    if "error" in obj:
        error = obj["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise RequestError("http:stream_error", message)
    usage = usage_from_json(obj["usage"]) if obj.get("usage") else None
    choices = obj.get("choices") or []
    if not choices:
        return Chunk(0, usage=usage)
    choice = choices[0]
    ids = choice.get("token_ids")
    text = choice.get("text") or ""
    num = len(ids) if ids is not None else int(bool(text))
    reason = choice.get("finish_reason")
    return Chunk(num, list(ids) if ids is not None else None, text, reason is not None, reason, usage)


def http_error(status: int, body: str) -> RequestError:
    """A non-200 answer, with the message of an OpenAI error body when there is one."""
    message = body.strip()
    try:
        obj = json.loads(body)
        error = obj.get("error", obj) if isinstance(obj, dict) else obj
        message = error.get("message", message) if isinstance(error, dict) else str(error)
    except json.JSONDecodeError:
        pass
    return RequestError(f"http:{status}", message[:500])


class OpenAIClient:
    def __init__(self, base_url: str, model: str, sampling: Sampling, timeout_s: float = 600.0,
                 api_key: str | None = None, return_token_ids: bool = False) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.sampling = sampling
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.return_token_ids = return_token_ids
        self._session = None

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), connector=aiohttp.TCPConnector(limit=0),
            headers=self.headers,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def model_info(self) -> dict:
        """The first served model (``/v1/models``), when none was named."""
        import aiohttp

        try:
            async with self._session.get(f"{self.base_url}/v1/models") as resp:
                if resp.status != 200:
                    raise http_error(resp.status, await resp.text())
                models = (await resp.json()).get("data") or []
        except aiohttp.ClientError as err:
            raise RequestError("connection", str(err)) from None
        if not self.model:
            if not models:
                raise RequestError("http:no_model", f"{self.base_url}/v1/models lists no model")
            self.model = models[0]["id"]
        return {"model": self.model, "served": [m.get("id") for m in models]}

    async def stream(self, prompt: Prompt, max_tokens: int, request_id: str,
                     session_id: str = "") -> AsyncIterator[Chunk]:
        import aiohttp

        from loadtest.sse import SSEDecoder

        body = completion_body(prompt, max_tokens, self.model, self.sampling, self.return_token_ids, session_id)
        headers = {"X-Request-Id": request_id}
        try:
            async with self._session.post(f"{self.base_url}/v1/completions", json=body, headers=headers) as resp:
                if resp.status != 200:
                    raise http_error(resp.status, await resp.text())
                decoder = SSEDecoder()
                async for data in resp.content.iter_any():
                    for event in decoder.feed(data):
                        if event.data.strip() == "[DONE]":
                            return
                        try:
                            obj = json.loads(event.data)
                        except json.JSONDecodeError:
                            raise RequestError("http:bad_event", event.data[:200]) from None
                        yield chunk_from_completion(obj)
        except aiohttp.ClientError as err:
            raise RequestError("connection", str(err) or type(err).__name__) from None
        except TimeoutError:
            raise RequestError("timeout", f"no answer within {self.timeout_s}s") from None

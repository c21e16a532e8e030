"""The OpenAI-compatible HTTP API, served by the router process beside its gRPC API (same event loop, same
placement): ``/v1/completions``, ``/v1/chat/completions`` (streamed over SSE or whole), ``/v1/models``, ``/health``,
``/metrics``.

A request becomes token ids here (chat template, tokenizer; long inputs in a thread, so one 50K-token prompt does
not hold up other streams), then runs through ``RouterService.generate`` exactly as a gRPC request does. Errors
before the first token get their HTTP status (400 bad field, 401 key, 404 model, 429 full, 503 no pod); once a
stream has begun, an error is its last event. A client that disconnects cancels its handler (aiohttp's handler
cancellation), which closes the router's stream and cancels the pod's call: the request is freed everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.protos import inference_pb2
from services.engine.chat_template import ChatTemplateError
from services.router.server import RouteRequest, RouterError, RouterService

from .auth import ApiKeys, http_ssl_context
from .config import GatewayConfig
from .openai_protocol import (
    FINISH_REASONS,
    ApiError,
    ParsedRequest,
    ResponseBuilder,
    parse_chat,
    parse_completion,
    usage,
)

log = logging.getLogger("baton.gateway")

# Chat conversations longer than this (characters) are rendered and tokenized in a thread.
_OFFLOAD_CHARS = 16384
_OPEN_PATHS = frozenset({"/health", "/metrics"})  # no key needed: probes and scrapers, no request data


def _error_response(err: ApiError) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        headers["retry-after-ms"] = str(int(err.retry_after_s * 1000))
    return web.json_response(err.body(), status=err.status, headers=headers)


class OpenAIGateway:
    def __init__(self, router: RouterService, config: GatewayConfig, keys: ApiKeys) -> None:
        self.router = router
        self.config = config
        self.keys = keys
        self.model_name = router.config.model_name
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_keys], client_max_size=self.config.max_body_mb << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (0: any free port); returns the bound port."""
        # handler_cancellation: a client that disconnects cancels its handler, so its request is freed at once.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=http_ssl_context(self.config))
        await site.start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors_and_keys(self, request: web.Request, handler):
        if request.path not in _OPEN_PATHS and not self.keys.allows(request.headers.get("Authorization")):
            return _error_response(ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                            code="invalid_api_key"))
        try:
            return await handler(request)
        except ApiError as err:
            return _error_response(err)
        except web.HTTPException as exc:  # unknown path, wrong method: still an OpenAI error body
            if exc.status < 400:
                raise
            return _error_response(ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}"))

    # ---- informational endpoints --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        serving = self.router.serving()
        body = {"status": "ok" if serving else "unavailable", "redis_up": self.router.sync.up,
                "model": self.model_name}
        return web.json_response(body, status=200 if serving else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.router.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "baton",
                "root": self.router.config.model, "max_model_len": self.router.max_model_len()}
        return web.json_response({"object": "list", "data": [card]})

    # ---- generation ---------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        with self._counted_if_refused():
            parsed = parse_completion(await self._json(request), self.model_name)
            if parsed.prompt_ids is not None:
                prompt = parsed.prompt_ids
            else:
                prompt = await self.router.encode(parsed.prompt_text)
        return await self._serve(request, parsed, prompt, arrival)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        with self._counted_if_refused():
            parsed, prompt = await self._chat_prompt(request)
        return await self._serve(request, parsed, prompt, arrival)

    @contextlib.contextmanager
    def _counted_if_refused(self):
        """A request refused while it is parsed (bad JSON or field, unknown model, template error) never reaches
        ``RouterService.generate``, which counts the others: count it here, once."""
        try:
            yield
        except ApiError:
            self.router.metrics.requests.labels("invalid").inc()
            raise

    async def _chat_prompt(self, request: web.Request) -> tuple[ParsedRequest, list[int]]:
        parsed = parse_chat(await self._json(request), self.model_name)
        template = self.router.tokenizer.chat_template
        if template is None:
            raise ApiError(400, f"the model's tokenizer ({self.router.tokenizer.name}) has no chat template: "
                                "use /v1/completions", param="messages")

        def render_and_encode() -> list[int]:
            text = template.render(parsed.messages, add_generation_prompt=parsed.add_generation_prompt,
                                   tools=parsed.tools, **parsed.template_kwargs)
            return self.router.tokenizer.encode(text)

        size = sum(len(m.get("content") or "") for m in parsed.messages)
        try:
            prompt = (await asyncio.to_thread(render_and_encode) if size > _OFFLOAD_CHARS
                      else render_and_encode())
        except ChatTemplateError as err:
            raise ApiError(400, str(err), param="messages") from err
        if not parsed.max_tokens_set:  # chat: up to the context limit, as OpenAI's own server does
            limit = self.router.max_model_len()
            if limit and limit > len(prompt):
                parsed.sampling.max_tokens = limit - len(prompt)
        return parsed, prompt

    async def _json(self, request: web.Request):
        try:
            return await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from err

    async def _serve(self, request: web.Request, parsed: ParsedRequest, prompt: list[int],
                     arrival: float) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        route = RouteRequest(prompt, parsed.sampling, parsed.session_id, request_id, arrival=arrival)
        placed: list[str] = []

        async def on_placed(address: str) -> None:
            placed.append(address)

        responses = self.router.generate(route, on_placed=on_placed)
        builder = ResponseBuilder(parsed, request_id, self._token_text)
        try:
            try:  # refusals (bad input, overload, no pod) come before the first token: answer them with a status
                first = await anext(responses)
            except RouterError as err:
                raise ApiError.from_grpc(err.code, err.message, err.retry_after_s) from err
            # Which decode pod serves it (the first; after a failover the JSON response names the last).
            headers = {"X-Baton-Decode-Pod": placed[0]} if placed else {}
            if parsed.stream:
                return await self._stream(request, builder, first, responses, headers)
            response = await self._whole(builder, first, responses)
            response.headers["X-Baton-Decode-Pod"] = route.served_by or headers.get("X-Baton-Decode-Pod", "")
            return response
        finally:
            await responses.aclose()  # after a disconnect or an error: cancels the pod's call

    async def _whole(self, builder: ResponseBuilder, first: inference_pb2.GenerateResponse,
                     responses) -> web.Response:
        text, token_ids, logprobs, last = [], [], [], first
        response = first
        while True:
            text.append(response.text)
            token_ids.extend(response.token_ids)
            logprobs.extend(response.logprobs)
            last = response
            if response.finished:
                break
            try:
                response = await anext(responses)
            except RouterError as err:
                raise ApiError.from_grpc(err.code, err.message, err.retry_after_s) from err
        u = last.usage
        body = builder.complete("".join(text), token_ids, logprobs, FINISH_REASONS.get(last.finish_reason, "stop"),
                                usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens))
        return web.json_response(body)

    async def _stream(self, request: web.Request, builder: ResponseBuilder, first: inference_pb2.GenerateResponse,
                      responses, headers: dict[str, str]) -> web.StreamResponse:
        sse = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no", **headers})
        await sse.prepare(request)

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await sse.write(f"data: {data}\n\n".encode())

        response, is_first = first, True
        try:
            while True:
                reason = FINISH_REASONS.get(response.finish_reason) if response.finished else None
                if response.text or response.token_ids or reason or is_first:
                    await send(builder.chunk(response.text, list(response.token_ids), list(response.logprobs),
                                             reason, first=is_first))
                    is_first = False
                if response.finished:
                    break
                response = await anext(responses)
            if builder.parsed.include_usage:
                u = response.usage
                await send(builder.usage_chunk(usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)))
        except RouterError as err:  # after the first token: the stream's last event says what went wrong
            await send(ApiError.from_grpc(err.code, err.message).body())
        except ConnectionResetError:  # the client left while we wrote; the caller's finally frees the request
            log.info("request %s: client disconnected", builder.id)
            return sse
        await send("[DONE]")
        await sse.write_eof()
        return sse

    def _token_text(self, token_id: int) -> str:
        return self.router.tokenizer.decode([token_id])

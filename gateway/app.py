"""The gateway: an aiohttp application answering OpenAI's chat-completions API by forwarding each request
to the `crema` ensemble of `crema serve` over gRPC (tritonclient's asyncio client).

    gateway = Gateway(Settings(urls=["127.0.0.1:8001"], allow_dirs=["clips/"])).start()   # port 0: a free one
    ...  # OpenAI(base_url=gateway.base_url, api_key="-")
    gateway.stop()

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}. Limits (Settings): body bytes
(413 from Content-Length before reading), decoded media bytes per request (413 before decoding),
concurrent requests (429 beyond), a deadline per request (504; `crema serve` passes it on to Triton). A client
that disconnects cancels its handler, which cancels its gRPC call. Request fields and errors: docs/gateway.md.

Several `crema serve` instances (urls): requests go round-robin to the ones not marked down. A call that
fails UNAVAILABLE (the server died, restarts, or is busy) marks its server down for DOWN_S seconds and is
retried once on another within the same deadline; inference has no side effects, so a retry is safe.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from triton_models.client import DATATYPES
from triton_models.layout import ENSEMBLE
from triton_models.loop import LoopThread

from .chat import ChatRequest, parse_chat, parse_json
from .errors import ApiError
from .media import Budget, Media

# gRPC status of a failed Triton call -> (HTTP status, code)
GRPC_ERRORS = {"INVALID_ARGUMENT": (400, "invalid_input"), "RESOURCE_EXHAUSTED": (413, "payload_too_large"),
               "DEADLINE_EXCEEDED": (504, "timeout"), "UNAVAILABLE": (503, "model_unavailable"),
               "CANCELLED": (503, "model_unavailable")}


@dataclass
class Settings:
    urls: list = field(default_factory=lambda: ["127.0.0.1:8001"])  # gRPC addresses of `crema serve` instances
    host: str = "127.0.0.1"
    port: int = 8080  # 0: a free port
    model_name: str = ENSEMBLE  # the name clients send and responses carry
    allow_dirs: list = field(default_factory=list)  # file:// URLs only under these (resolved)
    timeout_s: float = 300.0  # deadline of one request, retry included
    max_body_bytes: int = 96 << 20  # request body (base64 costs 4/3 of the media)
    max_media_bytes: int = 64 << 20  # decoded media of one request, all fields together
    max_concurrent: int = 16  # requests being handled; 429 beyond
    tokenizer: str | Path | None = None  # the model's tokenizer.json: usage counted in its tokens


class TokenCounter:
    """usage: the served model's tokens when its tokenizer.json is given, else whitespace-separated words."""

    def __init__(self, path: str | Path | None):
        if path is None:
            self.tok = None
        else:
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids) if self.tok else len(text.split())

    def usage(self, question: str, answer: str) -> dict:
        prompt = self.count(question) + (1 if self.tok else 0)  # + </s>, as the model reads the question
        completion = self.count(answer)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


DOWN_S = 1.0  # an upstream that failed UNAVAILABLE gets no new requests for this long


class Upstream:
    """One `crema serve` gRPC address and its client (made in the gateway's loop)."""

    def __init__(self, url: str):
        self.url, self.client, self.down_until = url, None, 0.0

    def up(self, now: float) -> bool:
        return now >= self.down_until


class Gateway(LoopThread):
    start_timeout = 30.0

    def __init__(self, settings: Settings):
        super().__init__("crema-gateway")
        self.settings = settings
        self.allow_dirs = [Path(d).resolve(strict=True) for d in settings.allow_dirs]
        self.tokens = TokenCounter(settings.tokenizer)
        self.counts = {"answered": 0, "refused": 0, "cancelled": 0, "busy": 0, "retried": 0}
        if not settings.urls:
            raise ValueError("no crema serve address (urls)")
        self.upstreams = [Upstream(u) for u in settings.urls]
        self._turn = 0
        self.in_flight = 0  # requests being handled now
        self.calling = 0  # of which waiting for Triton's answer
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    async def _start(self) -> None:
        import tritonclient.grpc.aio as triton
        for u in self.upstreams:
            u.client = triton.InferenceServerClient(u.url)
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[_openai_errors])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name}", self.model)
        # handler_cancellation: a client that disconnects cancels its handler, and so its gRPC call
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, lingering_time=0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.host, self.settings.port).start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for u in self.upstreams:
            if u.client is not None:
                await u.client.close()

    # endpoints
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.settings.model_name:
            raise ApiError(f"model {request.match_info['name']!r}: this gateway serves {self.settings.model_name!r}",
                           "model", "model_not_found", 404)
        return web.json_response(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "crema"}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.in_flight >= self.settings.max_concurrent:
            self.counts["busy"] += 1
            raise ApiError(f"this gateway is handling {self.in_flight} requests, its limit; retry shortly", None,
                           "too_many_requests", 429)
        self.in_flight += 1
        try:
            chat = await asyncio.to_thread(self._parse, await self._body(request))
            answer, scores = await self._infer(chat)
            self.counts["answered"] += 1
            return await self._respond(request, chat, answer, scores)
        except ApiError:
            self.counts["refused"] += 1
            raise
        except asyncio.CancelledError:  # the client went away: its gRPC call is cancelled with this task
            self.counts["cancelled"] += 1
            raise
        finally:
            self.in_flight -= 1

    async def _body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.headers.get("Content-Encoding", "identity") != "identity":
            raise ApiError("compressed request bodies are not accepted (Content-Encoding)", None,
                           "unsupported_encoding", 415)
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(f"the request body is {request.content_length} bytes, over this gateway's limit of "
                           f"{limit}", None, "payload_too_large", 413)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body, cut at the limit
            raise ApiError(f"the request body is over this gateway's limit of {limit} bytes", None,
                           "payload_too_large", 413) from None

    def _parse(self, body: bytes) -> ChatRequest:
        media = Media(self.allow_dirs, Budget(self.settings.max_media_bytes))
        return parse_chat(parse_json(body), self.settings.model_name, media)

    def _order(self) -> list[Upstream]:
        """The upstreams to try, in order: the next up one (round-robin), then the others up, then those down."""
        now = time.monotonic()
        n = len(self.upstreams)
        self._turn = (self._turn + 1) % n
        turn = [self.upstreams[(self._turn + i) % n] for i in range(n)]
        return [u for u in turn if u.up(now)] + [u for u in turn if not u.up(now)]

    async def _infer(self, chat: ChatRequest) -> tuple[str, list[float]]:
        """One call of the ensemble, within the deadline (retried once on another upstream when the first
        is unavailable) -> (answer, option scores)."""
        import tritonclient.grpc.aio as triton
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, x in chat.tensors.items():
            tensor = triton.InferInput(name, list(x.shape), DATATYPES[x.dtype])
            tensor.set_data_from_numpy(x)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(n) for n in ("answer", "option_scores")]
        deadline = time.monotonic() + self.settings.timeout_s
        order = self._order()[:2]
        self.calling += 1
        try:
            for attempt, upstream in enumerate(order):
                try:
                    result = await upstream.client.infer(ENSEMBLE, inputs, outputs=outputs,
                                                         client_timeout=max(deadline - time.monotonic(), 0.001))
                    break
                except InferenceServerException as e:
                    if _status(e) != "UNAVAILABLE":
                        raise _triton_error(e) from None
                    upstream.down_until = time.monotonic() + DOWN_S
                    if attempt + 1 == len(order):
                        raise _triton_error(e, upstream.url if len(order) == 1 else "every model server") from None
                    self.counts["retried"] += 1
        finally:
            self.calling -= 1
        return (result.as_numpy("answer").reshape(-1)[0].decode(),
                [float(x) for x in result.as_numpy("option_scores").reshape(-1)])

    async def _respond(self, request: web.Request, chat: ChatRequest, answer: str,
                       scores: list[float]) -> web.StreamResponse:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.settings.model_name,
                "system_fingerprint": None}
        usage = self.tokens.usage(chat.question, answer)
        extra = {"crema": {"option_scores": scores}} if scores else {}
        if not chat.stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                      "logprobs": None, "finish_reason": "stop"}
            return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": usage,
                                      **extra})
        # the ensemble answers at once: one content chunk, the finish chunk, [usage chunk], [DONE]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk = {**head, "object": "chat.completion.chunk", **({"usage": None} if chat.include_usage else {})}
        deltas = [({"role": "assistant", "content": answer}, None), ({}, "stop")]
        events = [{**chunk, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}]}
                  for d, f in deltas]
        events[-1].update(extra)
        if chat.include_usage:
            events.append({**chunk, "choices": [], "usage": usage})
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _status(e) -> str:
    return (e.status() or "").removeprefix("StatusCode.")


def _triton_error(e, server: str = "the model server") -> ApiError:
    http, code = GRPC_ERRORS.get(_status(e), (502, "model_server_error"))
    message = e.message() or str(e)
    if http == 504:
        message = f"no answer from the model within the gateway's deadline ({message})"
    elif http == 503:
        message = f"{server} is unavailable ({message}); retry shortly"
    return ApiError(message, None, code, http)


@web.middleware
async def _openai_errors(request: web.Request, handler):
    """ApiError and aiohttp's own 404/405/413 as OpenAI error bodies."""
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_response(ApiError(f"{request.method} {request.path}: {e.reason}", None,
                                        e.reason.lower().replace(" ", "_"), e.status))


def _error_response(e: ApiError) -> web.Response:
    response = web.json_response(e.body(), status=e.status)
    if e.status in (413, 415):  # the rest of the body is not read: close instead
        response.force_close()
    return response

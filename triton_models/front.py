"""The front of `crema serve`: the only listeners clients reach, HTTP and gRPC (KServe v2).

It forwards to Triton's internal, key-restricted ports (triton_models/server.py) only what is
well-formed, and answers the rest itself:
  inference    the `crema` ensemble only (stage models are internal); each request checked against
               the ensemble's config (triton_models/contract.py) before Triton sees it
  size         a request body over `max_request_bytes` is refused from its declared length before
               it is read (HTTP 413; gRPC's message limit); the JSON part of an HTTP request is
               limited to `max_json_bytes` (parsed JSON numbers cost ~10x their text in Python);
               compressed bodies are refused, never decompressed
  parsing      JSON with a key given twice, or NaN/Infinity, is refused; what Triton receives is
               the request as the front parsed and checked it, serialized anew (HTTP JSON, gRPC
               protobuf), so a parser difference cannot smuggle anything past the checks
  load         bodies are read outside the forwarding slots, each within `read_timeout_s`, those
               being read declaring at most max_in_flight x max_request_bytes together (Content-Length
               is required: a slow client holds only what it declared); `max_in_flight` requests
               forwarded at once; `max_queued` more wait; beyond that 503. Memory: about
               2 x max_in_flight x max_request_bytes
  read-only    health, metadata, model config and statistics are forwarded
  closed       model repository (load/unload/upload), shared memory, trace and log settings:
               refused (403 / PERMISSION_DENIED); gRPC streaming is not offered
  deadlines    each forwarded inference gets a deadline: the client's (gRPC deadline, or the KServe
               `timeout` parameter in microseconds), at most `timeout_s`. Triton gets it twice: as the
               `timeout` parameter (its queue policies reject a request still queued at its deadline)
               and as `crema_deadline_ms` (the llm model's decode loop stops there). Triton 2.51 does
               not flag a cancellation inside a running python model, so this is what bounds the work
               of a request whose client has gone: its queued steps are dropped on cancellation, and
               the front marks its id (`crema_request_id`) on the cancellation board
               (triton_models/cancel.py), where the llm model's decode loop sees it at its next step
  failures     when the supervisor reports a dead model process or server, every request in
               flight is answered at once (503 / UNAVAILABLE, "retry"); while it repairs, new
               requests get the same answer instead of waiting
The front runs an asyncio loop in its own thread: `start()` binds both ports and returns.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass

import grpc
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from tritonclient.grpc import service_pb2

from .cancel import CancelBoard, new_id
from .contract import Contract, RequestRejected, TensorClaim, count_json_values
from .layout import DEADLINE_PARAMETER, ID_PARAMETER
from .loop import LoopThread
from .server import GRPC_KEY_HEADER, KEY_HEADER, TritonServer

GRPC_SERVICE = "/inference.GRPCInferenceService/"
READ_ONLY_RPCS = {"ServerLive", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"}
CLOSED = "closed to clients: model management, shared memory, trace and log settings are not offered (docs/security.md)"
READ_ONLY_PATHS = re.compile(r"^/v2(/models(/[^/]+(/versions/[0-9]+)?)?(/ready|/config|/stats)?)?$")
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/infer$")
HEADER_LENGTH = "Inference-Header-Content-Length"
FORWARDED_HEADERS = ("Content-Type", "Accept-Encoding")  # a compressed answer passes through as it is
GRPC_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
               408: grpc.StatusCode.DEADLINE_EXCEEDED, 411: grpc.StatusCode.INVALID_ARGUMENT,
               404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
               415: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE,
               504: grpc.StatusCode.DEADLINE_EXCEEDED}
TYPED_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 65 << 20
    max_json_bytes: int = 1 << 20
    max_in_flight: int = 16
    max_queued: int = 256
    timeout_s: float = 300.0  # a forwarded request's answer
    read_timeout_s: float = 30.0  # a request body, once its slot is free


class Failure(Exception):
    """Answered by the front itself: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unreachable(Exception):
    """Triton's internal port did not answer (it died, or is restarting)."""


VERDICT_WAIT_S = 2.0  # how long an unanswered request waits for the supervisor to say why


def deadline_s(limit_s: float, client_timeout_us=None, remaining_s: float | None = None) -> float:
    """Seconds this request may take: the least of the front's limit, the client's `timeout` parameter
    (microseconds, KServe/Triton's) and its gRPC deadline's remaining time."""
    out = limit_s
    if client_timeout_us is not None:
        if isinstance(client_timeout_us, bool) or not isinstance(client_timeout_us, int) or client_timeout_us <= 0:
            raise RequestRejected(f"parameter timeout {client_timeout_us!r}: expected a positive integer (microseconds)")
        out = min(out, client_timeout_us / 1e6)
    if remaining_s is not None:
        out = min(out, remaining_s)
    return max(out, 0.0)


def deadline_parameters(seconds: float) -> dict[str, int]:
    """The parameters Triton gets for a request that may take `seconds` from now."""
    return {"timeout": max(1, int(seconds * 1e6)), DEADLINE_PARAMETER: int((time.time() + seconds) * 1000)}


def forwarded_parameters(seconds: float) -> dict:
    """Every forwarded inference's parameters (a client's own of these names are replaced): its deadline
    and its id on the cancellation board."""
    return {**deadline_parameters(seconds), ID_PARAMETER: new_id()}


# --- requests -> claims --------------------------------------------------------------------------

def _object(pairs: list) -> dict:
    """json.loads' object hook: a key given twice is refused. Python keeps the last copy and Triton's
    parser the first, so a duplicate would let Triton act on what the front never checked."""
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        twice = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise RequestRejected(f"the request's JSON gives the key {twice!r} twice")
    return out


def _constant(name: str):
    raise RequestRejected(f"the request's JSON holds {name}, which JSON does not allow")


@dataclass
class HttpRequest:
    """An HTTP infer body, parsed: the JSON object and the binary tensors after it."""
    json: dict
    binary: memoryview

    def body(self) -> tuple[bytes, int | None]:
        """What the front forwards: the JSON it checked, serialized anew, then the binary part, and
        the Inference-Header-Content-Length that goes with it (None: no binary part)."""
        header = json.dumps(self.json, separators=(",", ":")).encode()
        return (header + bytes(self.binary), len(header)) if len(self.binary) else (header, None)


def parse_http(body: bytes, header_length: str | None, limits: Limits) -> HttpRequest:
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or not 0 < int(header_length) <= len(body):
            raise RequestRejected(f"{HEADER_LENGTH} {header_length!r}: not a length within the body "
                                  f"({len(body)} bytes)")
        json_part, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    if len(json_part) > limits.max_json_bytes:
        raise RequestRejected(f"the request's JSON is {len(json_part)} bytes, over the limit of "
                              f"{limits.max_json_bytes}: send tensors as binary data (tritonclient does by default)", 413)
    try:
        request = json.loads(json_part, object_pairs_hook=_object, parse_constant=_constant)
    except RequestRejected:
        raise
    except (ValueError, RecursionError) as e:
        raise RequestRejected(f"the request is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestRejected("the request must be a JSON object with an 'inputs' list")
    return HttpRequest(request, binary)


def http_claims(request: HttpRequest) -> tuple[list[TensorClaim], list[str]]:
    """The claims of a parsed HTTP infer request, and its requested outputs."""
    binary = request.binary
    claims, offset = [], 0
    for x in request.json["inputs"]:
        if not isinstance(x, dict):
            raise RequestRejected("inputs: each input must be a JSON object")
        claim = TensorClaim(x.get("name"), x.get("datatype"), x.get("shape"))
        parameters = x.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise RequestRejected(f"input {claim.name!r}: binary_data_size {size!r} is not within the "
                                      f"{len(binary) - offset} binary bytes left in the body")
            claim.raw, offset = binary[offset:offset + size], offset + size
        if "data" in x:
            shape = claim.shape if isinstance(claim.shape, list) and all(type(d) is int for d in claim.shape) else []
            claim.values = count_json_values(x["data"], str(claim.datatype), math.prod(shape) + 1)
        claims.append(claim)
    if offset != len(binary):
        raise RequestRejected(f"the body carries {len(binary)} binary bytes, its inputs claim {offset}")
    outputs = request.json.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise RequestRejected("outputs: expected a list of objects with a 'name'")
    return claims, [o.get("name") for o in outputs]


def grpc_claims(request: service_pb2.ModelInferRequest) -> tuple[list[TensorClaim], list[str]]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestRejected(f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs")
    claims = []
    for i, t in enumerate(request.inputs):
        claim = TensorClaim(t.name, t.datatype, list(t.shape))
        if raw:
            claim.raw = raw[i]
            if t.HasField("contents"):
                raise RequestRejected(f"input {t.name!r}: both contents and raw_input_contents")
        elif t.datatype in TYPED_CONTENTS:
            claim.values = len(getattr(t.contents, TYPED_CONTENTS[t.datatype]))
        claims.append(claim)
    return claims, [o.name for o in request.outputs]


# --- the front -----------------------------------------------------------------------------------

class Front(LoopThread):
    def __init__(self, server: TritonServer, contract: Contract, limits: Limits, host: str, http_port: int,
                 grpc_port: int, ready=lambda: (True, "")):
        super().__init__("crema-front")
        self.server, self.contract, self.limits = server, contract, limits
        self.board = CancelBoard(server.cancel_dir) if server.cancel_dir else None
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.ready = ready  # () -> (ready, why not)
        self._in_flight: set[asyncio.Future] = set()
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._reading: asyncio.Condition | None = None
        self._reading_bytes, self._reading_budget = 0, limits.max_in_flight * limits.max_request_bytes
        self._session: ClientSession | None = None
        self._channel: tuple[int, grpc.aio.Channel] | None = None
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.counts = {"forwarded": 0, "rejected": 0, "aborted": 0, "busy": 0}

    def abort_in_flight(self, reason: str) -> None:
        """Answer every request in flight now with 503/UNAVAILABLE naming `reason` (thread-safe)."""
        def abort():
            for f in self._in_flight:
                if not f.done():
                    f.set_result(reason)
        if self.running:
            self.loop.call_soon_threadsafe(abort)

    async def _start(self) -> None:
        self._slots = asyncio.Semaphore(self.limits.max_in_flight)
        self._reading = asyncio.Condition()
        self._session = ClientSession(timeout=ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=self.limits.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._http)
        # no automatic decompression (a 4 MB gzip body is 4 GB of work); refused requests close their
        # connection rather than have aiohttp read (linger over) the rest of their body
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False, lingering_time=0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.http_port).start()
        options = [("grpc.max_receive_message_length", self.limits.max_request_bytes),
                   ("grpc.max_send_message_length", self.limits.max_request_bytes),
                   ("grpc.max_concurrent_streams", self.limits.max_in_flight)]  # per connection
        self._grpc = grpc.aio.server(handlers=[_GrpcHandler(self)], options=options,
                                     maximum_concurrent_rpcs=2 * self.limits.max_in_flight)
        if not self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}"):
            raise OSError(f"gRPC port {self.grpc_port} on {self.host} is not free")
        await self._grpc.start()

    async def _stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(5)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel[1].close()

    # the shared path of both protocols
    def _admit(self) -> None:
        """Refuse at once what would only wait: while the server is not ready, or the queue is full."""
        ok, why = self.ready()
        if not ok:
            raise Failure(503, f"the server is not ready ({why}); retry shortly")
        if self._waiting >= self.limits.max_queued:
            self.counts["busy"] += 1
            raise Failure(503, f"the server is busy ({self.limits.max_in_flight} requests in flight, "
                               f"{self._waiting} waiting); retry shortly")

    async def _guarded(self, forward, timeout_s: float, request_id: str | None = None):
        """Run `forward()` within the in-flight limit; a reported failure or the deadline answers first. A
        forward left unfinished (client gone, deadline, failure) is cancelled and its id marked on the board."""
        self._admit()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        ok, why = self.ready()  # it may have failed while this request waited for a slot
        if not ok:
            self._slots.release()
            raise Failure(503, f"the server is not ready ({why}); retry shortly")
        abort = self.loop.create_future()
        self._in_flight.add(abort)
        task = asyncio.ensure_future(forward())
        try:
            done, _ = await asyncio.wait({task, abort}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                result = task.result()
                self.counts["forwarded"] += 1
                return result
            task.cancel()
            if abort in done:
                raise self._aborted(abort.result())
            raise Failure(504, f"no answer within the request's deadline ({timeout_s:.3g} s)")
        except Unreachable as e:  # the connection broke first: the supervisor will say why
            try:
                reason = await asyncio.wait_for(asyncio.shield(abort), VERDICT_WAIT_S)
            except asyncio.TimeoutError:
                raise Failure(503, f"the model server did not answer ({e}); retry shortly") from None
            raise self._aborted(reason) from None
        finally:  # also when this handler is cancelled (the client went away): the call to Triton goes too
            if not task.done():
                task.cancel()
                if self.board is not None and request_id is not None:
                    self.board.mark(request_id)
            self._in_flight.discard(abort)
            self._slots.release()

    def _aborted(self, reason: str) -> Failure:
        self.counts["aborted"] += 1
        return Failure(503, f"{reason} while this request was in flight; nothing of it was kept: retry")

    def _check_model(self, name: str) -> None:
        if name != self.contract.model:
            raise Failure(403 if name in _internal_models(self.server) else 404,
                          f"model {name!r}: this server answers inference on {self.contract.model!r} only")

    # HTTP
    async def _http(self, request: web.Request) -> web.Response:
        try:
            return await self._http_route(request)
        except RequestRejected as e:
            self.counts["rejected"] += 1
            return _json_error(e.status, str(e))
        except Failure as e:
            return _json_error(e.status, str(e))
        except Unreachable as e:
            return _json_error(503, f"the model server did not answer ({e}); retry shortly")
        except ConnectionError:  # the client went away mid-body: nobody to answer
            return web.Response(status=400)
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, f"the request body is over this server's limit of {self.limits.max_request_bytes} bytes")

    async def _http_route(self, request: web.Request) -> web.Response:
        path = request.path
        if path == "/v2/health/live" and request.method == "GET":
            return web.Response(status=200)
        if path == "/v2/health/ready" and request.method == "GET":
            ok, why = self.ready()
            return web.Response(status=200) if ok else _json_error(503, f"not ready: {why}")
        infer = INFER_PATH.match(path)
        if infer and request.method == "POST":
            return await self._http_infer(request, infer.group(1))
        if READ_ONLY_PATHS.match(path) and request.method == "GET":
            headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
            return await self._forward_http(request.method, path, None, headers)
        if re.match(r"^/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)\b", path) \
                or re.match(r"^/v2/models/[^/]+(/versions/[0-9]+)?/trace/setting$", path):
            raise Failure(403, f"{path}: {CLOSED}")
        raise Failure(404, f"{request.method} {path}: not a KServe v2 endpoint this server offers")

    async def _http_infer(self, request: web.Request, model: str) -> web.Response:
        self._check_model(model)
        if request.headers.get("Content-Encoding", "identity") != "identity":
            raise RequestRejected("compressed requests are not accepted (Content-Encoding)", 415)
        declared = request.content_length
        if declared is not None and declared > self.limits.max_request_bytes:
            raise RequestRejected(f"the request body is {declared} bytes, over this server's limit of "
                                  f"{self.limits.max_request_bytes}", 413)
        self._admit()
        parsed = parse_http(await self._read_body(request), request.headers.get(HEADER_LENGTH), self.limits)
        self.contract.check(*http_claims(parsed))
        params = parsed.json.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestRejected("the request's parameters must be a JSON object")
        seconds = deadline_s(self.limits.timeout_s, params.get("timeout"))
        parsed.json["parameters"] = forwarded = {**params, **forwarded_parameters(seconds)}
        body, header_length = parsed.body()  # what was checked (and the deadline) is what Triton gets
        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        return await self._guarded(lambda: self._forward_http("POST", request.path, body, headers), seconds,
                                   forwarded[ID_PARAMETER])

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, read outside the forwarding slots (a slow client must not hold one) within
        read_timeout_s; the bodies being read at once declare at most max_in_flight x
        max_request_bytes in all (a slow client holds only what it declared)."""
        size = request.content_length
        if size is None:
            raise RequestRejected("an inference request must declare its Content-Length", 411)
        self._waiting += 1
        try:
            async with self._reading:
                await self._reading.wait_for(lambda: self._reading_bytes + size <= self._reading_budget)
                self._reading_bytes += size
        finally:
            self._waiting -= 1
        try:
            return await asyncio.wait_for(request.read(), self.limits.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestRejected(f"the request body did not arrive within {self.limits.read_timeout_s:.0f} s",
                                  408) from None
        finally:
            async with self._reading:
                self._reading_bytes -= size
                self._reading.notify_all()

    async def _forward_http(self, method: str, path: str, body: bytes | None, headers: dict) -> web.Response:
        headers = {"Accept-Encoding": "identity", **headers, KEY_HEADER: self.server.key}
        try:
            async with self._session.request(method, f"http://{self.server.http_url}{path}", data=body,
                                             headers=headers) as r:
                content = await r.read()
                keep = {k: r.headers[k] for k in ("Content-Type", "Content-Encoding", HEADER_LENGTH) if k in r.headers}
                return web.Response(status=r.status, body=content, headers=keep)
        except (OSError, ClientError) as e:
            raise Unreachable(str(e) or type(e).__name__) from e

    # gRPC
    def _internal_channel(self) -> grpc.aio.Channel:
        port = self.server.grpc_port
        if self._channel is None or self._channel[0] != port:  # a restarted server listens elsewhere
            options = [("grpc.max_receive_message_length", self.limits.max_request_bytes),
                       ("grpc.max_send_message_length", self.limits.max_request_bytes)]
            self._channel = (port, grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options))
        return self._channel[1]

    async def grpc_forward(self, method: str, raw: bytes, context, timeout_s: float | None = None) -> bytes:
        call = self._internal_channel().unary_unary(GRPC_SERVICE + method)
        try:
            return await call(raw, metadata=((GRPC_KEY_HEADER, self.server.key),), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and "restricted" not in (e.details() or ""):
                raise Unreachable(e.details() or "unavailable") from e
            await context.abort(e.code(), e.details() or "")

    async def grpc_infer(self, raw: bytes, context) -> bytes:
        try:
            request = service_pb2.ModelInferRequest.FromString(raw)
            self._check_model(request.model_name)
            claims, outputs = grpc_claims(request)
            self.contract.check(claims, outputs)
            timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else None
            seconds = deadline_s(self.limits.timeout_s, timeout, context.time_remaining())
            forwarded = forwarded_parameters(seconds)
            for key, value in forwarded.items():
                if isinstance(value, str):
                    request.parameters[key].string_param = value
                else:
                    request.parameters[key].int64_param = value
            checked = request.SerializeToString()  # what was checked (and the deadline) is what Triton gets
            return await self._guarded(lambda: self.grpc_forward("ModelInfer", checked, context, seconds), seconds,
                                       forwarded[ID_PARAMETER])
        except RequestRejected as e:
            self.counts["rejected"] += 1
            await context.abort(GRPC_STATUS[e.status], str(e))
        except Failure as e:
            await context.abort(GRPC_STATUS.get(e.status, grpc.StatusCode.UNAVAILABLE), str(e))
        except Exception as e:  # protobuf's DecodeError and the like
            if isinstance(e, (grpc.aio.AbortError, asyncio.CancelledError)):
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a ModelInferRequest ({type(e).__name__})")

    async def grpc_server_ready(self, raw: bytes, context) -> bytes:
        return service_pb2.ServerReadyResponse(ready=self.ready()[0]).SerializeToString()


class _GrpcHandler(grpc.GenericRpcHandler):
    def __init__(self, front: Front):
        self.front = front

    def service(self, details):
        if not details.method.startswith(GRPC_SERVICE):
            return None
        name = details.method[len(GRPC_SERVICE):]
        if name == "ModelInfer":
            return grpc.unary_unary_rpc_method_handler(self.front.grpc_infer)
        if name == "ServerReady":
            return grpc.unary_unary_rpc_method_handler(self.front.grpc_server_ready)
        if name in READ_ONLY_RPCS:
            async def forward(raw: bytes, context) -> bytes:
                try:
                    return await self.front.grpc_forward(name, raw, context)
                except Unreachable as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"the model server did not answer ({e})")
            return grpc.unary_unary_rpc_method_handler(forward)
        if name == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(_refuse_stream)
        return grpc.unary_unary_rpc_method_handler(_refuse)


async def _refuse(raw: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, CLOSED)


async def _refuse_stream(requests, context):
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not offered: use ModelInfer")
    yield b""  # an async generator, as a stream handler must be


def _json_error(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if status in (400, 404, 408, 411, 413, 415):  # the rest of a refused body is not read: close instead
        response.force_close()
    return response


def _internal_models(server: TritonServer) -> set[str]:
    return {p.parent.name for p in server.repo.glob("*/config.pbtxt")}

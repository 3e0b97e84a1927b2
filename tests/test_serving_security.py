"""Attacks on and failures of the served demo model (the session's `served` fixture: the front and a
supervised Triton on loopback), each with the payload that broke the server before the front existed:
shape bombs, the model-repository API, cached errors, killed processes, oversized payloads, and 64
clients mixing good and bad requests while a model process is killed. docs/security.md maps each
claim to its test.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from conftest import MAX_INPUT_MB
from synthetic.generator import clip_files
from triton_models.client import AskError, CremaClient, tensors_from_files
from triton_models.server import python_stubs

SHAPE_BOMB = b'{"inputs":[{"name":"pc_feat","shape":[1000000000,64],"datatype":"FP32","data":[1.0]}]}'


def post(service, path: str, body: bytes, headers: dict | None = None, port: int | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a raw HTTP POST to the front (or another port)."""
    conn = http.client.HTTPConnection(service.endpoints.host, port or service.endpoints.http, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data or b"{}")
    except ValueError:
        return r.status, {"raw": data[:200]}


def good(served, index: int = 0) -> tuple[dict, str]:
    q = served["questions"][index]
    return tensors_from_files(q.question, **clip_files(served["data"] / q.clip)), q.answer


def assert_serving(served) -> None:
    """The same Triton process still answers a good request correctly."""
    tensors, answer = good(served)
    with CremaClient(served["service"].endpoints.http_url) as client:
        assert client.infer(tensors).answer == answer


def infer_json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def bombs() -> list[tuple[str, bytes, dict, int, str]]:
    """(what, body, headers, HTTP status, phrase of the error)."""
    pc = {"name": "pc_feat", "datatype": "FP32"}
    binary = json.dumps({"inputs": [{**pc, "shape": [4, 64], "parameters": {"binary_data_size": 16}}]}).encode()
    deep = b'{"inputs":[{"name":"question","shape":[1],"datatype":"BYTES","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    return [
        ("the 95-byte shape bomb", SHAPE_BOMB, {}, 413, "declared by their shapes, over this server's limit"),
        ("10 million rows", infer_json([{**pc, "shape": [10_000_000, 64], "data": [1.0]}]), {}, 413, "over this"),
        ("an input the model lacks", infer_json([{"name": "nope", "shape": [10 ** 9], "datatype": "FP32",
                                                  "data": [1.0]}]), {}, 400, "has no such input"),
        ("shape and data disagree", infer_json([{**pc, "shape": [3, 64], "data": [1.0]}]), {}, 400,
         "holds 192 values, the request carries 1"),
        ("a negative dimension", infer_json([{**pc, "shape": [-1, 64], "data": [1.0]}]), {}, 400, "non-negative"),
        ("a shape that is not a list", infer_json([{**pc, "shape": "1,64", "data": [1.0]}]), {}, 400, "not a list"),
        ("the wrong datatype", infer_json([{**pc, "datatype": "FP64", "shape": [1, 64], "data": [1.0] * 64}]), {},
         400, "the model takes FP32"),
        ("strings as numbers", infer_json([{**pc, "shape": [1, 64], "data": ["x"] * 64}]), {}, 400, "str value"),
        ("the same input twice", infer_json([{**pc, "shape": [1, 64], "data": [1.0] * 64}] * 2), {}, 400,
         "given twice"),
        ("not JSON", b"{not json", {}, 400, "not valid JSON"),
        ("JSON nested 100000 deep", deep, {}, 400, "not valid JSON"),
        ("binary size beyond the body", binary, {"Inference-Header-Content-Length": str(len(binary))}, 400,
         "binary_data_size 16 is not within"),
        ("binary size that is not the shape's", binary + b"\0" * 16,
         {"Inference-Header-Content-Length": str(len(binary))}, 400, "is 1024 bytes, the request carries 16"),
        ("header length beyond the body", SHAPE_BOMB, {"Inference-Header-Content-Length": "999999"}, 400,
         "not a length within the body"),
        ("a compressed body", b"\x1f\x8b" + b"\0" * 20, {"Content-Encoding": "gzip"}, 415, "compressed"),
        ("a BYTES count that lies", infer_json([{"name": "question", "shape": [5], "datatype": "BYTES",
                                                 "data": ["a"]}]), {}, 400, "the model takes [1]"),
    ]


@pytest.mark.parametrize("what,body,headers,status,phrase", bombs(), ids=[b[0] for b in bombs()])
def test_malformed_requests_are_refused_and_the_server_lives(served, what, body, headers, status, phrase):
    service = served["service"]
    pid = service.server.process.pid
    got, answer = post(service, "/v2/models/crema/infer", body, headers)
    assert (got, phrase in answer.get("error", "")) == (status, True), (what, got, answer)
    assert service.server.process.pid == pid and service.server.process.poll() is None
    assert_serving(served)


def test_grpc_shape_bombs_and_oversized_messages_are_refused(served):
    service = served["service"]
    channel = grpc.insecure_channel(service.endpoints.grpc_url)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    pc = service_pb2.ModelInferRequest.InferInputTensor(name="pc_feat", datatype="FP32", shape=[10 ** 9, 64])
    cases = [
        ("raw content shorter than the shape", service_pb2.ModelInferRequest(
            model_name="crema", inputs=[pc], raw_input_contents=[b"\0" * 4]), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("typed contents shorter than the shape", service_pb2.ModelInferRequest(
            model_name="crema", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                name="pc_feat", datatype="FP32", shape=[2, 64], contents=service_pb2.InferTensorContents(
                    fp32_contents=[1.0]))]), grpc.StatusCode.INVALID_ARGUMENT),
        ("a stage model", service_pb2.ModelInferRequest(model_name="llm", inputs=[pc]),
         grpc.StatusCode.PERMISSION_DENIED),
        ("a message over the limit", service_pb2.ModelInferRequest(
            model_name="crema", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                name="video", datatype="BYTES", shape=[1])],
            raw_input_contents=[os.urandom((MAX_INPUT_MB << 20) * 2)]), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for what, request, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            infer(request.SerializeToString(), timeout=30)
        assert err.value.code() == code, (what, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        infer(b"\xff\xff not a protobuf", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    assert_serving(served)


def test_an_oversized_body_is_refused_before_it_is_read(served):
    """The declared length alone is refused: the client has not sent a byte of the 500 MB."""
    service = served["service"]
    with socket.create_connection((service.endpoints.host, service.endpoints.http), timeout=10) as s:
        s.sendall(b"POST /v2/models/crema/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 524288000\r\n\r\n" + SHAPE_BOMB)
        reply = s.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "over this server's limit" in reply, reply
    assert_serving(served)


REPOSITORY_PATHS = ["/v2/repository/models/crema/unload", "/v2/repository/models/llm/load", "/v2/repository/index",
                    "/v2/systemsharedmemory/region/x/register", "/v2/logging", "/v2/trace/setting"]


def test_no_client_can_manage_models_or_upload_code(served, tmp_path):
    service = served["service"]
    marker = tmp_path / "uploaded-code-ran"
    upload = json.dumps({"parameters": {
        "config": json.dumps({"backend": "python", "max_batch_size": 0}),
        "file:1/model.py": __import__("base64").b64encode(
            f"open({str(marker)!r}, 'w').write('x')\nclass TritonPythonModel: pass\n".encode()).decode()}}).encode()
    for path in REPOSITORY_PATHS:
        status, answer = post(service, path, upload if path.endswith("/load") else b"{}")
        assert status == 403 and "closed to clients" in answer["error"], (path, status, answer)
    status, _ = post(service, "/v2/repository/models/evil/load", upload)
    assert status == 403
    client = grpcclient.InferenceServerClient(service.endpoints.grpc_url)
    for call in (lambda: client.unload_model("crema"), lambda: client.load_model("evil", config="{}"),
                 lambda: client.get_model_repository_index(), lambda: client.register_system_shared_memory("r", "/x", 8)):
        with pytest.raises(Exception, match="closed to clients"):
            call()
    # Triton's own ports answer nothing without the key (it is only in the front and the supervisor)
    server = service.server
    status, answer = post(service, "/v2/repository/models/crema/unload", b"{}", port=server.http_port)
    assert status == 403 and "restricted" in answer["error"]
    status, _ = post(service, "/v2/models/crema/infer", SHAPE_BOMB, port=server.http_port)
    assert status == 403 and server.process.poll() is None
    internal = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(Exception, match="restricted"):
        internal.unload_model("crema")
    time.sleep(2)  # anything uploaded would have been loaded by now
    assert not marker.exists()
    assert client.is_model_ready("crema") and client.is_server_ready()
    assert_serving(served)


def test_an_unloaded_model_is_reloaded_and_readiness_says_so(served):
    service = served["service"]
    loads = service.supervisor.count("load")
    assert service.server.call("POST", "/v2/repository/models/llm/unload")[0] == 200  # as an insider could
    saw_unready = False
    deadline = time.monotonic() + 60
    while service.supervisor.count("load") == loads and time.monotonic() < deadline:
        conn = http.client.HTTPConnection(service.endpoints.host, service.endpoints.http, timeout=10)
        conn.request("GET", "/v2/health/ready")
        saw_unready |= conn.getresponse().status == 503
        conn.close()
        time.sleep(0.05)
    assert service.supervisor.count("load") > loads and saw_unready
    assert {e.what for e in service.supervisor.events if e.kind == "load"} <= {"llm", "crema"}
    wait_ready(service)
    assert_serving(served)


def test_errors_are_never_cached(served):
    tensors, _ = good(served)
    broken = {**tensors, "video": np.array([b"not a video at all"], dtype=object)}
    with CremaClient(served["service"].endpoints.http_url) as client:
        for _ in range(3):  # Triton's own cache answered the second one with "expected 1 inputs but got 0"
            with pytest.raises(AskError, match="video bytes: not a video"):
                client.infer(broken)


def wait_ready(service, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not service.supervisor.ready and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.supervisor.ready, service.supervisor.not_ready_reason


def stub_pid(service, model: str) -> int:
    return next(pid for pid, s in python_stubs(service.server.process.pid).items() if s.model == model)


def distinct_requests(served, n: int) -> list[dict]:
    """n requests for one clip that differ in their audio bytes (each a new preprocess cache key)."""
    tensors, _ = good(served)
    audio = bytes(tensors["audio"][0])
    return [{**tensors, "audio": np.array([audio + b"\0" * (2 * (i + 1))], dtype=object)} for i in range(n)]


def test_a_killed_preprocess_under_load_fails_fast_and_poisons_nothing(served):
    """16 distinct requests in flight while preprocess is killed: each fails at once or answers;
    afterwards every one of the same 16 inputs answers (Triton's cache kept 12 of them failing)."""
    service = served["service"]
    requests = distinct_requests(served, 16)
    want = good(served)[1]
    preprocess = stub_pid(service, "preprocess")
    dead_region = python_stubs(service.server.process.pid)[preprocess].region
    assert os.path.exists(f"/dev/shm/{dead_region}")
    os.kill(preprocess, signal.SIGSTOP)
    outcomes = {}

    def ask(i):
        with CremaClient(service.endpoints.http_url) as client:
            try:
                outcomes[i] = client.infer(requests[i]).answer
            except AskError as e:
                outcomes[i] = e
            outcomes[i, "at"] = time.monotonic()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    killed = time.monotonic()
    os.kill(preprocess, signal.SIGKILL)
    for t in threads:
        t.join(60)
    late = [outcomes[i, "at"] - killed for i in range(16) if isinstance(outcomes[i], AskError)]
    assert late and max(late) < 3.0, late  # Triton alone: the last one ~17 s after the kill
    errors = [str(outcomes[i]) for i in range(16) if isinstance(outcomes[i], AskError)]
    assert all("preprocess" in e for e in errors), errors
    wait_ready(service)
    with CremaClient(service.endpoints.http_url) as client:
        assert [client.infer(r).answer for r in requests] == [want] * 16
    assert not os.path.exists(f"/dev/shm/{dead_region}")  # Triton leaves a dead process's shared memory


def test_a_crashed_tritonserver_is_restarted_and_in_flight_requests_fail_at_once(served):
    service = served["service"]
    restarts = service.supervisor.count("restart")
    requests = distinct_requests(served, 4)
    os.kill(stub_pid(service, "llm"), signal.SIGSTOP)  # requests wait inside llm
    regions = {stub.region for stub in python_stubs(service.server.process.pid).values()}
    outcomes = []

    def ask(r):
        with CremaClient(service.endpoints.http_url) as client:
            try:
                client.infer(r)
                outcomes.append(("answer", time.monotonic()))
            except AskError as e:
                outcomes.append((str(e), time.monotonic()))

    threads = [threading.Thread(target=ask, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(service.server.process.pid, signal.SIGABRT)  # what the shape bomb did
    for t in threads:
        t.join(60)
    assert len(outcomes) == 4
    for message, at in outcomes:  # the front's verdict, or Triton's own last words as it went down
        assert ("tritonserver stopped (killed by SIGABRT)" in message or "not healthy" in message) \
            and at - killed < 3.0, (message, at - killed)
    with CremaClient(service.endpoints.http_url) as client:  # while it restarts: refused at once, not hung
        start = time.monotonic()
        try:
            client.infer(requests[0])
        except AskError as e:
            assert "not ready" in str(e) and time.monotonic() - start < 3.0
    deadline = time.monotonic() + 120
    while service.supervisor.count("restart") == restarts and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.supervisor.count("restart") == restarts + 1
    assert any("tritonserver stopped (killed by SIGABRT)" in line for line in served["log"])
    wait_ready(service)
    assert_serving(served)
    assert not any(os.path.exists(f"/dev/shm/{r}") for r in regions)  # the dead server's shared memory: gone
    live = {stub.region for stub in python_stubs(service.server.process.pid).values()}
    assert live and all(os.path.exists(f"/dev/shm/{r}") for r in live)


def test_64_clients_mixing_good_and_bad_requests_while_a_model_process_dies(served):
    """64 clients in 4 processes (tests/load_client.py), 30 % of their requests malformed, for 30 s;
    a model process is killed at 10 s. Good requests issued after the repair all answer correctly;
    bad ones all get their own error (but for those the kill caught); the ones the kill caught, or
    that came during the repair, fail within 5 s saying "retry"."""
    service = served["service"]
    events, reloads = len(service.supervisor.events), service.supervisor.count("reload")
    e = service.endpoints
    clients = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("load_client.py")), "--http", e.http_url,
                                 "--grpc", e.grpc_url, "--clips", str(served["data"]), "--seconds", "30",
                                 "--threads", "16", "--seed", str(k)], stdout=subprocess.PIPE, text=True)
               for k in range(4)]
    for c in clients:
        assert c.stdout.readline().strip() == "started"
    time.sleep(10)
    killed = time.monotonic()
    os.kill(stub_pid(service, "vision"), signal.SIGKILL)
    results = [json.loads(line) for c in clients for line in c.communicate(timeout=180)[0].splitlines() if line]
    repaired = next(x.at for x in service.supervisor.events[events:] if x.kind == "reload")
    assert service.supervisor.count("reload") == reloads + 1
    window = [r for r in results if killed < r["end"] < repaired + 1.0]
    outside = [r for r in results if r not in window]
    before = [r for r in outside if r["end"] <= killed]
    after = [r for r in outside if r["kind"] == "good" and r["start"] > repaired + 1.0]
    assert len(before) > 20 and len(after) > 20, (len(before), len(after))
    assert all(r["ok"] for r in outside), [r for r in outside if not r["ok"]][:3]  # before and after: all right
    assert all(r["error"] for r in window if r["kind"] == "bad")  # a bad request never gets an answer
    caught = [r for r in window if not r["ok"]]  # each answered within 5 s of the kill or of its own start
    assert all(r["end"] - max(r["start"], killed) < 5.0 and ("retry" in r["error"] or "not healthy" in r["error"])
               for r in caught), [(r["end"] - max(r["start"], killed), r["error"]) for r in caught][:3]


def test_a_taken_port_is_named_in_the_first_line(served):
    """It was "Failed to initialize NVML" (a harmless warning Triton prints on every GPU-less start)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "crema.cli", "serve", "--repo", str(served["repo"]), "--http-port",
                              str(port), "--grpc-port", "0", "--metrics-port", "0"], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2, out
    assert out.stderr.splitlines()[0].startswith(f"error: HTTP port {port} on 127.0.0.1 is not free"), out.stderr
    assert "NVML" not in out.stderr and "Traceback" not in out.stderr


def test_what_triton_gets_is_what_the_front_checked(served):
    """A key given twice: Python keeps the last, Triton's parser the first; the front refuses it
    (and forwards only what it parsed), else this 353-byte request aborted Triton."""
    service = served["service"]
    pid = service.server.process.pid
    ones = ",".join(["1.0"] * 64)
    smuggled = [
        f'{{"inputs":[{{"name":"pc_feat","shape":[1000000000,64],"shape":[1,64],"datatype":"FP32","data":[{ones}]}}]}}',
        f'{{"inputs":[{{"name":"zzz","name":"pc_feat","shape":[1,64],"datatype":"FP32","data":[{ones}]}}]}}',
        '{"inputs":' + SHAPE_BOMB.decode()[10:-1] + ',"inputs":[{"name":"question","shape":[1],"datatype":"BYTES",'
        '"data":["q"]}]}',
    ]
    for body in smuggled:
        status, answer = post(service, "/v2/models/crema/infer", body.encode())
        assert status == 400 and "twice" in answer["error"], (body[:80], status, answer)
    status, answer = post(service, "/v2/models/crema/infer", b'{"inputs":[{"name":"pc_feat","shape":[1,64],'
                          b'"datatype":"FP32","data":[NaN' + b",1.0" * 63 + b"]}]}")
    assert status == 400 and "NaN" in answer["error"]
    status, answer = post(service, "/v2/models/crema/infer", SHAPE_BOMB, {"Inference-Header-Content-Length": "²"})
    assert status == 400 and "not a length" in answer["error"]
    assert service.server.process.pid == pid and service.server.process.poll() is None
    assert_serving(served)


def test_bad_content_is_a_client_error_and_a_gzip_body_is_never_inflated(served):
    service = served["service"]
    tensors, _ = good(served)
    conn = http.client.HTTPConnection(service.endpoints.host, service.endpoints.http, timeout=60)
    # the models' own refusals are 400 (they were 500, "the server failed")
    from tritonclient.http import InferenceServerClient, InferInput
    client = InferenceServerClient(service.endpoints.http_url)
    x = InferInput("video", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"not a video"], dtype=object))
    q = InferInput("question", [1], "BYTES")
    q.set_data_from_numpy(tensors["question"])
    with pytest.raises(Exception) as err:
        client.infer("crema", [q, x])
    assert "[400]" in str(err.value) or "400" in str(getattr(err.value, "status", lambda: "")()), str(err.value)
    # 64 MiB of zeros compressed to ~64 KB: refused at once, without inflating it
    import gzip
    bomb = gzip.compress(b"\0" * (64 << 20))
    start = time.monotonic()
    conn.request("POST", "/nothing-here", body=bomb, headers={"Content-Encoding": "gzip"})
    assert conn.getresponse().status == 404 and time.monotonic() - start < 2.0
    conn.close()
    assert_serving(served)


def test_slow_clients_do_not_hold_the_server(served):
    """32 clients that send headers and one byte of a 1000-byte body, then stall (slowloris): a good
    request is still answered at once (it waited for them: ~30 s), and they are cut off."""
    service = served["service"]
    slow = []
    for _ in range(32):
        s = socket.create_connection((service.endpoints.host, service.endpoints.http), timeout=60)
        s.sendall(b"POST /v2/models/crema/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        slow.append(s)
    time.sleep(0.5)
    start = time.monotonic()
    assert_serving(served)
    assert time.monotonic() - start < 10.0
    for s in slow:
        s.close()
    chunked = socket.create_connection((service.endpoints.host, service.endpoints.http), timeout=10)
    chunked.sendall(b"POST /v2/models/crema/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
    assert chunked.recv(4096).startswith(b"HTTP/1.1 411")
    chunked.close()

"""`crema gateway` with the official `openai` client, against the real gateway in front of the real
front + Triton (the session's `served` fixture): answers equal Triton's own, streaming, usage, the model
list, errors in OpenAI's shape (the gateway serving on after each), the deadline, and a disconnected
client's call cancelled, and two `crema serve` behind one gateway losing no request when one is killed.
The overhead measurement: bench/bench_gateway.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from gateway.app import Gateway, Settings
from synthetic.generator import clip_files
from triton_models.client import CremaClient, tensors_from_files
from triton_models.server import free_port

MEDIA_LIMIT = 2 << 20  # the gateway's decoded-media limit here (a demo clip is ~100 KB)


@pytest.fixture(scope="module")
def allowed(served, tmp_path_factory):
    """The directory file:// URLs may name: demo question 0's clip files."""
    folder = tmp_path_factory.mktemp("allowed")
    for name, path in clip_files(served["data"] / served["questions"][0].clip).items():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def gateway(served, allowed):
    settings = Settings(urls=[served["service"].endpoints.grpc_url], port=0, allow_dirs=[allowed],
                        tokenizer=served["artifacts"] / "tokenizer.json", max_media_bytes=MEDIA_LIMIT, timeout_s=120)
    with Gateway(settings) as g:
        yield g


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def demo(served, i: int = 0):
    """(question, clip files, request) of demo question i: video as a data URL, pc and depth as base64."""
    q = served["questions"][i]
    files = clip_files(served["data"] / q.clip)
    content = [{"type": "text", "text": q.question}, video_part("data:video/mp4;base64," + b64(files["video"]))]
    crema = {"pc": b64(files["pc"]), "depth": b64(files["depth"])}
    return q, files, {"messages": [{"role": "user", "content": content}], "extra_body": {"crema": crema}}


def direct(served, question: str, files: dict, **options) -> str:
    with CremaClient(served["service"].endpoints.grpc_url, "grpc") as triton:
        return triton.infer(tensors_from_files(question, video=files["video"], pc=files["pc"], depth=files["depth"],
                                              **options)).answer


def test_answers_as_triton_with_usage_and_the_model_list(served, gateway, client, allowed):
    q, files, request = demo(served)
    r = client.chat.completions.create(model="crema", **request)
    assert r.choices[0].message.content == direct(served, q.question, files) and r.choices[0].finish_reason == "stop"
    assert r.model == "crema" and r.id.startswith("chatcmpl-") and abs(r.created - time.time()) < 120
    tok = gateway.tokens.tok
    assert r.usage.prompt_tokens == len(tok.encode(q.question, add_special_tokens=False).ids) + 1  # + </s>
    assert r.usage.completion_tokens == len(tok.encode(r.choices[0].message.content, add_special_tokens=False).ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 1
    # options: mcqa, greedy, max_tokens -> max_new_tokens; file:// URLs under an allowed directory; audio
    audio = {"type": "input_audio", "input_audio": {"data": b64(files["audio"]), "format": "wav"}}
    messages = [{"role": "system", "content": "ignored"},
                {"role": "user", "content": [{"type": "text", "text": q.question},
                                             video_part((allowed / "clip.mp4").as_uri()), audio]}]
    r = client.chat.completions.create(model="crema", messages=messages, max_tokens=3,
                                       extra_body={"crema": {"task": "mcqa", "num_beams": 1, "pc": b64(files["pc"]),
                                                             "depth": (allowed / "depth.npy").as_uri()}})
    assert r.choices[0].message.content == direct(served, q.question, files, audio=files["audio"], task="mcqa",
                                                  num_beams=1, max_new_tokens=3)
    assert len(r.model_extra["crema"]["option_scores"]) == len(q.options)
    assert [m.id for m in client.models.list()] == ["crema"] and client.models.retrieve("crema").id == "crema"


def test_streaming(served, client):
    q, files, request = demo(served)
    chunks = list(client.chat.completions.create(model="crema", stream=True, stream_options={"include_usage": True},
                                                 **request))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct(served, q.question, files)
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "stop"]
    assert chunks[-1].usage.total_tokens > 0 and len({c.id for c in chunks}) == 1
    body = {"model": "crema", "stream": True, "messages": request["messages"], **request["extra_body"]}
    with urllib.request.urlopen(urllib.request.Request(  # the wire format: SSE ending with [DONE]
            f"{client.base_url}chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.read().decode().rstrip().endswith("data: [DONE]")


def error_cases(served, allowed, tmp_path) -> list[tuple[str, dict, int, str]]:
    """(what, request, HTTP status, param) of each refused request."""
    q, files, _ = demo(served)
    text = {"type": "text", "text": q.question}
    user = lambda *parts: [{"role": "user", "content": [text, *parts]}]  # noqa: E731
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(files["video"].read_bytes())
    link = allowed / "escape.mp4"  # a symlink in the allowed directory, pointing out of it
    if not link.is_symlink():
        link.symlink_to(outside)
    big = "data:video/mp4;base64," + "A" * (MEDIA_LIMIT // 3 * 4 + 8)
    return [
        ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ("missing content", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ("assistant history", {"messages": [{"role": "assistant", "content": "x"}, *user()]}, 400, "messages[0].role"),
        ("n=2", {"messages": user(), "n": 2}, 400, "n"),
        ("tools", {"messages": user(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("json response", {"messages": user(), "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("image part", {"messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}})},
         400, "messages[0].content[1].type"),
        ("oversized data URL", {"messages": user(video_part(big))}, 413, "messages[0].content[1].video_url.url"),
        ("file:// outside", {"messages": user(video_part(outside.as_uri()))}, 403,
         "messages[0].content[1].video_url.url"),
        ("symlink escape", {"messages": user(video_part(link.as_uri()))}, 403, "messages[0].content[1].video_url.url"),
        ("http URL", {"messages": user(video_part("http://127.0.0.1:1/clip.mp4"))}, 400,
         "messages[0].content[1].video_url.url"),
        ("bad base64", {"messages": user(video_part("data:video/mp4;base64,@@@@"))}, 400,
         "messages[0].content[1].video_url.url"),
        ("bad pc", {"messages": user(), "extra_body": {"crema": {"pc": b64(files["video"])}}}, 400, "crema.pc"),
        ("unknown model", {"messages": user(), "model": "gpt-4o"}, 404, "model"),
        ("undecodable video (Triton's INVALID_ARG)", {"messages": user(video_part("data:video/mp4;base64,AAAA"))},
         400, None),
        ("options not a list", {"messages": user(), "extra_body": {"crema": {"options": "A B C"}}}, 400,
         "crema.options"),
        ("structured fields for a model exported without a dataset (Triton's INVALID_ARG)",
         {"messages": user(video_part("data:video/mp4;base64," + b64(files["video"]))),
          "extra_body": {"crema": {"situation": "I sit.", "depth": b64(files["depth"]),
                                   "pc": b64(files["pc"])}}}, 400, None),
    ]


def test_errors_in_openai_shape_and_the_gateway_serves_on(served, gateway, client, allowed, tmp_path):
    for what, request, status, param in error_cases(served, allowed, tmp_path):
        extra = request.pop("extra_body", None)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**{"model": "crema", **request}, extra_body=extra)
        error = e.value.body
        assert e.value.status_code == status and error["param"] == param and error["message"], (what, error)
        assert error["type"] == "invalid_request_error" and error["code"], (what, error)
        assert [m.id for m in client.models.list()] == ["crema"], what  # still serving
    assert gateway.in_flight == 0
    q, files, request = demo(served)
    assert client.chat.completions.create(model="crema", **request).choices[0].message.content == \
        direct(served, q.question, files)


def test_body_limit_busy_and_deadline(served):
    q, files, request = demo(served)
    small = Settings(urls=[served["service"].endpoints.grpc_url], port=0, timeout_s=0.001, max_body_bytes=1 << 20,
                     max_concurrent=1)
    with Gateway(small) as g, openai.OpenAI(base_url=g.base_url, api_key="-", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as e:  # the deadline: 504, in OpenAI's shape
            c.chat.completions.create(model="crema", **request)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        with pytest.raises(openai.APIStatusError) as e:  # refused from Content-Length, before reading
            c.chat.completions.create(model="crema", messages=[{"role": "user", "content": "x" * (2 << 20)}])
        assert e.value.status_code == 413 and e.value.body["code"] == "payload_too_large"
        with socket.create_connection(("127.0.0.1", g.port)) as slow:  # holds the one slot, its body unsent
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            wait_for(lambda: g.in_flight == 1)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="crema", **request)
            assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        wait_for(lambda: g.in_flight == 0)  # the abandoned request's handler is cancelled
        assert [m.id for m in c.models.list()] == ["crema"] and g.counts["busy"] == 1
    nobody = Settings(urls=[f"127.0.0.1:{free_port('127.0.0.1')}"], port=0)  # no server there: 503
    with Gateway(nobody) as g, openai.OpenAI(base_url=g.base_url, api_key="-", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="crema", **request)
        assert e.value.status_code == 503 and e.value.body["code"] == "model_unavailable", e.value.body


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_a_disconnected_client_cancels_its_call(served, gateway):
    """A client that disconnects while its call waits in `crema serve`: the gateway's handler is cancelled,
    and with it its gRPC call, which `crema serve`'s front sees go (its waiting call ends). The front's
    forwarding slots are held meanwhile, so the call cannot finish first whatever the timing."""
    front = served["service"].front
    slots = front.limits.max_in_flight
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, front.loop).result(10)  # noqa: E731

    async def hold():
        for _ in range(slots):
            await front._slots.acquire()

    async def release():
        for _ in range(slots):
            front._slots.release()

    q, files, request = demo(served)
    data = json.dumps({"model": "crema", "messages": request["messages"], **request["extra_body"]}).encode()
    before, forwarded = dict(gateway.counts), dict(front.counts)
    run(hold())
    try:
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(data) + data)
            wait_for(lambda: gateway.calling == 1 and front._waiting == 1)
        wait_for(lambda: gateway.in_flight == 0 and front._waiting == 0, 2)
    finally:
        run(release())
    assert gateway.counts == {**before, "cancelled": before["cancelled"] + 1} and front.counts == forwarded


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc): `crema serve` starts Triton in a session of its own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_two_servers_and_a_kill_lose_no_request_issued_after_it(served):
    """Issue 15 item 5: the session's `crema serve` and a second one (a process of its own) behind one gateway,
    four clients asking without pause; the second server and everything it started are killed (SIGKILL, as a
    lost machine) mid-load. Every request issued after the kill is answered, and answered right; a request
    in flight at the kill is answered (retried on the other server) or gets 503 saying to retry."""
    http, grpc_port, metrics = free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.1")
    second = subprocess.Popen([sys.executable, "-m", "crema.cli", "serve", "--repo", str(served["repo"]), "--http-port",
                               str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in second.stdout:
            if line.startswith("ready:"):
                break
        assert second.poll() is None, "the second server did not start"
        q, files, request = demo(served)
        want = direct(served, q.question, files)
        settings = Settings(urls=[served["service"].endpoints.grpc_url, f"127.0.0.1:{grpc_port}"], port=0,
                            timeout_s=120)
        results: list[tuple[float, float, str | None, Exception | None]] = []  # (issued, answered, answer, error)
        stop = threading.Event()
        with Gateway(settings) as g:
            def ask():
                with openai.OpenAI(base_url=g.base_url, api_key="-", max_retries=0, timeout=120) as c:
                    while not stop.is_set():
                        issued = time.monotonic()
                        try:
                            answer = c.chat.completions.create(model="crema", **request).choices[0].message.content
                            results.append((issued, time.monotonic(), answer, None))
                        except openai.APIError as e:
                            results.append((issued, time.monotonic(), None, e))
            clients = [threading.Thread(target=ask) for _ in range(4)]
            for t in clients:
                t.start()
            try:
                wait_for(lambda: len(results) >= 12, 120)  # round-robin: half of them answered by the second
                victims = [second.pid, *descendants(second.pid)]
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                wait_for(lambda: sum(r[0] > killed for r in results) >= 24, 120)
            finally:
                stop.set()
                for t in clients:
                    t.join(150)
            retried = g.counts["retried"]
    finally:
        if second.poll() is None:
            second.kill()
    after = [r for r in results if r[0] > killed]
    assert all(answer == want for _, _, answer, _ in after), [e for *_, e in after if e]
    for issued, answered, answer, error in results:
        if error is not None:
            assert issued <= killed < answered and error.status_code == 503 and "retry" in str(error), error
        else:
            assert answer == want
    assert retried >= 1  # the first call to the dead server after the kill was retried on the live one
    assert len(victims) >= 2  # crema serve and its tritonserver (and the stubs)

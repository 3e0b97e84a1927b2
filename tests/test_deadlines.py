"""Deadlines, cancellation (the front's cancellation board: triton_models/cancel.py) and queue limits
through `crema serve` (front + a real Triton 2.51).

The model here decodes for seconds: the tiny preset with a 6-layer, 512-wide T5 decoder, 64 beams and
min_length = max_new_tokens = 64 (EOS masked), so every full request runs exactly 64 decoder steps and
each step takes tens of ms. Work done is read from the llm model's own counters
(crema_decoder_steps_total, crema_requests_stopped_total) and Triton's execution count.
"""
from __future__ import annotations

import dataclasses
import re
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import tiny
from export.onnx_export import export_artifacts
from reference.config import GenerationConfig
from reference.weights import preset_model
from synthetic.generator import clip_files
from training.demo import demo_data
from triton_models.client import DATATYPES, tensors_from_files
from triton_models.repository import generate_repository
from triton_models.service import Service

STEPS = 64
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadlines")
    cfg = tiny(("rgb",))
    cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, d_model=512, d_ff=2048, d_kv=64, num_heads=8,
                                                          num_decoder_layers=6),
                              generation=GenerationConfig(num_beams=64, max_new_tokens=STEPS, min_length=STEPS,
                                                          length_penalty=1.0))
    artifacts = export_artifacts(preset_model(cfg), root / "artifacts", {"preset": "tiny"}, progress=False)
    video = clip_files(demo_data(root / "clips", 1, 1, cfg.to_dict()) / "clip00000")["video"]
    repo = generate_repository(artifacts, root / "repo", cache_mb=0, max_queue=MAX_QUEUE)
    service = Service(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "server.log").start()
    yield {"service": service, "video": video}
    service.stop()


def _inputs(module, video, **options):
    out = []
    for name, x in tensors_from_files("what is it?", video=video, **options).items():
        tensor = module.InferInput(name, list(x.shape), DATATYPES[x.dtype])
        tensor.set_data_from_numpy(x)
        out.append(tensor)
    return out


def metric(service, name: str, model: str = "llm") -> float:
    with urllib.request.urlopen(f"http://{service.endpoints.host}:{service.endpoints.metrics}/metrics") as r:
        text = r.read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M) or \
        re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def counters(service) -> tuple[float, float]:
    return metric(service, "crema_decoder_steps_total"), metric(service, "crema_requests_stopped_total")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_deadline_stops_the_decode_loop(slow, protocol):
    """gRPC: the client's deadline; HTTP: the KServe `timeout` parameter. The client gets DEADLINE_EXCEEDED /
    504 at its deadline; the llm model's decode loop stops there too (fewer than 64 steps), and does no
    further work."""
    service = slow["service"]
    steps, stopped = counters(service)
    with pytest.raises(InferenceServerException) as e:
        if protocol == "grpc":
            with grpcclient.InferenceServerClient(service.endpoints.grpc_url) as c:
                c.infer("crema", _inputs(grpcclient, slow["video"]), client_timeout=1.0)
        else:
            with httpclient.InferenceServerClient(service.endpoints.http_url) as c:
                c.infer("crema", _inputs(httpclient, slow["video"]), timeout=1_000_000)
    assert ("DEADLINE_EXCEEDED" if protocol == "grpc" else "504") in str(e.value.status()) + str(e.value)
    wait_for(lambda: counters(service)[1] == stopped + 1)
    done = counters(service)[0] - steps
    assert 0 < done < STEPS
    time.sleep(0.5)  # several steps' time: nothing more runs for it
    assert counters(service) == (steps + done, stopped + 1)


def test_cancelled_requests_do_no_work_and_queues_are_bounded(slow):
    """Four requests at once: one decodes, two wait in the llm model's queue (max_queue 2), the fourth is
    rejected at once. The three are cancelled: the decoding one stops at its next step; the waiting ones
    are dropped by Triton, or stop before their first step if the llm model took them first. Every
    request the llm model executed was stopped, and fewer than 64 steps ran in all."""
    service = slow["service"]
    steps, stopped = counters(service)
    executed = metric(service, "nv_inference_exec_count")
    results: dict[int, object] = {}
    with grpcclient.InferenceServerClient(service.endpoints.grpc_url) as c:
        calls = [c.async_infer("crema", _inputs(grpcclient, slow["video"]),
                               callback=lambda result, error, i=i: results.__setitem__(i, error or result)) for i in range(4)]
        wait_for(lambda: len(results) == 1)
        [(rejected, error)] = results.items()
        assert "maximum queue size" in str(error), error
        wait_for(lambda: metric(service, "nv_inference_pending_request_count") == MAX_QUEUE)
        time.sleep(0.2)
        assert len(results) == 1  # nothing else answered: one decodes, two wait
        for i, call in enumerate(calls):
            if i != rejected:
                call.cancel()
        wait_for(lambda: metric(service, "nv_inference_pending_request_count") == 0
                 and counters(service)[1] - stopped == metric(service, "nv_inference_exec_count") - executed)
    time.sleep(0.5)
    ran = metric(service, "nv_inference_exec_count") - executed
    assert 1 <= ran <= 3 and counters(service)[1] - stopped == ran  # each one executed was stopped
    assert counters(service)[0] - steps < STEPS
    with grpcclient.InferenceServerClient(service.endpoints.grpc_url) as c:  # and the server serves on
        answer = c.infer("crema", _inputs(grpcclient, slow["video"], task="oeqa", num_beams=1, max_new_tokens=1))
    assert answer.as_numpy("answer").shape == (1,)


def test_a_client_that_cancels_stops_its_running_decode(slow):
    """The decode has started (the encoders ran, nothing waits in the llm model's queue) when the client
    cancels: the front marks the request on the cancellation board, and the decode loop stops at its next
    step, well before 64 (Triton 2.51 alone lets a running python model run to its end)."""
    service = slow["service"]
    steps, stopped = counters(service)
    encoded = metric(service, "nv_inference_exec_count", "mmqa_rgb")
    with grpcclient.InferenceServerClient(service.endpoints.grpc_url) as c:
        call = c.async_infer("crema", _inputs(grpcclient, slow["video"]), callback=lambda result, error: None)
        wait_for(lambda: metric(service, "nv_inference_exec_count", "mmqa_rgb") == encoded + 1)
        wait_for(lambda: metric(service, "nv_inference_pending_request_count") == 0)
        time.sleep(0.3)
        call.cancel()
        wait_for(lambda: counters(service)[1] == stopped + 1)
    done = counters(service)[0] - steps
    assert 0 < done < STEPS
    time.sleep(0.5)
    assert counters(service) == (steps + done, stopped + 1)

"""Serving with a real Triton server (the nvidia-pytriton wheel's 2.51) behind the front, on loopback
and free ports (the session's `served` fixture, tests/conftest.py), over the trained demo model's
repository (python flavour): HTTP and gRPC answers equal the in-process ONNX Runtime pipeline's,
concurrent requests, the response cache, bad requests answered with errors while the server keeps
serving, and a killed model process. Attacks and failures: tests/test_serving_security.py.
"""
from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pathlib import Path

from conftest import MAX_INPUT_MB
from crema.demo import write_clip
from runtime.inputs import request_from_files
from synthetic.generator import clip_files
from triton_models.client import AskError, CremaClient, request_tensors, tensors_from_files
from triton_models.repository import generate_repository, validate
from triton_models.server import ServerError, TritonServer, python_stubs


@pytest.fixture
def setup(served):
    return served


@pytest.fixture
def http(setup):
    with CremaClient(setup["service"].endpoints.http_url) as client:
        yield client


def files(setup, clip: str) -> dict:
    return clip_files(setup["data"] / clip)


def in_process(setup, question, **options):
    p = setup["pipeline"]
    return p.answer([request_from_files(p.config, question.question, **files(setup, question.clip))], **options)[0]


def test_generated_configs_parse_as_triton_model_configs(setup, tmp_path):
    configs = validate(setup["repo"])
    assert set(configs) == {"crema", "preprocess", "vision", "audio_encoder", "llm"} | {
        f"mmqa_{m}" for m in ("rgb", "depth", "flow", "norm", "audio", "pc")}  # llm runs the LLM graphs itself
    vision = configs["vision"]
    assert vision.max_batch_size > 0 and vision.HasField("dynamic_batching")
    # the models' own response cache (Triton's stores errors): encoders and preprocess, not llm
    cached = {n for n, c in configs.items() if int(c.parameters["cache_bytes"].string_value or 0) > 0}
    assert cached == set(configs) - {"crema", "llm"}
    assert not any(c.response_cache.enable for c in configs.values())
    steps = [s.model_name for s in configs["crema"].ensemble_scheduling.step]
    assert steps[0] == "preprocess" and steps[-1] == "llm" and steps.count("vision") == 4
    native = generate_repository(setup["artifacts"], tmp_path / "native", flavour="native")
    with pytest.raises(ServerError, match="native-flavour repository"):
        TritonServer(native)
    assert {"fuse_encode", "decoder_first", "decoder_step"} < set(validate(native))  # BLS targets
    for name, cfg in validate(native).items():
        text = (native / name / "config.pbtxt").read_text()
        assert text_format.Parse(text, mc.ModelConfig()) == cfg
        if name in ("crema",):
            assert cfg.platform == "ensemble"
        elif name in ("preprocess", "llm"):
            assert cfg.backend == "python"
        else:
            assert cfg.platform == "onnxruntime_onnx" and (native / name / "1" / "model.onnx").is_file()
            assert not (native / name / "1" / "model.py").exists()


def test_rate_limited_repository(setup, tmp_path):
    repo = generate_repository(setup["artifacts"], tmp_path / "repo", cores=2)
    configs = validate(repo)
    for name, cfg in configs.items():
        limits = [(r.name, r.count) for g in cfg.instance_group for r in g.rate_limiter.resources]
        assert limits == ([] if name == "crema" else [("cpu", 2)]), name
    assert "--rate-limit" in TritonServer(repo).command()


def test_gpu_repository_runs_stages_and_the_decode_loop_on_the_gpu(setup, tmp_path):
    """Configs only (no GPU here): stage models and llm as KIND_GPU instances with the CUDA provider,
    preprocess on the CPU."""
    configs = validate(generate_repository(setup["artifacts"], tmp_path / "repo", device="gpu"))
    for name, cfg in configs.items():
        if name == "crema":
            continue
        kinds = {g.kind for g in cfg.instance_group}
        gpu = name != "preprocess"
        assert kinds == {mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU}, name
        assert cfg.parameters["providers"].string_value == ("cuda" if gpu else ""), name
    with pytest.raises(ValueError, match="device 'tpu'"):
        generate_repository(setup["artifacts"], tmp_path / "x", device="tpu")


def test_int8_repository_needs_calibrated_artifacts(setup, tmp_path):
    with pytest.raises(ValueError, match="no INT8 graphs"):
        generate_repository(setup["artifacts"], tmp_path / "repo", precision="int8")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo.tmp").exists()


def test_broken_config_is_refused(setup, tmp_path):
    import shutil
    repo = shutil.copytree(setup["repo"], tmp_path / "repo")
    (repo / "vision" / "config.pbtxt").write_text('name: "vision"\nmax_batch_size: "many"\n')
    with pytest.raises(ValueError, match="vision/config.pbtxt: not a valid Triton ModelConfig"):
        validate(repo)


def test_http_and_grpc_answer_as_the_in_process_runtime(setup):
    service = setup["service"]
    with CremaClient(service.endpoints.http_url) as http, CremaClient(service.endpoints.grpc_url, "grpc") as grpc:
        for q in setup["questions"][:12]:
            want = in_process(setup, q).text
            tensors = tensors_from_files(q.question, **files(setup, q.clip))
            assert http.infer(tensors).answer == want == grpc.infer(tensors).answer, q
        q = setup["questions"][0]
        want = in_process(setup, q, task="mcqa")
        got = grpc.infer(tensors_from_files(q.question, **files(setup, q.clip), task="mcqa"))
        assert got.answer == want.text and np.allclose(got.option_scores, want.option_scores, atol=1e-4)
        greedy = http.infer(tensors_from_files(q.question, **files(setup, q.clip), num_beams=1, max_new_tokens=3))
        assert greedy.answer == in_process(setup, q, num_beams=1, max_new_tokens=3).text
        long = dataclasses.replace(q, question=" ".join([q.question] * 8))  # cut to max_txt_len as CREMA cuts it
        want = in_process(setup, long)
        got = grpc.infer(tensors_from_files(long.question, **files(setup, q.clip)))
        assert got.answer == want.text and got.question_tokens == want.question_tokens
        assert want.question_tokens[1] > want.question_tokens[0] == 32


def test_pre_extracted_frames_instead_of_video(setup, http):
    q = setup["questions"][1]
    p = setup["pipeline"]
    request = request_from_files(p.config, q.question, **files(setup, q.clip))
    frames = {m: x for m, x in request.frames.items()}
    frames["rgb"] = frames["rgb"] * 0.5  # not what the video gives: the frames must be what is used
    want = p.answer([dataclasses.replace(request, frames=frames)])[0].text
    with open(files(setup, q.clip)["audio"], "rb") as f:
        audio = f.read()
    got = http.ask(q.question, frames=frames, audio=audio, pc_feat=request.pc_feat, pc_coords=request.pc_coords)
    assert got.answer == want


def test_concurrent_requests_all_answer_correctly(setup):
    questions = setup["questions"][:12]
    want = {q.id: in_process(setup, q).text for q in questions}
    url = setup["service"].endpoints.http_url

    def ask(q):
        with CremaClient(url) as client:
            return q.id, client.infer(tensors_from_files(q.question, **files(setup, q.clip))).answer

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, questions + questions))
    assert got == want and len(questions) == 12


def cache_hits(service, model: str) -> int:
    """The model's response-cache hits, from the Prometheus metrics its python processes export."""
    with urllib.request.urlopen(f"http://{service.endpoints.host}:{service.endpoints.metrics}/metrics") as r:
        text = r.read().decode()
    found = re.search(rf'^crema_cache_hits_total{{model="{model}"}} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def test_a_repeated_video_hits_the_response_cache(setup, http):
    clip = setup["questions"][-1].clip  # clip00002
    qs = [q for q in setup["questions"] if q.clip == clip]
    service = setup["service"]
    http.infer(tensors_from_files(qs[0].question, **files(setup, clip)))
    before = {m: cache_hits(service, m) for m in ("preprocess", "vision", "mmqa_depth", "audio_encoder")}
    answer = http.infer(tensors_from_files(qs[1].question, **files(setup, clip))).answer
    after = {m: cache_hits(service, m) for m in before}
    assert answer == in_process(setup, qs[1]).text
    assert after["preprocess"] == before["preprocess"] + 1 and after["mmqa_depth"] == before["mmqa_depth"] + 1
    assert after["vision"] == before["vision"] + 4 and after["audio_encoder"] == before["audio_encoder"] + 1


def bad_requests(setup) -> list[tuple[str, dict, str]]:
    """(what, tensors, a phrase the error must contain)."""
    q = setup["questions"][0]
    good = tensors_from_files(q.question, **files(setup, q.clip))
    without = lambda *names: {k: v for k, v in good.items() if k not in names}  # noqa: E731
    text = lambda s: np.array([s], dtype=object)  # noqa: E731
    frames = np.zeros((2, 3, 56, 56), np.float32)
    nan_points = good["pc_feat"].copy()
    nan_points[0, 0] = np.nan
    return [
        ("missing question", without("question"), "question: missing"),
        ("empty question", {**good, "question": text(b"   ")}, "question: empty"),
        ("oversized question", {**good, "question": text(b"why " * 2000)}, "question: 8000 bytes"),
        ("missing audio, a video without soundtrack", {**without("audio"), "video": text(silent_video())},
         "audio: the configuration needs audio and the video has no soundtrack"),
        ("missing video", without("video"), "flow: needs the video"),
        ("undecodable video", {**good, "video": text(b"not a video at all")}, "video bytes: not a video"),
        ("bad depth", {**good, "depth": text(b"\x89PNG not really")}, "depth"),
        ("too many frames", {**good, "rgb_frames": frames}, "rgb_frames"),
        ("wrong dtype", {**good, "pc_coords": good["pc_coords"].astype(np.float32)}, "pc_coords"),
        ("wrong shape", {**good, "pc_feat": good["pc_feat"][:, :10]}, "pc_feat"),
        ("NaN in features", {**good, "pc_feat": nan_points}, "NaN"),
        ("voxels off the grid", {**good, "pc_coords": good["pc_coords"] + 10_000}, "voxel coordinates"),
        ("unknown task", {**good, "task": text(b"summarise")}, "task 'summarise'"),
        ("zero beams", {**good, "num_beams": np.array([0], np.int32)}, "num_beams 0"),
        ("payload over the limit", {**good, "video": text(os.urandom((MAX_INPUT_MB << 20) + 1))},
         "over this server's limit"),
        ("a question that is not UTF-8", {**good, "question": text(b"What \xff colour?")},
         "question: not valid UTF-8 at byte 5"),
        ("depth maps with no frame", {**good, "depth": text(npy_bytes(np.zeros((0, 56, 56), np.float32)))},
         "depth bytes: 0 depth maps"),
    ]


def silent_video() -> bytes:
    """A video without a soundtrack, the size of the demo clips' depth maps."""
    with tempfile.TemporaryDirectory() as d:
        return write_clip(Path(d) / "silent.mp4", frames=8, size=64).read_bytes()


def test_a_video_with_a_soundtrack_is_enough_for_audio(setup, http):
    q = next(x for x in setup["questions"] if x.qtype == "sound")
    tensors = tensors_from_files(q.question, **files(setup, q.clip))
    del tensors["audio"]  # clip.mp4 carries the soundtrack
    assert http.infer(tensors).answer == q.answer


def npy_bytes(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def test_whitespace_in_a_question_does_not_change_the_answer(setup, http):
    q = next(x for x in setup["questions"] if len(x.question.split()) > 3)
    words = q.question.split()
    spread = f"  {words[0]}\n{' '.join(words[1:3])}\t\t{' '.join(words[3:])}\n"
    tensors = tensors_from_files(q.question, **files(setup, q.clip))
    assert http.infer({**tensors, "question": np.array([spread.encode()], dtype=object)}).answer \
        == http.infer(tensors).answer == q.answer


def test_bad_requests_get_errors_and_the_server_keeps_serving(setup, http):
    q = setup["questions"][0]
    good = tensors_from_files(q.question, **files(setup, q.clip))
    want = in_process(setup, q).text
    for what, tensors, phrase in bad_requests(setup):
        with pytest.raises(AskError) as err:
            http.infer(tensors)
        assert phrase in str(err.value), (what, str(err.value))
        assert http.infer(good).answer == want, what


def test_a_killed_model_process_fails_its_request_at_once_and_is_replaced(setup, http):
    service = setup["service"]
    q = setup["questions"][3]
    tensors = tensors_from_files(q.question, **files(setup, q.clip))
    want = http.infer(tensors).answer
    reloads = service.supervisor.count("reload")
    llm = next(pid for pid, s in python_stubs(service.server.process.pid).items() if s.model == "llm")
    os.kill(llm, signal.SIGSTOP)  # hold it mid-run: the next request waits inside it
    outcome = {}

    def in_flight():
        with CremaClient(service.endpoints.http_url) as client:
            try:
                outcome["answer"] = client.infer(tensors).answer
            except AskError as e:
                outcome["error"] = str(e)
            outcome["at"] = time.monotonic()

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(llm, signal.SIGKILL)
    thread.join(60)
    # the request it died in fails at once, and says what happened (the front's answer or Triton's,
    # whichever is first; under load Triton alone took up to ~17 s: tests/test_serving_security.py)
    error = outcome.get("error", "")
    assert "llm" in error and ("process died" in error or "not healthy" in error), outcome
    assert outcome["at"] - killed < 3.0
    deadline = time.monotonic() + 60
    while service.supervisor.count("reload") == reloads and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [e.what for e in service.supervisor.events[-1:]] == ["llm"]
    wait_ready(service)
    for _ in range(3):
        assert http.infer(tensors).answer == want


def wait_ready(service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not service.supervisor.ready and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.supervisor.ready, service.supervisor.not_ready_reason


def test_crema_serve_and_ask_then_ctrl_c(setup, tmp_path):
    from triton_models.server import free_port
    port, grpc_port, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "crema.cli", "serve", "--repo", str(setup["repo"]),
                              "--http-port", str(port), "--grpc-port", str(grpc_port), "--metrics-port",
                              str(metrics)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert f"HTTP 127.0.0.1:{port}" in lines[-1], lines
        q = setup["questions"][2]
        f = files(setup, q.clip)
        args = ["--question", q.question, "--video", str(f["video"]), "--depth", str(f["depth"]), "--audio",
                str(f["audio"]), "--pc", str(f["pc"])]
        for protocol, url in (("http", port), ("grpc", grpc_port)):
            out = subprocess.run([sys.executable, "-m", "crema.cli", "ask", "--url", f"127.0.0.1:{url}",
                                  "--protocol", protocol, *args], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and f"answer:   {in_process(setup, q).text}" in out.stdout, out.stderr
        refused = subprocess.run([sys.executable, "-m", "crema.cli", "ask", "--url", f"127.0.0.1:{port}",
                                  *args[:2]], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "flow: needs the video" in refused.stderr
        serve.send_signal(signal.SIGINT)
        rest = serve.communicate(timeout=60)[0]
        assert serve.returncode == 0 and "stopped" in rest
    finally:
        if serve.poll() is None:
            serve.kill()


def test_request_tensors_send_only_what_is_given():
    t = request_tensors("Q?", audio=b"RIFF", num_beams=2)
    assert sorted(t) == ["audio", "num_beams", "question"] and t["num_beams"].dtype == np.int32


def test_the_demo_answers_from_the_video_alone(setup, tmp_path):
    """Issue 14: the demo model exported with its shipped depth estimator; a request carrying clip.mp4 and
    pc.npz only (no depth maps, no audio file) gets depth and normals from the repository's depth_estimator
    model (called by preprocess), audio from the soundtrack: the make-demo clip's six answers are right and
    equal the in-process runtime's, and a repeated video hits the estimator's cache."""
    from crema.demo import video_alone
    from export.onnx_export import export_artifacts
    from reference.weights import DEMO_DEPTH, DEMO_SOURCE, demo_model
    from runtime.pipeline import Pipeline
    from triton_models.service import Service

    art = export_artifacts(demo_model(), tmp_path / "art", DEMO_SOURCE, progress=False, depth_model=DEMO_DEPTH)
    repo = generate_repository(art, tmp_path / "repo")
    assert "depth_estimator" in validate(repo)
    pipeline = Pipeline(art)
    with Service(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "server.log") as service, \
            CremaClient(service.endpoints.http_url) as client:
        for q in [q for q in setup["questions"] if q.clip == "clip00000"]:  # the clip `make demo` asks about
            f = video_alone(setup["data"] / q.clip)
            want = pipeline.answer([request_from_files(pipeline.config, q.question, **f,
                                                       depth_model=pipeline.depth_estimator)])[0].text
            assert client.infer(tensors_from_files(q.question, **f)).answer == want == q.answer, q
        # the same video with an audio file: preprocess runs again, the estimator's frames are a cache hit
        before = cache_hits(service, "depth_estimator")
        client.infer(tensors_from_files(q.question, **f, audio=files(setup, q.clip)["audio"]))
        assert cache_hits(service, "depth_estimator") == before + 1

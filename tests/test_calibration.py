"""`crema calibrate` on the demo model: INT8 graphs within DESIGN §5's bounds, FP32 files untouched."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from calibration.calibrate import (ACCURACY_BOUND, COSINE_BOUND, CalibrationLockedError, calibrate, format_report,
                                   report_path)
from calibration.data import CalibrationDataError
from runtime.artifacts import MANIFEST, ArtifactError, Artifacts
from runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def fp32_artifacts(tmp_path_factory):
    from export.onnx_export import export_artifacts
    from reference.weights import demo_model
    out = tmp_path_factory.mktemp("cal") / "artifacts"
    export_artifacts(demo_model(), out, {"preset": "demo"}, progress=False)
    return out


@pytest.fixture(scope="module")
def calibrated(fp32_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "int8"
    shutil.copytree(fp32_artifacts, out)
    report = calibrate(out, questions=60, eval_questions=300, log=lambda *_: None)
    return out, report


def test_int8_within_the_fidelity_bounds(calibrated):
    directory, report = calibrated
    assert report["ok"], report
    assert all(s["cosine"] >= COSINE_BOUND for s in report["stages"].values())
    assert report["end_to_end"]["int8"]["relative_accuracy"] >= ACCURACY_BOUND
    assert report["end_to_end"]["fp32"]["accuracy"] > 0.8  # a trained model, not noise
    assert {s["mode"] for s in report["stages"].values()} == {"static"}


def test_int8_artifacts_are_self_describing(calibrated, fp32_artifacts):
    directory, _ = calibrated
    art = Artifacts(directory)  # verifies every hash, INT8 files included
    fp32_files = json.loads((fp32_artifacts / MANIFEST).read_text())["files"]
    assert all(art.manifest["files"][k] == v for k, v in fp32_files.items())  # FP32 untouched
    for name, stage in art.manifest["int8"]["stages"].items():
        assert (directory / stage["file"]).is_file() and stage["file"] in art.manifest["files"]
        table = directory / "int8" / "tensorrt" / name
        assert {p.name for p in table.iterdir()} >= {"calibration.cache", "calibration.json", "calibration.flatbuffers"}
        ranges = json.loads((table / "calibration.json").read_text())
        assert np.isfinite(np.hstack([r[k]["data"] for r in ranges.values() for k in ("lowest", "highest")])).all()
    assert "int8/fidelity.json" in art.manifest["files"]
    assert art.path("vision", "int8") != art.path("vision", "fp32")
    import onnx
    graph = onnx.load(str(art.path("vision", "int8")), load_external_data=False).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert any(n.op_type == "Softmax" for n in graph.node)  # kept FP32


def test_int8_pipeline_answers(calibrated):
    from reference.config import preset
    directory, _ = calibrated
    fp32, int8 = Pipeline(directory), Pipeline(directory, precision="int8")
    from calibration.data import EVALUATION_SEED, read_items
    from training.demo import demo_data
    items = read_items(demo_data(directory.parent / "q", 1, EVALUATION_SEED, preset("demo").to_dict()),
                       fp32.config)
    a = [x.text for x in fp32.answer([it.request for it in items])]
    b = [x.text for x in int8.answer([it.request for it in items])]
    assert np.mean([x == y for x, y in zip(a, b)]) >= 5 / 6


def test_no_int8_graphs_is_a_clear_error(fp32_artifacts):
    with pytest.raises(ArtifactError, match="crema calibrate"):
        Pipeline(fp32_artifacts, precision="int8")


def test_unreadable_calibration_data_leaves_fp32_intact(fp32_artifacts, tmp_path):
    before = (fp32_artifacts / MANIFEST).read_text()
    (tmp_path / "data").mkdir()
    with pytest.raises(CalibrationDataError, match="questions.jsonl"):
        calibrate(fp32_artifacts, data=tmp_path / "data", log=lambda *_: None)
    (tmp_path / "data" / "questions.jsonl").write_text('{"clip": "nope", "question": "Q?"}\n')
    with pytest.raises(CalibrationDataError, match="nope"):
        calibrate(fp32_artifacts, data=tmp_path / "data", log=lambda *_: None)
    assert (fp32_artifacts / MANIFEST).read_text() == before and not (fp32_artifacts / "int8").exists()
    Artifacts(fp32_artifacts)


def test_tensorrt_engines(calibrated):
    """Runs only where tensorrt imports and a CUDA GPU is present."""
    from calibration.tensorrt import available, build_engines
    reason = available()
    if reason:
        pytest.skip(f"TensorRT: {reason}")
    directory, _ = calibrated
    for precision in ("fp16", "int8"):
        assert len(build_engines(directory, precision, log=lambda *_: None)) == len(Artifacts(directory).specs)


def test_build_trt_without_tensorrt_says_why(fp32_artifacts):
    import subprocess
    import sys
    from calibration.tensorrt import available
    if available() is None:
        pytest.skip("TensorRT is available here")
    r = subprocess.run([sys.executable, "-m", "crema.cli", "build-trt", "--artifacts", str(fp32_artifacts)],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "cannot build TensorRT engines" in r.stderr


def test_calibration_methods_on_planted_outliers():
    """DESIGN §4: a few fc2-input channels 50-100x the rest; every method is scored vs FP32."""
    from calibration.outliers import compare_methods
    r = compare_methods(calib_questions=12, eval_questions=12, log=lambda *_: None)
    assert 50 <= r["outliers"]["fc2_input_ratio"]
    for method in ("minmax", "entropy", "percentile"):
        assert r["clean"][method]["cosine"] >= COSINE_BOUND
    # the outliers cost accuracy: some method loses fidelity it had on clean weights
    assert min(r["outliers"][m]["cosine"] for m in ("minmax", "entropy", "percentile")) < \
        min(r["clean"][m]["cosine"] for m in ("minmax", "entropy", "percentile"))


def test_execution_providers(fp32_artifacts):
    import onnxruntime as ort
    from runtime.pipeline import execution_providers
    assert execution_providers(["cpu"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ArtifactError, match="onnxruntime-gpu"):
            Pipeline(fp32_artifacts, providers=["cuda"])
    else:
        assert execution_providers(["cuda"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _snapshot(directory):
    from runtime.artifacts import sha256
    return {p.relative_to(directory).as_posix(): sha256(p) for p in directory.rglob("*") if p.is_file()}


def _wait_for(condition, proc, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_killed_calibration_installs_nothing_and_a_running_one_refuses_a_second(fp32_artifacts, tmp_path):
    directory = tmp_path / "a"
    shutil.copytree(fp32_artifacts, directory)
    before = {p.name for p in directory.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "crema.cli", "calibrate", "--artifacts", str(directory),
                             "--questions", "8", "--eval-questions", "120"],  # evaluation: seconds to catch it in
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # every stage quantized (its INT8 decoder_step graph exists somewhere below the directory): the
        # run is evaluating its graphs end to end
        _wait_for(lambda: [p for p in directory.rglob("decoder_step.onnx") if p.parent != directory], proc,
                  "INT8 decoder_step graph")
        os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-run (it keeps its lock), then kill it
        assert proc.poll() is None, "the calibration finished before it could be stopped"
        with pytest.raises(CalibrationLockedError, match="another `crema calibrate` or `crema convert-fp16` is running"):
            calibrate(directory, questions=8, eval_questions=6, log=lambda *_: None)
    finally:
        proc.kill()
        proc.wait()
    assert "int8" not in json.loads((directory / MANIFEST).read_text())
    with pytest.raises(ArtifactError, match="no INT8 graphs"):
        Pipeline(directory, precision="int8")
    Artifacts(directory)  # FP32 still verifies
    assert {p.name for p in directory.iterdir()} > before  # the killed run's leftovers

    report = calibrate(directory, questions=8, eval_questions=6, log=lambda *_: None)
    assert report["ok"]
    assert {p.name for p in directory.iterdir()} == before | {"int8"}  # leftovers cleaned
    Pipeline(directory, precision="int8")


def test_failed_fidelity_leaves_the_artifacts_as_they_were_and_a_pass_replaces_them(calibrated, tmp_path):
    directory = tmp_path / "a"
    shutil.copytree(calibrated[0], directory)
    manifest, files = (directory / MANIFEST).read_bytes(), _snapshot(directory)
    logged = []
    report = calibrate(directory, questions=8, eval_questions=6, cosine_bound=1.01, log=logged.append)
    assert not report["ok"] and not report["installed"]
    assert (directory / MANIFEST).read_bytes() == manifest  # the previous INT8 graphs stay installed
    rejected = report_path(directory, report)
    assert rejected == directory / "int8-rejected.json"
    assert _snapshot(directory) == {**files, rejected.name: _snapshot(directory)[rejected.name]}
    assert json.loads(rejected.read_text())["ok"] is False
    assert any(str(rejected) in line for line in logged) and "not installed" in format_report(report)

    report = calibrate(directory, questions=8, eval_questions=6, log=lambda *_: None)
    assert report["installed"] and report_path(directory, report) == directory / "int8" / "fidelity.json"
    art = Artifacts(directory)
    assert art.manifest["int8"]["stages"] == report["stages"] and not rejected.exists()
    assert art.manifest["files"]["int8/vision.onnx"] != files["int8/vision.onnx"]  # calibrated on other calls
    assert {k for k in art.manifest["files"]} == {k for k in files if k != MANIFEST}


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_every_method_calibrates_every_stage(fp32_artifacts, tmp_path, method):
    """T5-style relative position buckets (BEATs, T5 encoder, decoder step) take log(0) = -inf on a branch
    torch.where discards, and the attention mask fill is finfo(float32).min: no usable range, so those
    tensors are left out of the TensorRT tables (they broke ORT's histogram calibrators)."""
    directory = tmp_path / "a"
    shutil.copytree(fp32_artifacts, directory)
    logged = []
    # two calls per stage are enough for calls of different shapes (text length, decoder cache) to meet
    # in one histogram; ORT's entropy search is slow python, its time grows with the calls
    report = calibrate(directory, method=method, questions=12, eval_questions=12, max_feeds=2, log=logged.append)
    assert report["ok"], report
    stages = report["stages"]
    assert all(s["cosine"] >= COSINE_BOUND for s in stages.values())
    for name in ("audio_encoder", "fuse_encode", "decoder_step"):
        skipped = stages[name]["tensorrt_skipped"]
        assert any("Log" in t for t in skipped), (name, skipped)
        assert any(name in line and skipped[0] in line for line in logged)
        table = json.loads((directory / "int8" / "tensorrt" / name / "calibration.json").read_text())
        assert not set(skipped) & set(table) and len(table) > 100
    assert stages["vision"]["tensorrt_skipped"] == []
    assert "audio_encoder (3)" in format_report(report)
    assert json.loads((directory / "int8" / "fidelity.json").read_text())["stages"] == stages


def test_killed_export_is_cleaned_by_the_next(tmp_path):
    from conftest import make_model
    from export.onnx_export import export_artifacts
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "crema.cli", "export", "--preset", "tiny", "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(tmp_path.iterdir()), proc, "export staging folder")
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and list(tmp_path.iterdir())
    export_artifacts(make_model(), out, {"preset": "tiny"}, progress=False)
    assert list(tmp_path.iterdir()) == [out]
    Artifacts(out)


def test_int8_graphs_use_only_ops_tensorrt_parses(calibrated):
    import onnx

    from calibration.tensorrt import unsupported_ops
    art = Artifacts(calibrated[0])
    for name in art.specs:
        graph = onnx.load(str(art.path(name, "int8")), load_external_data=False).graph
        assert not unsupported_ops(graph), (name, unsupported_ops(graph))

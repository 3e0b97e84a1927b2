"""`crema calibrate` on the demo model: INT8 graphs within DESIGN §5's bounds, FP32 files untouched."""
import json
import shutil

import numpy as np
import pytest

from calibration.calibrate import ACCURACY_BOUND, COSINE_BOUND, calibrate
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

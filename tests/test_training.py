"""`crema train-demo` and `crema train-depth` are deterministic, and the shipped demo model answers new clips
through the runtime, with their depth maps and from the video alone (its shipped depth estimator)."""
import json

import numpy as np
import pytest

from crema.demo import video_alone
from reference.weights import DEMO_CHECKPOINT, DEMO_DEPTH, demo_model, load_checkpoint
from runtime.inputs import request_from_files
from runtime.pipeline import Pipeline
from synthetic.generator import QUESTION_TYPES, clip_files, read_questions
from training.demo import TrainSettings, demo_data, metrics_table, train_demo
from training.depth import DepthSettings, report_markdown, train_depth

TINY_RUN = TrainSettings(train_clips=8, test_clips=4, steps=6, clip_batch=4, warmup=2)


def test_training_is_deterministic(tmp_path):
    a = train_demo(tmp_path / "a", TINY_RUN, work=tmp_path / "data_a", log=lambda *_: None)
    b = train_demo(tmp_path / "b", TINY_RUN, work=tmp_path / "data_b", log=lambda *_: None)
    assert a["ablation"] == b["ablation"] and a["final_loss"] == b["final_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert set(a["ablation"]) == {"all", "rgb only"} | {f"without {m}" for m in
                                                        ("rgb", "depth", "flow", "norm", "audio", "pc")}
    assert "| rgb only |" in metrics_table(a)
    load_checkpoint(tmp_path / "a")  # a checkpoint `crema run --checkpoint` reads


def test_shipped_weights_fit_the_budget():
    size = (DEMO_CHECKPOINT / "model.safetensors").stat().st_size
    assert size <= 20 * 2 ** 20 and (DEMO_CHECKPOINT / "tokenizer.json").is_file()
    metrics = json.loads((DEMO_CHECKPOINT / "metrics.json").read_text())
    assert metrics["accuracy"]["overall"] >= 0.9  # issue 4's goal
    for qtype, modality in QUESTION_TYPES.items():  # each type clearly better with its modality
        assert metrics["accuracy"][qtype] - metrics["ablation"][f"without {modality}"][qtype] >= 0.3, qtype


TINY_DEPTH = DepthSettings(train_clips=3, frames=2, steps=3, batch=2, warmup=1, demo_clips=1, threads=1)


def test_depth_training_is_deterministic(tmp_path):
    a = train_depth(tmp_path / "a", TINY_DEPTH, work=tmp_path / "data_a", log=lambda *_: None)
    b = train_depth(tmp_path / "b", TINY_DEPTH, work=tmp_path / "data_b", log=lambda *_: None)
    assert a["held_out"] == b["held_out"] and a["demo"] == b["demo"] and a["final_loss"] == b["final_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert set(a["demo"]) == {"rendered depth", "video alone"} and "| AbsRel |" in report_markdown(a)
    from export.depth import check_depth_model
    check_depth_model(tmp_path / "a")  # a directory `crema export --depth-model` takes


def test_shipped_depth_estimator_fits_the_budget():
    """Issue 14: weights <= 5 MB, and the demo model keeps its accuracy from the video alone."""
    assert (DEMO_DEPTH / "model.safetensors").stat().st_size <= 5 * 2 ** 20
    metrics = json.loads((DEMO_DEPTH / "metrics.json").read_text())
    alone = metrics["demo"]["video alone"]
    assert alone["overall"] >= 0.9 and alone["nearer"] >= 0.9
    assert alone["facing"] >= 0.7  # normals from estimated depth: the known weakness (docs/demo-model.md)


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory):
    from export.onnx_export import export_artifacts
    out = tmp_path_factory.mktemp("demo") / "artifacts"
    export_artifacts(demo_model(), out, {"preset": "demo"}, progress=False, depth_model=DEMO_DEPTH)
    return out


def test_demo_model_answers_new_clips_through_the_runtime(demo_artifacts, tmp_path):
    """Clips the model never saw (seed 1), raw files -> ORT: accuracy near the shipped held-out figure."""
    pipeline = Pipeline(demo_artifacts)
    cfg = pipeline.config
    data = demo_data(tmp_path, 10, 1, cfg)
    questions = read_questions(data)
    requests = [request_from_files(cfg, q.question, **clip_files(data / q.clip)) for q in questions]
    answers = pipeline.answer(requests)
    accuracy = np.mean([a.text == q.answer for a, q in zip(answers, questions)])
    shipped = json.loads((DEMO_CHECKPOINT / "metrics.json").read_text())["accuracy"]["overall"]
    assert accuracy >= shipped - 0.1, (accuracy, shipped)


def test_demo_model_answers_from_the_video_alone(demo_artifacts, tmp_path):
    """clip.mp4 + pc.npz only: depth and normals from the exported depth estimator (ONNX), audio from the
    soundtrack, flow from the frames; accuracy near the shipped video-alone figure."""
    pipeline = Pipeline(demo_artifacts)
    assert pipeline.depth_estimator is not None
    data = demo_data(tmp_path, 10, 1, pipeline.config)
    questions = read_questions(data)
    requests = [request_from_files(pipeline.config, q.question, **video_alone(data / q.clip),
                                   depth_model=pipeline.depth_estimator) for q in questions]
    accuracy = np.mean([a.text == q.answer for a, q in zip(pipeline.answer(requests), questions)])
    shipped = json.loads((DEMO_DEPTH / "metrics.json").read_text())["demo"]["video alone"]["overall"]
    assert accuracy >= shipped - 0.1, (accuracy, shipped)

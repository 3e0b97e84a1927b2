"""`crema evaluate` on the three official annotation formats, through ONNX Runtime, a real Triton
(`crema serve`) and the PyTorch reference: the same predictions from every backend, CREMA's prompt
reaching the model (its token count), SQA3D's 5000 points, a missing video reported for its item while
the run goes on, metrics files, and the command resuming a finished run.

Models: the tiny preset with each dataset's modalities and random weights (their answers are not
meant to be right: the backends must agree). Media: one generated clip (video with soundtrack) copied
into each dataset's layout, and generated 3D features.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny
from crema.evaluate import ReferenceBackend, RuntimeBackend, TritonBackend, generation, inputs, prompt, run
from evaluation.annotations import load_annotations
from export.onnx_export import export_artifacts
from reference.weights import preset_model
from synthetic.generator import clip_files
from training.demo import demo_data
from triton_models.repository import generate_repository
from triton_models.service import Service

MODALITIES = {"nextqa": ("rgb",), "music-avqa": ("rgb", "audio"), "sqa3d": ("rgb", "pc")}
OPTIONS = ["the ball rolls.", "it stops.", "a cat jumps.", "nothing.", "it turns around."]


def annotations(dataset: str, root, video) -> tuple:
    """(annotation file, media root) in the dataset's official layout; its last item's media is missing."""
    media = root / "media"
    media.mkdir()
    if dataset == "nextqa":
        rows = [{"qid": f"{t}_v{i}_{i}", "video": f"v{i}", "question": q, "num_option": 5,
                 **{f"a{j}": o for j, o in enumerate(OPTIONS)}, "answer": i % 5}
                for i, (t, q) in enumerate([("CW", "why did the ball roll?"), ("TN", "what happens next?"),
                                            ("DC", "how many balls are there?")])]
        for i in range(2):
            shutil.copy(video, media / f"v{i}.mp4")
    elif dataset == "music-avqa":
        rows = [{"video_id": f"{i:05d}", "question_id": i, "type": t, "question_content": q, "templ_values": v,
                 "anser": a} for i, (t, q, v, a) in enumerate([
                     ('["Audio", "Counting"]', "How many <Object> are sounding?", '["cello"]', "two"),
                     ('["Audio-Visual", "Existential"]', "Is the <Object> in the <LR> sounding?",
                      '["piano", "left"]', "yes"),
                     ('["Visual", "Location"]', "Where is the <Object>?", '["acoustic_guitar"]', "left")])]
        for i in range(2):
            shutil.copy(video, media / f"{i:05d}.mp4")
    else:
        rows = [{"scene_id": f"scene{i:04d}_00", "question_id": i, "situation": s, "question": q, "answers": [a]}
                for i, (s, q, a) in enumerate([("I am facing the window.", "What is on my left?", "chair"),
                                                ("I sit on the bed.", "Is the door open?", "no"),
                                                ("I stand by the desk.", "How many chairs are there?", "two")])]
        (media / "pc").mkdir()
        (media / "video").mkdir()
        rng = np.random.default_rng(0)
        for i, points in enumerate([6000, 100]):  # more than CREMA's 5000, and fewer
            np.savez(media / "pc" / f"scene{i:04d}_00.npz", feat=rng.standard_normal((points, 48)).astype(np.float32),
                     coords=rng.integers(0, 32, (points, 3)))
            shutil.copy(video, media / "video" / f"scene{i:04d}_00.mp4")
    path = root / f"{dataset}.json"
    path.write_text(json.dumps(rows))
    return path, media


@pytest.fixture(scope="module", params=list(MODALITIES))
def dataset(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    cfg = tiny(MODALITIES[name], downstream_task="mcqa" if name == "nextqa" else "oeqa", dataset=name)
    model = preset_model(cfg)
    artifacts = export_artifacts(model, root / "artifacts", {"preset": "tiny"}, progress=False)
    video = clip_files(demo_data(root / "clips", 1, 1, cfg.to_dict()) / "clip00000")["video"]
    ann, media = annotations(name, root, video)
    yield {"name": name, "root": root, "model": model, "artifacts": artifacts, "annotations": ann, "media": media}


def predictions(result) -> dict:
    lines = [json.loads(x) for x in open(result["predictions_path"])]
    return {x["id"]: x.get("prediction", x.get("error")) for x in lines}


def test_every_backend_answers_alike_with_cremas_prompts(dataset):
    name, root = dataset["name"], dataset["root"]
    runtime = RuntimeBackend(dataset["artifacts"])
    modalities = list(MODALITIES[name])
    got = run(name, dataset["annotations"], dataset["media"], root / "ort", runtime, modalities, progress=False)
    repo = generate_repository(dataset["artifacts"], root / "repo")
    items = load_annotations(name, dataset["annotations"])
    with Service(repo, http_port=0, grpc_port=0, metrics_port=0) as service:
        triton = TritonBackend(service.endpoints.grpc_url)
        served = run(name, dataset["annotations"], dataset["media"], root / "triton", triton, modalities,
                     progress=False)
        # a structured request: the server (exported with the dataset) builds CREMA's prompt itself
        item = items[0]
        fields = {"nextqa": {"options": list(item.options)}, "sqa3d": {"situation": item.extra.get("situation")},
                  "music-avqa": {"templ_values": json.dumps(item.extra.get("templ_values"))}}[name]
        files = inputs(item, dataset["media"], modalities)
        raw = item.extra.get("template", item.question)
        structured = triton(raw, files, {**generation(name), **fields})
        assert structured == runtime(prompt(item), files, generation(name))
    assert predictions(got) == predictions(served)
    lines = {x["id"]: x for x in map(json.loads, open(got["predictions_path"]))}
    missing = items[-1]
    assert lines[missing.id]["error_type"] == "MissingMedia" and got["counts"]["errors"] == 1
    for item in items[:-1]:  # CREMA's prompt is what the model read: its token count
        text = prompt(item)
        assert lines[item.id]["info"]["question_tokens"][1] == runtime.pipeline.tokenizer.lengths([text])[0]
    assert got["metrics"]["total"] == len(items) and (root / "ort" / "metrics.json").is_file()
    if name == "nextqa":  # mcqa: the prediction is an option letter, scored against the gold letter
        assert all(lines[i.id]["prediction"] in "ABCDE" for i in items[:-1])
        reference = run(name, dataset["annotations"], dataset["media"], root / "reference",
                        ReferenceBackend(dataset["model"]), modalities, progress=False)
        assert predictions(reference) == predictions(got)


@pytest.mark.parametrize("dataset", ["sqa3d"], indirect=True)
def test_sqa3d_feeds_cremas_5000_points(dataset):
    items = load_annotations("sqa3d", dataset["annotations"])
    many, few = (inputs(i, dataset["media"], ["rgb", "pc"])["pc"] for i in items[:2])
    assert many[0].shape == few[0].shape == (5000, 48)
    raw = np.load(dataset["media"] / "pc" / "scene0000_00.npz")
    np.testing.assert_array_equal(many[0], raw["feat"][:5000])  # the first 5000, as CREMA's argsort keeps
    assert not few[0][100:].any() and not few[1][100:].any()  # zero features at voxel (0, 0, 0)


@pytest.mark.parametrize("dataset", ["music-avqa"], indirect=True)
def test_the_command_writes_metrics_and_resumes(dataset):
    out = dataset["root"] / "cli"
    args = [sys.executable, "-m", "crema.cli", "evaluate", "--dataset", "music-avqa", "--annotations",
            str(dataset["annotations"]), "--media", str(dataset["media"]), "--out", str(out), "--artifacts",
            str(dataset["artifacts"]), "--quiet"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "0 resumed" in first.stdout and "1 unanswered" in first.stdout and "| **Audio** |" in first.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 resumed" in again.stdout, again.stdout + again.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["total"] == 3 and len((out / "predictions.jsonl").read_text().splitlines()) == 3
    both = subprocess.run(args + ["--url", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "exactly one backend" in both.stderr


def test_nextqa_flow_folders_are_read_as_crema_reads_them(tmp_path):
    """CREMA's load_frames, type 'flow' (data_utils.py l.167-170): FLIP_LEFT_RIGHT, then transpose(2) (ROTATE_90),
    then resize((224, 224)): NExT-QA's flow frames are stored mirrored and turned."""
    from PIL import Image

    from runtime.video import MEAN, STD
    media = tmp_path / "videos"
    media.mkdir()
    flow = tmp_path / "videos_flow" / "v0"  # CREMA's sibling folder of the frames root
    flow.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(flow / f"{i:03d}.png")
    shutil.copytree(flow, media / "v0")  # its rgb frames: any folder will do here
    row = {"qid": "CW_v0_0", "video": "v0", "question": "why?", "num_option": 5,
           **{f"a{j}": o for j, o in enumerate(OPTIONS)}, "answer": 0}
    (tmp_path / "a.json").write_text(json.dumps([row]))
    [item] = load_annotations("nextqa", tmp_path / "a.json")
    got = inputs(item, media, ["rgb", "flow"], {"rgb": (2, 56), "flow": (2, 56)})["frames"]["flow"]
    files = sorted(flow.iterdir())
    want = np.stack([np.asarray(Image.open(files[i]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                .transpose(Image.Transpose.ROTATE_90).resize((56, 56))) for i in (1, 3)])
    np.testing.assert_array_equal(got, ((want / np.float32(255) - MEAN) / STD).transpose(0, 3, 1, 2))


def test_the_demo_model_evaluated_on_the_synthetic_task(served, tmp_path):
    """The trained demo model on the served clips' questions (questions.jsonl as the generator writes it),
    through ONNX Runtime and `crema serve`: the same predictions, and the demo model's accuracy."""
    from crema.evaluate import RuntimeBackend, TritonBackend
    from runtime.specs import modality_names
    questions = served["data"] / "questions.jsonl"
    modalities = modality_names(served["pipeline"].config)
    ort = run("synthetic", questions, served["data"], tmp_path / "ort", RuntimeBackend(served["artifacts"]),
              modalities, progress=False)
    triton = run("synthetic", questions, served["data"], tmp_path / "triton",
                 TritonBackend(served["service"].endpoints.grpc_url), modalities, progress=False)
    assert predictions(ort) == predictions(triton) and ort["counts"]["errors"] == 0
    assert ort["metrics"]["total"] == 18 and ort["metrics"]["accuracy"] >= 90, ort["table"]


@pytest.mark.parametrize("dataset", ["music-avqa"], indirect=True)
def test_videos_are_read_as_cremas_decord_reads_them(dataset):
    """MUSIC-AVQA and SQA3D videos: rgb frames scaled inside FFmpeg (decode_scaled, checked against decord
    in tests/test_video.py), not OpenCV's resize of the full frames."""
    from runtime.video import decode_frames, decode_scaled, normalize_frames
    [item, *_] = load_annotations("music-avqa", dataset["annotations"])
    got = inputs(item, dataset["media"], ["rgb", "audio"], {"rgb": (2, 56)})
    video = got["video"]
    np.testing.assert_array_equal(got["frames"]["rgb"], normalize_frames(decode_scaled(video, 2, 56), 56))
    assert not np.array_equal(got["frames"]["rgb"], normalize_frames(decode_frames(video, 2), 56))

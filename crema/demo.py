"""`crema demo`: a new synthetic clip, the trained `demo` model exported to ONNX, answers through the runtime.

Also `write_clip`, a plain test video (a red ball moving right) used by tests and the benchmark.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

DEMO_SEED = 1  # training uses seed 0: seed 1's clips were never seen in training


def write_clip(path: str | Path, frames: int = 16, size: int = 96, fps: int = 8) -> Path:
    """A red ball moving left to right on a grey background, written as MPEG-4 (mp4v)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for t in range(frames):
        img = np.full((size, size, 3), 128, np.uint8)
        x = int(size * (0.15 + 0.7 * t / max(frames - 1, 1)))
        cv2.circle(img, (x, size // 2), size // 8, (0, 0, 255), -1)  # BGR red
        writer.write(img)
    writer.release()
    return path


def describe(scene: dict) -> str:
    near = scene["still"][scene["nearer"]]
    return (f"a {scene['colour']} {scene['shape']} moving {scene['motion']}, the {near} nearer, the wall "
            f"facing {scene['facing']}, sound '{scene['sound']}', a 3D {scene['shape3d']}")


def run_demo(out: Path, clips: int = 1, seed: int = DEMO_SEED, triton: bool = True, precision: str = "int8") -> int:
    """Export the demo model, answer every question of `clips` new clips; returns the number wrong.

    triton: through a Triton server started here on loopback (generated repository, python flavour),
    else in process with ONNX Runtime. precision int8/mixed calibrates the export first and falls
    back to FP32 when the INT8 graphs miss DESIGN §5's fidelity bounds."""
    from export.onnx_export import export_artifacts
    from reference.weights import DEMO_DEPTH, DEMO_SOURCE, demo_model
    from synthetic.generator import read_questions
    from training.demo import demo_data

    model = demo_model()
    data = demo_data(out / "clips", clips, seed, model.cfg.to_dict())
    artifacts = out / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)  # always from the current code and weights
    export_artifacts(model, artifacts, DEMO_SOURCE, progress=False, depth_model=DEMO_DEPTH)
    print(f"exported the demo model and its depth estimator ({DEMO_DEPTH.name}) to {artifacts} (ONNX)")
    if precision != "fp32":
        from calibration.calibrate import calibrate
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars: seconds here, noise in the demo
            report = calibrate(artifacts, questions=60, eval_questions=60, log=lambda *a: None)
        worst = min(s["cosine"] for s in report["stages"].values())
        print(f"calibrated INT8 graphs in {report['seconds']} s (lowest stage cosine to FP32: {worst:.4f}, "
              f"{report['end_to_end']['int8']['relative_accuracy']:.0%} of FP32's accuracy on 60 questions)")
        if not report["ok"]:
            print("INT8 misses the fidelity bounds (docs/int8-fidelity.md): serving FP32 instead")
            precision = "fp32"
    questions = read_questions(data)
    if not triton:
        from runtime.inputs import request_from_files
        from runtime.pipeline import Pipeline
        pipeline = Pipeline(artifacts, precision=precision)

        def in_process(folder: Path, question: str) -> str:
            request = request_from_files(pipeline.config, question, **video_alone(folder),
                                         depth_model=pipeline.depth_estimator)
            return pipeline.answer([request])[0].text
        return _ask_all(data, questions, in_process, f"ONNX Runtime in process, {precision}")
    from triton_models.client import CremaClient, tensors_from_files
    from triton_models.repository import generate_repository
    from triton_models.service import Service
    repo = generate_repository(artifacts, out / "repository", flavour="python", precision=precision)
    print(f"wrote the Triton repository {repo}; starting the server (front + supervised Triton) on loopback ...", flush=True)
    start = time.perf_counter()
    with Service(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=out / "tritonserver.log") as server:
        print(f"Triton ready in {time.perf_counter() - start:.1f} s: HTTP {server.endpoints.http_url}, "
              f"gRPC {server.endpoints.grpc_url}")
        with CremaClient(server.endpoints.http_url) as client:
            def via_triton(folder: Path, question: str) -> str:
                return client.infer(tensors_from_files(question, **video_alone(folder))).answer
            wrong = _ask_all(data, questions, via_triton, f"Triton HTTP, {precision}")
    print("server stopped")
    return wrong


def video_alone(folder: Path) -> dict:
    """What the demo asks from: the clip's video (frames and soundtrack) and its 3D features. Depth and normals
    come from the exported depth estimator, audio from the soundtrack, flow from the frames."""
    from synthetic.generator import CLIP_FILES
    return {"video": folder / CLIP_FILES["video"], "pc": folder / CLIP_FILES["pc"]}


def _ask_all(data: Path, questions: list, ask, how: str) -> int:
    wrong = total = 0
    for clip in sorted({q.clip for q in questions}):
        folder = data / clip
        scene = json.loads((folder / "scene.json").read_text())
        print(f"\n{folder}: {describe(scene)}; asked from clip.mp4 (video + soundtrack) and pc.npz")
        print(f"  {'question':<52} {'answer':<9} {'truth':<9}")
        for q in (q for q in questions if q.clip == clip):
            start = time.perf_counter()
            answer = ask(folder, q.question)
            ms = (time.perf_counter() - start) * 1000
            ok = answer == q.answer
            wrong, total = wrong + (not ok), total + 1
            print(f"  {q.question:<52} {answer:<9} {q.answer:<9} {'correct' if ok else 'WRONG'}  ({ms:.0f} ms)")
    print(f"\n{total - wrong}/{total} correct ({how}; the demo model trained by `crema train-demo`, held-out "
          f"accuracy in docs/demo-model.md)")
    sys.stdout.flush()
    return wrong

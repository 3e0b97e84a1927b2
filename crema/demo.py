"""`crema demo`: a new synthetic clip, the trained `demo` model exported to ONNX, answers through the runtime.

Also `write_clip`, a plain test video (a red ball moving right) used by tests and the benchmark.
"""
from __future__ import annotations

import dataclasses
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
    near = ("left", "right")[scene["nearer"]]
    return (f"a {scene['colour']} {scene['shape']} moving {scene['motion']}, the {near} square nearer, the wall "
            f"facing {scene['facing']}, sound '{scene['sound']}', a 3D {scene['shape3d']}")


def run_demo(out: Path, clips: int = 1, seed: int = DEMO_SEED) -> int:
    """Export the demo model, answer every question of `clips` new clips; returns the number wrong."""
    from export.onnx_export import export_artifacts
    from reference.weights import DEMO_SOURCE, demo_model
    from runtime.inputs import request_from_files
    from runtime.pipeline import Pipeline
    from synthetic.generator import clip_files, read_questions
    from training.demo import demo_data

    model = demo_model()
    data = demo_data(out / "clips", clips, seed, model.cfg.to_dict())
    artifacts = out / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)  # always from the current code and weights
    export_artifacts(model, artifacts, DEMO_SOURCE, progress=False)
    print(f"exported the demo model to {artifacts} (ONNX)")
    pipeline = Pipeline(artifacts)
    wrong = total = 0
    questions = read_questions(data)
    for clip in sorted({q.clip for q in questions}):
        folder = data / clip
        scene = json.loads((folder / "scene.json").read_text())
        print(f"\n{folder}: {describe(scene)}")
        request = request_from_files(pipeline.config, "", **clip_files(folder))
        print(f"  {'question':<52} {'answer':<9} {'truth':<9}")
        for q in (q for q in questions if q.clip == clip):
            start = time.perf_counter()
            answer = pipeline.answer([dataclasses.replace(request, question=q.question)])[0].text
            ms = (time.perf_counter() - start) * 1000
            ok = answer == q.answer
            wrong, total = wrong + (not ok), total + 1
            print(f"  {q.question:<52} {answer:<9} {q.answer:<9} {'correct' if ok else 'WRONG'}  ({ms:.0f} ms)")
    print(f"\n{total - wrong}/{total} correct (ONNX Runtime, the demo model trained by `crema train-demo`; "
          f"held-out accuracy in docs/demo-model.md)")
    sys.stdout.flush()
    return wrong

"""`crema calibrate`: INT8 graphs for every stage of an artifact directory, and the fidelity report.

    feeds   the FP32 pipeline answers the calibration questions; every stage's inputs are recorded
    int8    per stage: static QDQ by default, dynamic for the stages named in `dynamic`, written
            as int8/{stage}.onnx; TensorRT tables as int8/tensorrt/{stage}/calibration.*.
            Measured on the demo model (minmax, 90 questions): the decoder quantized dynamically
            had cosine 0.981 (first) / 0.974 (step), static 0.994 / 0.999 (with T5's `wo` and the
            attention products in FP32, calibration/quantize.py): static is the default everywhere.
    report  per stage cosine and max error vs FP32 on the evaluation questions' inputs; answers
            and task accuracy of --precision int8 and mixed vs fp32 (DESIGN §5)
    mixed   the stages within the per-stage bound (cosine >= 0.99) run INT8, the rest FP32
The FP32 files are never touched; the manifest is rewritten atomically with an "int8" section.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from runtime.artifacts import Artifacts, update_manifest
from runtime.pipeline import Pipeline

from training.demo import demo_data

from .data import CALIBRATION_SEED, EVALUATION_SEED, CalibrationDataError, collect_feeds, read_items
from .quantize import DEFAULT_OPS, KEEP_FP32, QuantizationError, cosine, quantize_stage, tensorrt_table

COSINE_BOUND, ACCURACY_BOUND = 0.99, 0.99
MIN_QUESTIONS = 8


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stage_fidelity(fp32: Path, int8: Path, feeds: list[dict], limit: int = 64) -> dict:
    """INT8 vs FP32 on up to `limit` recorded calls: cosine of all float outputs together (the bound
    of DESIGN §5), the worst single call's cosine, and max abs error / max |fp32|."""
    a, b = _session(fp32), _session(int8)
    xs, ys, worst_cos, worst_err = [], [], 1.0, 0.0
    for feed in feeds[:limit]:
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            if not np.issubdtype(x.dtype, np.floating):
                continue
            xs.append(x.ravel())
            ys.append(y.ravel())
            worst_cos = min(worst_cos, cosine(x, y))
            worst_err = max(worst_err, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)))
    return {"cosine": cosine(np.concatenate(xs), np.concatenate(ys)), "worst_call_cosine": worst_cos,
            "max_rel_error": worst_err}


def accuracy(pipeline: Pipeline, items, batch: int = 6) -> tuple[float, list[str]]:
    answers = []
    for start in range(0, len(items), batch):
        answers += [a.text for a in pipeline.answer([it.request for it in items[start:start + batch]])]
    return float(np.mean([a == it.answer for a, it in zip(answers, items)])), answers


def calibrate(artifacts: str | Path, data: str | Path | None = None, method: str = "minmax",
              questions: int = 120, eval_questions: int = 300, ops: tuple[str, ...] = DEFAULT_OPS,
              dynamic: tuple[str, ...] = (), keep_fp32: tuple[str, ...] = KEEP_FP32, max_feeds: int = 64,
              work: Path | None = None, log=print) -> dict:
    """Quantize every stage of `artifacts`, update its manifest, return (and write) the fidelity report.

    max_feeds: recorded calls per stage used for calibration (evenly spaced). ORT's calibrator keeps
    every quantized op's input tensors of every call in memory: at bench-preset widths one vision
    call (16 images) is ~2 GB of them, and 12 calls were OOM-killed on a 24 GiB machine."""
    directory = Path(artifacts)
    fp32 = Artifacts(directory)
    config = fp32.config
    unknown = set(dynamic) - set(fp32.specs)
    if unknown:
        raise ValueError(f"--dynamic {', '.join(sorted(unknown))}: no such stage (stages: {', '.join(fp32.specs)})")
    work = Path(work or directory / "int8.data.tmp")
    start = time.time()
    calib_dir = Path(data) if data else demo_data(work / "calibration", -(-questions // 6), CALIBRATION_SEED, config)
    calib = read_items(calib_dir, config, questions)
    if len(calib) < MIN_QUESTIONS:
        raise CalibrationDataError(f"{calib_dir}: {len(calib)} questions, calibration needs at least {MIN_QUESTIONS}")
    evaluation = read_items(demo_data(work / "evaluation", -(-eval_questions // 6), EVALUATION_SEED, config),
                            config, eval_questions)
    pipeline = Pipeline(directory)
    log(f"calibration: {len(calib)} questions from {calib_dir}; evaluation: {len(evaluation)} questions")
    # one request per call: each recorded feed (one calibration step) stays small
    feeds, eval_feeds = collect_feeds(pipeline, calib, batch=1), collect_feeds(pipeline, evaluation, batch=1)

    out = directory / "int8"
    staging = directory / "int8.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    stages, mixed = {}, []
    for name in tqdm(fp32.specs, desc=f"quantize ({method})", unit="stage"):
        mode = "dynamic" if name in dynamic else "static"
        src = fp32.path(name)
        calls = feeds[name]
        calls = [calls[i] for i in np.linspace(0, len(calls) - 1, min(max_feeds, len(calls))).round().astype(int)] \
            if calls else calls
        quantize_stage(src, staging / f"{name}.onnx", calls, mode, method, ops, keep_fp32=keep_fp32)
        tensorrt_table(src, staging / "tensorrt" / name, calls, method)
        fid = stage_fidelity(src, staging / f"{name}.onnx", eval_feeds[name])
        stages[name] = {"file": f"int8/{name}.onnx", "mode": mode, "ops": list(ops), "keep_fp32": list(keep_fp32),
                        "attention_products": "fp32",
                        "tensorrt_table": f"int8/tensorrt/{name}/calibration.cache", **fid}
        if fid["cosine"] >= COSINE_BOUND:
            mixed.append(name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    if work.name == "int8.data.tmp":
        shutil.rmtree(work, ignore_errors=True)
    manifest = update_manifest(directory, "int8/", int8={"method": method, "stages": stages, "mixed": mixed})

    report = {"method": method, "calibration": {"data": str(calib_dir), "questions": len(calib)},
              "evaluation": {"questions": len(evaluation), "seed": EVALUATION_SEED}, "stages": stages,
              "mixed": mixed}
    fp32_acc, fp32_answers = accuracy(pipeline, evaluation)
    report["end_to_end"] = {"fp32": {"accuracy": fp32_acc}}
    for precision in ("int8", "mixed"):
        acc, answers = accuracy(Pipeline(directory, precision=precision), evaluation)
        report["end_to_end"][precision] = {
            "accuracy": acc, "relative_accuracy": acc / fp32_acc if fp32_acc else float("nan"),
            "answer_agreement": float(np.mean([a == b for a, b in zip(answers, fp32_answers)]))}
    report["ok"] = (all(s["cosine"] >= COSINE_BOUND for s in stages.values())
                    and report["end_to_end"]["int8"]["relative_accuracy"] >= ACCURACY_BOUND)
    report["seconds"] = round(time.time() - start)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2))
    update_manifest(directory, "int8/", int8=manifest["int8"])  # hash fidelity.json too
    return report


def format_report(report: dict) -> str:
    rows = [f"INT8 ({report['method']}) vs FP32, per stage on {report['evaluation']['questions']} evaluation "
            f"questions' inputs (bound: cosine >= {COSINE_BOUND})",
            "| stage | mode | cosine | worst call | max rel. error | |", "|---|---|---:|---:|---:|---|"]
    for name, s in report["stages"].items():
        ok = "ok" if s["cosine"] >= COSINE_BOUND else "FAIL"
        rows.append(f"| {name} | {s['mode']} | {s['cosine']:.5f} | {s['worst_call_cosine']:.5f} | "
                    f"{s['max_rel_error']:.4f} | {ok} |")
    e = report["end_to_end"]
    rows += ["", f"end to end (bound: accuracy >= {100 * ACCURACY_BOUND:.0f}% of FP32's)",
             "| precision | accuracy | relative to FP32 | answers equal to FP32's |", "|---|---:|---:|---:|",
             f"| fp32 | {100 * e['fp32']['accuracy']:.1f}% | 100% | 100% |"]
    for p in ("int8", "mixed"):
        rows.append(f"| {p} | {100 * e[p]['accuracy']:.1f}% | {100 * e[p]['relative_accuracy']:.1f}% | "
                    f"{100 * e[p]['answer_agreement']:.1f}% |")
    rows.append(f"\nmixed runs INT8 on: {', '.join(report['mixed']) or 'none'}")
    rows.append(f"fidelity: {'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(rows)


__all__ = ["calibrate", "format_report", "QuantizationError", "CalibrationDataError"]

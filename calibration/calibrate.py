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
    install only a report that passes puts the graphs live: int8/ (graphs, tables, fidelity.json)
            is renamed into place and then the manifest gains its "int8" section in one atomic
            replace, the commit point. A run that fails leaves the directory as it was (FP32 only,
            or the previous INT8 graphs) and writes its report to ARTIFACTS/int8-rejected.json,
            a file no manifest lists.
Everything a run writes is staged in ARTIFACTS/.calibrate.{pid}.tmp/ (generated clips, graphs) and
evaluated from there. One run at a time holds the directory's lock; the next run removes what a
killed one left behind. The FP32 files are never touched.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from export.onnx_export import remove_paths, remove_stale, staging_dir
from runtime.artifacts import MANIFEST, ArtifactError, Artifacts, update_manifest
from runtime.pipeline import Pipeline

from training.demo import demo_data

from .data import CALIBRATION_SEED, EVALUATION_SEED, CalibrationDataError, Item, collect_feeds, read_items
from .quantize import DEFAULT_OPS, KEEP_FP32, QuantizationError, cosine, quantize_stage, tensorrt_table

COSINE_BOUND, ACCURACY_BOUND = 0.99, 0.99
MIN_QUESTIONS = 8
FIDELITY_CALLS = 64  # recorded calls per stage that the per-stage fidelity compares
STAGING = "calibrate"  # ARTIFACTS/.calibrate.{pid}.tmp
REJECTED = "int8-rejected.json"
# what killed runs leave: staging folders of earlier versions, a manifest replace cut short
LEFTOVERS = ("int8.tmp", "int8.data.tmp", "manifest.json.tmp")


class CalibrationLockedError(ValueError):
    """Another calibration holds the artifact directory; the message names it."""


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stage_fidelity(fp32: Path, int8: Path, feeds: list[dict], limit: int = FIDELITY_CALLS) -> dict:
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


def accuracy(pipeline: Pipeline, items, batch: int = 6, desc: str = "answer") -> tuple[float, list[str]]:
    answers = []
    for start in tqdm(range(0, len(items), batch), desc=desc, unit="batch", leave=False):
        answers += [a.text for a in pipeline.answer([it.request for it in items[start:start + batch]])]
    return float(np.mean([a == it.answer for a, it in zip(answers, items)])), answers


@contextlib.contextmanager
def directory_lock(directory: Path):
    """An exclusive flock on the artifact directory itself while the block runs: a second calibration
    is refused, and the kernel releases the lock when its holder dies, so it cannot go stale."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ArtifactError(f"{directory}: not an artifact directory ({e.strerror})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CalibrationLockedError(f"{directory}: another `crema calibrate` or `crema convert-fp16` is running "
                                         "on it (it holds the directory's lock); wait until it ends") from None
        yield
    finally:
        os.close(fd)


def remove_leftovers(directory: Path, manifest: dict, log=print) -> None:
    """What killed runs left: staging folders of dead processes, and an int8/ folder that the manifest
    does not list (a run killed while installing). Call with the lock held."""
    gone = remove_stale(directory, STAGING) + remove_paths(
        directory / name for name in LEFTOVERS + (() if "int8" in manifest else ("int8",)))
    if gone:
        log(f"removed what interrupted calibrations left: {', '.join(p.name for p in gone)}")


def read_data(config: dict, data: str | Path | None, questions: int, eval_questions: int,
              folder: Path) -> tuple[list[Item], Path, list[Item]]:
    """Calibration items (from `data`, or synthetic seed-2 clips generated in `folder`), the folder
    they came from, and the evaluation items (seed-1 clips, generated in `folder`)."""
    calib_dir = Path(data) if data else demo_data(folder / "calibration", -(-questions // 6), CALIBRATION_SEED, config)
    calib = read_items(calib_dir, config, questions)
    if len(calib) < MIN_QUESTIONS:
        raise CalibrationDataError(f"{calib_dir}: {len(calib)} questions, calibration needs at least {MIN_QUESTIONS}")
    evaluation = read_items(demo_data(folder / "evaluation", -(-eval_questions // 6), EVALUATION_SEED, config),
                            config, eval_questions)
    return calib, calib_dir, evaluation


def evenly_spaced(calls: list, n: int) -> list:
    if not calls:
        return calls
    return [calls[i] for i in np.linspace(0, len(calls) - 1, min(n, len(calls))).round().astype(int)]


def quantize_stages(fp32: Artifacts, out: Path, feeds: dict, eval_feeds: dict, method: str, ops: tuple[str, ...],
                    dynamic: tuple[str, ...], keep_fp32: tuple[str, ...], max_feeds: int, log=print) -> dict:
    """Every stage's INT8 graph and TensorRT table, written to `out`, with its fidelity vs FP32 ->
    {stage: manifest entry}."""
    out.mkdir(parents=True, exist_ok=True)
    stages = {}
    for name in tqdm(fp32.specs, desc=f"quantize ({method})", unit="stage"):
        mode = "dynamic" if name in dynamic else "static"
        src, calls = fp32.path(name), evenly_spaced(feeds[name], max_feeds)
        quantize_stage(src, out / f"{name}.onnx", calls, mode, method, ops, keep_fp32=keep_fp32)
        skipped = tensorrt_table(src, out / "tensorrt" / name, calls, method)
        if skipped:
            log(f"{name}: the TensorRT table leaves out {len(skipped)} tensors without a usable range (inf, NaN "
                f"or |x| >= 2**24; TensorRT runs them in higher precision): {', '.join(skipped)}")
        stages[name] = {"file": f"int8/{name}.onnx", "mode": mode, "ops": list(ops), "keep_fp32": list(keep_fp32),
                        "attention_products": "fp32", "tensorrt_table": f"int8/tensorrt/{name}/calibration.cache",
                        "tensorrt_skipped": skipped, **stage_fidelity(src, out / f"{name}.onnx", eval_feeds[name])}
    return stages


def end_to_end(directory: Path, fp32: Pipeline, staged: Path, stages: dict, mixed: list[str],
               evaluation: list[Item]) -> dict:
    """Task accuracy of fp32, int8 (every stage) and mixed, the INT8 graphs run from `staged`."""
    fp32_acc, fp32_answers = accuracy(fp32, evaluation, desc="answer (fp32)")
    out = {"fp32": {"accuracy": fp32_acc}}
    for precision, names in (("int8", list(stages)), ("mixed", mixed)):
        if precision == "mixed" and set(mixed) == set(stages):
            out["mixed"] = out["int8"]  # the same graphs
            continue
        pipeline = Pipeline(directory, graphs={name: staged / f"{name}.onnx" for name in names})
        acc, answers = accuracy(pipeline, evaluation, desc=f"answer ({precision})")
        out[precision] = {
            "accuracy": acc, "relative_accuracy": acc / fp32_acc if fp32_acc else float("nan"),
            "answer_agreement": float(np.mean([a == b for a, b in zip(answers, fp32_answers)]))}
    return out


def _drop_int8(directory: Path) -> None:
    """The manifest without its "int8" section and int8/ files, replaced atomically."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.pop("int8", None)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("int8/")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def install(directory: Path, staged: Path, section: dict) -> None:
    """Make `staged` the int8/ folder and `section` the manifest's "int8" section. A previous section
    is dropped first, so the manifest never lists a file that is not in place: killed in between,
    the directory is FP32 only (and the next run removes the unlisted int8/)."""
    if "int8" in json.loads((directory / MANIFEST).read_text()):
        _drop_int8(directory)
    live = directory / "int8"
    if live.exists():
        live.rename(staged.with_name("int8.old"))  # inside the staging folder: removed with it
    staged.rename(live)
    update_manifest(directory, "int8/", int8=section)  # the commit point
    (directory / REJECTED).unlink(missing_ok=True)  # it described an older run


def report_path(artifacts: str | Path, report: dict) -> Path:
    """Where `calibrate` wrote `report`."""
    return Path(artifacts) / ("int8/fidelity.json" if report["installed"] else REJECTED)


def conclude(directory: Path, staged: Path, report: dict, force: bool, log=print) -> None:
    """Install the staged graphs with their report if it passed (or `force`), else write the report
    to ARTIFACTS/int8-rejected.json and leave everything else as it was."""
    report["installed"] = report["ok"] or force
    if report["installed"]:
        (staged / "fidelity.json").write_text(json.dumps(report, indent=2))
        install(directory, staged, {"method": report["method"], "stages": report["stages"], "mixed": report["mixed"]})
        log(f"INT8 graphs installed in {directory / 'int8'}")
    else:
        (directory / REJECTED).write_text(json.dumps(report, indent=2))
        log(f"INT8 rejected (it misses the fidelity bounds): the artifacts in {directory} are as they were; "
            f"report: {directory / REJECTED}")


def calibrate(artifacts: str | Path, data: str | Path | None = None, method: str = "minmax",
              questions: int = 120, eval_questions: int = 300, ops: tuple[str, ...] = DEFAULT_OPS,
              dynamic: tuple[str, ...] = (), keep_fp32: tuple[str, ...] = KEEP_FP32, max_feeds: int = 64,
              work: Path | None = None, cosine_bound: float = COSINE_BOUND, accuracy_bound: float = ACCURACY_BOUND,
              force: bool = False, log=print) -> dict:
    """Quantize every stage of `artifacts`, check the graphs against the bounds, install them if they
    pass (or `force`: benchmarks of random weights, where accuracy means nothing); return the report.

    max_feeds: recorded calls per stage used for calibration (evenly spaced). The calibrators take
    them one call at a time: at bench-preset widths one vision call's quantized-op inputs are ~2 GB,
    and holding 12 calls at once was OOM-killed on a 24 GiB machine.
    work: keep the generated clips there (default: in the staging folder, removed at the end)."""
    directory = Path(artifacts)
    with directory_lock(directory):
        fp32 = Artifacts(directory)
        unknown = set(dynamic) - set(fp32.specs)
        if unknown:
            raise ValueError(f"--dynamic {', '.join(sorted(unknown))}: no such stage (stages: {', '.join(fp32.specs)})")
        remove_leftovers(directory, fp32.manifest, log)
        staging = staging_dir(directory, STAGING)
        try:
            start = time.time()
            calib, calib_dir, evaluation = read_data(fp32.config, data, questions, eval_questions,
                                                     Path(work) if work else staging / "data")
            log(f"calibration: {len(calib)} questions from {calib_dir}; evaluation: {len(evaluation)} questions")
            pipeline = Pipeline(directory)
            # one request per call: each recorded feed (one calibration step) stays small. Every question
            # calls every stage at least once, so the first FIDELITY_CALLS questions record all that
            # stage_fidelity reads.
            feeds = collect_feeds(pipeline, calib, batch=1)
            eval_feeds = collect_feeds(pipeline, evaluation[:FIDELITY_CALLS], batch=1)
            staged = staging / "int8"
            stages = quantize_stages(fp32, staged, feeds, eval_feeds, method, ops, dynamic, keep_fp32, max_feeds, log)
            mixed = [name for name, s in stages.items() if s["cosine"] >= cosine_bound]
            e2e = end_to_end(directory, pipeline, staged, stages, mixed, evaluation)
            ok = len(mixed) == len(stages) and e2e["int8"]["relative_accuracy"] >= accuracy_bound
            report = {"method": method, "calibration": {"data": str(calib_dir), "questions": len(calib)},
                      "evaluation": {"questions": len(evaluation), "seed": EVALUATION_SEED}, "stages": stages,
                      "mixed": mixed, "bounds": {"cosine": cosine_bound, "relative_accuracy": accuracy_bound},
                      "end_to_end": e2e, "ok": ok, "seconds": round(time.time() - start)}
            conclude(directory, staged, report, force, log)
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def format_report(report: dict) -> str:
    bound, acc_bound = report["bounds"]["cosine"], report["bounds"]["relative_accuracy"]
    rows = [f"INT8 ({report['method']}) vs FP32, per stage on {report['evaluation']['questions']} evaluation "
            f"questions' inputs (bound: cosine >= {bound})",
            "| stage | mode | cosine | worst call | max rel. error | |", "|---|---|---:|---:|---:|---|"]
    for name, s in report["stages"].items():
        ok = "ok" if s["cosine"] >= bound else "FAIL"
        rows.append(f"| {name} | {s['mode']} | {s['cosine']:.5f} | {s['worst_call_cosine']:.5f} | "
                    f"{s['max_rel_error']:.4f} | {ok} |")
    e = report["end_to_end"]
    rows += ["", f"end to end (bound: accuracy >= {100 * acc_bound:.0f}% of FP32's)",
             "| precision | accuracy | relative to FP32 | answers equal to FP32's |", "|---|---:|---:|---:|",
             f"| fp32 | {100 * e['fp32']['accuracy']:.1f}% | 100% | 100% |"]
    for p in ("int8", "mixed"):
        rows.append(f"| {p} | {100 * e[p]['accuracy']:.1f}% | {100 * e[p]['relative_accuracy']:.1f}% | "
                    f"{100 * e[p]['answer_agreement']:.1f}% |")
    rows.append(f"\nmixed runs INT8 on: {', '.join(report['mixed']) or 'none'}")
    skipped = [f"{name} ({len(s['tensorrt_skipped'])})" for name, s in report["stages"].items()
               if s["tensorrt_skipped"]]
    rows.append(f"TensorRT tables leave out tensors without a usable range in: {', '.join(skipped) or 'none'}")
    rows.append(f"fidelity: {'PASS' if report['ok'] else 'FAIL'}; INT8 graphs "
                f"{'installed' if report['installed'] else 'not installed (the artifacts are as they were)'}")
    return "\n".join(rows)


__all__ = ["calibrate", "format_report", "report_path", "QuantizationError", "CalibrationDataError",
           "CalibrationLockedError"]

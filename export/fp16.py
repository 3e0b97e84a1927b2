"""`crema convert-fp16`: FP16 graphs for every stage of an artifact directory, checked against FP32.

    convert  each stage's FP32 graph -> fp16/{stage}.onnx with ONNX Runtime's converter
             (onnxruntime.transformers.float16), float32 inputs and outputs (keep_io_types: the
             runtime, Triton configs and stage specs stay as they are), and the nodes of the
             FP32 exceptions below left in FP32 (casts around them; the converter's FP16 round trip
             between two FP32 nodes removed, fuse_round_trips)
    check    per stage, cosine vs FP32 on the recorded inputs of held-out questions (synthetic
             seed-1 clips, or --data), DESIGN §5's FP16 row: >= 0.999, twice: the FP16 graph as ONNX
             Runtime's CPU provider runs it (most ops in FP32 islands: it has no FP16 kernels for them)
             and the FP32 graph with FP16 storage emulated as a GPU stores it (emulate_graph); answers
             of both vs FP32's on the same questions (reported, not bounded: DESIGN §5 bounds stages)
    install  as `crema calibrate` does: staged in ARTIFACTS/.fp16.{pid}.tmp/, evaluated from there,
             and only a passing report puts fp16/ (graphs + fidelity.json) live, the manifest's "fp16"
             section written in one atomic replace (the commit point); a failing one writes
             ARTIFACTS/fp16-rejected.json and leaves everything else as it was.

FP32 exceptions (docs/fp16.md has the measurements):
    position_buckets  float arithmetic whose result is cast to an integer (T5's and BEATs'
                      relative-position buckets: log(distance) in FP16 moves distances to the
                      neighbouring bucket); measured on the demo model (CPU check), fuse_encode's
                      cosine is 0.99996 with it in FP16, 0.9999999 in FP32
    t5_ffn_output     T5's feed-forward output projection `DenseReluDense/wo` (transformers keeps it in
                      FP32 for half precision, `_keep_in_fp32_modules`: T5's activations overflow FP16 there)
    t5_norm_residual  T5LayerNorm (an RMS norm written out: x.pow(2) overflows FP16 above |x| = 256) and
                      the residual additions around it: what transformers' FP16 T5 runs in FP32 once
                      `wo` is (its FP32 output promotes the residual stream)
Optional (`softmax`, `layer_normalization`), not default: ONNX Runtime's FP16 kernels for them accumulate
in FP32, and keeping them FP32 measured no gain that matters (docs/fp16.md).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16, convert_np_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from runtime.artifacts import MANIFEST, Artifacts, update_manifest

from .onnx_export import remove_paths, remove_stale, staging_dir

COSINE_BOUND = 0.999  # DESIGN §5, FP16 row
FIDELITY_CALLS = 64  # recorded calls per stage that the fidelity check compares
STAGING = "fp16"  # ARTIFACTS/.fp16.{pid}.tmp
FOLDER = "fp16"
REJECTED = "fp16-rejected.json"
INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}


class FP16Error(ValueError):
    """A stage that could not be converted to FP16; the message names the graph."""


# --- which nodes stay FP32 -------------------------------------------------------------------------

def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the (shape-inferred) model names."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def position_buckets(model: onnx.ModelProto) -> list[str]:
    """Float nodes whose result is cast to an integer, and everything float that feeds them (a backward
    slice from each float->int Cast, ending at the integer->float casts)."""
    types = _tensor_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    todo = [n for n in model.graph.node if n.op_type == "Cast" and types.get(n.input[0]) == TensorProto.FLOAT
            and any(a.name == "to" and a.i in INTEGER_TYPES for a in n.attribute)]
    seen: dict[str, None] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = None
        todo += [producer[i] for i in node.input if types.get(i) == TensorProto.FLOAT and i in producer]
    return list(seen)


def t5_ffn_output(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if "DenseReluDense/wo" in n.name]


def t5_norm_residual(model: onnx.ModelProto) -> list[str]:
    """T5LayerNorm's nodes (scope `layer_norm`, `final_layer_norm`) and the residual Adds that read its
    input cast (`hidden_states.to(float32)`, which the residual path shares)."""
    norm = [n for n in model.graph.node if "layer_norm" in n.name and n.op_type != "LayerNormalization"]
    casts = {o for n in norm if n.op_type == "Cast" for o in n.output}
    residual = [n for n in model.graph.node if n.op_type == "Add" and casts.intersection(n.input)]
    return [n.name for n in norm + residual]


def softmax(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Softmax"]


def layer_normalization(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]


EXCEPTIONS = {"position_buckets": position_buckets, "t5_ffn_output": t5_ffn_output,
              "t5_norm_residual": t5_norm_residual, "softmax": softmax, "layer_normalization": layer_normalization}
KEEP_FP32 = ("position_buckets", "t5_ffn_output", "t5_norm_residual")  # the default (module docstring)


def fp32_nodes(model: onnx.ModelProto, keep_fp32: tuple[str, ...]) -> dict[str, list[str]]:
    """exception name -> the names of the nodes it keeps in FP32."""
    return {name: EXCEPTIONS[name](model) for name in keep_fp32}


# --- one graph ---------------------------------------------------------------------------------------

def external_data(graph: Path) -> Path:
    """Where a graph over 2 GB keeps its weights (export writes `{stage}.onnx.data` beside it)."""
    return graph.with_name(graph.name + ".data")


def check_exceptions(keep_fp32: tuple[str, ...]) -> None:
    unknown = set(keep_fp32) - set(EXCEPTIONS)
    if unknown:
        raise FP16Error(f"keep_fp32: unknown exception {', '.join(sorted(unknown))} (known: {', '.join(EXCEPTIONS)})")


def load_graph(src: Path) -> onnx.ModelProto:
    """The graph with inferred types and its weights (shape inference runs on the structure only, so a
    graph over 2 GB works)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    load_external_data_for_model(model, str(src.parent))
    return model


def save_graph(model: onnx.ModelProto, src: Path, dst: Path) -> None:
    """Write `dst`, with its weights in `dst.data` where `src` has external data; check it by path."""
    OnnxModel.graph_topological_sort(model.graph)  # the converter and emulate() append nodes at the end
    if external_data(src).is_file():
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data(dst).name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))


def kept_nodes(model: onnx.ModelProto, keep_fp32: tuple[str, ...]) -> dict[str, list[str]]:
    """Each exception's FP32 nodes, plus the converter's own (ops it never converts: Range, Min, ...)."""
    keep = fp32_nodes(model, keep_fp32)
    keep["converter_block_list"] = [n.name for n in model.graph.node if n.op_type in DEFAULT_OP_BLOCK_LIST]
    return keep


def fuse_round_trips(model: onnx.ModelProto) -> int:
    """Cast(to FP16) -> Cast(to FP32): the converter stores every tensor between two FP32 nodes in FP16
    (an FP32 chain such as T5's x.pow(2) -> mean would still overflow). The second cast reads the first
    one's input instead; where that is FP32 already, its readers read it directly. Casts left without
    readers are removed. Returns the number of round trips removed."""
    graph = model.graph
    types = _tensor_types(model)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename, fused = {}, 0
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" and _cast_to(node) == TensorProto.FLOAT else None
        if first is None or first.op_type != "Cast" or _cast_to(first) != TensorProto.FLOAT16:
            continue
        node.input[0] = first.input[0]
        fused += 1
        if types.get(first.input[0]) == TensorProto.FLOAT and node.output[0] not in outputs:
            rename[node.output[0]] = first.input[0]  # FP32 -> FP32: read the source directly
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not read.intersection(n.output)]
        if not dead:
            return fused
        for node in dead:
            graph.node.remove(node)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def convert_graph(src: Path, dst: Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> dict[str, int]:
    """Write the FP16 graph of `src` to `dst` (+ `dst.data` when `src` has external data); returns the
    number of nodes each exception (and the converter's block list) kept in FP32."""
    check_exceptions(keep_fp32)
    try:
        model = load_graph(src)
        keep = kept_nodes(model, keep_fp32)
        blocked = sorted({name for names in keep.values() for name in names})
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=blocked)
        fuse_round_trips(model)
        save_graph(model, src, dst)
    except Exception as e:  # onnx and the converter raise many types; name the graph
        raise FP16Error(f"{src}: FP16 conversion failed ({type(e).__name__}: {e})") from e
    return {name: len(names) for name, names in keep.items()}


def emulate_graph(src: Path, dst: Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> None:
    """The FP32 graph with FP16 storage emulated, for the pessimistic fidelity check: each float tensor
    rounded to FP16 (Cast to FP16 and back) wherever the FP16 graph stores it in FP16, weights and
    constants clamped and rounded as the converter does, every computation in FP32. A GPU stores each
    tensor in FP16 between kernels like this; ONNX Runtime's CPU provider instead runs most FP16 ops in
    FP32 islands without rounding inside them (docs/fp16.md), which would hide an overflow."""
    check_exceptions(keep_fp32)
    try:
        model = load_graph(src)
        keep = {name for names in kept_nodes(model, keep_fp32).values() for name in names}
        types = _tensor_types(model)
        _round_weights(model, keep)
        graph = model.graph
        for node in list(graph.node):
            for name in [o for o in node.output if types.get(o) == TensorProto.FLOAT]:
                if node.name in keep:  # FP32, but an FP16 reader reads it cast to FP16
                    _round_for(graph, name, [n for n in graph.node if n.name not in keep])
                else:  # stored in FP16
                    _round_output(graph, node, name)
        for i in graph.input:
            if types.get(i.name) == TensorProto.FLOAT:
                _round_for(graph, i.name, [n for n in graph.node if n.name not in keep])
        save_graph(model, src, dst)
    except Exception as e:
        raise FP16Error(f"{src}: FP16 emulation failed ({type(e).__name__}: {e})") from e


def _round_weights(model: onnx.ModelProto, keep: set[str]) -> None:
    """Float initializers and Constant values that a converted node reads -> their FP16 values (as FP32)."""
    graph = model.graph
    read = {i for n in graph.node if n.name not in keep for i in n.input}
    tensors = [t for t in graph.initializer if t.name in read]
    tensors += [a.t for n in graph.node if n.op_type == "Constant" and n.name not in keep for a in n.attribute
                if a.name == "value"]
    for t in tensors:
        if t.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(t)
            half = convert_np_to_float16(values.ravel()).astype(np.float32).reshape(values.shape)
            t.CopyFrom(numpy_helper.from_array(half, t.name))


def _rounding(graph: onnx.GraphProto, src: str, dst: str) -> None:
    half = f"{dst}.fp16"
    graph.node.extend([onnx.helper.make_node("Cast", [src], [half], to=TensorProto.FLOAT16, name=f"{half}/cast"),
                       onnx.helper.make_node("Cast", [half], [dst], to=TensorProto.FLOAT, name=f"{dst}/cast")])


def _round_output(graph: onnx.GraphProto, node: onnx.NodeProto, name: str) -> None:
    """Everything that reads `name` (graph outputs included) reads it rounded to FP16."""
    raw = f"{name}.fp32"
    node.output[list(node.output).index(name)] = raw
    _rounding(graph, raw, name)


def _round_for(graph: onnx.GraphProto, name: str, readers: list[onnx.NodeProto]) -> None:
    """`readers` read `name` rounded to FP16; other readers read it as it is."""
    rounded = f"{name}.rounded"
    hits = [(n, i) for n in readers for i, x in enumerate(n.input) if x == name]
    for n, i in hits:
        n.input[i] = rounded
    if hits:
        _rounding(graph, name, rounded)


# --- every stage: stage, check, install --------------------------------------------------------------

def read_evaluation(config: dict, data: str | Path | None, questions: int, folder: Path) -> tuple[list, Path]:
    """Held-out questions (from `data`, or synthetic seed-1 clips generated in `folder`) and their folder."""
    from calibration.data import EVALUATION_SEED, CalibrationDataError, read_items
    from training.demo import demo_data

    directory = Path(data) if data else demo_data(folder, -(-questions // 6), EVALUATION_SEED, config)
    items = read_items(directory, config, questions)
    if not items:
        raise CalibrationDataError(f"{directory}: no questions; the FP16 check needs at least one")
    return items, directory


def check_stage(src: Path, fp16: Path, emulated: Path, feeds: list[dict]) -> dict:
    """Cosine etc. vs FP32 (calibration's stage_fidelity) of the FP16 graph as ORT's CPU provider runs
    it, and of the emulated FP16 storage (keys prefixed `emulated_`)."""
    from calibration.calibrate import stage_fidelity

    if not feeds:
        raise FP16Error(f"{src}: no recorded inputs for this stage (no evaluation question reached it)")
    cpu = stage_fidelity(src, fp16, feeds, FIDELITY_CALLS)
    emu = stage_fidelity(src, emulated, feeds, FIDELITY_CALLS)
    return {**cpu, **{f"emulated_{k}": v for k, v in emu.items()}}


def within(stage: dict, bound: float) -> bool:
    """Both checks at or above the bound (NaN, from an overflow, fails)."""
    return stage["cosine"] >= bound and stage["emulated_cosine"] >= bound


def convert_stages(fp32: Artifacts, staged: Path, emulated: Path, feeds: dict, keep_fp32: tuple[str, ...]) -> dict:
    """Every stage's FP16 graph in `staged` (and its emulation in `emulated`), with its fidelity ->
    {stage: manifest entry}."""
    from tqdm import tqdm

    staged.mkdir(parents=True)
    emulated.mkdir(parents=True)
    stages = {}
    for name in tqdm(fp32.specs, desc="fp16", unit="stage", leave=False):
        src, dst = fp32.path(name), staged / f"{name}.onnx"
        start = time.perf_counter()
        counts = convert_graph(src, dst, keep_fp32)
        seconds = time.perf_counter() - start
        emulate_graph(src, emulated / dst.name, keep_fp32)
        stages[name] = {"file": f"{FOLDER}/{name}.onnx", "fp32_nodes": counts, "convert_seconds": round(seconds, 2),
                        **check_stage(src, dst, emulated / dst.name, feeds[name])}
    return stages


def end_to_end(directory: Path, fp32, graphs: dict[str, Path], items: list) -> dict:
    """Accuracy and answers equal to FP32's of the pipeline running each set of `graphs`
    ({"fp16": folder, "fp16_emulated": folder})."""
    from calibration.calibrate import accuracy
    from runtime.pipeline import Pipeline

    fp32_acc, fp32_answers = accuracy(fp32, items, desc="answer (fp32)")
    out = {"fp32": {"accuracy": fp32_acc}}
    for label, folder in graphs.items():
        pipeline = Pipeline(directory, graphs={name: folder / f"{name}.onnx" for name in fp32.stages})
        acc, answers = accuracy(pipeline, items, desc=f"answer ({label})")
        out[label] = {"accuracy": acc, "answer_agreement": float(np.mean([a == b for a, b in zip(answers, fp32_answers)]))}
    return out


def remove_leftovers(directory: Path, manifest: dict, log=print) -> None:
    """Staging folders of dead conversions, an fp16/ the manifest does not list (a run killed while
    installing), a manifest replace cut short. Call with the directory's lock held."""
    gone = remove_stale(directory, STAGING) + remove_paths(
        [directory / "manifest.json.tmp"] + ([] if FOLDER in manifest else [directory / FOLDER]))
    if gone:
        log(f"removed what interrupted runs left: {', '.join(p.name for p in gone)}")


def _drop_section(directory: Path) -> None:
    """The manifest without its "fp16" section and fp16/ files, replaced atomically."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.pop(FOLDER, None)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{FOLDER}/")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def install(directory: Path, staged: Path, section: dict) -> None:
    """Make `staged` the fp16/ folder and `section` the manifest's "fp16" section (calibration's order:
    the old section goes first, so the manifest never lists a file that is not in place)."""
    if FOLDER in json.loads((directory / MANIFEST).read_text()):
        _drop_section(directory)
    live = directory / FOLDER
    if live.exists():
        live.rename(staged.with_name(f"{FOLDER}.old"))  # inside the staging folder: removed with it
    staged.rename(live)
    update_manifest(directory, f"{FOLDER}/", **{FOLDER: section})  # the commit point
    (directory / REJECTED).unlink(missing_ok=True)  # it described an older run


def conclude(directory: Path, staged: Path, report: dict, force: bool, log=print) -> None:
    """Install the staged graphs with the report if it passed (or `force`), else write the report to
    ARTIFACTS/fp16-rejected.json and leave everything else as it was."""
    report["installed"] = report["ok"] or force
    if report["installed"]:
        (staged / "fidelity.json").write_text(json.dumps(report, indent=2))
        install(directory, staged, {k: report[k] for k in ("converter", "io", "keep_fp32", "stages")})
        log(f"FP16 graphs installed in {directory / FOLDER}")
    else:
        (directory / REJECTED).write_text(json.dumps(report, indent=2))
        log(f"FP16 rejected (it misses the fidelity bound): the artifacts in {directory} are as they were; "
            f"report: {directory / REJECTED}")


def report_path(artifacts: str | Path, report: dict) -> Path:
    return Path(artifacts) / (f"{FOLDER}/fidelity.json" if report["installed"] else REJECTED)


def convert_fp16(artifacts: str | Path, data: str | Path | None = None, questions: int = 60,
                 keep_fp32: tuple[str, ...] = KEEP_FP32, cosine_bound: float = COSINE_BOUND, force: bool = False,
                 log=print) -> dict:
    """Convert every stage of `artifacts` to FP16, check each against FP32 on the recorded inputs of
    `questions` held-out questions (`data`: a folder laid out as calibration/data.py says; default
    synthetic seed-1 clips), install the graphs if every stage is within `cosine_bound` on both checks
    (or `force`: benchmarks on random weights); return the report. One run per directory at a time,
    `crema calibrate` included (both rewrite the manifest)."""
    from calibration.calibrate import directory_lock

    check_exceptions(keep_fp32)
    directory = Path(artifacts)
    with directory_lock(directory):
        return _convert_locked(directory, data, questions, tuple(keep_fp32), cosine_bound, force, log)


def _convert_locked(directory: Path, data, questions: int, keep_fp32: tuple[str, ...], cosine_bound: float,
                    force: bool, log) -> dict:
    from calibration.data import EVALUATION_SEED, collect_feeds
    from runtime.pipeline import Pipeline

    fp32 = Artifacts(directory)
    remove_leftovers(directory, fp32.manifest, log)
    staging = staging_dir(directory, STAGING)
    try:
        start = time.time()
        items, data_dir = read_evaluation(fp32.config, data, questions, staging / "data")
        pipeline = Pipeline(directory)
        feeds = collect_feeds(pipeline, items[:FIDELITY_CALLS], batch=1)
        staged, emulated = staging / FOLDER, staging / "emulated"
        stages = convert_stages(fp32, staged, emulated, feeds, keep_fp32)
        e2e = end_to_end(directory, pipeline, {"fp16": staged, "fp16_emulated": emulated}, items)
        report = {"converter": "onnxruntime.transformers.float16.convert_float_to_float16", "io": "float32",
                  "keep_fp32": list(keep_fp32),
                  "evaluation": {"data": str(data_dir), "questions": len(items), "seed": None if data else EVALUATION_SEED},
                  "stages": stages, "bounds": {"cosine": cosine_bound}, "end_to_end": e2e,
                  "ok": all(within(s, cosine_bound) for s in stages.values()),
                  "seconds": round(time.time() - start, 1)}
        conclude(directory, staged, report, force, log)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_report(report: dict) -> str:
    bound = report["bounds"]["cosine"]
    rows = [f"FP16 vs FP32 per stage on {report['evaluation']['questions']} held-out questions' inputs (bound: cosine "
            f">= {bound}, i.e. 1 - cosine <= {1 - bound:.0e}); FP32 exceptions: {', '.join(report['keep_fp32']) or 'none'}",
            "ORT CPU: the FP16 graph as ONNX Runtime's CPU provider runs it; emulated: every tensor stored in FP16 "
            "between ops, as on a GPU (docs/fp16.md)",
            "| stage | 1 - cosine (ORT CPU) | worst call | 1 - cosine (emulated) | worst call | max rel. error (emulated) | |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, s in report["stages"].items():
        ok = "ok" if within(s, bound) else "FAIL"
        rows.append(f"| {name} | {1 - s['cosine']:.1e} | {1 - s['worst_call_cosine']:.1e} | {1 - s['emulated_cosine']:.1e} "
                    f"| {1 - s['emulated_worst_call_cosine']:.1e} | {s['emulated_max_rel_error']:.4f} | {ok} |")
    e = report["end_to_end"]
    rows += ["", "| graphs | accuracy | answers equal to FP32's |", "|---|---:|---:|",
             f"| fp32 | {100 * e['fp32']['accuracy']:.1f}% | 100% |"]
    for label in ("fp16", "fp16_emulated"):
        rows.append(f"| {label} | {100 * e[label]['accuracy']:.1f}% | {100 * e[label]['answer_agreement']:.1f}% |")
    rows.append(f"fidelity: {'PASS' if report['ok'] else 'FAIL'}; FP16 graphs "
                f"{'installed' if report['installed'] else 'not installed (the artifacts are as they were)'}; "
                f"{report['seconds']} s")
    return "\n".join(rows)

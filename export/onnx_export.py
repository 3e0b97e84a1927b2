"""Export every stage of a reference model to ONNX and write a verified artifact directory.

Writes are atomic: graphs go to a temporary sibling directory (`.OUT.{pid}.tmp`) that is renamed
into place only after every graph passed `onnx.checker` and the manifest is written. A killed export
leaves that folder behind; the next export beside it removes it once its process is gone.
"""
from __future__ import annotations

import os
import shutil
import warnings
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from reference.model import Crema
from runtime.artifacts import write_manifest
from runtime.specs import DEPTH_ESTIMATOR, StageSpec, stage_specs

from .stages import stage_module

OPSET = 17
# Trace-time sizes of the symbolic axes: all > 1 and distinct, so no axis is specialised away
# (decoder rows are requests x beams: rows a multiple of batch).
SAMPLE_DIMS = {"images": 4, "rows": 4, "clips": 3, "batch": 2, "points": 5, "text": 7, "enc_len": 9, "past": 3,
               "past_rows": 6}


def sample_inputs(spec: StageSpec, cfg: dict, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the spec's shapes, with valid ids, masks and voxel coordinates."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = tuple(SAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.dims)
        if t.name.endswith("_mask"):
            x = torch.ones(shape, dtype=torch.long)
            x[-1, -2:] = 0  # a padded row
        elif t.name.endswith("_ids"):
            x = torch.randint(2, cfg["t5"]["vocab_size"], shape, generator=g)
        elif t.name == "pc_coords":
            x = torch.randint(0, cfg["pc_grid"], shape, generator=g)
        elif t.name == "beam_index":  # rows of the past cache
            x = torch.randint(0, SAMPLE_DIMS["past_rows"], shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x)
    return tuple(out)


def export_stage(model: Crema, spec: StageSpec, path: Path) -> None:
    """Trace one stage to `path`; a graph over 2 GB gets its weights in one `path.data` file."""
    module = stage_module(model, spec.name).eval()
    cfg = model.cfg.to_dict()
    dynamic = {t.name: t.dynamic_axes for t in spec.inputs + spec.outputs if t.dynamic_axes}
    scratch = path.parent / f".{spec.name}"  # the exporter may write one file per weight: keep them apart
    scratch.mkdir()
    try:
        traced = scratch / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values are expected here
            torch.onnx.export(module, sample_inputs(spec, cfg), str(traced), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        if len(list(scratch.iterdir())) == 1:  # weights inside the graph file
            traced.rename(path)
        else:
            consolidate_external_data(traced, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))  # by path: works for graphs with external data


def consolidate_external_data(src: Path, dest: Path) -> None:
    """Rewrite a graph whose weights lie in many files as `dest` + one `dest.data`, streaming.

    Reads one tensor at a time, so a graph larger than memory can be rewritten.
    """
    graph = onnx.load(str(src), load_external_data=False)
    data_name = dest.name + ".data"
    with open(dest.parent / data_name, "wb") as out:
        for tensor in (t for t in graph.graph.initializer if uses_external_data(t)):
            info = {e.key: e.value for e in tensor.external_data}
            with open(src.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                blob = f.read(int(info["length"])) if "length" in info else f.read()
            out.seek((out.tell() + 4095) // 4096 * 4096)  # page-aligned, so ORT can map it
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", len(blob))):
                tensor.external_data.add(key=key, value=str(value))
    onnx.save(graph, str(dest))


def versions() -> dict:
    import onnxruntime
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def staging_dir(parent: Path, name: str) -> Path:
    """A new, empty `parent/.{name}.{pid}.tmp`: the name says which process owns it."""
    path = Path(parent) / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(path, ignore_errors=True)  # a dead process's, whose pid this one reuses
    path.mkdir(parents=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def remove_paths(paths) -> list[Path]:
    """Remove each path that exists (folder or file); returns those removed."""
    gone = []
    for path in map(Path, paths):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        gone.append(path)
    return gone


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove the `parent/.{name}.{pid}.tmp` folders whose process is gone (left by killed runs)."""
    removed = []
    for path in Path(parent).glob(f".{glob_escape(name)}.*.tmp"):
        pid = path.name[len(name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def export_artifacts(model: Crema, out: str | Path, source: dict, progress: bool = True,
                     depth_model: str | Path | None = None) -> Path:
    """All stages of `model` -> `out/` (graphs, tokenizer.json, manifest.json), atomically.
    depth_model: a local Hugging Face depth model directory, exported as the depth_estimator stage
    (export/depth.py; checked before anything is written)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (choose another --out or remove it)")
    depth = None
    if depth_model is not None:
        if not {"depth", "norm"} & set(model.cfg.modality_names):
            raise ValueError(f"depth model {depth_model}: the modalities ({'_'.join(model.cfg.modalities)}) use no "
                             "depth (configure depth or norm)")
        from .depth import load_depth_model
        depth = load_depth_model(depth_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)
    cfg = model.cfg.to_dict()
    specs = stage_specs(cfg)
    tmp = staging_dir(out.parent, out.name)
    try:
        for spec in tqdm(specs.values(), desc="export", unit="graph", disable=not progress):
            export_stage(model, spec, tmp / spec.file)
        sections = {}
        if depth is not None:
            from .depth import export_depth_module
            sections[DEPTH_ESTIMATOR] = export_depth_module(*depth, tmp / f"{DEPTH_ESTIMATOR}.onnx")
        model.tokenizer.save(tmp)
        write_manifest(tmp, cfg, source, "fp32", list(model.answer_ids), versions(), sections)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

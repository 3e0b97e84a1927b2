"""Artifact directories (DESIGN rule 5): graphs + manifest.json + tokenizer.json, verified on load.

manifest.json: {"format", "config", "source", "precision", "stages": [names], "files": {path: sha256},
"answer_ids", "versions"} and, once `crema calibrate` ran, "int8": {"method", "stages": {stage:
{"file", "mode", ...}}, "mixed": [stages that run INT8 under --precision mixed]}; once `crema
convert-fp16` ran, "fp16": {"converter", "io", "keep_fp32", "stages": {stage: {"file", ...}}}; when
exported with `--depth-model DIR`, "depth_estimator": {"architecture", "model_type", "source",
"input_size" [H, W], "output_size" [H', W'], "rescale", "mean" [3], "std" [3], "resize", "pad", "output",
"batch_vote"}: what the runtime needs to preprocess frames for `depth_estimator.onnx` and read its
output (runtime/specs.py, runtime/modalities.ExportedDepthEstimator). That stage is not in "stages":
calibration and FP16 conversion leave it FP32. The stage specs are rebuilt from "config" and that section
(runtime/specs.py), so the manifest cannot disagree with the code that reads it.

Nothing in a manifest is trusted: its structure is checked key by key (ArtifactError naming the key),
and every path it names ("files" keys, int8 "file" and "tensorrt_table", fp16 "file") must be a relative POSIX
path that stays inside the directory (no absolute path, no "..", no symlink out) and be listed in
"files" with a sha256 hex digest, so everything loaded is hash-checked.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .specs import (DEPTH_OUTPUTS, DEPTH_PADS, DEPTH_RESIZE, MAX_DEPTH_SIDE, StageSpec, depth_estimator_spec,
                    modality_names, stage_specs)

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = 1
PRECISIONS = ("fp32", "int8", "mixed", "fp16")
# the manifest section each precision other than fp32 reads, and the command that writes it
SECTIONS = {"int8": ("int8", "crema calibrate"), "mixed": ("int8", "crema calibrate"),
            "fp16": ("fp16", "crema convert-fp16")}


class ArtifactError(ValueError):
    """An artifact directory that is missing, corrupt or inconsistent; the message names the file."""


DIGEST = re.compile(r"[0-9a-f]{64}")
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
              bool: "a boolean", type(None): "null"}
REQUIRED = {"format": int, "config": dict, "source": dict, "precision": str, "stages": list, "files": dict,
            "answer_ids": list, "versions": dict}


def _json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def _require(where: str, value, key: str, kind: type, label: str):
    """value[key] of type `kind`, or an ArtifactError naming the key."""
    if key not in value:
        raise ArtifactError(f"{where}: no '{label}' key")
    if not isinstance(value[key], kind) or kind is int and isinstance(value[key], bool):
        raise ArtifactError(f"{where}: '{label}' is {_json_type(value[key])}, expected {JSON_TYPES[kind]}")
    return value[key]


def check_manifest(manifest, where: str) -> None:
    """The manifest's structure: required keys and types, digests, the optional int8 section."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: the JSON is {_json_type(manifest)}, expected an object")
    if _require(where, manifest, "format", int, "format") != FORMAT:  # first: another format, other keys
        raise ArtifactError(f"{where}: format {manifest['format']!r}, this runtime reads {FORMAT}")
    for key, kind in REQUIRED.items():
        _require(where, manifest, key, kind, key)
    if not all(isinstance(x, str) for x in manifest["stages"]):
        raise ArtifactError(f"{where}: 'stages' must list stage names (strings)")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in manifest["answer_ids"]):
        raise ArtifactError(f"{where}: 'answer_ids' must list token ids (integers)")
    for name, digest in manifest["files"].items():
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ArtifactError(f"{where}: files[{name!r}] is {digest!r}, expected a sha256 hex digest")
    if "int8" in manifest:
        _check_int8(manifest["int8"], where)
    if "fp16" in manifest:
        _check_fp16(manifest["fp16"], where)
    if "depth_estimator" in manifest:
        _check_depth(manifest["depth_estimator"], where)


def _check_int8(int8, where: str) -> None:
    if not isinstance(int8, dict):
        raise ArtifactError(f"{where}: 'int8' is {_json_type(int8)}, expected an object")
    stages = _require(where, int8, "stages", dict, "int8.stages")
    mixed = _require(where, int8, "mixed", list, "int8.mixed")
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            raise ArtifactError(f"{where}: int8.stages[{name!r}] is {_json_type(stage)}, expected an object")
        _require(where, stage, "file", str, f"int8.stages[{name!r}].file")
        if "tensorrt_table" in stage:
            _require(where, stage, "tensorrt_table", str, f"int8.stages[{name!r}].tensorrt_table")
    if not all(isinstance(x, str) and x in stages for x in mixed):
        raise ArtifactError(f"{where}: int8.mixed {mixed} must name stages of int8.stages")


def _check_fp16(fp16, where: str) -> None:
    if not isinstance(fp16, dict):
        raise ArtifactError(f"{where}: 'fp16' is {_json_type(fp16)}, expected an object")
    for name, stage in _require(where, fp16, "stages", dict, "fp16.stages").items():
        if not isinstance(stage, dict):
            raise ArtifactError(f"{where}: fp16.stages[{name!r}] is {_json_type(stage)}, expected an object")
        _require(where, stage, "file", str, f"fp16.stages[{name!r}].file")


def _check_depth(depth, where: str) -> None:
    """The "depth_estimator" section: sizes, preprocessing and output kind the runtime can apply."""
    if not isinstance(depth, dict):
        raise ArtifactError(f"{where}: 'depth_estimator' is {_json_type(depth)}, expected an object")
    for key in ("architecture", "model_type", "source", "resize", "output"):
        _require(where, depth, key, str, f"depth_estimator.{key}")
    for key, n in (("input_size", 2), ("output_size", 2), ("mean", 3), ("std", 3)):
        value = _require(where, depth, key, list, f"depth_estimator.{key}")
        kind = int if key.endswith("size") else (int, float)
        if len(value) != n or not all(isinstance(x, kind) and not isinstance(x, bool) for x in value):
            raise ArtifactError(f"{where}: depth_estimator.{key} is {value!r}, expected {n} "
                                f"{'integers' if kind is int else 'numbers'}")
    for key in ("input_size", "output_size"):
        if not all(1 <= x <= MAX_DEPTH_SIDE for x in depth[key]):
            raise ArtifactError(f"{where}: depth_estimator.{key} {depth[key]}: each side must be 1..{MAX_DEPTH_SIDE}")
    if not all(x > 0 for x in depth["std"]):
        raise ArtifactError(f"{where}: depth_estimator.std {depth['std']}: must be positive")
    rescale = depth.get("rescale")
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not rescale > 0:
        raise ArtifactError(f"{where}: depth_estimator.rescale {rescale!r}: expected a positive number")
    if not isinstance(depth.get("batch_vote", False), bool):
        raise ArtifactError(f"{where}: depth_estimator.batch_vote is {depth['batch_vote']!r}, expected a boolean")
    for key, allowed in (("resize", DEPTH_RESIZE), ("output", DEPTH_OUTPUTS), ("pad", DEPTH_PADS)):
        if depth.get(key) not in allowed:
            raise ArtifactError(f"{where}: depth_estimator.{key} is {depth.get(key)!r}, expected one of {list(allowed)}")


def named_paths(manifest: dict) -> dict[str, str]:
    """Every path the manifest names -> where it names it."""
    paths = {name: f"files[{name!r}]" for name in manifest["files"]}
    for section in ("int8", "fp16"):
        for name, stage in manifest.get(section, {}).get("stages", {}).items():
            for key in ("file", "tensorrt_table"):
                if key in stage:
                    paths.setdefault(stage[key], f"{section}.stages[{name!r}].{key}")
    return paths


def safe_path(directory: Path, name: str, where: str) -> Path:
    """directory / name, refused unless `name` is a relative POSIX path that stays inside `directory`
    (no absolute path, no "..", no backslash, no symlink that leads out)."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or pure.as_posix() != name:
        raise ArtifactError(f"{where}: {name!r} is not a plain relative path inside the artifact directory")
    path = directory / pure
    root = directory.resolve()
    if path.exists() or path.is_symlink():
        target = path.resolve()
        if target != root and root not in target.parents:
            raise ArtifactError(f"{where}: {name!r} leads outside the artifact directory (to {target})")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` but the manifest, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}


def write_manifest(directory: Path, config: dict, source: dict, precision: str, answer_ids: list[int],
                   versions: dict, sections: dict | None = None) -> dict:
    """Hash every file in `directory` and write the manifest (call last, before the atomic rename).
    sections: optional sections, e.g. {"depth_estimator": {...}}; checked as a loader checks them."""
    manifest = {"format": FORMAT, "config": config, "source": source, "precision": precision,
                "stages": list(stage_specs(config)), "files": hash_files(directory), "answer_ids": answer_ids,
                "versions": versions, **(sections or {})}
    check_manifest(manifest, str(directory / MANIFEST))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def update_manifest(directory: Path, prefix: str, **fields) -> dict:
    """Add fields (e.g. "int8") and rehash the files under `prefix` (e.g. "int8/"), keeping every other
    entry as it was; the old manifest is replaced atomically."""
    directory = Path(directory)
    path = directory / MANIFEST
    old = json.loads(path.read_text())
    files = {k: v for k, v in old["files"].items() if not k.startswith(prefix)}
    if (directory / prefix).is_dir():
        files.update({f"{prefix}{k}": v for k, v in hash_files(directory / prefix).items()})
    manifest = {**old, **fields, "files": files}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return manifest


class Artifacts:
    """A verified artifact directory: its manifest, stage specs and file paths."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (not an artifact directory; create one with `crema export`)")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from e
        check_manifest(self.manifest, str(path))
        self.config: dict = self.manifest["config"]
        try:
            self.specs: dict[str, StageSpec] = stage_specs(self.config)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ArtifactError(f"{path}: 'config' is not a CREMA configuration ({type(e).__name__}: {e})") from e
        if list(self.specs) != self.manifest["stages"]:
            raise ArtifactError(f"{path}: stages {self.manifest['stages']} do not match the config's {list(self.specs)}")
        self.depth: dict | None = self.manifest.get("depth_estimator")  # preprocessing + output kind
        self.depth_spec: StageSpec | None = None if self.depth is None else depth_estimator_spec(self.depth)
        self._check_files(path)
        if verify:
            self.verify()

    def _check_files(self, path: Path) -> None:
        """Every named path stays inside the directory and is hash-listed; every stage has its graph."""
        files = self.manifest["files"]
        for name, where in named_paths(self.manifest).items():
            safe_path(self.dir, name, f"{path}: {where}")
            if name not in files:
                raise ArtifactError(f"{path}: {where} names {name!r}, which 'files' does not list with its sha256")
        for spec in [*self.specs.values(), *([self.depth_spec] if self.depth_spec else [])]:
            if spec.file not in files:
                raise ArtifactError(f"{path}: no entry for {spec.file}")
        if TOKENIZER not in files:
            raise ArtifactError(f"{path}: no entry for {TOKENIZER}")
        for section in ("int8", "fp16"):
            unknown = set(self.manifest.get(section, {}).get("stages", {})) - set(self.specs)
            if unknown:
                raise ArtifactError(f"{path}: {section}.stages names {sorted(unknown)}, not stages of the config")

    def verify(self) -> None:
        for name, digest in self.manifest["files"].items():
            file = self.dir / name
            if not file.is_file():
                raise ArtifactError(f"{file}: missing (listed in {MANIFEST})")
            if sha256(file) != digest:
                raise ArtifactError(f"{file}: sha256 does not match {MANIFEST} (corrupt or modified)")

    def path(self, stage: str, precision: str = "fp32") -> Path:
        """The graph a stage runs at `precision`: int8 where calibrated (mixed: where the calibration
        chose it), fp16 where converted, FP32 otherwise."""
        if precision not in PRECISIONS:
            raise ArtifactError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if precision == "fp32":
            return self.dir / self.specs[stage].file
        key, command = SECTIONS[precision]
        section = self.manifest.get(key)
        if section is None:
            raise ArtifactError(f"{self.dir}: no {key.upper()} graphs (run `{command} --artifacts {self.dir}`)")
        if stage in (section["mixed"] if precision == "mixed" else section["stages"]):
            return self.dir / section["stages"][stage]["file"]
        return self.dir / self.specs[stage].file

    @property
    def modalities(self) -> list[str]:
        return modality_names(self.config)

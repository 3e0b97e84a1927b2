"""Artifact directories (DESIGN rule 5): graphs + manifest.json + tokenizer.json, verified on load.

manifest.json: {"format", "config", "source", "precision", "stages": [names], "files": {path: sha256},
"answer_ids", "versions"} and, once `crema calibrate` ran, "int8": {"method", "stages": {stage:
{"file", "mode", ...}}, "mixed": [stages that run INT8 under --precision mixed]}. The stage specs are
rebuilt from "config" (runtime/specs.py), so the manifest cannot disagree with the code that reads it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .specs import StageSpec, modality_names, stage_specs

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = 1
PRECISIONS = ("fp32", "int8", "mixed")


class ArtifactError(ValueError):
    """An artifact directory that is missing, corrupt or inconsistent; the message names the file."""


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
                   versions: dict) -> dict:
    """Hash every file in `directory` and write the manifest (call last, before the atomic rename)."""
    manifest = {"format": FORMAT, "config": config, "source": source, "precision": precision,
                "stages": list(stage_specs(config)), "files": hash_files(directory), "answer_ids": answer_ids,
                "versions": versions}
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
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path}: format {self.manifest.get('format')!r}, this runtime reads {FORMAT}")
        self.config: dict = self.manifest["config"]
        self.specs: dict[str, StageSpec] = stage_specs(self.config)
        if list(self.specs) != self.manifest["stages"]:
            raise ArtifactError(f"{path}: stages {self.manifest['stages']} do not match the config's {list(self.specs)}")
        for spec in self.specs.values():
            if spec.file not in self.manifest["files"]:
                raise ArtifactError(f"{path}: no entry for {spec.file}")
        if TOKENIZER not in self.manifest["files"]:
            raise ArtifactError(f"{path}: no entry for {TOKENIZER}")
        if verify:
            self.verify()

    def verify(self) -> None:
        for name, digest in self.manifest["files"].items():
            file = self.dir / name
            if not file.is_file():
                raise ArtifactError(f"{file}: missing (listed in {MANIFEST})")
            if sha256(file) != digest:
                raise ArtifactError(f"{file}: sha256 does not match {MANIFEST} (corrupt or modified)")

    def path(self, stage: str, precision: str = "fp32") -> Path:
        """The graph a stage runs at `precision`: int8 where calibrated (mixed: where the calibration
        chose it), FP32 otherwise."""
        if precision not in PRECISIONS:
            raise ArtifactError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        int8 = self.manifest.get("int8")
        if precision != "fp32" and int8 is None:
            raise ArtifactError(f"{self.dir}: no INT8 graphs (run `crema calibrate --artifacts {self.dir}`)")
        if precision == "int8" and stage in int8["stages"] or precision == "mixed" and stage in int8["mixed"]:
            return self.dir / int8["stages"][stage]["file"]
        return self.dir / self.specs[stage].file

    @property
    def modalities(self) -> list[str]:
        return modality_names(self.config)

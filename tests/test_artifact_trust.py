"""Nothing in manifest.json is trusted: paths stay inside the artifact directory and are hash-checked,
and a malformed manifest is an ArtifactError naming the key, never a KeyError traceback."""
import json
import os
import shutil

import pytest

from conftest import make_model
from export.onnx_export import export_artifacts
from runtime.artifacts import ArtifactError, Artifacts, sha256


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "art"
    export_artifacts(make_model(("rgb",)), out, {"preset": "tiny", "seed": 0}, progress=False)
    return out


def _tampered(art, tmp_path, edit):
    """A copy of the artifact directory whose manifest `edit(manifest, directory)` changed in place
    (or replaced, when it returns something)."""
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    replaced = edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest if replaced is None else replaced))
    return copy


def _int8(manifest, directory, stage_file, table=None, listed=True):
    """An int8 section for the vision stage pointing at `stage_file` (hash listed unless told not)."""
    entry = {"file": stage_file, "mode": "static"}
    if table is not None:
        entry["tensorrt_table"] = table
    manifest["int8"] = {"method": "minmax", "stages": {"vision": entry}, "mixed": ["vision"]}
    target = directory / stage_file if not os.path.isabs(stage_file) else stage_file
    if listed and os.path.isfile(target):
        manifest["files"][stage_file] = sha256(target)


def test_an_honest_int8_section_loads(exported, tmp_path):
    def edit(m, d):
        (d / "int8" / "tensorrt" / "vision").mkdir(parents=True)
        shutil.copy(d / "vision.onnx", d / "int8" / "vision.onnx")
        (d / "int8" / "tensorrt" / "vision" / "calibration.cache").write_text("table")
        m["files"]["int8/tensorrt/vision/calibration.cache"] = sha256(d / "int8/tensorrt/vision/calibration.cache")
        _int8(m, d, "int8/vision.onnx", table="int8/tensorrt/vision/calibration.cache")
    art = Artifacts(_tampered(exported, tmp_path, edit))
    assert art.path("vision", "int8") == art.dir / "int8" / "vision.onnx"


def test_int8_graph_outside_the_directory_is_refused(exported, tmp_path):
    evil = tmp_path / "evil.onnx"
    shutil.copy(exported / "vision.onnx", evil)
    bad = _tampered(exported, tmp_path, lambda m, d: _int8(m, d, str(evil), listed=False))
    with pytest.raises(ArtifactError, match=r"int8.stages\['vision'\].file: '/.*evil.onnx' is not a plain relative"):
        Artifacts(bad)
    listed = _tampered(exported, tmp_path / "x", lambda m, d: _int8(m, d, str(evil)))
    with pytest.raises(ArtifactError, match=r"files\['/.*evil.onnx'\]: .* is not a plain relative path"):
        Artifacts(listed)


def test_a_files_entry_escaping_with_dotdot_is_refused_even_with_the_right_hash(exported, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")

    def edit(m, d):
        m["files"][os.path.relpath(secret, d)] = sha256(secret)
    with pytest.raises(ArtifactError, match=r"files\['\.\./secret.txt'\]: .* not a plain relative path"):
        Artifacts(_tampered(exported, tmp_path, edit))
    if os.path.isfile("/etc/passwd"):
        def passwd(m, d):
            m["files"][os.path.relpath("/etc/passwd", d)] = sha256("/etc/passwd")
        with pytest.raises(ArtifactError, match=r"etc/passwd'.* not a plain relative path"):
            Artifacts(_tampered(exported, tmp_path / "p", passwd))


def test_a_symlink_out_of_the_directory_is_refused(exported, tmp_path):
    secret = tmp_path / "secret.onnx"
    shutil.copy(exported / "vision.onnx", secret)

    def edit(m, d):
        (d / "int8").mkdir()
        (d / "int8" / "vision.onnx").symlink_to(secret)
        _int8(m, d, "int8/vision.onnx")
    with pytest.raises(ArtifactError, match=r"'int8/vision.onnx' leads outside the artifact directory"):
        Artifacts(_tampered(exported, tmp_path, edit))

    def swap(m, d):  # the FP32 graph itself replaced by a link to an identical file outside
        (d / "vision.onnx").unlink()
        (d / "vision.onnx").symlink_to(secret)
    with pytest.raises(ArtifactError, match=r"'vision.onnx' leads outside"):
        Artifacts(_tampered(exported, tmp_path / "s", swap))


def test_an_int8_graph_missing_from_files_is_refused(exported, tmp_path):
    def edit(m, d):
        (d / "int8").mkdir()
        shutil.copy(d / "vision.onnx", d / "int8" / "vision.onnx")
        _int8(m, d, "int8/vision.onnx", listed=False)
    with pytest.raises(ArtifactError, match=r"int8.stages\['vision'\].file names 'int8/vision.onnx', which 'files' "
                                            r"does not list"):
        Artifacts(_tampered(exported, tmp_path, edit))

    def table(m, d):
        (d / "int8").mkdir()
        shutil.copy(d / "vision.onnx", d / "int8" / "vision.onnx")
        _int8(m, d, "int8/vision.onnx", table="/etc/hostname")
    with pytest.raises(ArtifactError, match=r"tensorrt_table: '/etc/hostname' is not a plain relative"):
        Artifacts(_tampered(exported, tmp_path / "t", table))


def _drop(key):
    def edit(manifest, directory):
        del manifest[key]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("config"), r"no 'config' key"),
    (_drop("files"), r"no 'files' key"),
    (_drop("answer_ids"), r"no 'answer_ids' key"),
    (lambda m, d: list(m), r"the JSON is an array, expected an object"),
    (lambda m, d: "manifest", r"the JSON is a string, expected an object"),
    (lambda m, d: m.update(config=[1, 2]), r"'config' is an array, expected an object"),
    (lambda m, d: m.update(config={"frame_num": 2}), r"'config' is not a CREMA configuration \(KeyError"),
    (lambda m, d: m.update(stages="vision"), r"'stages' is a string, expected an array"),
    (lambda m, d: m.update(format=True), r"'format' is a boolean, expected an integer"),
    (lambda m, d: m.update(answer_ids=["A"]), r"'answer_ids' must list token ids"),
    (lambda m, d: m["files"].update({"vision.onnx": 12}), r"files\['vision.onnx'\] is 12, expected a sha256 hex"),
    (lambda m, d: m["files"].update({"vision.onnx": "abc"}), r"files\['vision.onnx'\] is 'abc', expected a sha256"),
    (lambda m, d: m["files"].update({"vision.onnx": sha256(d / "vision.onnx").upper()}), r"expected a sha256 hex"),
    (lambda m, d: m.update(int8=[]), r"'int8' is an array, expected an object"),
    (lambda m, d: m.update(int8={"stages": {"vision": {}}, "mixed": []}), r"no 'int8.stages\['vision'\].file' key"),
    (lambda m, d: m.update(int8={"stages": {}, "mixed": ["vision"]}), r"int8.mixed \['vision'\] must name stages"),
    (lambda m, d: m.update(int8={"stages": {"nope": {"file": "vision.onnx"}}, "mixed": []}),
     r"int8.stages names \['nope'\], not stages"),
    (lambda m, d: m["files"].update({"./vision.onnx": m["files"]["vision.onnx"]}), r"'./vision.onnx' is not a plain"),
    (lambda m, d: m["files"].update({"int8\\vision.onnx": m["files"]["vision.onnx"]}), r"is not a plain relative"),
])
def test_malformed_manifests_name_the_key(exported, tmp_path, edit, message):
    with pytest.raises(ArtifactError, match=message):
        Artifacts(_tampered(exported, tmp_path, edit))

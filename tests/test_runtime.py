"""The torch-free runtime: no torch at import or run time, verified artifacts, clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_model
from export import onnx_export
from export.onnx_export import export_artifacts
from export.parity import random_inputs, to_requests
from runtime.artifacts import ArtifactError, Artifacts
from runtime.pipeline import Pipeline, Request, RequestError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model(("rgb", "depth"))
    out = tmp_path_factory.mktemp("art") / "a"
    export_artifacts(model, out, {"preset": "tiny", "seed": 0}, progress=False)
    return model, out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_runtime_never_imports_torch(exported, tmp_path):
    model, art = exported
    request = to_requests(random_inputs(model.cfg, batch=1))[0]
    np.save(tmp_path / "rgb.npy", request.frames["rgb"])
    np.save(tmp_path / "depth.npy", request.frames["depth"])
    code = f"""
import sys, numpy as np
from runtime.pipeline import Pipeline, Request
from runtime import video, decoding, specs, artifacts, text
p = Pipeline({str(art)!r})
r = Request("What color is the ball?", frames={{"rgb": np.load({str(tmp_path / 'rgb.npy')!r}),
                                               "depth": np.load({str(tmp_path / 'depth.npy')!r})}})
print(p.answer([r])[0].token_ids)
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    request.question = "What color is the ball?"
    assert proc.stdout.strip() == str(Pipeline(art).answer([request])[0].token_ids)


def test_manifest_records_what_was_exported(exported):
    _, art = exported
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["stages"] == ["vision", "mmqa_rgb", "mmqa_depth", "fuse_encode", "decoder_first", "decoder_step"]
    assert set(manifest["files"]) == {f"{s}.onnx" for s in manifest["stages"]} | {"tokenizer.json"}
    assert manifest["precision"] == "fp32" and "onnxruntime" in manifest["versions"]
    assert manifest["source"] == {"preset": "tiny", "seed": 0}


def test_corrupt_truncated_and_missing_files_are_named(exported, tmp_path):
    _, art = exported
    bad = _copy(art, tmp_path / "truncated")
    data = (bad / "vision.onnx").read_bytes()
    (bad / "vision.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"vision.onnx: sha256 does not match"):
        Pipeline(bad)
    # same truncation with the manifest "fixed": ONNX Runtime refuses it, and the error names the file
    manifest = json.loads((bad / "manifest.json").read_text())
    from runtime.artifacts import sha256
    manifest["files"]["vision.onnx"] = sha256(bad / "vision.onnx")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"vision.onnx: ONNX Runtime cannot load it"):
        Pipeline(bad)
    gone = _copy(art, tmp_path / "missing")
    (gone / "decoder_step.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"decoder_step.onnx: missing"):
        Pipeline(gone)
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        Artifacts(tmp_path)
    broken = _copy(art, tmp_path / "badjson")
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Pipeline(broken)


def test_bad_requests_are_named(exported):
    model, art = exported
    pipeline = Pipeline(art)
    good = to_requests(random_inputs(model.cfg, batch=1))[0]
    with pytest.raises(RequestError, match=r"frames\['flow'\]: modality not in these artifacts"):
        pipeline.answer([Request(good.question, frames={**good.frames, "flow": good.frames["rgb"]})])
    with pytest.raises(RequestError, match=r"audio: modality 'audio' not in these artifacts"):
        pipeline.answer([Request(good.question, frames=good.frames, audio=np.zeros((2, 64, 128), np.float32))])
    with pytest.raises(RequestError, match=r"frames\['depth'\]: missing"):
        pipeline.answer([Request(good.question, frames={"rgb": good.frames["rgb"]})])
    with pytest.raises(RequestError, match=r"shape \(3, 3, 56, 56\), expected \(2, 3, 56, 56\)"):
        pipeline.answer([Request(good.question, frames={**good.frames, "rgb": np.zeros((3, 3, 56, 56), np.float32)})])
    with pytest.raises(RequestError, match="empty question"):
        pipeline.answer([Request(" ", frames=good.frames)])
    nan = {**good.frames, "rgb": good.frames["rgb"].copy()}
    nan["rgb"][0, 0, 0, 0] = np.nan
    with pytest.raises(RequestError, match="NaN"):
        pipeline.answer([Request(good.question, frames=nan)])
    assert pipeline.answer([good])[0].text  # still answers after bad requests


def test_a_long_question_is_cut_as_crema_cuts_it_and_the_answer_says_so(exported):
    """CREMA tokenizes with truncation=True, max_length=max_txt_len: the first max_txt_len - 1 tokens + </s>.
    The answer equals the one to the question cut by hand, and reports (read, given) tokens."""
    model, art = exported
    pipeline = Pipeline(art)
    good = to_requests(random_inputs(model.cfg, batch=1))[0]
    long = "what is it " * 40
    given = pipeline.tokenizer.lengths([long])[0]
    assert given > model.cfg.max_txt_len
    cut = pipeline.tokenizer.tok.decode(pipeline.tokenizer.tok.encode(long, add_special_tokens=False).ids[:31])
    a, b = (pipeline.answer([Request(q, frames=good.frames)])[0] for q in (long, cut))
    assert a.question_tokens == (32, given) and b.question_tokens == (32, 32)
    assert a.token_ids == b.token_ids
    ids, mask = model.tokenizer.encode([long], max_len=model.cfg.max_txt_len)  # the reference cuts alike
    np.testing.assert_array_equal(ids, pipeline.tokenizer.encode([long])[0])


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    model = make_model()
    calls = []

    def failing(model, spec, path):
        calls.append(spec.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        path.write_bytes(b"partial")

    monkeypatch.setattr(onnx_export, "export_stage", failing)
    with pytest.raises(KeyboardInterrupt):
        export_artifacts(model, tmp_path / "out", {}, progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_artifacts(model, tmp_path / "full", {}, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_external_data_is_consolidated_into_one_file(exported, tmp_path):
    """Graphs over 2 GB come out of the exporter with one file per weight; we keep one .data file."""
    import onnx

    from export.onnx_export import consolidate_external_data
    _, art = exported
    graph = onnx.load(str(art / "mmqa_rgb.onnx"))
    split = tmp_path / "split"
    split.mkdir()
    onnx.save(graph, str(split / "mmqa_rgb.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    assert len(list(split.iterdir())) > 10
    dest = tmp_path / "mmqa_rgb.onnx"
    consolidate_external_data(split / "mmqa_rgb.onnx", dest)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mmqa_rgb.onnx", "mmqa_rgb.onnx.data"]
    onnx.checker.check_model(str(dest))
    import onnxruntime as ort
    feed = {"features": np.random.default_rng(0).standard_normal((3, 17, 48)).astype(np.float32)}
    a = ort.InferenceSession(str(art / "mmqa_rgb.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(dest)).run(None, feed)[0]
    np.testing.assert_array_equal(a, b)

"""`crema convert-fp16`: FP16 graphs within DESIGN §5's bound (cosine >= 0.999 per stage), the FP32
exceptions that keep them there, answers equal to FP32's, atomic install, clear errors."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibration.calibrate import CalibrationLockedError, directory_lock, stage_fidelity
from conftest import make_model
from export.fp16 import (COSINE_BOUND, KEEP_FP32, REJECTED, FP16Error, convert_fp16, convert_graph, emulate_graph,
                         format_report)
from runtime.artifacts import MANIFEST, ArtifactError, Artifacts, sha256
from runtime.pipeline import Pipeline

QUIET = {"log": lambda *_: None}


def _export(model, out):
    from export.onnx_export import export_artifacts
    export_artifacts(model, out, {"preset": "test"}, progress=False)
    return out


@pytest.fixture(scope="module")
def demo_fp32(tmp_path_factory):
    from reference.weights import demo_model
    return _export(demo_model(), tmp_path_factory.mktemp("fp16") / "demo")


@pytest.fixture(scope="module")
def demo_fp16(demo_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "demo16"
    shutil.copytree(demo_fp32, out)
    return out, convert_fp16(out, questions=36, **QUIET)


@pytest.fixture(scope="module")
def demo_items(demo_fp32, tmp_path_factory):
    """36 held-out questions (synthetic seed-1 clips; training used seed 0)."""
    from calibration.data import EVALUATION_SEED, read_items
    from training.demo import demo_data
    config = Artifacts(demo_fp32).config
    return read_items(demo_data(tmp_path_factory.mktemp("fp16") / "q", 6, EVALUATION_SEED, config), config)


@pytest.fixture(scope="module")
def fuse_feeds(demo_fp32, demo_items):
    """fuse_encode's recorded inputs on 12 held-out questions."""
    from calibration.data import collect_feeds
    return collect_feeds(Pipeline(demo_fp32), demo_items[:12], batch=1)["fuse_encode"]


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): sha256(p) for p in directory.rglob("*") if p.is_file()}


def _scaled(feeds, factor):
    return [{k: v * factor if k.endswith("_tokens") else v for k, v in f.items()} for f in feeds]


def test_tiny_every_stage_converted_within_the_bound(tmp_path):
    """Every stage kind (vision, audio_encoder, mmqa of each input kind, fuse_encode, both decoders) on
    non-degenerate random weights, through the CLI."""
    from crema.cli import main
    directory = _export(make_model(("rgb", "depth", "audio", "pc"), task="espresso"), tmp_path / "tiny")
    assert main(["convert-fp16", "--artifacts", str(directory), "--questions", "12"]) == 0
    art = Artifacts(directory)
    report = json.loads((directory / "fp16" / "fidelity.json").read_text())
    assert report["ok"] and set(report["stages"]) == set(art.specs)
    for name, stage in report["stages"].items():
        assert stage["cosine"] >= COSINE_BOUND and stage["emulated_cosine"] >= COSINE_BOUND, (name, stage)
        graph = onnx.load(str(art.path(name, "fp16")))
        assert all(t.type.tensor_type.elem_type != TensorProto.FLOAT16 for t in list(graph.graph.input)
                   + list(graph.graph.output)), f"{name}: float32 in and out (keep_io_types)"
        share = _fp16_share(graph.graph)
        assert share > (0.5 if name in ("fuse_encode", "decoder_first", "decoder_step") else 0.95), (name, share)


def _fp16_share(graph) -> float:
    """FP16 weight elements / all float weight elements (T5's `wo` stays FP32)."""
    sizes = {TensorProto.FLOAT16: 0, TensorProto.FLOAT: 0}
    for t in graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    return sizes[TensorProto.FLOAT16] / sum(sizes.values())


def test_demo_answers_equal_fp32(demo_fp16, demo_items):
    directory, report = demo_fp16
    assert report["ok"] and report["installed"]
    assert report["end_to_end"]["fp16"]["answer_agreement"] == 1.0
    assert report["end_to_end"]["fp16_emulated"]["answer_agreement"] == 1.0
    fp32, fp16 = Pipeline(directory), Pipeline(directory, precision="fp16")
    requests = [it.request for it in demo_items]
    a = [x.text for x in fp32.answer(requests)]
    b = [x.text for x in fp16.answer(requests)]
    assert a == b and np.mean([x == it.answer for x, it in zip(a, demo_items)]) > 0.8  # a trained model
    assert "PASS" in format_report(report)


def test_fp16_artifacts_are_self_describing(demo_fp16, demo_fp32, tmp_path):
    directory, report = demo_fp16
    art = Artifacts(directory)  # verifies every hash, FP16 files included
    fp32_files = json.loads((demo_fp32 / MANIFEST).read_text())["files"]
    assert all(art.manifest["files"][k] == v for k, v in fp32_files.items())  # FP32 untouched
    section = art.manifest["fp16"]
    assert section["keep_fp32"] == list(KEEP_FP32) and set(section["stages"]) == set(art.specs)
    for name, stage in section["stages"].items():
        assert stage["file"] == f"fp16/{name}.onnx" and stage["file"] in art.manifest["files"]
        assert art.path(name, "fp16") == directory / stage["file"]
    assert "fp16/fidelity.json" in art.manifest["files"]
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    with open(broken / "fp16" / "vision.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        Artifacts(broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["fp16"]["stages"]["vision"]["file"] = "../vision.onnx"
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"fp16.stages\['vision'\].file"):
        Artifacts(broken)


def test_no_fp16_graphs_is_a_clear_error(demo_fp32, tmp_path, capsys):
    from crema.cli import main
    from triton_models.repository import generate_repository
    with pytest.raises(ArtifactError, match="crema convert-fp16"):
        Pipeline(demo_fp32, precision="fp16")
    with pytest.raises(ArtifactError, match="no FP16 graphs"):
        generate_repository(demo_fp32, tmp_path / "repo", precision="fp16")
    clip = tmp_path / "frames.npy"
    np.save(clip, np.zeros((1, 3, 56, 56), np.float32))
    assert main(["run", "--artifacts", str(demo_fp32), "--precision", "fp16", "--visual", f"rgb={clip}",
                 "--question", "What color is the ball?"]) == 2
    assert "no FP16 graphs (run `crema convert-fp16" in capsys.readouterr().err


def test_triton_repository_serves_the_fp16_graphs(demo_fp16, tmp_path):
    from triton_models.repository import generate_repository
    directory, _ = demo_fp16
    repo = generate_repository(directory, tmp_path / "repo", precision="fp16")
    assert sha256(repo / "vision" / "1" / "model.onnx") == sha256(directory / "fp16" / "vision.onnx")
    assert sha256(repo / "llm" / "1" / "decoder_step.onnx") == sha256(directory / "fp16" / "decoder_step.onnx")
    assert json.loads((repo / "crema.json").read_text())["precision"] == "fp16"


def test_a_failed_bound_installs_nothing_and_a_pass_replaces(demo_fp32, tmp_path):
    directory = tmp_path / "a"
    shutil.copytree(demo_fp32, directory)
    (directory / ".fp16.999999999.tmp").mkdir()  # what a killed run leaves: removed by the next
    before = _snapshot(directory)
    report = convert_fp16(directory, questions=6, cosine_bound=1.0, **QUIET)  # FP16 is never exact
    assert not report["ok"] and not report["installed"]
    after = _snapshot(directory)
    assert after.pop(REJECTED) and after == before  # byte for byte, plus the report no manifest lists
    assert not (directory / "fp16").exists() and not list(directory.glob(".fp16.*"))
    with pytest.raises(ArtifactError, match="crema convert-fp16"):
        Pipeline(directory, precision="fp16")
    assert convert_fp16(directory, questions=6, **QUIET)["installed"]
    assert not (directory / REJECTED).exists()
    first = Artifacts(directory).manifest["files"]["fp16/fidelity.json"]
    report = convert_fp16(directory, questions=6, keep_fp32=KEEP_FP32 + ("softmax",), **QUIET)
    art = Artifacts(directory)
    assert art.manifest["fp16"]["keep_fp32"] == list(KEEP_FP32) + ["softmax"]
    assert art.manifest["files"]["fp16/fidelity.json"] != first
    assert not list(directory.glob(".fp16.*"))


def test_one_run_at_a_time_and_unknown_exceptions(demo_fp32):
    with directory_lock(demo_fp32):
        with pytest.raises(CalibrationLockedError, match="convert-fp16"):
            convert_fp16(demo_fp32, **QUIET)
    with pytest.raises(FP16Error, match="unknown exception nope"):
        convert_fp16(demo_fp32, keep_fp32=("nope",), **QUIET)


def _fidelity(src, keep, tmp_path, feeds, emulated=False):
    dst = tmp_path / f"{'-'.join(keep) or 'none'}{'-emu' if emulated else ''}.onnx"
    (emulate_graph if emulated else convert_graph)(src, dst, keep)
    return stage_fidelity(src, dst, feeds)["cosine"]


def test_position_buckets_stay_fp32(demo_fp32, fuse_feeds, tmp_path):
    """log(distance) in FP16 moves relative positions to neighbouring buckets (measured: 170 of 784 in a
    demo call as ORT's CPU provider runs FP16): the bucket arithmetic stays FP32."""
    src = demo_fp32 / "fuse_encode.onnx"
    without = _fidelity(src, (), tmp_path, fuse_feeds)
    with_ = _fidelity(src, ("position_buckets",), tmp_path, fuse_feeds)
    assert 1 - without > 10 * (1 - with_) and with_ >= COSINE_BOUND


def test_t5_norm_keeps_fp32_where_activations_exceed_fp16(demo_fp32, fuse_feeds, tmp_path):
    """T5's RMS norm squares its input: above |x| = 256 that overflows FP16. Residuals made 16x larger
    (as in real T5 checkpoints) break emulated FP16 storage unless the norm and residual stay FP32;
    ORT's CPU provider alone would hide it (it runs the chain in FP32)."""
    src, feeds = demo_fp32 / "fuse_encode.onnx", _scaled(fuse_feeds, 16)
    assert _fidelity(src, ("position_buckets",), tmp_path, feeds, emulated=True) < 0.99
    assert _fidelity(src, ("position_buckets", "t5_norm_residual"), tmp_path, feeds, emulated=True) >= COSINE_BOUND
    convert_graph(src, tmp_path / "fp16.onnx", ("position_buckets", "t5_norm_residual"))
    graph = onnx.load(str(tmp_path / "fp16.onnx")).graph
    pows = [n for n in graph.node if n.op_type == "Pow" and "layer_norm" in n.name]
    readers = {i: n for n in graph.node for i in n.input}
    assert pows and all(readers[p.output[0]].op_type == "ReduceMean" for p in pows)  # no FP16 cast between


def test_t5_ffn_output_stays_fp32(demo_fp32, fuse_feeds, tmp_path):
    """T5's FFN output overflows FP16 in real checkpoints (transformers keeps `wo` in FP32); here its
    weights are made 5000x larger: only with `wo` in FP32 does emulated FP16 keep the bound."""
    model = onnx.load(str(demo_fp32 / "fuse_encode.onnx"))
    wo = {n.input[1] for n in model.graph.node if "DenseReluDense/wo" in n.name}
    for t in model.graph.initializer:
        if t.name in wo:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 5000, t.name))
    src = tmp_path / "fuse_encode.onnx"
    onnx.save(model, str(src))
    without = _fidelity(src, ("position_buckets", "t5_norm_residual"), tmp_path, fuse_feeds, emulated=True)
    assert not without >= 0.99  # NaN: inf - inf
    assert _fidelity(src, KEEP_FP32, tmp_path, fuse_feeds, emulated=True) >= COSINE_BOUND


def test_graphs_over_2gb_keep_external_data(demo_fp32, tmp_path):
    """A graph with its weights in `{stage}.onnx.data` (as export writes graphs over 2 GB) converts to
    fp16/{stage}.onnx + fp16/{stage}.onnx.data, and ONNX Runtime runs it."""
    src = tmp_path / "src" / "vision.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(demo_fp32 / "vision.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="vision.onnx.data", size_threshold=0)
    dst = tmp_path / "fp16" / "vision.onnx"
    dst.parent.mkdir()
    convert_graph(src, dst)
    assert (tmp_path / "fp16" / "vision.onnx.data").stat().st_size > 0.4 * (src.parent / "vision.onnx.data").stat().st_size
    assert dst.stat().st_size < 100_000  # the weights are in the .data file
    feeds = [{"pixel_values": np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)}]
    assert stage_fidelity(demo_fp32 / "vision.onnx", dst, feeds)["cosine"] >= COSINE_BOUND

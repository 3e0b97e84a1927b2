"""The depth estimator stage (`crema export --depth-model DIR`): transformers ZoeDepth / Depth Anything /
DPT exported to ONNX, parity with the module (DESIGN §5), the eval-mode trap, the runtime's
preprocessing and output handling, the manifest section, `crema run` without depth maps, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import make_model
from crema.demo import write_clip
from export.depth import (DepthModelError, DepthStage, export_depth_estimator, export_depth_module, load_depth_model,
                          sample_pixels)
from export.onnx_export import export_artifacts
from export.parity import compare, parity_report
from runtime.artifacts import MANIFEST, ArtifactError, Artifacts
from runtime.inputs import request_from_files
from runtime.modalities import ExportedDepthEstimator, depth_to_rgb, disparity_to_depth
from runtime.pipeline import Pipeline, Stage, session_options
from runtime.specs import depth_estimator_spec
from runtime.video import decode_frames, normalize_frames

# --- tiny transformers depth models on disk, as `crema export --depth-model DIR` reads them ------------
# Built from small configs with non-degenerate random weights (DESIGN §4: drawn at fan-in scale so the
# conv stacks do not collapse to a constant, norm gains and biases perturbed, BatchNorm running statistics
# away from 0/1 so eval and train mode differ), with a preprocessor_config.json like the published ones.

# the published checkpoints' processors (Intel/zoedepth-nyu-kitti, LiheYoung/depth-anything-small-hf,
# Intel/dpt-large), at tiny sizes
PREPROCESSORS = {
    "zoedepth": {"image_processor_type": "ZoeDepthImageProcessor", "do_normalize": True, "do_pad": True,
                 "do_rescale": True, "do_resize": True, "ensure_multiple_of": 32, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "keep_aspect_ratio": True, "resample": 2,
                 "rescale_factor": 0.00392156862745098, "size": {"height": 64, "width": 96}},
    "depth_anything": {"image_processor_type": "DPTImageProcessor", "do_normalize": True, "do_pad": False,
                       "do_rescale": True, "do_resize": True, "ensure_multiple_of": 14,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                       "keep_aspect_ratio": True, "resample": 3, "rescale_factor": 0.00392156862745098,
                       "size": {"height": 56, "width": 56}},
    "dpt": {"feature_extractor_type": "DPTFeatureExtractor", "do_normalize": True, "do_resize": True,
            "ensure_multiple_of": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "keep_aspect_ratio": False, "resample": 2, "size": {"height": 64, "width": 64}},
}
KINDS = tuple(PREPROCESSORS)


def depth_model(kind: str, seed: int = 0, **overrides):
    """A tiny transformers depth model of `kind` (zoedepth | depth_anything | dpt), non-degenerate weights."""
    from transformers import (BeitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config,
                              DPTConfig, DPTForDepthEstimation, ZoeDepthConfig, ZoeDepthForDepthEstimation)
    torch.manual_seed(seed)
    vit = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    neck = dict(neck_hidden_sizes=(8, 16, 32, 32), fusion_hidden_size=16)
    neck.update({k: overrides.pop(k) for k in list(overrides) if k in neck})
    if kind == "zoedepth":
        backbone = BeitConfig(**vit, image_size=64, patch_size=16, out_indices=[1, 2, 3, 4],
                              use_relative_position_bias=True, reshape_hidden_states=False)
        zoe = dict(num_relative_features=8, bottleneck_features=16, bin_embedding_dim=8, num_attractors=(4, 4, 2, 1),
                   use_batch_norm_in_fusion_residual=True,
                   bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0}])
        config = ZoeDepthConfig(backbone_config=backbone, **neck, **{**zoe, **overrides})
        model = ZoeDepthForDepthEstimation(config)
    elif kind == "depth_anything":
        backbone = Dinov2Config(**vit, image_size=56, patch_size=14, out_indices=[1, 2, 3, 4], apply_layernorm=True,
                                reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, head_hidden_size=8,
                                     patch_size=14, **neck, **overrides)
        model = DepthAnythingForDepthEstimation(config)
    elif kind == "dpt":
        config = DPTConfig(**vit, image_size=64, patch_size=16, backbone_out_indices=(0, 1, 2, 3), **neck,
                           use_batch_norm_in_fusion_residual=True, **overrides)
        model = DPTForDepthEstimation(config)
    else:
        raise KeyError(kind)
    perturb(model, seed)
    return model.eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and p.shape[0] > 1:  # Linear/Conv weights (and embeddings): fan-in scale
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        elif name.endswith("weight"):  # norm gains
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:  # biases, tokens, layer scales
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def write_depth_model(path: str | Path, kind: str, seed: int = 0, preprocessor: dict | None = None,
                      **overrides) -> Path:
    """Save a tiny depth model of `kind` as a Hugging Face directory (safetensors) at `path`."""
    path = Path(path)
    depth_model(kind, seed, **overrides).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor or PREPROCESSORS[kind], indent=2))
    return path


# ZoeDepth with two metric heads routed by a classifier (as Intel/zoedepth-nyu-kitti); its classifier
# takes 128 features and its patch transformer runs 4 layers, whatever the config says
NYU_KITTI = dict(bin_configurations=[{"name": "nyu", "n_bins": 8, "min_depth": 0.001, "max_depth": 10.0},
                                     {"name": "kitti", "n_bins": 8, "min_depth": 0.001, "max_depth": 80.0}],
                 num_patch_transformer_layers=4, patch_transformer_hidden_size=128,
                 patch_transformer_intermediate_size=64, patch_transformer_num_attention_heads=2)


BOUND = 1e-4  # DESIGN §5: ORT FP32 vs PyTorch FP32 per stage
OUTPUT = {"zoedepth": "metric", "depth_anything": "disparity", "dpt": "disparity"}
CLASSES = {"zoedepth": "ZoeDepthForDepthEstimation", "depth_anything": "DepthAnythingForDepthEstimation",
           "dpt": "DPTForDepthEstimation"}


def _stage(section, path):
    """The exported graph as the runtime runs it: an ORT session bound to the stage spec."""
    return Stage(depth_estimator_spec(section), path, session_options(), ["CPUExecutionProvider"])


def _reference(directory):
    """The transformers model loaded independently of export/depth.py (from_pretrained puts it in eval mode)."""
    import transformers
    name = json.loads((directory / "config.json").read_text())["architectures"][0]
    return getattr(transformers, name).from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model directory, section, graph path) for each architecture."""
    root = tmp_path_factory.mktemp("depth")
    out = {}
    for kind in KINDS:
        directory = write_depth_model(root / kind, kind)
        path = root / f"{kind}.onnx"
        out[kind] = (directory, export_depth_estimator(directory, path), path)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_the_transformers_module(exported, kind):
    directory, section, path = exported[kind]
    proc = PREPROCESSORS[kind]
    assert section["architecture"] == CLASSES[kind] and section["output"] == OUTPUT[kind]
    assert section["input_size"] == [proc["size"]["height"], proc["size"]["width"]]
    assert section["output_size"] == section["input_size"]
    assert section["mean"] == proc["image_mean"] and section["std"] == proc["image_std"]
    assert section["resize"] == {2: "bilinear", 3: "bicubic"}[proc["resample"]]
    assert section["pad"] == ("reflect" if kind == "zoedepth" else None)
    stage, reference = _stage(section, path), _reference(directory)
    for frames in (1, 3):  # the frames axis is dynamic (ZoeDepth's reassembly would bake the trace batch)
        x = sample_pixels(section, frames=frames, seed=7)
        with torch.no_grad():
            ref = reference(pixel_values=x).predicted_depth
        got = stage(pixel_values=x.numpy())["predicted_depth"]
        row = compare(got, ref)
        print(f"{kind} frames={frames}: max rel err {row['max_rel_err']:.2e}, cosine {row['cosine']:.9f}")
        assert got.shape == (frames, *section["output_size"])
        assert row["max_rel_err"] <= BOUND, row
        assert float(ref.std()) > 1e-3 * float(ref.abs().max())  # non-degenerate: the map varies


def test_zoedepth_with_two_metric_heads_routes_in_the_graph(tmp_path):
    """zoedepth-nyu-kitti's layout: a classifier votes over the batch for the nyu or the kitti head. The
    graph must take that route itself (transformers picks it with .item(), which tracing would freeze to the
    head the export's sample input chose): inputs that vote for either head match the module."""
    directory = write_depth_model(tmp_path / "nk", "zoedepth", **NYU_KITTI)
    section = export_depth_estimator(directory, tmp_path / "nk.onnx")
    assert section["batch_vote"] and depth_estimator_spec(section).batch_axis is None
    stage, reference = _stage(section, tmp_path / "nk.onnx"), _reference(directory)
    heads = set()
    for seed in range(6):
        x = sample_pixels(section, frames=2, seed=seed)
        with torch.no_grad():
            out = reference(pixel_values=x)
        heads.add(int(out.domain_logits.sum(0).argmax()))
        row = compare(stage(pixel_values=x.numpy())["predicted_depth"], out.predicted_depth)
        assert row["max_rel_err"] <= BOUND, (seed, row)
    assert heads == {0, 1}, "the inputs should vote for both heads"


@pytest.mark.parametrize("kind", ["zoedepth", "dpt"])  # the architectures with BatchNorm in the fusion residual
def test_eval_mode_trap(exported, tmp_path, kind):
    """A wrapper built after loading starts in training mode: BatchNorm would use batch statistics (and a
    forward would update the running ones). The loader's wrapper is in eval mode throughout; a train-mode
    wrapper differs from the graph by far more than the bound; and export_depth_module, handed a
    train-mode wrapper, still exports the eval-mode model (nothing it runs updates BatchNorm)."""
    directory, section, path = exported[kind]
    module, _ = load_depth_model(directory)
    assert not any(m.training for m in module.modules())
    stage = _stage(section, path)
    x = sample_pixels(section, frames=3, seed=3)
    graph = stage(pixel_values=x.numpy())["predicted_depth"]
    with torch.no_grad():
        assert compare(graph, module(x))["max_rel_err"] <= BOUND
        trapped = DepthStage(_reference(directory)).train()  # the trap, as a forgotten .eval() leaves it
        assert compare(graph, trapped(x))["max_rel_err"] > 100 * BOUND
        # that forward also moved trapped's running statistics: a graph exported from it now would differ
        assert compare(graph, trapped.eval()(x))["max_rel_err"] > 100 * BOUND
    fresh = DepthStage(_reference(directory)).train()
    again = export_depth_module(fresh, dict(section), tmp_path / "again.onnx")
    got = _stage(again, tmp_path / "again.onnx")(pixel_values=x.numpy())["predicted_depth"]
    with torch.no_grad():
        assert compare(got, _reference(directory)(pixel_values=x).predicted_depth)["max_rel_err"] <= BOUND


def _channel_graph(path, h, w):
    """A real ONNX graph with the stage's names: predicted_depth = channel 0 of pixel_values."""
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    graph = helper.make_graph([helper.make_node("Gather", ["pixel_values", "zero"], ["predicted_depth"], axis=1)],
                              "channel0", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                         ["frames", 3, h, w])],
                              [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, ["frames", h, w])],
                              initializer=[zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("pad", [None, "reflect"])
def test_runtime_preprocessing_and_output_alignment(tmp_path, pad):
    """Known answers through a real graph that echoes channel 0: a uniform frame gives (v * rescale - mean)
    / std; a horizontal ramp comes back at the frame's size where it was (padding cut off, not shifted)."""
    section = {"input_size": [32, 48], "output_size": [32, 48], "rescale": 1 / 255, "mean": [0.25, 0.5, 0.75],
               "std": [0.5, 0.25, 0.125], "resize": "bilinear", "pad": pad, "output": "metric"}
    stage = _stage(section, _channel_graph(tmp_path / "echo.onnx", 32, 48))
    estimator = ExportedDepthEstimator(stage, section)
    flat = np.full((2, 40, 60, 3), 153, np.uint8)
    x = estimator.preprocess(flat)
    assert x.shape == (2, 3, 32, 48) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, :, 5, 7], [[(0.6 - 0.25) / 0.5, (0.6 - 0.5) / 0.25, (0.6 - 0.75) / 0.125]] * 2,
                               rtol=1e-5)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 60)[None, :, None], 40, axis=0)[None], 2, axis=0)
    ramp = np.repeat(ramp, 3, axis=3).round().astype(np.uint8)
    got = estimator.predict(ramp)
    assert got.shape == (2, 40, 60)
    expected = (ramp[..., 0] / 255 - 0.25) / 0.5  # one frame pixel = 0.034 on this ramp
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert np.abs(got[inner] - expected[inner]).max() < 0.015  # measured 0.007 (resampling)
    for shift in (-1, 1):  # misplaced padding or crop by one pixel is caught
        assert np.abs(got[inner] - np.roll(expected, shift, axis=2)[inner]).max() > 0.03


def test_disparity_output_is_rendered_as_depth(tmp_path):
    """A disparity model's output goes through disparity_to_depth: larger = farther, and depth_to_rgb of it
    is the min-max normalised disparity (near = bright)."""
    section = {"input_size": [16, 16], "output_size": [16, 16], "rescale": 1 / 255, "mean": [0.0] * 3,
               "std": [1.0] * 3, "resize": "bilinear", "pad": None, "output": "disparity"}
    estimator = ExportedDepthEstimator(_stage(section, _channel_graph(tmp_path / "echo.onnx", 16, 16)), section)
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    frames[0, :, 8:] = 200  # right half: large disparity = near
    frames[0, :, :8] = 50
    depth = estimator(frames)[0]
    assert depth[3, 12] < depth[3, 3]  # near is smaller depth
    rgb = depth_to_rgb(depth)
    assert rgb[3, 12, 0] == 255 and rgb[3, 3, 0] == 0
    np.testing.assert_allclose(depth, disparity_to_depth(estimator.predict(frames)[0]))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, exported):
    """A tiny CREMA (rgb, depth, norm) exported with the tiny ZoeDepth as its depth estimator."""
    out = tmp_path_factory.mktemp("art") / "a"
    export_artifacts(make_model(("rgb", "depth", "norm")), out, {"preset": "tiny", "seed": 0}, progress=False,
                     depth_model=exported["zoedepth"][0])
    return out


def test_manifest_records_the_depth_estimator(artifacts, exported):
    manifest = json.loads((artifacts / MANIFEST).read_text())
    section = manifest["depth_estimator"]
    assert section == exported["zoedepth"][1]
    assert "depth_estimator.onnx" in manifest["files"] and "depth_estimator" not in manifest["stages"]
    art = Artifacts(artifacts)
    assert art.depth_spec.input_names == ["pixel_values"] and art.depth_spec.output_names == ["predicted_depth"]
    assert art.depth_spec.inputs[0].dims == ("frames", 3, 64, 96)
    report = parity_report(artifacts)
    assert report["stages"]["depth_estimator"]["ok"] and report["ok"], report["stages"]["depth_estimator"]


@pytest.mark.parametrize("key, value, message", [
    ("output", "inverse", "depth_estimator.output is 'inverse'"),
    ("input_size", [0, 96], r"depth_estimator.input_size \[0, 96\]: each side must be 1..2048"),
    ("mean", [0.5, 0.5], "depth_estimator.mean is"),
    ("std", [0.5, 0.0, 0.5], "depth_estimator.std .* must be positive"),
    ("pad", "zero", "depth_estimator.pad is 'zero'"),
])
def test_a_bad_depth_section_is_refused(artifacts, tmp_path, key, value, message):
    import shutil
    copy = tmp_path / "a"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["depth_estimator"][key] = value
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        Artifacts(copy)


def test_a_section_that_disagrees_with_the_graph_is_refused(artifacts, tmp_path):
    import shutil
    copy = tmp_path / "a"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["depth_estimator"]["input_size"] = [32, 48]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"depth_estimator.onnx: takes pixel_values \(3, 64, 96\), the manifest's "
                                            r"depth_estimator.input_size says \(3, 32, 48\)"):
        Pipeline(copy)


def test_the_depth_graph_is_hash_checked(artifacts, tmp_path):
    import shutil
    copy = tmp_path / "a"
    shutil.copytree(artifacts, copy)
    with open(copy / "depth_estimator.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="depth_estimator.onnx: sha256 does not match"):
        Artifacts(copy)


def test_request_from_files_uses_the_exported_estimator(artifacts, tmp_path):
    """No depth maps: depth and norm come from the estimator on the sampled frames, resized to the frame."""
    clip = write_clip(tmp_path / "clip.mp4")
    pipeline = Pipeline(artifacts)
    config = pipeline.config
    request = request_from_files(config, "Which is nearer?", video=clip, depth_model=pipeline.depth_estimator)
    frames = decode_frames(clip, config["frame_num"])
    depth = pipeline.depth_estimator(frames)
    assert depth.shape == frames.shape[:3] and (depth > 0).all() and depth.std() > 0
    size = config["vision"]["image_size"]
    expected = normalize_frames(np.stack([depth_to_rgb(d) for d in depth]), size)
    np.testing.assert_allclose(request.frames["depth"], expected)
    assert request.frames["norm"].shape == request.frames["rgb"].shape
    assert pipeline.answer([request])[0].text


def crema(*args):
    return subprocess.run([sys.executable, "-m", "crema.cli", *args], capture_output=True, text=True, timeout=300)


def test_crema_run_answers_without_depth_maps(exported, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    plain = tmp_path / "plain"
    proc = crema("export", "--preset", "tiny", "--modalities", "rgb_depth_norm", "--out", str(tmp_path / "art"),
                 "--depth-model", str(exported["zoedepth"][0]), "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = ["run", "--artifacts", str(tmp_path / "art"), "--video", str(clip), "--question", "Which is nearer?"]
    code = (f"import sys; from crema.cli import main; rc = main({run!r}); "
            "print('torch loaded:', 'torch' in sys.modules or 'transformers' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "torch loaded: False" in proc.stdout  # DESIGN rule 2
    proc = crema("export", "--preset", "tiny", "--modalities", "rgb_depth_norm", "--out", str(plain), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = crema("run", "--artifacts", str(plain), "--video", str(clip), "--question", "Which is nearer?")
    assert proc.returncode == 2 and "depth: give depth maps or a depth model" in proc.stderr


# --- bad input ---------------------------------------------------------------------------------

def _save_config(directory, config):
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def test_another_architecture_is_refused(tmp_path):
    from transformers import BertConfig, DPTConfig, GLPNConfig
    bert = _save_config(tmp_path / "bert", BertConfig())
    with pytest.raises(DepthModelError, match=r"bert/config.json: model_type 'bert' .* not a depth estimation model; "
                                              "supported: zoedepth, depth_anything, dpt"):
        load_depth_model(bert)
    glpn = _save_config(tmp_path / "glpn", GLPNConfig())
    with pytest.raises(DepthModelError, match="'glpn' .* a transformers depth model this export does not support"):
        load_depth_model(glpn)
    seg = DPTConfig(architectures=["DPTForSemanticSegmentation"])
    with pytest.raises(DepthModelError, match=r"seg/config.json: architectures \['DPTForSemanticSegmentation'\]"):
        load_depth_model(_save_config(tmp_path / "seg", seg))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DepthModelError, match="nowhere: not a directory"):
        load_depth_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DepthModelError, match="empty/config.json: missing"):
        load_depth_model(tmp_path / "empty")
    directory = write_depth_model(tmp_path / "m", "depth_anything")
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(DepthModelError, match="m/preprocessor_config.json: missing"):
        load_depth_model(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(DepthModelError, match=r"m: no weights \(model.safetensors or"):
        load_depth_model(directory)


def test_incomplete_weights_are_refused(tmp_path):
    """transformers would initialise missing tensors randomly and go on: refused instead."""
    from safetensors.torch import load_file, save_file
    directory = write_depth_model(tmp_path / "m", "dpt")
    weights = load_file(directory / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("head."))[0]
    del weights[dropped]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DepthModelError, match=r"the weights do not fit DPTForDepthEstimation: 1 missing"):
        load_depth_model(directory)
    other = tmp_path / "other"
    depth_model("dpt", fusion_hidden_size=8).save_pretrained(other)  # same names, other shapes
    (directory / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(DepthModelError, match=r"m: transformers cannot load the DPTForDepthEstimation weights "
                                              r"\(.*ignore_mismatched_sizes"):  # shapes are checked by transformers
        load_depth_model(directory)


@pytest.mark.parametrize("kind, change, message", [
    ("depth_anything", {"size": {"height": 0, "width": 56}}, "size 0x56: each side must be an integer in 14..2048"),
    ("depth_anything", {"size": {"height": 100000, "width": 56}}, "size 100000x56: each side must be"),
    ("depth_anything", {"size": {"height": 57, "width": 56}}, "size 57x56 is not a multiple of the backbone's patch size 14"),
    ("depth_anything", {"size": {"shortest_edge": 56}}, "size .*shortest_edge.*: expected"),
    ("dpt", {"size": {"height": 64, "width": 96}}, "size 64x96: DPT's own ViT takes square images only"),
    ("depth_anything", {"image_mean": [0.5, 0.5]}, r"image_mean \[0.5, 0.5\]: expected 3 numbers"),
    ("depth_anything", {"image_std": [0.2, 0.0, 0.2]}, "image_std .* must be positive"),
    ("depth_anything", {"image_mean": None}, "image_mean None: expected 3 numbers"),
    ("depth_anything", {"resample": 5}, "resample 5: expected one of"),
    ("depth_anything", {"rescale_factor": "1/255"}, "rescale_factor '1/255': must be a positive number"),
    ("zoedepth", {"size": {"height": 48, "width": 64}}, "size 48x64 gives a 64x64 depth map"),
])
def test_bad_preprocessor_configs_name_the_file(tmp_path, kind, change, message):
    proc = {**PREPROCESSORS[kind], **change}
    directory = write_depth_model(tmp_path / kind, kind, preprocessor=proc)
    with pytest.raises(DepthModelError, match=f"preprocessor_config.json: {message}"):
        export_depth_estimator(directory, tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


def test_cli_refuses_a_bad_depth_model_before_exporting(tmp_path):
    from transformers import BertConfig
    bert = _save_config(tmp_path / "bert", BertConfig())
    proc = crema("export", "--preset", "tiny", "--modalities", "rgb_depth", "--out", str(tmp_path / "a"),
                 "--depth-model", str(bert), "--quiet")
    assert proc.returncode == 2 and "bert/config.json: model_type 'bert'" in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
    good = write_depth_model(tmp_path / "da", "depth_anything")
    proc = crema("export", "--preset", "tiny", "--modalities", "rgb", "--out", str(tmp_path / "b"),
                 "--depth-model", str(good), "--quiet")
    assert proc.returncode == 2 and "use no depth (configure depth or norm)" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()

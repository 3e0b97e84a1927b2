"""A transformers depth model (local Hugging Face directory) -> the `depth_estimator` stage.

    section = export_depth_estimator("zoedepth-nyu-kitti/", out / "depth_estimator.onnx")

The directory holds `config.json`, the weights (`model.safetensors`, sharded safetensors or
`pytorch_model.bin`) and `preprocessor_config.json`; nothing is downloaded. Supported: ZoeDepth (what
CREMA's data pipeline used; metric depth in metres), Depth Anything (relative disparity, or metric when
its config says `depth_estimation_type: metric`) and DPT (MiDaS-style relative disparity). The graph is
runtime/specs.depth_estimator_spec: pixel_values [N, 3, H, W] -> predicted_depth [N, H', W']; the
returned manifest section records what the torch-free runtime needs to prepare frames and read the
output (runtime/modalities.ExportedDepthEstimator).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from runtime.specs import DEPTH_RESIZE, MAX_DEPTH_SIDE, depth_estimator_spec

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# model_type -> transformers class; the output kind is read from the config (depth_output)
SUPPORTED = {"zoedepth": "ZoeDepthForDepthEstimation", "depth_anything": "DepthAnythingForDepthEstimation",
             "dpt": "DPTForDepthEstimation"}
# PIL resampling codes as image processors store them -> the runtime's OpenCV interpolation
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
OPSET = 17
SAMPLE_FRAMES = 2  # trace-time frames: > 1, so the frames axis is not specialised away


class DepthModelError(ValueError):
    """A depth model directory that cannot be exported; the message names the file."""


class DepthStage(nn.Module):
    """pixel_values [N, 3, H, W] (normalised as the image processor does) -> predicted_depth [N, H', W']."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).predicted_depth


def _json(path: Path) -> dict:
    if not path.is_file():
        raise DepthModelError(f"{path}: missing (a Hugging Face depth model directory has {CONFIG}, the weights "
                              f"and {PREPROCESSOR})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DepthModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DepthModelError(f"{path}: expected a JSON object")
    return data


def model_class(directory: Path) -> type:
    """The transformers class of the directory's config.json, refused unless it is a supported depth model."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    config = _json(directory / CONFIG)
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type not in SUPPORTED:
        kind = ("a transformers depth model this export does not support"
                if model_type in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES else "not a depth estimation model")
        raise DepthModelError(f"{directory / CONFIG}: model_type {model_type!r} (architectures {archs}) is {kind}; "
                              f"supported: {', '.join(SUPPORTED)} ({', '.join(SUPPORTED.values())})")
    name = SUPPORTED[model_type]
    if archs and name not in archs:
        raise DepthModelError(f"{directory / CONFIG}: architectures {archs}: these weights are not a {name} "
                              "(a depth estimation head)")
    return getattr(transformers, name)


def depth_output(model) -> str:
    """"metric" (depth in metres) or "disparity" (relative inverse depth) for a loaded model."""
    if model.config.model_type == "zoedepth":
        return "metric"
    if model.config.model_type == "depth_anything":
        return "metric" if model.config.depth_estimation_type == "metric" else "disparity"
    return "disparity"  # DPT: MiDaS-style relative inverse depth


def patch_size(config) -> int:
    backbone = getattr(config, "backbone_config", None)
    size = getattr(backbone, "patch_size", None) if backbone is not None else None
    size = size or getattr(config, "patch_size", None) or 1
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def preprocessing(directory: Path, config) -> dict:
    """The image processor's settings as the runtime applies them, from preprocessor_config.json.

    Required (no defaults: DPT's processor class defaults to mean/std 0.5 while Depth Anything was
    trained with ImageNet's, so a guess would silently shift every input): `size` ({"height", "width"}
    or one int), `image_mean`, `image_std`. `do_normalize`/`do_rescale` false, `rescale_factor`, `resample`
    and ZoeDepth's `do_pad` are honoured. The size must be a multiple of the backbone's patch size and at
    most MAX_DEPTH_SIDE per side."""
    path = directory / PREPROCESSOR
    proc = _json(path)
    size = proc.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or not {"height", "width"} <= set(size):
        raise DepthModelError(f"{path}: size {size!r}: expected {{\"height\": H, \"width\": W}} (or one integer)")
    hw = [size["height"], size["width"]]
    step = patch_size(config)
    if not all(isinstance(x, int) and not isinstance(x, bool) and step <= x <= MAX_DEPTH_SIDE for x in hw):
        raise DepthModelError(f"{path}: size {hw[0]}x{hw[1]}: each side must be an integer in {step}..{MAX_DEPTH_SIDE}")
    if any(x % step for x in hw):
        raise DepthModelError(f"{path}: size {hw[0]}x{hw[1]} is not a multiple of the backbone's patch size {step}")
    if config.model_type == "dpt" and (config.backbone_config is None or config.is_hybrid) and hw[0] != hw[1]:
        raise DepthModelError(f"{path}: size {hw[0]}x{hw[1]}: DPT's own ViT takes square images only")
    normalize = proc.get("do_normalize", True)
    stats = {}
    for key in ("image_mean", "image_std"):
        value = proc.get(key)
        if not normalize:
            value = [0.0, 0.0, 0.0] if key == "image_mean" else [1.0, 1.0, 1.0]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value)):
            raise DepthModelError(f"{path}: {key} {value!r}: expected 3 numbers (one per RGB channel)")
        stats[key] = [float(x) for x in value]
    if not all(x > 0 for x in stats["image_std"]):
        raise DepthModelError(f"{path}: image_std {stats['image_std']}: must be positive")
    rescale = proc.get("rescale_factor", 1 / 255) if proc.get("do_rescale", True) else 1.0
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not rescale > 0:
        raise DepthModelError(f"{path}: rescale_factor {proc.get('rescale_factor')!r}: must be a positive number")
    resample = proc.get("resample", 3 if config.model_type != "zoedepth" else 2)
    if resample not in RESAMPLE:
        raise DepthModelError(f"{path}: resample {resample!r}: expected one of {sorted(RESAMPLE)} "
                              f"({', '.join(DEPTH_RESIZE)})")
    pad = "reflect" if config.model_type == "zoedepth" and proc.get("do_pad", True) else None
    return {"input_size": hw, "rescale": float(rescale), "mean": stats["image_mean"], "std": stats["image_std"],
            "resize": RESAMPLE[resample], "pad": pad}


def check_depth_model(directory: str | Path) -> tuple[type, object, dict]:
    """What can be checked without loading weights (seconds, before a long export starts): the
    directory, its config's architecture, that weights exist, the preprocessing -> (class, config,
    the manifest section so far)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DepthModelError(f"{directory}: not a directory (expected a local Hugging Face depth model directory)")
    cls = model_class(directory)
    if not any((directory / w).is_file() for w in WEIGHTS):
        raise DepthModelError(f"{directory}: no weights ({' or '.join(WEIGHTS)})")
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise DepthModelError(f"{directory / CONFIG}: transformers cannot read it ({e})") from e
    section = {"architecture": cls.__name__, "model_type": config.model_type, "source": str(directory.resolve()),
               **preprocessing(directory, config)}
    return cls, config, section


def load_depth_model(directory: str | Path) -> tuple[DepthStage, dict]:
    """A local depth model directory -> (DepthStage in eval mode, the manifest section without output_size).

    Loading is strict: missing or mis-shaped weights are refused (transformers would initialise them
    randomly), and the model is FP32."""
    directory = Path(directory)
    cls, config, section = check_depth_model(directory)
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar: the export has a progress bar of its own
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(directory, config=config, dtype=torch.float32, local_files_only=True,
                                              output_loading_info=True)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise DepthModelError(f"{directory}: transformers cannot load the {cls.__name__} weights ({e})") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    problems = [f"{len(info[k])} {label} ({', '.join(sorted(map(str, info[k]))[:3])}...)"
                for k, label in (("missing_keys", "missing"), ("mismatched_keys", "mis-shaped")) if info.get(k)]
    if problems or info.get("error_msgs"):
        raise DepthModelError(f"{directory}: the weights do not fit {cls.__name__}: "
                              f"{'; '.join(problems) or info['error_msgs'][0]}")
    section["output"] = depth_output(model)
    section["batch_vote"] = batch_vote(model.config)
    # The trap: a module built after loading starts in training mode (BatchNorm on batch statistics,
    # dropout on), and .eval() on the inner model does not cover the wrapper; call it on the wrapper.
    return DepthStage(model).eval(), section


def _zoe_reassemble(self, hidden_states, patch_height, patch_width):
    """transformers' ZoeDepthReassembleStage.forward with one change: the stages stacked on the batch axis
    are separated by a reshape instead of `split(batch_size)`, whose split sizes the tracer would bake into
    the graph (a graph that only runs at the trace-time batch); the values are identical."""
    batch_size = hidden_states[0].shape[0]
    hidden_states = torch.cat(hidden_states, dim=0)
    cls_token, hidden_states = hidden_states[:, 0], hidden_states[:, 1:]
    total_batch_size, sequence_length, num_channels = hidden_states.shape
    hidden_states = hidden_states.reshape(total_batch_size, patch_height, patch_width, num_channels)
    hidden_states = hidden_states.permute(0, 3, 1, 2).contiguous()
    if self.readout_type == "project":
        hidden_states = hidden_states.flatten(2).permute((0, 2, 1))
        readout = cls_token.unsqueeze(dim=1).expand_as(hidden_states)
        hidden_states = torch.cat((hidden_states, readout), -1)
    elif self.readout_type == "add":
        hidden_states = hidden_states + cls_token.unsqueeze(-1)
    stages = hidden_states.reshape(len(self.layers), batch_size, *hidden_states.shape[1:])
    out = []
    for stage_idx in range(len(self.layers)):
        hidden_state = stages[stage_idx]
        if self.readout_type == "project":
            hidden_state = self.readout_projects[stage_idx](hidden_state)
        hidden_state = hidden_state.permute(0, 2, 1).reshape(batch_size, -1, patch_height, patch_width)
        out.append(self.layers[stage_idx](hidden_state))
    return out


def _zoe_metric_heads(self, outconv_activation, bottleneck, feature_blocks, relative_depth):
    """transformers' ZoeDepthMultipleMetricDepthEstimationHeads.forward (e.g. zoedepth-nyu-kitti: one metric
    head per domain, routed by a classifier's vote over the batch) with the route taken in the graph: every
    head runs and the voted one is selected by index. The original picks it with `.item()`, a Python value
    the tracer would bake in (a graph that always uses the head the sample input chose); values identical."""
    x = self.conv2(bottleneck)
    embedding = self.patch_transformer(x)[:, 0, :]
    domain_logits = self.mlp_classifier(embedding)
    domain_vote = torch.softmax(domain_logits.sum(dim=0, keepdim=True), dim=-1)
    choice = torch.argmax(domain_vote, dim=-1).reshape(())
    outs = []
    for conf in self.bin_configurations:
        name, min_depth, max_depth = conf["name"], conf["min_depth"], conf["max_depth"]
        _, seed_bin_centers = self.seed_bin_regressors[name](x)
        if self.bin_centers_type in ["normed", "hybrid2"]:
            prev_bin = (seed_bin_centers - min_depth) / (max_depth - min_depth)
        else:
            prev_bin = seed_bin_centers
        prev_bin_embedding = self.seed_projector(x)
        for projector, attractor, feature in zip(self.projectors, self.attractors[name], feature_blocks):
            bin_embedding = projector(feature)
            bin, bin_centers = attractor(bin_embedding, prev_bin, prev_bin_embedding, interpolate=True)
            prev_bin = bin
            prev_bin_embedding = bin_embedding
        last = outconv_activation
        bin_centers = nn.functional.interpolate(bin_centers, last.shape[-2:], mode="bilinear", align_corners=True)
        bin_embedding = nn.functional.interpolate(bin_embedding, last.shape[-2:], mode="bilinear", align_corners=True)
        probabilities = self.conditional_log_binomial[name](last, bin_embedding)
        outs.append(torch.sum(probabilities * bin_centers, dim=1, keepdim=True))
    return torch.stack(outs)[choice], domain_logits


def batch_vote(config) -> bool:
    """Whether a frame's depth depends on the other frames of the call: ZoeDepth with several metric heads
    routes the whole batch by one vote (so call it with one video's frames, never a mixed batch)."""
    return config.model_type == "zoedepth" and len(config.bin_configurations) > 1


@contextlib.contextmanager
def traceable(module: DepthStage):
    """While tracing: ZoeDepth's reassemble stage without the batch-baking split (_zoe_reassemble) and its
    multi-domain metric heads routed in the graph (_zoe_metric_heads)."""
    if module.model.config.model_type != "zoedepth":
        yield
        return
    from transformers.models.zoedepth import modeling_zoedepth as zoe
    patches = [(zoe.ZoeDepthReassembleStage, _zoe_reassemble),
               (zoe.ZoeDepthMultipleMetricDepthEstimationHeads, _zoe_metric_heads)]
    originals = [(cls, cls.forward) for cls, _ in patches]
    try:
        for cls, forward in patches:
            cls.forward = forward
        yield
    finally:
        for cls, forward in originals:
            cls.forward = forward


def sample_pixels(section: dict, frames: int = SAMPLE_FRAMES, seed: int = 0) -> torch.Tensor:
    """Random normalised pixel_values [frames, 3, H, W] at the section's input size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, *section["input_size"], generator=g)


def export_depth_estimator(directory: str | Path, path: str | Path) -> dict:
    """Export the depth model in `directory` to `path` (depth_estimator.onnx); returns the manifest's
    "depth_estimator" section (runtime/artifacts.py)."""
    return export_depth_module(*load_depth_model(directory), path)


def export_depth_module(module: DepthStage, section: dict, path: str | Path) -> dict:
    """A loaded depth model (load_depth_model) -> `path`; returns its section with output_size added."""
    path = Path(path)
    module.eval()
    x = sample_pixels(section)
    with torch.no_grad():
        out = module(x)
    if out.ndim != 3 or out.shape[0] != x.shape[0]:
        raise DepthModelError(f"{section['source']}: predicted_depth has shape {tuple(out.shape)}, "
                              "expected [N, H', W']")
    section["output_size"] = [int(out.shape[1]), int(out.shape[2])]
    (h, w), (oh, ow) = section["input_size"], section["output_size"]
    if abs(oh * w - ow * h) > 0.02 * h * w:  # e.g. ZoeDepth with an odd patch grid: its fusion goes square
        raise DepthModelError(f"{Path(section['source']) / PREPROCESSOR}: size {h}x{w} gives a {oh}x{ow} depth map "
                              "(another aspect ratio: the model needs another input size)")
    spec = depth_estimator_spec(section)
    dynamic = {t.name: t.dynamic_axes for t in spec.inputs + spec.outputs}
    scratch = path.parent / f".{spec.name}"  # the exporter may write one file per weight
    scratch.mkdir()
    try:
        traced = scratch / path.name
        with torch.no_grad(), warnings.catch_warnings(), traceable(module):
            warnings.simplefilter("ignore")  # tracer warnings about python values are expected here
            torch.onnx.export(module, (x,), str(traced), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        if len(list(scratch.iterdir())) != 1:
            raise DepthModelError(f"{section['source']}: the depth model's graph is over 2 GB (not supported)")
        traced.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))
    return section

"""Calibration methods compared on weights with planted outlier channels (DESIGN §4).

Real ViTs and LLMs have a few activation channels 50-100x the rest. We plant them in the demo
model's ViT: in every block, `channels` rows of mlp.fc1 are scaled by `scale` and the matching
columns of mlp.fc2 divided by it, so the input of fc2 (a quantized MatMul) carries outlier channels
while the block computes nearly the same function. Each method then quantizes the vision stage
(static QDQ, per-tensor activation ranges) and is scored by cosine vs FP32 on held-out inputs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from training.demo import demo_data

from .data import CALIBRATION_SEED, EVALUATION_SEED, collect_feeds, read_items
from .quantize import METHODS, quantize_stage
from .calibrate import stage_fidelity


def plant_outliers(model, channels: int = 2, scale: float = 60.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            idx = torch.randperm(layer.mlp.fc1.out_features, generator=g)[:channels]
            layer.mlp.fc1.weight[idx] *= scale
            layer.mlp.fc1.bias[idx] *= scale
            layer.mlp.fc2.weight[:, idx] /= scale
    return model


def fc2_input_ratio(model, pixels: torch.Tensor) -> float:
    """max |activation| of the outlier channels / max |activation| of the others, at fc2's input."""
    seen = []
    hook = model.vision_model.encoder.layers[0].mlp.fc2.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model.vision_features(pixels)
    hook.remove()
    per_channel = seen[0].abs().flatten(0, -2).max(0).values
    top = per_channel.sort(descending=True).values
    return float(top[0] / top[top.numel() // 2])


def compare_methods(calib_questions: int = 24, eval_questions: int = 24, methods=tuple(METHODS), log=print) -> dict:
    """{"clean"|"outliers": {method: {cosine, max_rel_error}}} on the demo model's vision stage."""
    from export.onnx_export import export_artifacts
    from reference.weights import demo_model
    from runtime.pipeline import Pipeline
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = demo_model().cfg.to_dict()
        calib = read_items(demo_data(tmp / "calib", -(-calib_questions // 6), CALIBRATION_SEED, config),
                           config, calib_questions)
        evaluation = read_items(demo_data(tmp / "eval", -(-eval_questions // 6), EVALUATION_SEED, config),
                                config, eval_questions)
        for variant in ("clean", "outliers"):
            model = demo_model()
            if variant == "outliers":
                plant_outliers(model)
            art = tmp / variant
            export_artifacts(model, art, {"preset": "demo", "variant": variant}, progress=False)
            pipeline = Pipeline(art)
            feeds = collect_feeds(pipeline, calib)["vision"]
            eval_feeds = collect_feeds(pipeline, evaluation)["vision"]
            row = {}
            for method in methods:
                out = tmp / f"{variant}-{method}.onnx"
                quantize_stage(art / "vision.onnx", out, feeds, "static", method)
                row[method] = stage_fidelity(art / "vision.onnx", out, eval_feeds)
            if variant == "outliers":
                row["fc2_input_ratio"] = fc2_input_ratio(model, torch.from_numpy(feeds[0]["pixel_values"]))
            results[variant] = row
            log(f"{variant}: " + ", ".join(f"{m} cosine {row[m]['cosine']:.4f}" for m in methods))
    return results

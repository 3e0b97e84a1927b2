"""Shared helpers: tiny-preset models with non-degenerate weights and matching random requests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # crema_math

from reference.config import preset  # noqa: E402
from reference.model import CremaInputs  # noqa: E402
from reference.weights import preset_model  # noqa: E402

QUESTIONS = ["What color is the ball?", "Where does the red ball move in the video?", "Is it near?"]


def tiny(modalities=("rgb",), **overrides):
    return preset("tiny", modalities=tuple(modalities), **overrides)


def make_model(modalities=("rgb",), seed=0, **overrides):
    return preset_model(tiny(modalities, **overrides), seed=seed)


def make_inputs(cfg, batch=2, seed=1, clips=2, points=12, questions=None) -> CremaInputs:
    g = torch.Generator().manual_seed(seed)
    inputs = CremaInputs(questions=list(questions or QUESTIONS[:batch]))
    v = cfg.vision
    for m in cfg.visual_modalities:
        inputs.frames[m] = torch.randn(batch, cfg.frame_num, 3, v.image_size, v.image_size, generator=g)
    names = cfg.modality_names
    if "audio" in names:
        inputs.audio = torch.randn(batch, clips, cfg.audio.clip_frames, cfg.audio.num_mel_bins, generator=g)
    if "pc" in names:
        inputs.pc_feat = torch.randn(batch, points, cfg.feature_dim, generator=g)
        inputs.pc_coords = torch.randint(0, cfg.pc_grid, (batch, points, 3), generator=g)
    return inputs


@pytest.fixture(scope="session")
def rgb_model():
    return make_model()

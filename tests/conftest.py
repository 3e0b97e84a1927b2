"""Shared helpers: tiny-preset models with non-degenerate weights and matching random requests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # crema_math

from export.parity import QUESTIONS, random_inputs  # noqa: E402,F401
from reference.config import preset  # noqa: E402
from reference.model import CremaInputs  # noqa: E402
from reference.weights import preset_model  # noqa: E402


def tiny(modalities=("rgb",), **overrides):
    return preset("tiny", modalities=tuple(modalities), **overrides)


def make_model(modalities=("rgb",), seed=0, **overrides):
    return preset_model(tiny(modalities, **overrides), seed=seed)


def make_inputs(cfg, batch=2, seed=1, **kwargs) -> CremaInputs:
    return random_inputs(cfg, batch=batch, seed=seed, **kwargs)


@pytest.fixture(scope="session")
def rgb_model():
    return make_model()

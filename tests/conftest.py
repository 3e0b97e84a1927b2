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


MAX_INPUT_MB = 1  # the served repository's limit: small, so payload-limit tests stay small


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """The trained demo model served as `crema serve` serves it (front + supervised Triton) on free
    loopback ports, with three demo clips; shared by the serving test modules."""
    from export.onnx_export import export_artifacts
    from reference.weights import DEMO_SOURCE, demo_model
    from runtime.pipeline import Pipeline
    from synthetic.generator import read_questions
    from training.demo import demo_data
    from triton_models.repository import generate_repository
    from triton_models.service import Service

    root = tmp_path_factory.mktemp("served")
    model = demo_model()
    artifacts = export_artifacts(model, root / "artifacts", DEMO_SOURCE, progress=False)
    data = demo_data(root / "clips", 3, 1, model.cfg.to_dict())
    repo = generate_repository(artifacts, root / "repo", max_input_mb=MAX_INPUT_MB)
    log: list[str] = []
    service = Service(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "server.log",
                      log=log.append).start()
    yield {"artifacts": artifacts, "data": data, "repo": repo, "service": service, "log": log,
           "pipeline": Pipeline(artifacts), "questions": read_questions(data)}
    service.stop()

"""TensorRT cannot be installed here, so the graphs are kept TensorRT-friendly by construction: every
op of every exported stage is one ONNX-TensorRT parses (calibration/tensorrt.py TENSORRT_OPS), for
every modality path (tiny preset); the INT8 graphs: tests/test_calibration.py."""
from __future__ import annotations

import onnx
import pytest

from calibration.tensorrt import unsupported_ops
from conftest import make_model
from export.onnx_export import export_artifacts
from runtime.artifacts import Artifacts


@pytest.mark.parametrize("modalities,task", [(("rgb", "depth", "flow", "norm", "audio", "pc"), "espresso_concat"),
                                             (("rgb", "audio"), "concat"), (("rgb", "pc"), "concat")])
def test_every_exported_op_is_one_tensorrt_parses(tmp_path, modalities, task):
    art = Artifacts(export_artifacts(make_model(modalities, task=task), tmp_path / "art", {"preset": "tiny"},
                                     progress=False))
    for name in art.specs:
        graph = onnx.load(str(art.path(name)), load_external_data=False).graph
        assert not unsupported_ops(graph), (name, unsupported_ops(graph))

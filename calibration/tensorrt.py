"""`crema build-trt`: TensorRT engines from an artifact directory's FP32 graphs (NVIDIA GPU only).

Optimisation profiles come from the stage specs (runtime/specs.py: (min, opt, max) per symbolic
axis). INT8 takes each tensor's range from `crema calibrate`'s table (int8/tensorrt/{stage}/
calibration.json) as a per-tensor dynamic range; FP16 needs no calibration. Engines are written to
ARTIFACTS/tensorrt/{precision}/{stage}.plan. Without `tensorrt` and a CUDA GPU this raises
TensorRTUnavailable; it has not run on this project's CPU machines (unverified).
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.artifacts import Artifacts


# The ONNX ops our graphs may use, each one in ONNX-TensorRT's support matrix (docs/operators.md of
# onnx/onnx-tensorrt, the 8.5 table) with the restrictions that concern us; LayerNormalization is
# parsed natively from TensorRT 8.6 (its release notes: "target opset 17 for LayerNormalization").
# Checked against every exported graph by tests/test_tensorrt_ops.py, since no TensorRT runs here.
TENSORRT_OPS = {
    "Abs", "Add", "And", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal", "Erf",
    "Expand", "Flatten", "Gather", "Gemm", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Log", "MatMul",
    "Max", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range", "ReduceMax", "ReduceMean", "ReduceSum",
    "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose",
    "Unsqueeze", "Where", "LayerNormalization",
    "QuantizeLinear", "DequantizeLinear",  # INT8 (QDQ): TensorRT wants zero points of 0 (symmetric)
}


def unsupported_ops(graph) -> set[str]:
    """Op types of an onnx GraphProto (subgraphs included) outside TENSORRT_OPS."""
    found = set()
    for node in graph.node:
        found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for attr in node.attribute:
            if attr.g.node:
                found |= unsupported_ops(attr.g)
    return found - TENSORRT_OPS


class TensorRTUnavailable(RuntimeError):
    """No TensorRT Python package or no CUDA GPU here."""


def available() -> str | None:
    """None when engines can be built here, else the reason they cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA GPU"
    return None


def _shape(spec_tensor, profile: dict, which: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else profile[d][which] for d in spec_tensor.dims)


def _value(entry) -> float:
    """One bound in ORT's calibration.json: {"data": x or [x], "dtype": ..., "CLS": "numpy.array"}."""
    data = entry["data"] if isinstance(entry, dict) else entry
    return float(data[0] if isinstance(data, list) else data)


def build_engines(artifacts: str | Path, precision: str = "fp16", workspace_gib: int = 4, log=print) -> list[Path]:
    reason = available()
    if reason:
        raise TensorRTUnavailable(f"cannot build TensorRT engines: {reason}")
    import tensorrt as trt

    art = Artifacts(artifacts)
    if precision == "int8" and "int8" not in art.manifest:
        raise ValueError(f"{art.dir}: INT8 engines need calibration tables (run `crema calibrate` first)")
    logger = trt.Logger(trt.Logger.WARNING)
    out_dir = art.dir / "tensorrt" / precision
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in art.specs.items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(art.path(name))):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"{name}: TensorRT cannot parse the ONNX graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            table = json.loads((art.dir / "int8" / "tensorrt" / name / "calibration.json").read_text())
            amax = {k: max(abs(_value(v["highest"])), abs(_value(v["lowest"]))) for k, v in table.items()}
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                for j in range(layer.num_outputs):
                    t = layer.get_output(j)
                    if t.name in amax:
                        t.dynamic_range = (-amax[t.name], amax[t.name])
            for i in range(network.num_inputs):
                t = network.get_input(i)
                if t.name in amax:
                    t.dynamic_range = (-amax[t.name], amax[t.name])
        profile = builder.create_optimization_profile()
        for tensor in spec.inputs:
            profile.set_shape(tensor.name, *(_shape(tensor, spec.profile, k) for k in range(3)))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ValueError(f"{name}: TensorRT failed to build the engine (see its log above)")
        path = out_dir / f"{name}.plan"
        path.write_bytes(bytes(engine))
        written.append(path)
        log(f"built {path}")
    return written

"""One stage's FP32 graph -> INT8 with ONNX Runtime's quantization tooling, and its TensorRT table.

static   QDQ, U8 activations / S8 per-channel weights (DESIGN §6: the fastest INT8 form on AVX2),
         activation ranges from the calibration feeds by `method`
dynamic  weights S8 ahead of time, activation ranges computed per call (no calibration data)
Only `ops` (default MatMul, Gemm, Conv: where the FLOPs are) are quantized, and of those only the
ones with a weight operand: activation x activation products (attention scores, attention x
values) stay FP32, as does every other op (softmax, normalisation, GELU, residual adds). Measured on
the demo decoder step: quantizing the attention products too put its cosine at 0.984 (bound 0.99).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      create_calibrator, quantize_dynamic, quantize_static, write_calibration_table)
from onnxruntime.quantization.shape_inference import quant_pre_process

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
DEFAULT_OPS = ("MatMul", "Gemm", "Conv")
# T5's feed-forward output projection sees the activation outliers T5 is known for; transformers keeps
# it in FP32 for half precision too (`T5PreTrainedModel._keep_in_fp32_modules = ["wo"]`)
KEEP_FP32 = ("DenseReluDense/wo",)
TWO_GB = 2 ** 31


class QuantizationError(ValueError):
    """A stage that could not be quantized; the message names it."""


class FeedReader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _large(path: Path) -> bool:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) >= TWO_GB


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's quant_pre_process: symbolic shape inference + graph optimisation, as ORT recommends."""
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False, save_as_external_data=_large(src))
    return dst


def activation_products(graph: onnx.GraphProto) -> list[str]:
    """MatMul nodes neither of whose operands is a weight (initializer or constant)."""
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def quantize_stage(src: Path, dst: Path, feeds: list[dict], mode: str, method: str = "minmax",
                   ops: tuple[str, ...] = DEFAULT_OPS, exclude_nodes: tuple[str, ...] = (),
                   keep_fp32: tuple[str, ...] = KEEP_FP32) -> None:
    """Write the INT8 graph of `src` to `dst` (static needs `feeds`, dynamic ignores them)."""
    external = _large(src)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pre = preprocess(src, Path(tmp) / "pre.onnx")
            graph = onnx.load(str(pre), load_external_data=False).graph
            exclude_nodes = (tuple(exclude_nodes) + tuple(activation_products(graph))
                             + tuple(n.name for n in graph.node if any(k in n.name for k in keep_fp32)))
            if mode == "static":
                if not feeds:
                    raise QuantizationError(f"{src.name}: no calibration inputs recorded for this stage")
                # not CalibMaxIntermediateOutputs: in ORT 1.32 it drops each full chunk without folding
                # its ranges in (calibrate.py collect_data), so only the last partial chunk would count
                extra = {"CalibPercentile": 99.99} if method == "percentile" else {}
                quantize_static(str(pre), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(ops), per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                                calibrate_method=METHODS[method], use_external_data_format=external,
                                extra_options=extra)
            elif mode == "dynamic":
                quantize_dynamic(str(pre), str(dst), op_types_to_quantize=list(ops), per_channel=True,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                                 use_external_data_format=external)
            else:
                raise QuantizationError(f"{src.name}: unknown mode {mode!r} (static | dynamic)")
        except QuantizationError:
            raise
        except Exception as e:  # ORT's tooling raises many types; name the stage
            raise QuantizationError(f"{src.name}: ORT quantization failed ({type(e).__name__}: {e})") from e
    onnx.checker.check_model(str(dst))


def tensorrt_table(src: Path, out_dir: Path, feeds: list[dict], method: str = "minmax") -> Path:
    """TensorRT INT8 calibration table of every tensor (calibration.{json,flatbuffers,cache}) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            calibrator = create_calibrator(str(src), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=METHODS[method], use_external_data_format=_large(src),
                                           extra_options={"symmetric": True})
            calibrator.collect_data(FeedReader(feeds))
            ranges = calibrator.compute_data()
        except Exception as e:
            raise QuantizationError(f"{src.name}: TensorRT calibration failed ({type(e).__name__}: {e})") from e
    write_calibration_table(dict(ranges.data), dir=str(out_dir))
    return out_dir


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))

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

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      create_calibrator, quantize_dynamic, quantize_static, write_calibration_table)
from onnxruntime.quantization.calibrate import HistogramCalibrater
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
    """The recorded calls; ORT's strided calibration reads them one range at a time (set_range)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def collect_per_call(calibrator, feeds: list[dict]) -> None:
    """One collect_data per call, as quantize_static does with CalibStridedMinMax=1 (see quantize_stage)."""
    for feed in feeds:
        calibrator.collect_data(FeedReader([feed]))


def _quiet():
    """ORT's histogram calibrators print their progress to stdout, through our progress bars."""
    return contextlib.redirect_stdout(io.StringIO())


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
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        try:
            pre = preprocess(src, Path(tmp) / "pre.onnx")
            graph = onnx.load(str(pre), load_external_data=False).graph
            exclude_nodes = (tuple(exclude_nodes) + tuple(activation_products(graph))
                             + tuple(n.name for n in graph.node if any(k in n.name for k in keep_fp32)))
            if mode == "static":
                if not feeds:
                    raise QuantizationError(f"{src.name}: no calibration inputs recorded for this stage")
                # One call at a time (the option works for every method, despite its name): ORT's
                # histogram calibrators stack a tensor's values of all calls in one np.asarray, which
                # fails where shapes differ between calls (fuse_encode's text length); MinMax merges the
                # per-call ranges into the same ranges as before. Not CalibMaxIntermediateOutputs: in
                # ORT 1.32 it drops each full chunk without folding its ranges in (collect_data).
                extra = {"CalibStridedMinMax": 1}
                if method == "percentile":
                    extra["CalibPercentile"] = 99.99
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


def tensorrt_table(src: Path, out_dir: Path, feeds: list[dict], method: str = "minmax") -> list[str]:
    """TensorRT INT8 calibration table (calibration.{json,flatbuffers,cache}) in out_dir of every float
    tensor with a usable range; returns the others, left out (TensorRT runs a tensor without a range in
    higher precision). On the demo model these are T5's relative-position buckets in BEATs, the T5
    encoder and the decoder step (log(0) = -inf on the branch torch.where discards) and the attention
    mask fill finfo(float32).min."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        try:
            calibrator = create_calibrator(str(src), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=METHODS[method], use_external_data_format=_large(src),
                                           extra_options={"symmetric": True})
            skipped = drop_unusable(calibrator, feeds)
            collect_per_call(calibrator, feeds)
            ranges = dict(calibrator.compute_data().data)
        except Exception as e:
            raise QuantizationError(f"{src.name}: TensorRT calibration failed ({type(e).__name__}: {e})") from e
    skipped |= {name for name, r in ranges.items() if not usable(np.asarray(r.range_value, np.float64))}
    write_calibration_table({k: v for k, v in ranges.items() if k not in skipped}, dir=str(out_dir))
    return sorted(skipped)


def usable(values: np.ndarray) -> bool:
    """Finite and below 2**24: from there on float32 cannot tell x from x + 0.5, and ORT's histogram
    of a tensor that holds the same such value in every call gets bins of zero width."""
    return bool(np.isfinite(values).all() and (values.size == 0 or np.abs(values).max() < 2 ** 24))


def drop_unusable(calibrator, feeds: list[dict]) -> set[str]:
    """Histogram calibrators fail on a tensor without a usable range (np.histogram needs finite bins):
    find such tensors in one pass over the augmented graph and take them out of what is calibrated.
    MinMax needs no pass: its ranges show them."""
    if not isinstance(calibrator, HistogramCalibrater):
        return set()
    session = calibrator.infer_session
    names = [o.name for o in session.get_outputs()]
    bad = set()
    for feed in feeds:
        for name, value in zip(names, session.run(None, feed)):
            if name in calibrator.tensors_to_calibrate and not usable(value):
                bad.add(name)
    calibrator.tensors_to_calibrate -= bad
    return bad


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))

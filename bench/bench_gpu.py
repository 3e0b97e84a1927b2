"""GPU benchmark: PyTorch eager (fp32, bf16, fp16: the reference on CUDA) vs the ONNX Runtime CUDA
pipeline (FP32 and FP16 graphs), per stage and end to end, in one run on one GPU.

    python bench/bench_gpu.py [--preset bench] [--preset flant5xl] [--out docs/gpu-benchmark.md]
    python bench/bench_gpu.py --cpu            # the same measurements on the CPU, tiny preset: checks the script

Workload (issue 12): batch 1, rgb+depth+flow+norm (16 images at 4 frames), oeqa, 5 beams, 10 new
tokens (min_length = max_new_tokens, so every path decodes exactly 10 steps), random weights.
Variants run interleaved, each number is the median of --repeat rounds after a warm-up. The
decoder step is (t(10 tokens) - t(1 token)) / 9 of a whole request. The floor: a decoder step
reads every decoder weight once (bytes / the measured device-to-device copy bandwidth); the ViT
needs its FLOPs at the measured fp16 matmul rate.

Without a CUDA GPU (torch) or ONNX Runtime's CUDAExecutionProvider it says why and writes nothing.
On the lent GPU machine: `../shared/tools/gpu-carry` brings onnxruntime-gpu (see its output), then
`python bench/bench_gpu.py` there; the table lands in docs/gpu-benchmark.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from export.onnx_export import export_artifacts  # noqa: E402
from export.parity import random_inputs, to_requests  # noqa: E402
from reference.config import preset  # noqa: E402
from reference.model import CremaInputs  # noqa: E402
from reference.weights import preset_model  # noqa: E402

MODALITIES = ("rgb", "depth", "flow", "norm")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unavailable() -> str | None:
    """Why this machine cannot run the GPU benchmark (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu: load the CUDA/cuDNN libraries torch's image carries
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


class Clock:
    """Wall time of a call, synchronising the device before and after."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def race(variants: dict, repeat: int, clock: Clock) -> dict[str, float]:
    """Median seconds of each variant over `repeat` interleaved rounds, after one warm-up call each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            times[name].append(clock(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def torch_variants(model, inputs: CremaInputs, device: str, dtypes: list[str], tokens: int) -> dict:
    """name -> {"request": fn, "one_token": fn, "vision": fn} for each torch dtype."""
    out = {}
    for name in dtypes:
        dtype = TORCH_DTYPES[name]
        m = copy.deepcopy(model).to(device=device, dtype=dtype)  # .to() casts in place: one copy per dtype

        def cast(x, dtype=dtype):
            return None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        x = CremaInputs(inputs.questions, {k: cast(v) for k, v in inputs.frames.items()}, cast(inputs.audio),
                        cast(inputs.pc_feat), cast(inputs.pc_coords))
        pixels = torch.cat([x.frames[k].flatten(0, 1) for k in model.cfg.visual_modalities])
        out[f"PyTorch eager {name}"] = {
            "request": lambda m=m, x=x: m.generate(x, num_beams=5, max_new_tokens=tokens, min_length=tokens),
            "one_token": lambda m=m, x=x: m.generate(x, num_beams=5, max_new_tokens=1, min_length=1),
            "vision": lambda m=m, p=pixels: torch.no_grad()(m.vision_features)(p),
        }
    return out


def ort_variants(artifacts: Path, requests, providers: list[str], precisions: list[str], tokens: int) -> dict:
    from runtime.pipeline import Pipeline
    out = {}
    for precision in precisions:
        p = Pipeline(artifacts, providers=providers, precision=precision)
        r = requests[0]
        pixels = np.concatenate([r.frames[m] for m in p.visual])
        out[f"ONNX Runtime {providers[0]} {precision}"] = {
            "request": lambda p=p: p.answer(requests, num_beams=5, max_new_tokens=tokens, min_length=tokens),
            "one_token": lambda p=p: p.answer(requests, num_beams=5, max_new_tokens=1, min_length=1),
            "vision": lambda p=p, x=pixels: p.stages["vision"](pixel_values=x),
        }
    return out


def floors(model, device: str) -> dict:
    """Measured copy bandwidth and fp16 matmul rate, and what they make the decoder step and the ViT."""
    clock = Clock(device)
    size = 1 << 28 if device == "cuda" else 1 << 24  # 1 GiB / 64 MiB of fp32
    a = torch.empty(size, device=device)
    b = torch.empty_like(a)
    copy = min(clock(lambda: b.copy_(a)) for _ in range(5))
    bandwidth = 2 * a.numel() * 4 / copy  # read + write
    dtype = torch.float16 if device == "cuda" else torch.float32
    k = 8192 if device == "cuda" else 1024
    x = torch.randn(k, k, device=device, dtype=dtype)
    matmul = min(clock(lambda: x @ x) for _ in range(5))
    rate = 2 * k ** 3 / matmul
    t5 = model.language_model
    decoder_bytes = sum(p.numel() for p in t5.decoder.parameters()) + t5.lm_head.weight.numel()
    v = model.cfg.vision
    n = v.num_tokens  # per image: qkv + output projections, the MLP, scores and their product
    layer = 2 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.mlp_dim) + 4 * n ** 2 * v.hidden_size
    images = len(model.cfg.visual_modalities) * model.cfg.frame_num
    vit_flops = images * v.num_layers * layer
    return {"copy_GBps": bandwidth / 1e9, "matmul_TFLOPs": rate / 1e12,
            "decoder_step_floor_s": {"fp32": 4 * decoder_bytes / bandwidth, "16-bit": 2 * decoder_bytes / bandwidth},
            "vision_floor_s": vit_flops / rate, "vision_GFLOP": vit_flops / 1e9}


def run_preset(name: str, device: str, repeat: int, work: Path, tokens: int) -> dict:
    cfg = preset(name, modalities=MODALITIES, frame_num=4 if name != "tiny" else 2)
    model = preset_model(cfg, seed=0)
    inputs = random_inputs(cfg, batch=1, seed=1)
    artifacts = export_artifacts(model, work / f"art-{name}", {"preset": name, "seed": 0}, progress=False)
    precisions = ["fp32"] + (["fp16"] if convert_fp16(artifacts) else [])
    providers = ["cuda"] if device == "cuda" else ["cpu"]
    floor = floors(model, device)
    variants = {**torch_variants(model, inputs, device, ["fp32", "bf16", "fp16"] if device == "cuda" else
                                 ["fp32", "bf16"], tokens),
                **ort_variants(artifacts, to_requests(inputs), providers, precisions, tokens)}
    clock = Clock(device)
    rows = {}
    for part in ("vision", "request", "one_token"):
        for variant, seconds in race({k: v[part] for k, v in variants.items()}, repeat, clock).items():
            rows.setdefault(variant, {})[part] = seconds
    for row in rows.values():
        row["decoder_step"] = (row["request"] - row["one_token"]) / (tokens - 1)
    return {"preset": name, "rows": rows, "floor": floor, "precisions": precisions}


def convert_fp16(artifacts: Path) -> bool:
    """FP16 graphs beside the FP32 ones (export/fp16.py; forced: random weights, timing not fidelity,
    which the report still measures and the table states)."""
    from export.fp16 import convert_fp16 as convert
    report = convert(artifacts, questions=6, force=True, log=lambda *a: None)
    worst = min(min(s["cosine"], s.get("emulated_cosine", 1.0)) for s in report["stages"].values())
    print(f"fp16 graphs: lowest stage cosine {worst:.5f} (bound 0.999), installed: {report['installed']}")
    return bool(report["installed"])


def render(results: list[dict], machine: str, tokens: int) -> str:
    lines = ["# GPU benchmark (`bench/bench_gpu.py`)", "", f"Machine: {machine}", "",
             f"Batch 1, rgb+depth+flow+norm, 5 beams x {tokens} tokens, random weights; medians of interleaved "
             "rounds; decoder step = (t(request) - t(1 token)) / (tokens - 1).", ""]
    for r in results:
        base = r["rows"].get("PyTorch eager bf16", next(iter(r["rows"].values())))["request"]
        lines += [f"## preset `{r['preset']}`", "",
                  "| path | end to end (ms) | vs PyTorch bf16 | vision (ms) | decoder step (ms) |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in r["rows"].items():
            lines.append(f"| {name} | {1e3 * row['request']:.1f} | {row['request'] / base:.2f}x | "
                         f"{1e3 * row['vision']:.2f} | {1e3 * row['decoder_step']:.2f} |")
        f = r["floor"]
        lines += ["", f"Floor: copy bandwidth {f['copy_GBps']:.0f} GB/s -> a decoder step reads its weights in "
                  f"{1e3 * f['decoder_step_floor_s']['16-bit']:.3f} ms (16-bit) / "
                  f"{1e3 * f['decoder_step_floor_s']['fp32']:.3f} ms (fp32); matmul {f['matmul_TFLOPs']:.2f} TFLOP/s "
                  f"-> the ViT's {f['vision_GFLOP']:.1f} GFLOP in {1e3 * f['vision_floor_s']:.2f} ms.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", help="bench (default), flant5xl")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (tiny preset unless --preset): a check")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--out", type=Path, help="table (markdown; .json beside it); default docs/gpu-benchmark.md")
    args = p.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and (why := unavailable()):
        print(f"skipped: {why}; nothing written. (`--cpu` runs the same measurements on the CPU.)")
        return 0
    presets = args.preset or (["tiny"] if args.cpu else ["bench"])
    with tempfile.TemporaryDirectory(prefix="crema-bench-gpu-") as work:
        results = [run_preset(name, device, args.repeat, Path(work), args.tokens) for name in presets]
    machine = describe()
    table = render(results, machine, args.tokens)
    print(table)
    out = args.out or (None if args.cpu else ROOT / "docs" / "gpu-benchmark.md")
    if out is not None:
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

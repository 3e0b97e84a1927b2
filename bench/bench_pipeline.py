"""Benchmark: PyTorch reference (eager, torch.compile) vs the ONNX Runtime pipeline, bench preset.

    .venv/bin/python bench/bench_pipeline.py [--repeat 3] [--out docs/benchmark.md]

One run, one machine: every number in the table is compared as a ratio to another number measured
in the same run (these machines are shared and noisy), and the variants of one comparison run
interleaved. Workload (issue 3): batch 1, 4 frames, rgb+depth+flow+norm, oeqa, 5 beams, 10 new
tokens. Times are the best of --repeat rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads must not spin between
# ops: with 2 cores, a spinning pool steals the cores from the other library's interleaved run

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_decoding import race, section_of  # noqa: E402
from bench.machine import describe  # noqa: E402
from crema.demo import write_clip  # noqa: E402
from export.onnx_export import export_artifacts  # noqa: E402
from export.parity import random_inputs, to_requests  # noqa: E402
from export.stages import stage_module  # noqa: E402
from reference.config import preset  # noqa: E402
from reference.weights import preset_model  # noqa: E402
from runtime.pipeline import HostCachedDecoder, Pipeline  # noqa: E402


def exported(make_model, artifacts: Path, source: dict) -> Path:
    """`artifacts`, exported from make_model() unless an earlier run left a complete one."""
    if not (artifacts / "manifest.json").is_file():
        shutil.rmtree(artifacts, ignore_errors=True)
        export_artifacts(make_model(), artifacts, source)
    return artifacts


def sgemm_peaks(n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """GFLOP/s of one n^3 single-precision matrix product in each library."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "AB"],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    flop = 2 * n ** 3 / 1e9
    with torch.no_grad():
        times = race({"torch (MKL)": lambda: a @ b, "numpy (OpenBLAS)": lambda: an @ bn,
                      "onnxruntime (MLAS)": lambda: session.run(None, {"A": an, "B": bn})}, repeat)
    return {name: flop / t for name, t in times.items()}


def vision_gflop(cfg, images: int) -> float:
    """Multiply-adds x 2 of the EVA ViT forward (patch embedding, attention, MLP)."""
    v = cfg.vision
    n, d, m = v.num_tokens, v.hidden_size, v.mlp_dim
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    patch = 2 * (n - 1) * 3 * v.patch_size ** 2 * d
    return images * (v.num_layers * per_layer + patch) / 1e9


def stage_inputs(model, pipeline, inputs):
    """Realistic inputs of each stage for this request (ORT names -> numpy)."""
    cfg = model.cfg
    pixels = np.concatenate([inputs.frames[m].flatten(0, 1).numpy() for m in cfg.visual_modalities])
    feats = pipeline.stages["vision"](pixel_values=pixels)["features"]
    rows = cfg.frame_num
    tokens = {m: pipeline.stages[f"mmqa_{m}"](features=feats[i * rows:(i + 1) * rows])["tokens"]
              .reshape(1, rows, cfg.num_query_token, -1) for i, m in enumerate(cfg.visual_modalities)}
    ids, mask = pipeline.tokenizer.encode(inputs.questions)
    fuse = {**{f"{m}_tokens": t for m, t in tokens.items()}, "question_ids": ids, "question_mask": mask}
    enc = pipeline.stages["fuse_encode"](**fuse)
    beams = cfg.generation.num_beams
    # the host-cache decoder: its past/cross K/V are numpy arrays this feed can hold
    step_model = HostCachedDecoder(pipeline.stages["decoder_first"], pipeline.stages["decoder_step"],
                                   enc["encoder_hidden"], enc["encoder_mask"])
    step_model.first()
    step_model.expand(beams)
    for _ in range(4):  # a cache of 5 positions, as in the middle of a 10-token answer
        step_model.step(np.full(beams, 5), None)
    step = {"decoder_input_ids": np.full((beams, 1), 5), "beam_index": np.arange(beams), "encoder_mask": step_model.mask,
            **dict(zip(step_model.past_names, step_model.past)), **dict(zip(step_model.cross_names, step_model.cross))}
    return {"vision": {"pixel_values": pixels}, "mmqa_rgb": {"features": feats[:rows]}, "fuse_encode": fuse,
            "decoder_step": step}


def per_stage(model, pipeline, inputs, repeat):
    rows = []
    for name, feed in stage_inputs(model, pipeline, inputs).items():
        module = stage_module(model, name).eval()
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in pipeline.stages[name].spec.input_names]
        compiled = torch.compile(module, dynamic=False)
        with torch.no_grad():
            t = race({"eager_s": lambda: module(*args), "compile_s": lambda: compiled(*args),
                      "ort_s": lambda: pipeline.stages[name](**feed)}, repeat)
        rows.append({"stage": name, **t})
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    return rows


def end_to_end(model, pipeline, inputs, repeat):
    requests = to_requests(inputs)
    eager = (model.vision_model, model.qformer, model.language_model.encoder)
    compiled = tuple(torch.compile(m, dynamic=False) for m in eager)

    def generate(modules):
        model.vision_model, model.qformer, model.language_model.encoder = modules
        with torch.no_grad():
            model.generate(inputs)

    try:
        return race({"eager_s": lambda: generate(eager), "compile_s": lambda: generate(compiled),
                     "ort_s": lambda: pipeline.answer(requests)}, repeat)
    finally:
        model.vision_model, model.qformer, model.language_model.encoder = eager


def decoder_cache(model, inputs, repeat):
    """HF generate (5 beams, 10 tokens) with and without the KV cache, encoder cost subtracted."""
    lm = model.language_model
    embeds, mask = model.encode_inputs(inputs)
    cached, uncached = model.generation_config(), model.generation_config(use_cache=False)
    with torch.no_grad():
        t = race({"encoder": lambda: lm.encoder(inputs_embeds=embeds, attention_mask=mask),
                  "cached": lambda: lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=cached),
                  "uncached": lambda: lm.generate(inputs_embeds=embeds, attention_mask=mask,
                                                  generation_config=uncached)}, repeat)
    return {"kv_cache_s": t["cached"] - t["encoder"], "recompute_s": t["uncached"] - t["encoder"]}


def graph_optimization(artifacts: Path, stage: str, feed: dict, repeat: int) -> list[dict]:
    """Session creation + run time: optimize at load (ORT_ENABLE_ALL) vs load a saved optimized graph."""
    src = artifacts / f"{stage}.onnx"
    saved = artifacts.parent / f"{stage}.optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable when saved
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    sessions, created = {}, {}
    for label, path in (("optimize at session creation", src), ("saved optimized graph", saved)):
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        start = time.perf_counter()
        sessions[label] = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        created[label] = time.perf_counter() - start
    runs = race({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()}, repeat)
    saved.unlink()
    return [{"stage": stage, "variant": label, "create_s": created[label], "run_s": runs[label]} for label in sessions]


def peak_rss(artifacts: Path, clip: Path, *flags: str) -> dict:
    """Peak resident memory of `crema run --artifacts` (a fresh process) vs the bytes of its graphs."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "crema.cli", "run", "--artifacts", str(artifacts),
           "--video", str(clip), "--question", "What is moving?"]
    depth = artifacts.parent / "depth.npy"
    np.save(depth, np.random.default_rng(0).random((4, 96, 96), dtype=np.float32))  # the clip's frame size
    cmd += ["--depth", str(depth), *flags]
    rss = int(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()) * 1024
    graphs = sum(p.stat().st_size for p in artifacts.glob("*.onnx*"))
    return {"peak_rss_bytes": rss, "graph_bytes": graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench", modalities=("rgb", "depth", "flow", "norm"), task="concat", downstream_task="oeqa")
    machine = describe()
    print(f"{machine}; torch threads {torch.get_num_threads()}", flush=True)
    model = preset_model(cfg)
    artifacts = exported(lambda: model, args.work / "artifacts", {"preset": "bench", "seed": 0})
    pipeline = Pipeline(artifacts, spin=False)
    inputs = random_inputs(cfg, batch=1)
    result = {"machine": {"description": machine, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__}}
    partial = args.work / "partial.json"  # kept after each section: a late failure loses nothing

    def section(key, fn):
        print(key, flush=True)
        result[key] = fn()
        partial.write_text(json.dumps(result, indent=2))

    section("sgemm_gflops", sgemm_peaks)
    section("stages", lambda: per_stage(model, pipeline, inputs, args.repeat))
    result["vision_gflop"] = vision_gflop(cfg, len(cfg.visual_modalities) * cfg.frame_num)
    section("end_to_end", lambda: end_to_end(model, pipeline, inputs, args.repeat))
    section("decoder", lambda: decoder_cache(model, inputs, args.repeat))
    feeds = stage_inputs(model, pipeline, inputs)
    section("graph_optimization", lambda: graph_optimization(artifacts, "vision", feeds["vision"], args.repeat)
            + graph_optimization(artifacts, "decoder_step", feeds["decoder_step"], args.repeat))
    clip = write_clip(args.work / "clip.mp4")
    section("memory", lambda: {"default": peak_rss(artifacts, clip), "low_memory": peak_rss(artifacts, clip, "--low-memory")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    kept = section_of(args.out.read_text()) if args.out.is_file() else ""  # bench_decoding.py's section
    args.out.write_text(render(result, args.repeat) + ("\n" + kept if kept else ""))
    print(args.out.read_text())


def render(r: dict, repeat: int) -> str:
    e = r["end_to_end"]
    peaks = r["sgemm_gflops"]
    vision = next(s for s in r["stages"] if s["stage"] == "vision")
    lines = [
        "# Benchmark: PyTorch reference vs ONNX Runtime pipeline (bench preset)",
        "",
        "Generated by `.venv/bin/python bench/bench_pipeline.py` (best of "
        f"{repeat} interleaved runs; {r['machine']['description']}; torch {r['versions']['torch']}, onnxruntime "
        f"{r['versions']['onnxruntime']}). Workload: batch 1, 4 frames, rgb+depth+flow+norm, oeqa, 5 beams, "
        "10 new tokens; real per-layer widths (ViT-g 1408/6144, Q-Former 768, T5-XL 2048/5120), reduced depth.",
        "",
        "## End to end",
        "",
        "| variant | seconds | speed-up vs eager |",
        "| --- | ---: | ---: |",
        f"| PyTorch eager (`Crema.generate`) | {e['eager_s']:.2f} | 1.00x |",
        f"| PyTorch, ViT/Q-Former/T5 encoder under `torch.compile` | {e['compile_s']:.2f} | {e['eager_s'] / e['compile_s']:.2f}x |",
        f"| ONNX Runtime pipeline | {e['ort_s']:.2f} | {e['eager_s'] / e['ort_s']:.2f}x |",
        "",
        "## Per stage",
        "",
        "| stage | eager s | torch.compile s | ORT s | ORT vs eager | ORT vs compile |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['eager_s']:.3f} | {s['compile_s']:.3f} | {s['ort_s']:.3f} | "
                     f"{s['eager_s'] / s['ort_s']:.2f}x | {s['compile_s'] / s['ort_s']:.2f}x |")
    gf = r["vision_gflop"]
    lines += [
        "",
        "## Vision stage against the machine's matrix-multiply peak",
        "",
        f"The vision stage is {gf:.0f} GFLOP (16 images through the ViT). Single-precision GEMM peak "
        "(one 2048^3 product) measured in the same run:",
        "",
        "| library | sgemm GFLOP/s | ORT vision as % of it |",
        "| --- | ---: | ---: |",
    ]
    achieved = gf / vision["ort_s"]
    for lib, peak in peaks.items():
        lines.append(f"| {lib} | {peak:.0f} | {100 * achieved / peak:.0f}% |")
    lines += [
        "",
        f"ORT vision: {achieved:.0f} GFLOP/s; eager torch {gf / vision['eager_s']:.0f}; torch.compile "
        f"{gf / vision['compile_s']:.0f}.",
        "",
        "## Decoder: KV cache vs recomputing the prefix (HF generate, encoder time subtracted)",
        "",
        f"With cache {r['decoder']['kv_cache_s']:.2f} s, recomputing {r['decoder']['recompute_s']:.2f} s: "
        f"{r['decoder']['recompute_s'] / r['decoder']['kv_cache_s']:.2f}x.",
        "",
        "## Graph optimization: at session creation vs a saved optimized graph",
        "",
        "| stage | variant | session creation s | run s |",
        "| --- | --- | ---: | ---: |",
    ]
    for g in r["graph_optimization"]:
        lines.append(f"| {g['stage']} | {g['variant']} | {g['create_s']:.2f} | {g['run_s']:.3f} |")
    lines += ["", "## Memory", "", "Peak RSS of one `crema run --artifacts` process against the bytes of the graphs it loads:", "",
              "| mode | peak RSS GiB | graphs GiB | ratio |", "| --- | ---: | ---: | ---: |"]
    for mode, m in r["memory"].items():
        lines.append(f"| {mode} | {m['peak_rss_bytes'] / 2**30:.2f} | {m['graph_bytes'] / 2**30:.2f} | "
                     f"{m['peak_rss_bytes'] / m['graph_bytes']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

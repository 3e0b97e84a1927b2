"""Benchmark: Triton serving vs the in-process ONNX Runtime pipeline, from raw files to the answer.

    .venv/bin/python bench/bench_triton.py [--preset demo|bench] [--clips 6] [--out docs/triton-benchmark.md]

One run, one machine, ratios between numbers of the same run. Every request starts from the raw
files (video, depth, audio, 3D features): preprocessing and modality extraction are included.
  latency     batch 1, a video neither side has seen (Triton: every encoder runs), interleaved
              in-process / Triton per clip; median over clips
  repeat      a second question about a video Triton has seen (encoders from the response cache);
              its physical limit is the LLM alone (fuse_encode + decoding, in process, encoder
              outputs given): the column "LLM alone"
  throughput  requests/s over fresh videos, 1 client vs 4 concurrent clients
Server: the python flavour on the pip Triton 2.51, every model one instance, loopback HTTP.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import exported  # noqa: E402
from bench.machine import describe  # noqa: E402
from reference.config import preset  # noqa: E402
from runtime.inputs import request_from_files  # noqa: E402
from runtime.pipeline import Pipeline, decode_answers, fuse_encode  # noqa: E402
from runtime.artifacts import Artifacts  # noqa: E402
from runtime.specs import modality_names  # noqa: E402
from synthetic.generator import clip_files, read_questions  # noqa: E402
from training.demo import demo_data  # noqa: E402
from triton_models.client import CremaClient, tensors_from_files  # noqa: E402
from triton_models.repository import generate_repository  # noqa: E402
from triton_models.service import Service  # noqa: E402

NEEDS = {"video": ("rgb", "flow", "depth", "norm"), "depth": ("depth", "norm"), "audio": ("audio",), "pc": ("pc",)}


def model_and_source(name: str):
    from reference.weights import DEMO_SOURCE, demo_model, preset_model
    if name == "demo":
        return demo_model, DEMO_SOURCE
    return (lambda: preset_model(preset(name), seed=0)), {"preset": name, "seed": 0}


class Clip:
    """One generated clip: its files (those the model needs) and its questions."""

    def __init__(self, folder: Path, config: dict, questions: list):
        names = modality_names(config)
        self.files = {k: v for k, v in clip_files(folder).items() if any(m in names for m in NEEDS[k])}
        self.questions = [q.question for q in questions if q.clip == folder.name]


def distinct(folder: Path, rng: np.random.Generator) -> bool:
    """Make a clip's modality images its own, or say it cannot be. Synthetic clips share some: the
    normals image depends only on where the wall faces, and a still shape's flow is zero, so
    Triton's per-modality response cache would serve them from another clip. A random depth scale
    (changes normals) and offset (changes the depth image) per clip; clips with a still shape skipped."""
    if json.loads((folder / "scene.json").read_text())["motion"] == "still":
        return False
    depth = np.load(folder / "depth.npy")
    np.save(folder / "depth.npy", depth * rng.uniform(0.8, 1.25) + rng.uniform(0.0, 8.0))
    return True


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(preset_name: str, clips: int, work: Path, cores: int | None = None, precision: str = "fp32") -> dict:
    make_model, source = model_and_source(preset_name)
    artifacts = exported(make_model, work / f"artifacts-{preset_name}", source)
    if precision != "fp32" and "int8" not in Artifacts(artifacts).manifest:
        from calibration.calibrate import calibrate  # few calls: speed, not fidelity (bench_int8.py)
        calibrate(artifacts, questions=8, eval_questions=2, max_feeds=3, force=True)
    pipeline = Pipeline(artifacts, precision=precision)
    config = pipeline.config
    n_latency, n_throughput = clips, 2 * max(clips, 4)
    need = n_latency + 2 * n_throughput + 1
    data = demo_data(work / f"clips-{preset_name}", 2 * need, seed=5, config=config)
    questions = read_questions(data)
    folders = [f for f in sorted(data.glob("clip*")) if distinct(f, np.random.default_rng(int(f.name[4:])))]
    all_clips = [Clip(f, config, questions) for f in folders[:need]]
    warm, latency_clips = all_clips[0], all_clips[1:1 + n_latency]
    serial_clips = all_clips[1 + n_latency:1 + n_latency + n_throughput]
    concurrent_clips = all_clips[1 + n_latency + n_throughput:]
    repo = generate_repository(artifacts, work / f"repo-{preset_name}", cores=cores, precision=precision)

    def local(clip: Clip, q: int = 0):
        return pipeline.answer([request_from_files(config, clip.questions[q], **clip.files)])[0].text

    def llm_alone(clip: Clip, q: int = 1):
        """The part a response-cache hit cannot skip: fuse_encode and the decode loop."""
        tokens = pipeline.modality_tokens([request_from_files(config, clip.questions[q], **clip.files)])
        start = time.perf_counter()
        hidden, mask = fuse_encode(pipeline.stages["fuse_encode"], pipeline.tokenizer, tokens, [clip.questions[q]])
        decode_answers(pipeline.stages, hidden, mask, pipeline.generation(), pipeline.tokenizer, pipeline.answer_ids)
        return time.perf_counter() - start

    with Service(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=work / "server.log") as server:
        url = server.endpoints.http_url

        def remote(clip: Clip, q: int = 0, client: CremaClient | None = None):
            if client is None:
                with CremaClient(url) as c:
                    return c.infer(tensors_from_files(clip.questions[q], **clip.files)).answer
            return client.infer(tensors_from_files(clip.questions[q], **clip.files)).answer

        with CremaClient(url) as client:
            assert local(warm) == remote(warm, client=client)  # warm-up both, and the same answer
            rows = []
            for clip in latency_clips:
                rows.append({"in_process_s": timed(lambda: local(clip)),
                             "triton_first_s": timed(lambda: remote(clip, 0, client)),
                             "triton_repeat_s": timed(lambda: remote(clip, 1, client)),
                             "in_process_repeat_s": timed(lambda: local(clip, 1)),
                             "llm_alone_s": llm_alone(clip)})
                print("  " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in rows[-1].items()), flush=True)
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}

        def throughput(clips_: list[Clip], workers: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(remote, clips_))
            return len(clips_) / (time.perf_counter() - start)

        rps1 = throughput(serial_clips, 1)
        rps4 = throughput(concurrent_clips, 4)
    return {"preset": preset_name, "modalities": config["modalities"], "clips": n_latency, "cores": cores, "precision": precision,
            "median": median, "per_clip": rows,
            "triton_overhead": median["triton_first_s"] / median["in_process_s"] - 1,
            "repeat_speedup": median["triton_first_s"] / median["triton_repeat_s"],
            "repeat_speedup_limit": median["triton_first_s"] / median["llm_alone_s"],
            "throughput": {"concurrency_1_rps": rps1, "concurrency_4_rps": rps4, "ratio": rps4 / rps1,
                           "requests": n_throughput}}


def markdown(results: list[dict], machine: str) -> str:
    rows = [f"Measured on: {machine}.", "",
            "| preset (modalities) | in process | Triton, new video | overhead (target <= 15%) | Triton, seen video | "
            "speed-up (target >= 5x) | LLM alone (limit) | req/s, 1 client | req/s, 4 clients | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m, t = r["median"], r["throughput"]
        limit = (f", rate limit {r['cores']} cores" if r["cores"] else "") + (
            f", {r['precision'].upper()}" if r.get("precision", "fp32") != "fp32" else "")
        rows.append(f"| {r['preset']} ({'+'.join(r['modalities'])}{limit}) | {m['in_process_s'] * 1000:.1f} ms | "
                    f"{m['triton_first_s'] * 1000:.1f} ms | {100 * r['triton_overhead']:+.0f}% | "
                    f"{m['triton_repeat_s'] * 1000:.1f} ms | {r['repeat_speedup']:.1f}x | "
                    f"{m['llm_alone_s'] * 1000:.1f} ms ({r['repeat_speedup_limit']:.1f}x) | "
                    f"{t['concurrency_1_rps']:.2f} | {t['concurrency_4_rps']:.2f} | {t['ratio']:.2f}x |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=["demo", "bench"], help="repeatable (default demo)")
    parser.add_argument("--clips", type=int, default=6, help="videos for the latency rows")
    parser.add_argument("--cores", type=int, action="append", default=[],
                        help="also run each preset with the repository rate-limited to N cores (repeatable)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="int8: calibrate the artifacts first if needed (few calls: a speed measurement)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-triton")
    parser.add_argument("--out", type=Path, help="markdown table (and .json beside it)")
    args = parser.parse_args()
    results, machine = [], describe()
    for name in args.preset or ["demo"]:
        for cores in [None, *args.cores]:
            print(f"preset {name}{f', rate limit {cores} cores' if cores else ''}:", flush=True)
            results.append({**run(name, args.clips, args.work, cores, args.precision), "machine": machine})
    table = markdown(results, machine)
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: INT8 vs FP32 ONNX Runtime on the bench preset (issue 5 targets), ratios in one run.

    .venv/bin/python bench/bench_int8.py [--repeat 4] [--out docs/int8-benchmark.md]

Exports the bench preset (real per-layer widths, seeded random weights), calibrates it with
`crema calibrate`'s code (minmax, synthetic clips), then races FP32 and INT8 interleaved: the vision
stage (16 images: 4 frames x rgb/depth/flow/norm), one decoder step (5 beams), and a whole request
(oeqa, 5 beams, 10 new tokens). Times are the best of --repeat rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import exported, race  # noqa: E402
from bench.machine import describe  # noqa: E402
from calibration.calibrate import _session, calibrate  # noqa: E402
from calibration.data import EVALUATION_SEED, collect_feeds, read_items  # noqa: E402
from reference.config import preset  # noqa: E402
from reference.weights import preset_model  # noqa: E402
from runtime.artifacts import Artifacts  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from training.demo import demo_data  # noqa: E402

TARGETS = {"vision": 1.8, "decoder_step": 2.0, "end to end": 1.7}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-int8")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "int8-benchmark.md")
    args = p.parse_args()
    machine = describe()  # INT8 gains depend on the ISA (VNNI, AMX): the table must say which
    art = exported(lambda: preset_model(preset("bench")), args.work / "artifacts", {"preset": "bench", "seed": 0})
    report = calibrate(art, questions=8, eval_questions=2, max_feeds=3, force=True)  # speed, not fidelity: random weights
    a = Artifacts(art)
    fp32, int8 = Pipeline(art, spin=False), Pipeline(art, precision="int8", spin=False)
    items = read_items(demo_data(args.work / "eval", 1, EVALUATION_SEED, a.config), a.config, 1)
    feeds = collect_feeds(fp32, items)
    results = {}
    for stage in ("vision", "decoder_step"):
        feed = feeds[stage][len(feeds[stage]) // 2]
        s32, s8 = _session(a.path(stage)), _session(a.path(stage, "int8"))
        t = race({"fp32": lambda: s32.run(None, feed), "int8": lambda: s8.run(None, feed)}, args.repeat)
        results[stage] = t
    request = [items[0].request]
    results["end to end"] = race({"fp32": lambda: fp32.answer(request), "int8": lambda: int8.answer(request)},
                                 max(2, args.repeat // 2))
    same = fp32.answer(request)[0].text == int8.answer(request)[0].text
    rows = ["| part | FP32 s | INT8 s | speed-up | target |", "|---|---:|---:|---:|---:|"]
    for name, t in results.items():
        rows.append(f"| {name} | {t['fp32']:.3f} | {t['int8']:.3f} | {t['fp32'] / t['int8']:.2f}x | "
                    f">= {TARGETS[name]}x |")
    cos = {n: s["cosine"] for n, s in report["stages"].items()}
    text = (f"# INT8 vs FP32 (ONNX Runtime, bench preset)\n\n`.venv/bin/python bench/bench_int8.py` — "
            f"best of {args.repeat} interleaved rounds, one run; {machine}.\n\n"
            + "\n".join(rows) + "\n\nPer-stage cosine INT8 vs FP32 (random bench weights): "
            + ", ".join(f"{n} {c:.4f}" for n, c in cos.items())
            + f"\n\nSame answer FP32 vs INT8 on the raced request: {same}.\n")
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "times": results, "cosine": cos}, indent=2))
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark: the beam search's top-k without sorting the vocabulary (issue 12), ratios in one run.

    .venv/bin/python bench/bench_decoding.py [--repeat 5] [--no-ort] [--out docs/benchmark.md]

  top-k      runtime.decoding._topk on the loop's real shape, [requests, 5 beams x 32128] float32
             log-prob rows: the stable full sort it replaced, argpartition + ordering the k
             candidates, and the group-maximum threshold it uses now (all three exact)
  loop       runtime.decoding.beam_search alone (5 beams, 10 new tokens, vocabulary 32128) over a
             step model that returns stored logits: the numpy work of a request, no model time;
             before = the previous _topk and _log_softmax swapped back in
  ORT decode the bench preset's decoder (T5-XL widths, 2 layers, seeded random weights) through
             runtime.pipeline.decode_answers, before vs after as above (skip: --no-ort)

Variants of one comparison run interleaved (A B C A B C ...); each time is the best round, a round
the mean of several calls. The table replaces the "## Decoding" section of --out (the rest stays).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from runtime import decoding  # noqa: E402

HEADING = "## Decoding: top-k without sorting the vocabulary"
VOCAB, BEAMS, NEW_TOKENS = 32128, 5, 10


def sort_topk(x: np.ndarray, k: int) -> np.ndarray:
    """The previous _topk: a stable sort of every row."""
    return np.argsort(-x, axis=-1, kind="stable")[:, :k]


def partition_topk(x: np.ndarray, k: int) -> np.ndarray:
    """argpartition, then order the k candidates; rows whose k-th value is tied with the (k+1)-th
    (or NaN) are sorted in full, since argpartition may take any member of a tie group."""
    neg = -x
    part = np.argpartition(neg, [k - 1, k], axis=-1)
    edge = np.take_along_axis(neg, part[:, k - 1:k + 1], axis=-1)
    sel = np.sort(part[:, :k], axis=-1)
    out = np.take_along_axis(sel, np.argsort(np.take_along_axis(neg, sel, axis=-1), axis=-1, kind="stable"), axis=-1)
    for i in np.flatnonzero(~(edge[:, 1] > edge[:, 0])):
        out[i] = np.argsort(neg[i], kind="stable")[:k]
    return out


def old_log_softmax(x: np.ndarray) -> np.ndarray:
    """The previous _log_softmax (a float32 copy first, three full-size temporaries)."""
    x = x.astype(np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@contextmanager
def before():
    """runtime.decoding with the previous top-k and log-softmax."""
    saved = decoding._topk, decoding._log_softmax
    decoding._topk, decoding._log_softmax = sort_topk, old_log_softmax
    try:
        yield
    finally:
        decoding._topk, decoding._log_softmax = saved


def race(variants: dict, repeat: int, number: int = 1) -> dict[str, float]:
    """Best round of each variant (a round: the mean of `number` calls) over `repeat` interleaved rounds
    (A B C A B C ...), so that a burst of load from other tenants of the machine hits every variant
    alike. One warm-up call each (which also compiles for torch.compile)."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) / number)
    return {name: min(t) for name, t in times.items()}


def before_after(run, repeat: int) -> tuple[object, dict[str, float]]:
    """`run` with the decoder's old top-k and log-softmax (before()) and with the current ones, raced;
    both must give the same result -> (that result, the race's times)."""
    new = run()
    with before():
        assert run() == new

    def old():
        with before():
            run()
    return new, race({"before": old, "after": run}, repeat)


def log_prob_rows(requests: int, seed: int = 0) -> np.ndarray:
    """[requests, beams x vocab] as the loop ranks them: log-probs plus each beam's running score."""
    rng = np.random.default_rng(seed)
    logp = decoding._log_softmax(rng.standard_normal((requests * BEAMS, VOCAB)).astype(np.float32) * 3)
    running = -rng.random((requests, BEAMS), dtype=np.float32) * 5
    return (logp.reshape(requests, BEAMS, VOCAB) + running[:, :, None]).reshape(requests, BEAMS * VOCAB)


def topk_section(repeat: int) -> list[dict]:
    rows = []
    for requests in (1, 8):
        x = log_prob_rows(requests)
        k = 2 * BEAMS
        want = sort_topk(x, k)
        for fn in (partition_topk, decoding._topk):
            assert np.array_equal(fn(x, k), want), fn.__name__
        t = race({"sort": lambda: sort_topk(x, k), "argpartition": lambda: partition_topk(x, k),
                  "threshold": lambda: decoding._topk(x, k)}, repeat, number=max(1, 40 // requests))
        rows.append({"shape": list(x.shape), "k": k, **t})
        print(f"  top-k {x.shape}: " + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in t.items()), flush=True)
    return rows


class StoredLogits:
    """A StepModel that returns stored logits: the decode loop without model time."""

    def __init__(self, requests: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.first_logits = rng.standard_normal((requests, VOCAB)).astype(np.float32) * 3
        self.steps = [rng.standard_normal((requests * BEAMS, VOCAB)).astype(np.float32) * 3
                      for _ in range(NEW_TOKENS)]
        self.steps[-1][:, decoding.EOS] += 20  # most beams end at the last step
        self.i = 0

    def first(self):
        self.i = 0
        return self.first_logits

    def expand(self, n):
        pass

    def step(self, tokens, reorder):
        self.i += 1
        return self.steps[min(self.i, NEW_TOKENS - 1)]


def loop_section(repeat: int) -> list[dict]:
    rows = []
    for requests in (1, 8):
        model = StoredLogits(requests)

        def run():
            return decoding.beam_search(model, BEAMS, NEW_TOKENS, length_penalty=1.0)

        _, t = before_after(run, repeat)
        rows.append({"requests": requests, **t})
        print(f"  loop, {requests} request(s): " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in t.items()), flush=True)
    return rows


def ort_section(repeat: int, work: Path) -> dict:
    """decode_answers on the bench preset's decoder graphs (exported once into `work`)."""
    import torch

    from export.onnx_export import export_stage
    from reference.config import preset
    from reference.weights import preset_model
    from runtime.pipeline import Stage, decode_answers, generation_settings, session_options
    from runtime.specs import stage_specs
    from runtime.text import QuestionTokenizer

    cfg = preset("bench")
    specs = stage_specs(cfg.to_dict())
    names = ("decoder_first", "decoder_step")
    stamp = work / "specs.json"  # re-export when the decoder specs changed
    wanted = json.dumps({n: [specs[n].input_names, specs[n].output_names] for n in names})
    if not stamp.is_file() or stamp.read_text() != wanted:
        model = preset_model(cfg, seed=0)
        work.mkdir(parents=True, exist_ok=True)
        for n in names:
            (work / specs[n].file).unlink(missing_ok=True)
            export_stage(model, specs[n], work / specs[n].file)
        model.tokenizer.save(work)
        stamp.write_text(wanted)
        del model
    options = session_options(spin=False)
    stages = {n: Stage(specs[n], work / specs[n].file, options, ["CPUExecutionProvider"]) for n in names}
    tokenizer = QuestionTokenizer(work / "tokenizer.json", cfg.max_txt_len)
    g = generation_settings(cfg.to_dict(), task="oeqa")
    rng = np.random.default_rng(0)
    length = cfg.frame_num * len(cfg.visual_modalities) * cfg.num_query_token + 16  # the modality tokens + a question
    hidden = rng.standard_normal((1, length, cfg.t5.d_model)).astype(np.float32)
    mask = np.ones((1, length), np.int64)

    def run():
        return [a.token_ids for a in decode_answers(stages, hidden, mask, g, tokenizer, [])]

    new, t = before_after(run, repeat)
    print("  ORT decode: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in t.items()), flush=True)
    return {"torch": torch.__version__, "generation": {k: g[k] for k in ("num_beams", "max_new_tokens")},
            "tokens": new, **t}


def section_of(text: str, heading: str = HEADING) -> str:
    """The section of markdown `text` under `heading` (to the next "## " heading), or ''."""
    start = text.find(heading + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end + 1]


def render(r: dict) -> str:
    lines = [HEADING, "",
             f"`.venv/bin/python bench/bench_decoding.py` (best of {r['repeat']} interleaved rounds; "
             f"{r['machine']}; numpy {r['numpy']}). The beam search ranks [requests, 5 beams x 32128] "
             "log-probs per step (k = 10). Every variant returns exactly the stable sort's first k (checked "
             "in the run).", "",
             "| top-k of | stable sort (before) | argpartition + order k | group-max threshold (now) | "
             "now vs before | now vs argpartition |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in r["topk"]:
        lines.append(f"| {t['shape'][0]} x {t['shape'][1]} | {t['sort'] * 1e3:.2f} ms | "
                     f"{t['argpartition'] * 1e3:.2f} ms | {t['threshold'] * 1e3:.3f} ms | "
                     f"{t['sort'] / t['threshold']:.0f}x | {t['argpartition'] / t['threshold']:.1f}x |")
    lines += ["", "Decode loop alone (5 beams, 10 new tokens, stored logits: no model time); before = the "
              "previous `_topk` and `_log_softmax`:", "",
              "| requests | before | now | speed-up |", "| ---: | ---: | ---: | ---: |"]
    for t in r["loop"]:
        lines.append(f"| {t['requests']} | {t['before'] * 1e3:.1f} ms | {t['after'] * 1e3:.1f} ms | "
                     f"{t['before'] / t['after']:.1f}x |")
    if "ort" in r:
        o = r["ort"]
        lines += ["", "Whole decode on ONNX Runtime (CPU), bench preset decoder (T5-XL widths, 2 layers), one "
                  f"request, {o['generation']['num_beams']} beams, {o['generation']['max_new_tokens']} new tokens "
                  f"(`decode_answers`, same tokens before and now): before {o['before'] * 1e3:.0f} ms, now "
                  f"{o['after'] * 1e3:.0f} ms, {o['before'] / o['after']:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime decode (exports the decoder once)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-decoding")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark.md")
    args = parser.parse_args()
    result = {"machine": describe(), "numpy": np.__version__, "repeat": args.repeat}
    print(result["machine"], flush=True)
    result["topk"] = topk_section(args.repeat)
    result["loop"] = loop_section(args.repeat)
    if not args.no_ort:
        result["ort"] = ort_section(args.repeat, args.work)
    text = render(result)
    print(text)
    old = args.out.read_text() if args.out.is_file() else ""
    kept = old.replace(section_of(old), "").rstrip("\n")
    args.out.write_text((kept + "\n\n" if kept else "") + text)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

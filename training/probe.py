"""Where does the demo model lose an answer? Linear probes of its representations on new clips.

    .venv/bin/python training/probe.py [--clips 300]

For "nearer" (2-way) and "sound" (5-way): ridge regression fitted on 2/3 of the clips and scored on
the rest, on each modality's own tokens and on the T5 input after fusion; plus each modality's token
spread across clips. Findings for the shipped model are in docs/demo-model.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.weights import demo_model  # noqa: E402
from synthetic.generator import read_questions  # noqa: E402
from training.demo import ClipSet, demo_data  # noqa: E402


def probe(x: torch.Tensor, labels: np.ndarray, fit: int, ridge: float = 10.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardised features."""
    x = x.reshape(len(x), -1).numpy().astype(np.float64)
    mu, sd = x[:fit].mean(0), x[:fit].std(0) + 1e-6
    x = (x - mu) / sd
    classes = sorted(set(labels))
    y = np.stack([(labels == c) * 2.0 - 1 for c in classes], 1)
    w = np.linalg.solve(x[:fit].T @ x[:fit] + ridge * np.eye(x.shape[1]), x[:fit].T @ y[:fit])
    return float((np.array(classes)[(x[fit:] @ w).argmax(1)] == labels[fit:]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=300)
    args = p.parse_args()
    model = demo_model()
    cfg = model.cfg
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_data(tmp, args.clips, 5, cfg.to_dict())
        clips = ClipSet(data, sorted(p.name for p in Path(data).iterdir() if p.is_dir()), read_questions(data),
                        cfg.to_dict())
    answer = lambda t: np.array([next(q.answer for q in qs if q.qtype == t) for qs in clips.questions])  # noqa: E731
    fit = 2 * len(clips) // 3
    with torch.no_grad():
        tokens = model.modality_tokens(clips.inputs(np.arange(len(clips)), [""] * len(clips)))
        ids, mask = (torch.from_numpy(a) for a in model.tokenizer.encode(["?"] * len(clips), 8))
        t5_input, _ = model.assemble(tokens, ids, mask)
    for qtype, modality in (("nearer", "depth"), ("sound", "audio")):
        labels = answer(qtype)
        print(f"{qtype}: {modality} tokens {probe(tokens[modality], labels, fit):.2f}, "
              f"T5 input after fusion {probe(t5_input, labels, fit):.2f}")
    for m, t in tokens.items():
        t = t.reshape(len(clips), -1)
        print(f"{m} tokens: std {float(t.std()):.3f}, between-clip std {float(t.std(0).mean()):.4f}")


if __name__ == "__main__":
    main()

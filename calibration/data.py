"""Calibration and evaluation data: questions about clips on disk -> runtime Requests -> stage feeds.

A data folder is what synthetic.generate writes (and any folder laid out the same way):
`questions.jsonl` (one JSON object per line with at least "clip", "question", "answer", "qtype") and
one folder per clip holding `clip.mp4` and, as the configuration needs them, `depth.npy`,
`audio.wav`, `pc.npz`. By default calibration generates synthetic clips with seed 2 and the
fidelity report evaluates on seed-1 clips: neither was seen by `crema train-demo` (seed 0).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from runtime.inputs import request_from_files
from runtime.modalities import ModalityError
from runtime.pipeline import Pipeline, Request, Stage
from synthetic.generator import clip_files

CALIBRATION_SEED, EVALUATION_SEED = 2, 1


class CalibrationDataError(ValueError):
    """Calibration data that cannot be read or is too small; the message names it."""


@dataclasses.dataclass(frozen=True)
class Item:
    request: Request
    answer: str
    qtype: str


def read_items(directory: str | Path, config: dict, limit: int | None = None) -> list[Item]:
    """Every question of the folder (up to `limit`), its clip's inputs extracted once per clip."""
    directory = Path(directory)
    index = directory / "questions.jsonl"
    if not index.is_file():
        raise CalibrationDataError(f"{directory}: no questions.jsonl (see calibration/data.py for the layout)")
    rows = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((row["clip"], row["question"], row.get("answer", ""), row.get("qtype", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CalibrationDataError(f"{index}:{n}: not a question record ({e})") from e
    rows = rows[:limit]
    base: dict[str, Request] = {}
    items = []
    for clip, question, answer, qtype in tqdm(rows, desc="read calibration data", unit="question", leave=False):
        if clip not in base:
            folder = directory / clip
            try:
                base[clip] = request_from_files(config, "", **clip_files(folder))
            except (ModalityError, ValueError) as e:
                raise CalibrationDataError(f"{folder}: cannot read its inputs: {e}") from e
        items.append(Item(dataclasses.replace(base[clip], question=question), answer, qtype))
    return items


class Recorder:
    """Stands in for a pipeline Stage: keeps every feed (as the stage checked and cast it), then runs it."""

    def __init__(self, stage: Stage):
        self.stage, self.spec, self.feeds = stage, stage.spec, []

    def __call__(self, **inputs):
        feed = self.stage.feed(**inputs)
        self.feeds.append(feed)
        return self.stage.run(feed)


def collect_feeds(pipeline: Pipeline, items: list[Item], batch: int = 6) -> dict[str, list[dict]]:
    """Run the pipeline over `items` and record every stage's inputs (decoder steps included)."""
    stages = pipeline.stages
    recorders = {name: Recorder(stage) for name, stage in stages.items()}
    pipeline.stages = recorders
    try:
        for start in tqdm(range(0, len(items), batch), desc="collect stage inputs", unit="batch", leave=False):
            pipeline.answer([it.request for it in items[start:start + batch]])
    finally:
        pipeline.stages = stages
    return {name: r.feeds for name, r in recorders.items()}

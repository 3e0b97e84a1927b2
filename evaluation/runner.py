"""The evaluation loop: ask every item, record each answer as it comes, resume where a run stopped.

Each item gets one JSON line in the predictions file, written and fsynced before the next item is asked:
    {"id", "dataset", "qtype", "answer", "prediction", "correct", "info": {answer_fn's other fields}}
or, when the item's media is missing or answer_fn raises ValueError (MissingMedia and FileNotFoundError
included), an error line
    {"id", "dataset", "qtype", "answer", "error_type", "error"}
and the run goes on. Any other exception (KeyboardInterrupt, a backend crash) stops the run; nothing written
is lost. Rerunning with the same file skips the items it already holds (error lines too, unless
retry_errors), ignores a last line cut short by a crash (it is removed and that item redone), and appends.
Metrics are recomputed from the file's predictions, so a finished file always gives the same numbers.

Unanswered items (error lines) count as wrong: accuracy is over every item, as the paper's is over the whole
split; metrics["answered"] gives the accuracy over the answered items alone, and the summary says how many
failed. (CREMA's own loaders instead drop items whose media is missing before evaluating.)
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from evaluation.annotations import Item
from evaluation.media import MissingMedia, resolve_media
from evaluation.metrics import compute_metrics, is_correct, metrics_markdown

RECOVERABLE = (MissingMedia, FileNotFoundError, ValueError)  # recorded as the item's error; the run goes on


def _scan(path: Path) -> tuple[dict[str, dict], int, int]:
    """(id -> its last readable line, bytes up to the end of the last complete line, unreadable lines)."""
    if not path.exists():
        return {}, 0, 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # a tail without a newline is a line cut short by a crash
    records: dict[str, dict] = {}
    bad = 0
    for raw in data[:complete].split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            bad += 1
            continue
        records[rec["id"]] = rec
    return records, complete, bad


def read_predictions(path: str | Path) -> dict[str, dict]:
    """The predictions file's records, id -> the last complete line for it."""
    return _scan(Path(path))[0]


def _append(f, line: dict) -> None:
    f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ask(item: Item, answer_fn: Callable[[Item], dict], media_root, modalities) -> dict:
    base = {"id": item.id, "dataset": item.dataset, "qtype": item.qtype, "answer": item.answer}
    try:
        if media_root is not None:
            resolve_media(item, media_root, modalities)
        result = answer_fn(item)
    except RECOVERABLE as e:
        return {**base, "error_type": type(e).__name__, "error": str(e)}
    if not isinstance(result, dict) or not isinstance(result.get("prediction"), str):
        raise TypeError(f"answer_fn must return a dict with a str 'prediction', got {result!r} for item {item.id!r}")
    info = {k: v for k, v in result.items() if k != "prediction"}
    return {**base, "prediction": result["prediction"], "correct": is_correct(item, result["prediction"]),
            **({"info": info} if info else {})}


def evaluate(items: Iterable[Item], answer_fn: Callable[[Item], dict], predictions_path: str | Path,
             progress: bool = True, media_root: str | Path | None = None, modalities: tuple[str, ...] | None = None,
             retry_errors: bool = False) -> dict:
    """Ask answer_fn(item) -> {"prediction": str, ...} for each item not yet in predictions_path (JSON lines,
    appended and fsynced per item), then score the whole file. media_root: check each item's media first
    (evaluation.media.resolve_media with `modalities`, default the dataset's), a missing file giving an error
    line without asking. Returns {"dataset", "predictions_path", "metrics", "counts", "errors", "summary",
    "table"}; counts: items, resumed (already in the file), asked (this run), errors (all unanswered items),
    errors_now, ignored_lines (unreadable or not one of these items)."""
    items = list(items)
    datasets = {item.dataset for item in items}
    if len(datasets) > 1:
        raise ValueError(f"items of several datasets: {sorted(datasets)}: evaluate one dataset at a time")
    ids = [item.id for item in items]
    dups = [i for i, n in Counter(ids).items() if n > 1]
    if dups:
        raise ValueError(f"duplicate item id {dups[0]!r}")
    path = Path(predictions_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records, complete, bad = _scan(path)
    by_id = {item.id: item for item in items}
    for rid, rec in records.items():
        if rid in by_id and rec.get("dataset") != by_id[rid].dataset:
            raise ValueError(f"{path}: item {rid!r} is recorded for dataset {rec.get('dataset')!r}, not "
                             f"{by_id[rid].dataset!r}: use another predictions file")
    if path.exists() and path.stat().st_size > complete:  # drop a line cut short by a crash
        with open(path, "r+b") as f:
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    created = not path.exists()

    def done(item: Item) -> bool:
        rec = records.get(item.id)
        return rec is not None and not (retry_errors and "error" in rec)

    todo = [item for item in items if not done(item)]
    resumed = len(items) - len(todo)
    errors_now = 0
    dataset = next(iter(datasets), None)
    with open(path, "ab") as f, tqdm(total=len(items), initial=resumed, desc=f"evaluating {dataset}", unit="q",
                                     file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        if created:
            _fsync_dir(path.parent)
        for item in todo:
            line = _ask(item, answer_fn, media_root, modalities)
            _append(f, line)
            records[item.id] = line
            if "error" in line:
                errors_now += 1
                bar.set_postfix(errors=errors_now, refresh=False)
            bar.update(1)

    predictions = {i: (None if "error" in records[i] else records[i].get("prediction")) for i in ids if i in records}
    metrics = compute_metrics(items, predictions)
    errors = [{"id": i, "error_type": records[i].get("error_type"), "error": records[i]["error"]}
              for i in ids if i in records and "error" in records[i]]
    counts = {"items": len(items), "resumed": resumed, "asked": len(todo), "errors": len(errors),
              "errors_now": errors_now, "ignored_lines": bad + sum(1 for r in records if r not in by_id)}
    acc = "n/a" if metrics["accuracy"] is None else f"{metrics['accuracy']:.2f}%"
    summary = f"{dataset}: accuracy {acc} over {len(items)} questions ({resumed} resumed from {path}, {len(todo)} asked now)"
    if errors:
        answered = metrics["answered"]["accuracy"]
        summary += (f"; {len(errors)} unanswered (missing media or errors, counted as wrong; accuracy over the "
                    f"{len(items) - len(errors)} answered: " + ("n/a" if answered is None else f"{answered:.2f}%") + ")")
    return {"dataset": dataset, "predictions_path": str(path), "metrics": metrics, "counts": counts,
            "errors": errors, "summary": summary, "table": metrics_markdown(metrics)}

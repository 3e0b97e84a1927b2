"""The paper's metrics, with answers matched as CREMA's own evaluation code matches them (lavis/tasks/vqa.py).

nextqa      accuracy: the predicted option == the gold option (CREMA's videoqa task compares the argmax option
            index with the target, VideoQA._report_metrics). A text prediction is read as an option by
            `nextqa_choice`: a letter ("C", "(C)", "Option C", "C: ..."), a 0-based index "2" (CREMA's
            prediction is the index), or an option's text. Per type: the qid prefix codes (CREMA reports
            these), grouped into Causal (C*), Temporal (T*), Descriptive (D*) as NExT-QA's eval_mc.py and
            SeViLA/CREMA's tables do (group accuracy = correct / questions over the group's codes).
music_avqa  accuracy as CREMA's gqa task scores it (GQATask.valid_step + _report_metrics): an empty prediction
            becomes "unanswerable" (Crema.predict_answers), "1".."10" become "one".."ten", then the prediction
            counts as correct when it is a *substring* of the gold answer ("guitar" in "acoustic guitar"),
            case-sensitive, no other normalisation. Per type: the benchmark's Audio (Counting, Comparative),
            Visual (Counting, Location), Audio-Visual (Existential, Counting, Location, Comparative, Temporal)
            and the three task averages (MUSIC-AVQA net_grd_avst/main_avst.py test()).
sqa3d       Top-1 EM as CREMA's sqa3d task computes it (ThreeDVQATask._report_metrics + evals_json): drop ","
            "<pad>" "</s>", strip, keep the first line, lowercase; for a one-word gold answer keep the last
            word; "1".."10" -> "one".."ten"; correct when that is a substring of answers[0]. Per type: What,
            How, Can, Is, Which, Other (get_qclass).
synthetic   ours: the prediction, stripped, lowercased and without a final ".", equals the answer; with options,
            a letter A-E reads as that option (the demo's mcqa form).

CREMA's substring matching (music_avqa, sqa3d) is kept for comparability with the paper; `strict` in the
metrics gives plain equality of the same normalised strings, so the leniency can be seen.
Accuracies are percentages. Unanswered items (errors, missing media) count as wrong; `answered` gives
the accuracy over the answered items alone.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from evaluation.annotations import LETTERS, MUSIC_AVQA_TYPES, NEXTQA_TYPES, SQA3D_TYPES, SYNTHETIC_TYPES, Item

NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven",
                "8": "eight", "9": "nine", "10": "ten"}  # CREMA's number_mapping (lavis/tasks/vqa.py)
NEXTQA_GROUPS = {"C": "Causal", "T": "Temporal", "D": "Descriptive"}
NEXTQA_NAMES = {"CW": "why", "CH": "how", "TC": "present", "TN": "next", "TP": "previous", "DC": "count",
                "DL": "location", "DO": "other"}
_LETTER = re.compile(r"^(?:option\s*)?\(?([a-e])\)?(?:\s*[.:)]\s*(.*))?$", re.IGNORECASE | re.DOTALL)


def _plain(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def nextqa_choice(prediction: str, options: tuple) -> int | None:
    """The option index a prediction names, or None."""
    text = prediction.strip()
    m = _LETTER.match(text)
    if m and "ABCDE".index(m.group(1).upper()) < len(options):
        return "ABCDE".index(m.group(1).upper())
    if text.isdigit() and int(text) < len(options):
        return int(text)
    plain = [_plain(o) for o in options]
    return plain.index(_plain(text)) if _plain(text) in plain else None


def music_avqa_prediction(prediction: str) -> str:
    """CREMA's post-processing of a MUSIC-AVQA prediction before matching."""
    pred = prediction if prediction != "" else "unanswerable"
    return NUMBER_WORDS.get(pred, pred)


def sqa3d_prediction(prediction: str, gold: str) -> str:
    """CREMA's post-processing of an SQA3D prediction before matching (ThreeDVQATask._report_metrics)."""
    pred = prediction if prediction != "" else "unanswerable"
    pred = pred.replace(",", "").replace("<pad>", "").replace("</s>", "").strip()
    pred = pred.strip().split("\n")[0].lower()
    if len(gold.split(" ")) == 1:
        pred = pred.split(" ")[-1]
    return NUMBER_WORDS.get(pred, pred)


def synthetic_prediction(prediction: str, options: tuple) -> str:
    m = _LETTER.match(prediction.strip()) if options else None
    if m and not m.group(2) and "ABCDE".index(m.group(1).upper()) < len(options):
        return _plain(options["ABCDE".index(m.group(1).upper())])
    return _plain(prediction)


def is_correct(item: Item, prediction: str, strict: bool = False) -> bool:
    """Whether `prediction` answers `item` as CREMA scores it (strict: equality instead of CREMA's substring)."""
    if item.dataset == "nextqa":
        choice = nextqa_choice(prediction, item.options)
        return choice is not None and LETTERS[choice] == item.answer
    if item.dataset == "music-avqa":
        pred = music_avqa_prediction(prediction)
        return pred == item.answer if strict else pred in item.answer
    if item.dataset == "sqa3d":
        pred = sqa3d_prediction(prediction, item.answer)
        return pred == item.answer if strict else pred in item.answer
    if item.dataset == "synthetic":
        return synthetic_prediction(prediction, item.options) == _plain(item.answer)
    raise ValueError(f"unknown dataset {item.dataset!r}")


def _group_of(item: Item) -> str | None:
    if item.dataset == "nextqa":
        return NEXTQA_GROUPS[item.qtype[0]]
    if item.dataset == "music-avqa":
        return item.qtype.split("/")[0]
    return None


def _type_order(dataset: str) -> list[str]:
    return {"nextqa": list(NEXTQA_TYPES), "sqa3d": list(SQA3D_TYPES), "synthetic": list(SYNTHETIC_TYPES),
            "music-avqa": [f"{k}/{t}" for k, ts in MUSIC_AVQA_TYPES.items() for t in ts]}[dataset]


def _group_order(dataset: str) -> list[str]:
    return {"nextqa": list(NEXTQA_GROUPS.values()), "music-avqa": list(MUSIC_AVQA_TYPES)}.get(dataset, [])


def _cell(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": 100.0 * correct / total if total else None}


def compute_metrics(items: Iterable[Item], predictions: Mapping[str, str | None]) -> dict:
    """Accuracy overall, per group and per question type, as a JSON-able dict. predictions: item id -> the
    predicted text, None (or absent) for an item that got no answer (an error): it counts as wrong."""
    items = list(items)
    datasets = {item.dataset for item in items}
    if len(datasets) > 1:
        raise ValueError(f"items of several datasets: {sorted(datasets)}")
    dataset = datasets.pop() if datasets else None
    tally: dict[tuple[str, str], list[int]] = {}  # (level, key) -> [correct, total]
    answered = correct = strict = 0
    for item in items:
        pred = predictions.get(item.id)
        ok = pred is not None and is_correct(item, pred)
        answered += pred is not None
        correct += ok
        strict += pred is not None and is_correct(item, pred, strict=True)
        keys = [("type", item.qtype)] + ([("group", _group_of(item))] if _group_of(item) else [])
        for key in keys:
            cell = tally.setdefault(key, [0, 0])
            cell[0] += ok
            cell[1] += 1
    out = {"dataset": dataset, **_cell(correct, len(items)), "errors": len(items) - answered,
           "answered": _cell(correct, answered)}
    if dataset in ("music-avqa", "sqa3d"):
        out["strict"] = _cell(strict, len(items))
    for level, order in (("group", _group_order(dataset)), ("type", _type_order(dataset) if dataset else [])):
        present = {k for lv, k in tally if lv == level}
        keys = [k for k in order if k in present] + sorted(present - set(order))
        if keys:
            out[f"per_{level}"] = {k: _cell(*tally[(level, k)]) for k in keys}
    return out


def _fmt(cell: dict) -> str:
    acc = "n/a" if cell["accuracy"] is None else f"{cell['accuracy']:.2f}"
    return f"{cell['correct']} | {cell['total']} | {acc}"


def metrics_markdown(metrics: dict) -> str:
    """A markdown table of compute_metrics' output: overall, then each group with its types, then the rest."""
    dataset = metrics.get("dataset")
    lines = [f"**{dataset}**: {metrics['total']} questions, {metrics['errors']} unanswered (counted as wrong)", "",
             "| Split | Correct | Total | Accuracy (%) |", "|---|---:|---:|---:|",
             f"| **Overall** | {_fmt(metrics)} |"]
    types = dict(metrics.get("per_type", {}))
    for group, cell in metrics.get("per_group", {}).items():
        lines.append(f"| **{group}** | {_fmt(cell)} |")
        for t in [t for t in types if _group_of(Item("", dataset, "", qtype=t)) == group]:
            lines.append(f"| &nbsp;&nbsp;{_type_label(dataset, t)} | {_fmt(types.pop(t))} |")
    for t, cell in types.items():
        lines.append(f"| {_type_label(dataset, t)} | {_fmt(cell)} |")
    if metrics["errors"]:
        lines.append(f"| Answered only | {_fmt(metrics['answered'])} |")
    if "strict" in metrics:
        lines.append(f"| Strict equality | {_fmt(metrics['strict'])} |")
    return "\n".join(lines) + "\n"


def _type_label(dataset: str, qtype: str) -> str:
    if dataset == "nextqa":
        return f"{qtype} ({NEXTQA_NAMES.get(qtype, '?')})"
    if dataset == "music-avqa":
        return qtype.split("/", 1)[-1]
    return qtype

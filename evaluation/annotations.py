"""Readers for the annotation files CREMA evaluates on, each giving a list of `Item`.

Formats (keys as CREMA's dataset classes read them; CREMA = github.com/Yui010206/CREMA):

nextqa       SeViLA's NExT-QA json (lavis/datasets/datasets/rgbd_vqa_datasets.py): a list of
             {"qid": "<type>_<video>_<n>", "video", "question", "num_option": 5, "a0".."a4", "answer": 0-4}
             and optionally "start"/"end" (seconds). The question type is the qid's prefix (CW, CH, TC, TN, TP,
             DC, DL, DO), as CREMA's videoqa task takes it (lavis/tasks/vqa.py: r['qid'].split('_')[0]); a
             "type" key (the original NExT-QA csv's) is used when present. Gold: the option letter A-E.
music_avqa   MUSIC-AVQA's data/json_update (music_avqa_datasets.py): a list of {"video_id", "question_id",
             "type": '["Audio", "Counting"]' (a JSON list, usually as a string), "question_content" with <...>
             placeholders, "templ_values": '["clarinet"]' (a list as a string), "anser" (sic)}. Gold: anser with
             "_" read as " " (CREMA: acoustic_guitar -> acoustic guitar).
sqa3d        3D-LLM's ScanQA-format SQA3D json (threedvqa_datasets.py): a list of {"scene_id", "situation",
             "question", "answers": [...], "question_id"}. Gold: answers[0] (CREMA scores against it alone);
             the question type is CREMA's get_qclass (What/How/Can/Is/Which/Other).
synthetic    ours (synthetic/generator.py's questions): a JSON list, or JSON lines, of {"id", "video" (the clip
             folder), "question", "answer", "type", "options" (optional: the five mcqa options)}. The
             generator's own questions.jsonl (clip/qtype instead of video/type) reads as is.

Any malformed record raises AnnotationError naming the file, the record's index and id, and the field.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

DATASETS = ("nextqa", "music-avqa", "sqa3d", "synthetic")
LETTERS = "ABCDE"
NEXTQA_OPTIONS = 5
NEXTQA_TYPES = ("CW", "CH", "TC", "TN", "TP", "DC", "DL", "DO")  # Causal why/how, Temporal, Descriptive
MUSIC_AVQA_TYPES = {  # the benchmark's task -> question types (MUSIC-AVQA net_grd_avst/main_avst.py test())
    "Audio": ("Counting", "Comparative"),
    "Visual": ("Counting", "Location"),
    "Audio-Visual": ("Existential", "Counting", "Location", "Comparative", "Temporal"),
}
SQA3D_TYPES = ("What", "How", "Can", "Is", "Which", "Other")  # CREMA's SQA3D_QT order (lavis/tasks/vqa.py)
SYNTHETIC_TYPES = ("colour", "motion", "nearer", "facing", "sound", "shape3d")  # synthetic.generator.QUESTION_TYPES


class AnnotationError(ValueError):
    """A malformed annotation file or record: names the file, the record (index and id) and the field."""

    def __init__(self, path, index: int | None, item_id, field_name: str | None, problem: str):
        self.path, self.index, self.item_id, self.field = str(path), index, item_id, field_name
        where = [str(path)]
        if index is not None:
            where.append(f"item {index}" + (f" (id {item_id!r})" if item_id is not None else ""))
        if field_name is not None:
            where.append(f"field {field_name!r}")
        super().__init__(": ".join(where + [problem]))


@dataclass(frozen=True)
class Item:
    """One question. options: the choices (empty for open-ended QA); answer: the gold answer (NExT-QA: the
    option letter); qtype: the type per-type metrics group by; media: what to find under a media root
    (evaluation.media); extra: dataset-specific fields (SQA3D situation, MUSIC-AVQA template, ...)."""
    id: str
    dataset: str
    question: str
    options: tuple = ()
    answer: str = ""
    qtype: str = ""
    media: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "options": list(self.options)}


class _Record:
    """One raw record with its position, for error messages."""

    def __init__(self, path: Path, index: int, raw: Any, id_key: str | None):
        self.path, self.index, self.raw = path, index, raw
        self.id = raw.get(id_key) if isinstance(raw, dict) and id_key else None
        if not isinstance(raw, dict):
            raise self.error(None, f"expected a JSON object, got {type(raw).__name__}")

    def error(self, field_name: str | None, problem: str) -> AnnotationError:
        return AnnotationError(self.path, self.index, self.id, field_name, problem)

    def get(self, key: str, kind=str, required: bool = True, default=None):
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise self.error(key, "missing")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {names}, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value.strip() and required:
            raise self.error(key, "empty")
        return value


def _read_records(path: Path, jsonl_ok: bool = False) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AnnotationError(path, None, None, None, f"cannot read: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not jsonl_ok:
            raise AnnotationError(path, None, None, None, f"not JSON: {e}") from e
        data = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e2:
                    raise AnnotationError(path, len(data), None, None, f"line {n + 1} is not JSON: {e2}") from e2
    if isinstance(data, dict) and jsonl_ok:  # a one-record JSON-lines file
        data = [data]
    if not isinstance(data, list):
        raise AnnotationError(path, None, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _unique(items: list[Item], path: Path) -> list[Item]:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise AnnotationError(path, i, item.id, "id", f"duplicate id (first at item {seen[item.id]})")
        seen[item.id] = i
    return items


def _int_like(rec: _Record, key: str) -> int:
    value = rec.get(key, (int, str))
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise rec.error(key, f"expected an integer, got {value!r}")
        value = int(value)
    return value


def read_nextqa(path: str | Path) -> list[Item]:
    """SeViLA-format NExT-QA (the json CREMA's MCVideoQADataset reads)."""
    path = Path(path)
    items = []
    for i, raw in enumerate(_read_records(path)):
        rec = _Record(path, i, raw, "qid")
        qid = rec.get("qid", (str, int))
        qid = str(qid)
        video = str(rec.get("video", (str, int)))
        question = rec.get("question")
        n = _int_like(rec, "num_option") if "num_option" in raw else NEXTQA_OPTIONS
        if n != NEXTQA_OPTIONS:
            raise rec.error("num_option", f"NExT-QA has {NEXTQA_OPTIONS} options, got {n}")
        options = tuple(str(rec.get(f"a{j}", (str, int, float))) for j in range(NEXTQA_OPTIONS))
        answer = _int_like(rec, "answer")
        if not 0 <= answer < NEXTQA_OPTIONS:
            raise rec.error("answer", f"expected an option index 0-{NEXTQA_OPTIONS - 1}, got {answer}")
        if "type" in raw:
            qtype, key = rec.get("type"), "type"
        else:
            qtype, key = qid.split("_")[0], "qid"
        if qtype not in NEXTQA_TYPES:
            raise rec.error(key, f"unknown question type {qtype!r} (expected one of {', '.join(NEXTQA_TYPES)})")
        extra = {"answer_index": answer}
        for k in ("start", "end"):
            if k in raw:
                extra[k] = float(rec.get(k, (int, float, str)))
        items.append(Item(qid, "nextqa", question, options, LETTERS[answer], qtype, {"video": video}, extra))
    return _unique(items, path)


def _literal_list(rec: _Record, key: str) -> list:
    """A list stored as JSON/Python text (MUSIC-AVQA's type and templ_values) or as a list."""
    value = rec.get(key, (str, list), required=True)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise rec.error(key, f"not a list literal: {value!r}") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise rec.error(key, f"expected a list of strings, got {value!r}")
    return value


def fill_template(template: str, values: list[str]) -> str:
    """MUSIC-AVQA: each <...> placeholder in turn takes the next value (the benchmark's own reading)."""
    it = iter(values)
    return re.sub(r"<[^<>]*>", lambda m: next(it), template)


def read_music_avqa(path: str | Path) -> list[Item]:
    """MUSIC-AVQA json_update (the json CREMA's MusicAVQADataset reads)."""
    path = Path(path)
    items = []
    for i, raw in enumerate(_read_records(path)):
        rec = _Record(path, i, raw, "question_id")
        qid = str(rec.get("question_id", (int, str)))
        video = str(rec.get("video_id", (str, int)))
        kind = _literal_list(rec, "type")
        if len(kind) != 2 or kind[0] not in MUSIC_AVQA_TYPES or kind[1] not in MUSIC_AVQA_TYPES[kind[0]]:
            known = "; ".join(f"{k}: {', '.join(v)}" for k, v in MUSIC_AVQA_TYPES.items())
            raise rec.error("type", f"unknown question type {kind!r} (known: {known})")
        template = rec.get("question_content")
        values = _literal_list(rec, "templ_values")
        slots = re.findall(r"<[^<>]*>", template)
        if len(values) < len(slots):
            raise rec.error("templ_values", f"{len(values)} values for the {len(slots)} placeholders of {template!r}")
        anser = str(rec.get("anser", (str, int)))
        extra = {"template": template, "templ_values": values, "type": kind, "anser": anser}
        if "question_deleted" in raw:
            extra["question_deleted"] = raw["question_deleted"]
        items.append(Item(qid, "music-avqa", fill_template(template, values), (), anser.replace("_", " "),
                          f"{kind[0]}/{kind[1]}", {"video": video}, extra))
    return _unique(items, path)


def sqa3d_qtype(question: str) -> str:
    """CREMA's get_qclass (threedvqa_datasets.py; 3D-LLM's qclass1): the first of What/How/Can/Is/Which that
    occurs in the question, case-sensitive and anywhere in it, else Other."""
    for word in SQA3D_TYPES[:-1]:
        if word in question:
            return word
    return "Other"


def read_sqa3d(path: str | Path) -> list[Item]:
    """3D-LLM-format SQA3D (the json CREMA's ThreeDVQAEvalDataset reads)."""
    path = Path(path)
    items = []
    for i, raw in enumerate(_read_records(path)):
        rec = _Record(path, i, raw, "question_id")
        qid = str(rec.get("question_id", (int, str)))
        scene = str(rec.get("scene_id", (str, int)))
        situation = rec.get("situation")
        question = rec.get("question")
        answers = rec.get("answers", list)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise rec.error("answers", f"expected a non-empty list of strings, got {answers!r}")
        items.append(Item(qid, "sqa3d", question, (), answers[0], sqa3d_qtype(question), {"scene": scene},
                          {"situation": situation, "answers": list(answers)}))
    return _unique(items, path)


def read_synthetic(path: str | Path) -> list[Item]:
    """Our synthetic task: {id, video, question, answer, type, options?} (or the generator's questions.jsonl)."""
    path = Path(path)
    items = []
    for i, raw in enumerate(_read_records(path, jsonl_ok=True)):
        rec = _Record(path, i, raw, "id")
        qid = str(rec.get("id", (str, int)))
        video_key = "video" if "video" in raw or "clip" not in raw else "clip"
        type_key = "type" if "type" in raw or "qtype" not in raw else "qtype"
        video = rec.get(video_key)
        question = rec.get("question")
        answer = rec.get("answer")
        qtype = rec.get(type_key)
        if qtype not in SYNTHETIC_TYPES:
            raise rec.error(type_key, f"unknown question type {qtype!r} (expected one of {', '.join(SYNTHETIC_TYPES)})")
        options = tuple(rec.get("options", list, required=False, default=[]))
        if options:
            if len(options) > len(LETTERS) or not all(isinstance(o, str) for o in options):
                raise rec.error("options", f"expected up to {len(LETTERS)} strings, got {list(options)!r}")
            if answer not in options:
                raise rec.error("options", f"the answer {answer!r} is not among {list(options)!r}")
        items.append(Item(qid, "synthetic", question, options, answer, qtype, {"video": video}, {}))
    return _unique(items, path)


READERS: dict[str, Callable[[str | Path], list[Item]]] = {
    "nextqa": read_nextqa, "music-avqa": read_music_avqa, "sqa3d": read_sqa3d, "synthetic": read_synthetic,
}


def load_annotations(dataset: str, path: str | Path) -> list[Item]:
    """Read `path` in `dataset`'s official format (DATASETS)."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    return READERS[dataset](path)

"""evaluation/: official annotation readers, CREMA's metrics, the resumable runner, media layouts.

Backends are not under test: a fake answer function returns fixed predictions whose scores are known.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evaluation import (AnnotationError, Item, MissingMedia, compute_metrics, evaluate, load_annotations,
                        load_points, metrics_markdown, read_predictions, resolve_media)
from evaluation.annotations import sqa3d_qtype


def _pct(correct: int, total: int) -> float:
    return 100.0 * correct / total


def _cell(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": _pct(correct, total)}


# --- NExT-QA (SeViLA json): one question per type code; qid -> (gold index, prediction, correct) -------------
NEXTQA = {
    "CW_1001_0": (0, "A", True),
    "CW_1001_1": (3, "Option D", True),
    "CH_1002_0": (1, "C", False),
    "TN_1002_1": (4, "4", True),              # CREMA's prediction is the 0-based option index
    "TC_1003_0": (2, "The man waves", True),  # an option's text (SeViLA options end with ".")
    "TP_1003_1": (0, "no idea", False),
    "DC_1004_0": (1, "(b)", True),
    "DL_1004_1": (2, "A", False),
    "DO_1005_0": (3, "D", True),
}


def nextqa_records() -> list[dict]:
    out = []
    for qid, (answer, _, _) in NEXTQA.items():
        video = f"0000/{qid.split('_')[1]}"
        out.append({"video": video, "num_option": 5, "qid": qid, "a0": "he sits.", "a1": "he runs.",
                    "a2": "the man waves.", "a3": "to play.", "a4": "a dog.", "answer": answer,
                    "question": f"question {qid}?"})
    return out


# --- MUSIC-AVQA (json_update): every benchmark type; question_id -> (type, template, values, anser, pred) -----
MUSIC = {
    1: (["Audio", "Counting"], "How many instruments are sounding in the video?", [], "two", "2", True, True),
    2: (["Audio", "Comparative"], "Is the <Object> louder than the <Object>?", ["clarinet", "acoustic_guitar"],
        "yes", "no", False, False),
    3: (["Visual", "Counting"], "How many <Object> are in the entire video?", ["violin"], "three", "three", True,
        True),
    4: (["Visual", "Location"], "Where is the <FL> sounding instrument?", ["first"], "left", "right", False, False),
    5: (["Audio-Visual", "Existential"], "Is this sound from the instrument in the video?", [], "yes", "yes", True,
        True),
    6: (["Audio-Visual", "Counting"], "How many instruments in the video did not sound?", [], "one", "1", True, True),
    7: (["Audio-Visual", "Location"], "Where is the <Object>?", ["piano"], "acoustic_guitar", "guitar", True,
        False),  # CREMA: a substring of the gold answer counts
    8: (["Audio-Visual", "Comparative"], "Is the <Object> more rhythmic than the <Object>?", ["drum", "bass"], "no",
        "", False, False),  # empty -> "unanswerable"
    9: (["Audio-Visual", "Temporal"], "Which <Object> sounds first?", ["instrument"], "piano", "Piano", False, False),
}


def music_records() -> list[dict]:
    out = []
    for qid, (kind, template, values, anser, *_) in MUSIC.items():
        out.append({"video_id": f"0000{qid:04d}", "question_id": qid,
                    "type": kind if qid == 3 else json.dumps(kind),  # a list, or as the file has it, a string
                    "question_content": template, "templ_values": json.dumps(values), "question_deleted": 0,
                    "anser": anser})
    return out


# --- SQA3D (3D-LLM format): question_id -> (question, answers, prediction, correct, strict) -------------------
SQA3D = {
    101: ("What is in front of me?", ["table"], "Table", True, True),
    102: ("Is the door open?", ["yes"], "yes, it is", False, False),  # one-word gold: the last word, "is"
    103: ("How many chairs are there?", ["two"], "2", True, True),
    104: ("Can I sit on the bed?", ["yes"], "no", False, False),
    105: ("Which direction should I go to reach the window?", ["left"], "left", True, True),
    106: ("Standing by the sink, where is the soap?", ["on the counter"], "the counter", True, False),
}


def sqa3d_records() -> list[dict]:
    return [{"scene_id": f"scene{qid:04d}_00", "situation": "I am facing the wall.", "question": q, "answers": a,
             "question_id": qid} for qid, (q, a, *_) in SQA3D.items()]


SYNTHETIC = [  # id, clip, type, answer, options, prediction, correct
    ("clip00000-colour", "clip00000", "colour", "red", [], "Red.", True),
    ("clip00000-motion", "clip00000", "motion", "left", ["up", "left", "down", "still", "right"], "B", True),
    ("clip00000-nearer", "clip00000", "nearer", "square", [], "circle", False),
    ("clip00001-sound", "clip00001", "sound", "beep", [], "beep", True),
    ("clip00001-shape3d", "clip00001", "shape3d", "cube", [], "cube", True),
    ("clip00001-facing", "clip00001", "facing", "up", [], "up", True),
]


def synthetic_records() -> list[dict]:
    return [{"id": i, "video": c, "question": f"{t}?", "answer": a, "type": t, **({"options": o} if o else {})}
            for i, c, t, a, o, _, _ in SYNTHETIC]


PREDICTIONS = {
    "nextqa": {qid: p for qid, (_, p, _) in NEXTQA.items()},
    "music-avqa": {str(qid): v[4] for qid, v in MUSIC.items()},
    "sqa3d": {str(qid): v[2] for qid, v in SQA3D.items()},
    "synthetic": {r[0]: r[5] for r in SYNTHETIC},
}
RECORDS = {"nextqa": nextqa_records, "music-avqa": music_records, "sqa3d": sqa3d_records,
           "synthetic": synthetic_records}


def write(tmp_path: Path, name: str, records) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def load(tmp_path: Path, dataset: str) -> list[Item]:
    return load_annotations(dataset, write(tmp_path, f"{dataset}.json", RECORDS[dataset]()))


def fake_answer(item: Item) -> dict:
    return {"prediction": PREDICTIONS[item.dataset][item.id], "latency_ms": 1.0}


# --- readers ---------------------------------------------------------------------------------------------------

def test_nextqa_items(tmp_path):
    items = load(tmp_path, "nextqa")
    assert [i.id for i in items] == list(NEXTQA)
    first = items[1]
    assert first == Item("CW_1001_1", "nextqa", "question CW_1001_1?",
                         ("he sits.", "he runs.", "the man waves.", "to play.", "a dog."), "D", "CW",
                         {"video": "0000/1001"}, {"answer_index": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.answer = "A"
    assert json.loads(json.dumps(first.to_dict()))["options"][3] == "to play."


def test_music_avqa_items(tmp_path):
    items = {i.id: i for i in load(tmp_path, "music-avqa")}
    two = items["2"]
    assert two.question == "Is the clarinet louder than the acoustic_guitar?"  # placeholders filled in turn
    assert (two.qtype, two.answer, two.media) == ("Audio/Comparative", "yes", {"video": "00000002"})
    assert two.extra["template"] == "Is the <Object> louder than the <Object>?"
    assert two.extra["templ_values"] == ["clarinet", "acoustic_guitar"]
    assert items["7"].answer == "acoustic guitar" and items["7"].extra["anser"] == "acoustic_guitar"
    assert items["3"].qtype == "Visual/Counting"  # "type" given as a list rather than a string


def test_sqa3d_items(tmp_path):
    items = {i.id: i for i in load(tmp_path, "sqa3d")}
    assert items["101"].extra["situation"] == "I am facing the wall."
    assert items["101"].media == {"scene": "scene0101_00"}
    assert [i.qtype for i in items.values()] == ["What", "Is", "How", "Can", "Which", "Other"]
    # CREMA's get_qclass: the first of What/How/Can/Is/Which anywhere in the question, case-sensitive
    assert sqa3d_qtype("Is there a way How to ...") == "How"
    assert sqa3d_qtype("what is this") == "Other"


def test_synthetic_reads_the_generators_questions(tmp_path):
    from synthetic.generator import CLIP_FILES, QUESTION_TYPES, Question

    from evaluation.annotations import SYNTHETIC_TYPES
    from evaluation.media import SYNTHETIC_FILES
    assert SYNTHETIC_TYPES == tuple(QUESTION_TYPES) and SYNTHETIC_FILES == CLIP_FILES
    q = Question("clip00003-motion", "clip00003", "motion", "flow", "Which way does the shape move?", "up",
                 ("left", "up", "down", "still", "right"), "B")
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(dataclasses.asdict(q)) + "\n")
    (item,) = load_annotations("synthetic", path)
    assert (item.id, item.qtype, item.answer, item.media) == ("clip00003-motion", "motion", "up", {"video": "clip00003"})
    assert item.options == ("left", "up", "down", "still", "right")


def _set(records, index, **changes):
    rec = records[index]
    for k, v in changes.items():
        if v is KeyError:
            del rec[k]
        else:
            rec[k] = v
    return records


BAD = [  # dataset, records, item index, item id, field
    ("nextqa", lambda: _set(nextqa_records(), 2, a3=KeyError), 2, "CH_1002_0", "a3"),
    ("nextqa", lambda: _set(nextqa_records(), 4, num_option=4), 4, "TC_1003_0", "num_option"),
    ("nextqa", lambda: _set(nextqa_records(), 1, qid="XX_1001_1"), 1, "XX_1001_1", "qid"),
    ("nextqa", lambda: _set(nextqa_records(), 0, answer=5), 0, "CW_1001_0", "answer"),
    ("nextqa", lambda: _set(nextqa_records(), 3, question=KeyError), 3, "TN_1002_1", "question"),
    ("nextqa", lambda: _set(nextqa_records(), 3, qid="CW_1001_0"), 3, "CW_1001_0", "id"),  # duplicate
    ("music-avqa", lambda: _set(music_records(), 1, type='["Audio", "Location"]'), 1, 2, "type"),
    ("music-avqa", lambda: _set(music_records(), 5, anser=KeyError), 5, 6, "anser"),
    ("music-avqa", lambda: _set(music_records(), 1, templ_values='["clarinet"]'), 1, 2, "templ_values"),
    ("music-avqa", lambda: _set(music_records(), 2, templ_values="[oops"), 2, 3, "templ_values"),
    ("sqa3d", lambda: _set(sqa3d_records(), 2, answers=[]), 2, 103, "answers"),
    ("sqa3d", lambda: _set(sqa3d_records(), 0, situation=KeyError), 0, 101, "situation"),
    ("sqa3d", lambda: _set(sqa3d_records(), 4, scene_id=KeyError), 4, 105, "scene_id"),
    ("synthetic", lambda: _set(synthetic_records(), 2, type="smell"), 2, "clip00000-nearer", "type"),
    ("synthetic", lambda: _set(synthetic_records(), 1, answer="right!"), 1, "clip00000-motion", "options"),
]


@pytest.mark.parametrize("dataset,records,index,item_id,field", BAD,
                         ids=[f"{b[0]}-{b[4]}-{n}" for n, b in enumerate(BAD)])
def test_bad_annotations_name_the_item_and_field(tmp_path, dataset, records, index, item_id, field):
    path = write(tmp_path, "bad.json", records())
    with pytest.raises(AnnotationError) as err:
        load_annotations(dataset, path)
    message = str(err.value)
    assert str(path) in message and f"item {index} (id {item_id!r})" in message and f"field {field!r}" in message
    assert (err.value.index, err.value.item_id, err.value.field) == (index, item_id, field)


def test_bad_annotation_files(tmp_path):
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        load_annotations("nextqa", write(tmp_path, "dict.json", {"qid": "CW_1_0"}))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(AnnotationError, match="broken.json: not JSON"):
        load_annotations("sqa3d", tmp_path / "broken.json")
    with pytest.raises(AnnotationError, match=r"item 1: expected a JSON object"):
        load_annotations("music-avqa", write(tmp_path, "x.json", [music_records()[0], "oops"]))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_annotations("msrvtt", tmp_path / "x.json")


# --- metrics through the runner --------------------------------------------------------------------------------

def test_nextqa_metrics(tmp_path):
    result = evaluate(load(tmp_path, "nextqa"), fake_answer, tmp_path / "p.jsonl", progress=False)
    m = result["metrics"]
    assert {k: m[k] for k in ("correct", "total", "accuracy", "errors")} == {
        "correct": 6, "total": 9, "accuracy": _pct(6, 9), "errors": 0}
    assert m["per_group"] == {"Causal": _cell(2, 3), "Temporal": _cell(2, 3), "Descriptive": _cell(2, 3)}
    assert m["per_type"] == {"CW": _cell(2, 2), "CH": _cell(0, 1), "TC": _cell(1, 1), "TN": _cell(1, 1),
                             "TP": _cell(0, 1), "DC": _cell(1, 1), "DL": _cell(0, 1), "DO": _cell(1, 1)}
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"]) for r in lines] == [(q, v[2]) for q, v in NEXTQA.items()]
    assert lines[0]["info"] == {"latency_ms": 1.0} and lines[0]["answer"] == "A"
    assert "| **Causal** | 2 | 3 | 66.67 |" in result["table"]
    assert "| &nbsp;&nbsp;CW (why) | 2 | 2 | 100.00 |" in result["table"]


def test_music_avqa_metrics(tmp_path):
    m = evaluate(load(tmp_path, "music-avqa"), fake_answer, tmp_path / "p.jsonl", progress=False)["metrics"]
    assert (m["correct"], m["total"], m["accuracy"]) == (5, 9, _pct(5, 9))
    assert m["strict"] == _cell(4, 9)  # "guitar" for "acoustic guitar" only counts by CREMA's substring rule
    assert m["per_group"] == {"Audio": _cell(1, 2), "Visual": _cell(1, 2), "Audio-Visual": _cell(3, 5)}
    assert m["per_type"] == {
        "Audio/Counting": _cell(1, 1), "Audio/Comparative": _cell(0, 1), "Visual/Counting": _cell(1, 1),
        "Visual/Location": _cell(0, 1), "Audio-Visual/Existential": _cell(1, 1), "Audio-Visual/Counting": _cell(1, 1),
        "Audio-Visual/Location": _cell(1, 1), "Audio-Visual/Comparative": _cell(0, 1),
        "Audio-Visual/Temporal": _cell(0, 1)}


def test_sqa3d_metrics(tmp_path):
    m = evaluate(load(tmp_path, "sqa3d"), fake_answer, tmp_path / "p.jsonl", progress=False)["metrics"]
    assert (m["correct"], m["total"], m["accuracy"]) == (4, 6, _pct(4, 6))
    assert m["strict"] == _cell(3, 6)
    assert m["per_type"] == {"What": _cell(1, 1), "How": _cell(1, 1), "Can": _cell(0, 1), "Is": _cell(0, 1),
                             "Which": _cell(1, 1), "Other": _cell(1, 1)}
    assert "per_group" not in m


def test_synthetic_metrics_and_missing_media(tmp_path):
    """clip00001 has no folder: its three items get error lines naming the path, the run goes on; a ValueError
    from the answer function is one more error line; unanswered items count as wrong."""
    root = tmp_path / "media"
    (root / "clip00000").mkdir(parents=True)
    (root / "clip00000" / "clip.mp4").write_bytes(b"\0")
    asked = []

    def answer(item):
        asked.append(item.id)
        if item.id == "clip00000-nearer":
            raise ValueError("clip.mp4: cannot decode")
        return fake_answer(item)

    result = evaluate(load(tmp_path, "synthetic"), answer, tmp_path / "p.jsonl", progress=False, media_root=root)
    assert asked == ["clip00000-colour", "clip00000-motion", "clip00000-nearer"]
    m = result["metrics"]
    assert (m["correct"], m["total"], m["accuracy"], m["errors"]) == (2, 6, _pct(2, 6), 4)
    assert m["answered"] == _cell(2, 2)
    assert m["per_type"]["sound"] == _cell(0, 1) and m["per_type"]["motion"] == _cell(1, 1)
    assert result["counts"] == {"items": 6, "resumed": 0, "asked": 6, "errors": 4, "errors_now": 4,
                                "ignored_lines": 0}
    errors = {e["id"]: e for e in result["errors"]}
    assert errors["clip00000-nearer"] == {"id": "clip00000-nearer", "error_type": "ValueError",
                                          "error": "clip.mp4: cannot decode"}
    missing = errors["clip00001-sound"]
    assert missing["error_type"] == "MissingMedia" and str(root / "clip00001" / "clip.mp4") in missing["error"]
    assert "4 unanswered" in result["summary"] and "counted as wrong" in result["summary"]
    assert len(read_predictions(tmp_path / "p.jsonl")) == 6
    # a rerun asks nothing; retry_errors asks the failed ones again once their media is there
    assert evaluate(load(tmp_path, "synthetic"), answer, tmp_path / "p.jsonl", progress=False,
                    media_root=root)["counts"]["asked"] == 0
    (root / "clip00001").mkdir()
    (root / "clip00001" / "clip.mp4").write_bytes(b"\0")
    again = evaluate(load(tmp_path, "synthetic"), fake_answer, tmp_path / "p.jsonl", progress=False,
                     media_root=root, retry_errors=True)
    assert again["counts"]["asked"] == 4 and again["metrics"]["correct"] == 5


def test_resume_after_interrupt_and_torn_line(tmp_path):
    items = load(tmp_path, "nextqa")
    reference = evaluate(items, fake_answer, tmp_path / "whole.jsonl", progress=False)
    answered: Counter = Counter()
    calls = {"n": 0}

    def flaky(item):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        answered[item.id] += 1
        return fake_answer(item)

    path = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(items, flaky, path, progress=False)
    assert len(path.read_text().splitlines()) == 4
    with open(path, "ab") as f:  # a crash in the middle of writing the next line
        f.write(b'{"id": "TC_1003_0", "dataset": "nex')
    result = evaluate(items, flaky, path, progress=False)
    assert answered == Counter({qid: 1 for qid in NEXTQA})
    assert result["counts"] == {"items": 9, "resumed": 4, "asked": 5, "errors": 0, "errors_now": 0,
                                "ignored_lines": 0}
    assert result["metrics"] == reference["metrics"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(NEXTQA)
    assert evaluate(items, flaky, path, progress=False)["counts"]["asked"] == 0


def test_progress_bar_on_stderr(tmp_path, capsys):
    evaluate(load(tmp_path, "sqa3d"), fake_answer, tmp_path / "p.jsonl", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "6/6" in err


def test_runner_refuses_mixed_input(tmp_path):
    nextqa, sqa3d = load(tmp_path, "nextqa"), load(tmp_path, "sqa3d")
    with pytest.raises(ValueError, match="several datasets"):
        evaluate(nextqa + sqa3d, fake_answer, tmp_path / "p.jsonl", progress=False)
    with pytest.raises(ValueError, match="duplicate item id"):
        evaluate(nextqa + nextqa[:1], fake_answer, tmp_path / "p.jsonl", progress=False)
    with pytest.raises(TypeError, match="prediction"):
        evaluate(nextqa, lambda item: "A", tmp_path / "p.jsonl", progress=False)
    evaluate(nextqa, fake_answer, tmp_path / "q.jsonl", progress=False)
    clash = [dataclasses.replace(i, dataset="synthetic") for i in nextqa]
    with pytest.raises(ValueError, match="recorded for dataset 'nextqa'"):
        evaluate(clash, fake_answer, tmp_path / "q.jsonl", progress=False)


def test_compute_metrics_without_answers(tmp_path):
    items = load(tmp_path, "sqa3d")
    m = compute_metrics(items, {"101": "table"})
    assert (m["correct"], m["errors"], m["answered"]) == (1, 5, _cell(1, 1))
    assert "5 unanswered" in metrics_markdown(m)


# --- media -----------------------------------------------------------------------------------------------------

def test_media_layouts(tmp_path):
    root = tmp_path / "frames"
    nextqa = load(tmp_path, "nextqa")
    with pytest.raises(MissingMedia) as err:
        resolve_media(nextqa[0], root)
    assert str(root / "0000/1001.mp4") in str(err.value) and str(root / "0000/1001") in str(err.value)
    assert err.value.path == root / "0000/1001.mp4"
    (root / "0000" / "1001").mkdir(parents=True)
    (root / "0000" / "1001" / "000001.jpg").write_bytes(b"\xff")  # CREMA's frame folder
    depth = Path(f"{root}_depth") / "0000" / "1001"
    depth.mkdir(parents=True)
    (depth / "000001.png").write_bytes(b"\x89")
    assert resolve_media(nextqa[0], root) == {"video": root / "0000" / "1001", "depth": depth}
    (root / "0000" / "1002.mp4").write_bytes(b"\0")  # SeViLA's video file
    assert resolve_media(nextqa[2], root) == {"video": root / "0000" / "1002.mp4"}

    music = load(tmp_path, "music-avqa")[0]
    (tmp_path / "avqa").mkdir()
    (tmp_path / "avqa" / "00000001.mp4").write_bytes(b"\0")
    assert resolve_media(music, tmp_path / "avqa") == {"video": tmp_path / "avqa" / "00000001.mp4",
                                                       "audio": tmp_path / "avqa" / "00000001.mp4"}

    sqa = load(tmp_path, "sqa3d")
    scenes = tmp_path / "scannet"
    with pytest.raises(MissingMedia, match="no pc"):
        resolve_media(sqa[0], scenes)
    (scenes / "pc").mkdir(parents=True)
    np.savez(scenes / "pc" / "scene0101_00.npz", feat=np.zeros((4, 8), np.float32), coords=np.zeros((4, 3), np.int64))
    assert resolve_media(sqa[0], scenes) == {"pc": scenes / "pc" / "scene0101_00.npz"}
    feat, coords = load_points(scenes / "pc" / "scene0101_00.npz")
    assert feat.shape == (4, 8) and coords.shape == (4, 3)
    for d, name in (("voxelized_features_sam_nonzero_preprocess", "scene0102_00.pt"),
                    ("voxelized_voxels_sam_nonzero_preprocess", "scene0102_00.npy")):
        (scenes / d).mkdir(exist_ok=True)
        (scenes / d / name).write_bytes(b"\0")
    found = resolve_media(sqa[1], scenes)
    assert found["pc_feat"].name == "scene0102_00.pt" and found["pc_coords"].name == "scene0102_00.npy"
    with pytest.raises(ValueError, match="no .* media"):
        resolve_media(sqa[0], scenes, required=("audio",))


def test_load_points_rejects_bad_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", feat=np.zeros((4, 8), np.float32), coords=np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"feat \[N, D\] and coords \[N, 3\]"):
        load_points(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", feat=np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="expected arrays 'feat' and 'coords'"):
        load_points(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_points(tmp_path / "c.npz")
    with pytest.raises(MissingMedia):
        load_points(tmp_path / "d.npz")

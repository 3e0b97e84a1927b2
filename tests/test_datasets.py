"""runtime/datasets.py against CREMA's source (github.com/Yui010206/CREMA, commit a76043b): every
expected string or number below is quoted from the file and line named in its comment."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime.datasets import (CREMA_COMMIT, DATASETS, DatasetError, DatasetPreset, blip_question, crema_points,
                              dataset_preset, music_avqa_audio_prompt, music_avqa_prompt, music_avqa_question,
                              nextqa_answer, nextqa_prompt, sqa3d_3d_prompt, sqa3d_prompt)

OPTIONS = ["the boy fell", "to get food", "he is sad", "playing", "the dog barked"]


def test_commit():
    assert CREMA_COMMIT.startswith("a76043b")


# --- blip_question: lavis/processors/blip_processors.py l.128-141 ------------------------------------

@pytest.mark.parametrize("raw, expected", [
    # l.129-133: lowercase, then delete . ! " ( ) * # : ; ~ with nothing in their place
    ('What\'s the Man (in red) "doing"?!', "what's the man in red doing?"),
    ("A.B*C#D:E;F~G", "abcdefg"),
    # kept: ? , ' - < > and leading whitespace; l.134 strips trailing spaces only (not newlines)
    ("  Is it left, or right-ish? <x>  ", "  is it left, or right-ish? <x>"),
    ("why?\n", "why?\n"),
    ("Where.  ", "where"),
    ("", ""),
])
def test_blip_question_text(raw, expected):
    assert blip_question(raw) == expected


def test_blip_question_word_limit():
    # l.137-139: split on " ", keep the first max_words joined by " "; the class default is 50 (l.113, l.124)
    words = [f"w{i}" for i in range(60)]
    assert blip_question(" ".join(words)) == " ".join(words[:50])
    assert blip_question(" ".join(words[:50])) == " ".join(words[:50])
    assert blip_question("One two three four", max_words=2) == "one two"
    # runs of spaces are empty words and count towards the limit
    assert blip_question("a  b c", max_words=2) == "a "
    # punctuation is deleted before the split: "x . y" -> "x  y" -> ["x", "", "y"]
    assert blip_question("x . y", max_words=2) == "x "


def test_blip_question_errors():
    with pytest.raises(DatasetError, match="text"):
        blip_question(None)
    with pytest.raises(DatasetError, match="max_words"):
        blip_question("hi", max_words=0)


# --- NExT-QA: lavis/datasets/datasets/rgbd_vqa_datasets.py l.28, l.61-68 ----------------------------

def test_nextqa_prompt():
    # l.61 'Question: ' + q (no text_processor); l.64 ' Option {}: '.format(ANS_MAPPING[j]) + a; l.66 the suffix
    assert nextqa_prompt("Why did the boy cry?", OPTIONS) == (
        "Question: Why did the boy cry? Option A: the boy fell Option B: to get food Option C: he is sad "
        "Option D: playing Option E: the dog barked Considering the information presented in the frame, "
        "select the correct answer from the options.")


def test_nextqa_answer():
    # l.68: answers = 'Option ' + ANS_MAPPING[int(ann['answer'])]; l.28 ANS_MAPPING = {0:'A', ..., 4:'E'}
    assert [nextqa_answer(i) for i in range(5)] == ["Option A", "Option B", "Option C", "Option D", "Option E"]
    assert DATASETS["nextqa"].answers == ("Option A", "Option B", "Option C", "Option D", "Option E")
    for bad in (5, -1, True, "A"):
        with pytest.raises(DatasetError, match="answer"):
            nextqa_answer(bad)


@pytest.mark.parametrize("options", [OPTIONS[:4], OPTIONS + ["sixth"], [], "ABCDE"])
def test_nextqa_option_count(options):
    with pytest.raises(DatasetError, match="options"):
        nextqa_prompt("why?", options)


def test_nextqa_bad_fields():
    with pytest.raises(DatasetError, match=r"options\[2\]"):
        nextqa_prompt("why?", OPTIONS[:2] + [None] + OPTIONS[3:])
    with pytest.raises(DatasetError, match="question"):
        nextqa_prompt("  ", OPTIONS)


# --- MUSIC-AVQA: lavis/datasets/datasets/music_avqa_datasets.py l.108-128 ----------------------------

AV_SUFFIX = " Based on the frames and audio information, answer the question using a single word or phase."  # l.116


def test_music_avqa_prompt():
    # l.110 ast.literal_eval(templ_values); l.111 re.findall(r'<(.*?)>'); l.113 replace; l.116 text_processor
    assert music_avqa_prompt("Where is the <FL> sounding instrument?", '["first"]') == (
        "Question: where is the first sounding instrument? Based on the frames and audio information, "
        "answer the question using a single word or phase.")
    # the filled value goes through blip_question too (lowercased); a list is taken as is
    assert music_avqa_prompt("Is the <Object1> louder than the <Object2>?", ["Cello", "Piano"]) == (
        "Question: is the cello louder than the piano?" + AV_SUFFIX)


def test_music_avqa_repeated_placeholder():
    # l.112-113: zip(matches, values) and str.replace of *every* occurrence: the first value fills both
    question = "Are there <Object> and <Object> instruments in the video?"
    assert music_avqa_question(question, '["piano", "ukulele"]') == "Are there piano and piano instruments in the video?"
    assert music_avqa_prompt(question, '["piano", "ukulele"]') == (
        "Question: are there piano and piano instruments in the video?" + AV_SUFFIX)


def test_music_avqa_without_values():
    # l.108 len(templ_values) != 0 else l.115 the question as is; MUSIC-AVQA records hold "[]"
    for values in ("", "[]", []):
        assert music_avqa_prompt("How many instruments are sounding?", values) == (
            "Question: how many instruments are sounding?" + AV_SUFFIX)


@pytest.mark.parametrize("template, values", [
    ("Is the <Object> louder than the <Object>?", '["cello"]'),
    ("Is the <Object> playing?", ""),
])
def test_music_avqa_too_few_values(template, values):
    with pytest.raises(DatasetError, match="templ_values: .* placeholders"):
        music_avqa_prompt(template, values)


def test_music_avqa_surplus_values_are_ignored_as_cremas_zip_ignores_them():
    # music_avqa_datasets.py l.111-113: for k, v in zip(matches, templ_values): question.replace(...)
    assert music_avqa_question("Is the <Object> playing?", '["cello", "piano"]') == "Is the cello playing?"
    assert music_avqa_question("How many instruments?", '["cello"]') == "How many instruments?"


def test_music_avqa_bad_values():
    with pytest.raises(DatasetError, match="templ_values"):
        music_avqa_prompt("Is the <Object> playing?", "cello")
    with pytest.raises(DatasetError, match="templ_values"):
        music_avqa_prompt("Is the <Object> playing?", '{"a": 1}')
    with pytest.raises(DatasetError, match=r"templ_values\[0\]"):
        music_avqa_prompt("Is the <Object> playing?", "[3]")
    with pytest.raises(DatasetError, match="question_template"):
        music_avqa_prompt(None, "[]")


def test_music_avqa_audio_prompt():
    # l.128: the audio pre-training records' prompt (chosen by an 'id' key at l.106, not by modality)
    assert music_avqa_audio_prompt("What is the Sound?") == (
        "Question: what is the sound? Based on the audio information, answer the question using a single word "
        "or phase.")


# --- SQA3D: lavis/datasets/datasets/threedvqa_datasets.py l.93, l.218, l.225 -------------------------

def test_sqa3d_prompt():
    # l.218: text_processor(situation) + '. Question: ' + text_processor(question) + suffix
    assert sqa3d_prompt("I am facing the window.", "What is on my left?") == (
        "i am facing the window. Question: what is on my left? Based on the frames and 3D Model information, "
        "answer the question using a single word or phase.")


def test_sqa3d_3d_prompt():
    # l.225 (eval dataset, records without question_id): 'Question: ' + text_processor(q) + suffix
    assert sqa3d_3d_prompt("Where is the Chair?") == (
        "Question: where is the chair? Based on 3D Model information, answer the question using a single word "
        "or phase.")


def test_sqa3d_missing_fields():
    with pytest.raises(DatasetError, match="situation"):
        sqa3d_prompt(None, "What is on my left?")
    with pytest.raises(DatasetError, match="question"):
        sqa3d_prompt("I am sitting.", "")


# --- presets ------------------------------------------------------------------------------------------

def test_presets():
    nextqa, avqa, sqa = DATASETS["nextqa"], DATASETS["music-avqa"], DATASETS["sqa3d"]
    # all eval yamls: n_frms 4 and model.frame_num 4; crema.py l.201: self.max_txt_len = 77
    assert {p.frame_num for p in DATASETS.values()} == {4}
    assert {p.max_txt_len for p in DATASETS.values()} == {77}
    # crema.py l.706 mcqa generates with num_beams=1; l.507 generate's default max_length=30 -> max_new_tokens
    assert (nextqa.downstream_task, nextqa.num_beams, nextqa.max_new_tokens, nextqa.min_length) == ("mcqa", 1, 30, 1)
    assert nextqa.modalities == ("rgb",)  # configs/datasets/nextqa/defaults_qa.yaml l.10; crema.py l.824
    assert nextqa.question_max_words is None  # rgbd_vqa_datasets.py l.61: no text_processor
    # music_avqa_eval.yaml l.86-89: max_len 10, min_len 1, num_beams 5, length_penalty -1.
    assert (avqa.downstream_task, avqa.num_beams, avqa.max_new_tokens, avqa.min_length, avqa.length_penalty) == (
        "oeqa", 5, 10, 1, -1.0)
    assert avqa.modalities == ("rgb", "audio")  # music_avqa_eval.yaml l.25 data_type: [video, audio]
    # sqa3d_eval.yaml l.84-86: max_len 40, min_len 1, num_beams 5; crema.py l.747 length_penalty=-1
    assert (sqa.downstream_task, sqa.num_beams, sqa.max_new_tokens, sqa.min_length, sqa.length_penalty) == (
        "oeqa", 5, 40, 1, -1.0)
    assert sqa.modalities == ("rgb", "pc")  # sqa3d_eval.yaml l.20 data_type: [video, pc]
    # blip_processors.py l.124: max_words default 50 (the eval yamls of music-avqa and sqa3d set none)
    assert avqa.question_max_words == sqa.question_max_words == 50


def test_preset_build_prompt():
    assert dataset_preset("nextqa").build_prompt({"question": "Why?", "options": OPTIONS}) == nextqa_prompt("Why?", OPTIONS)
    assert dataset_preset("music-avqa").build_prompt(
        {"question_template": "Is the <Object> playing?", "templ_values": '["cello"]'}) == (
        "Question: is the cello playing?" + AV_SUFFIX)
    assert dataset_preset("sqa3d").build_prompt({"situation": "I sit.", "question": "What is ahead?"}) == (
        "i sit. Question: what is ahead? Based on the frames and 3D Model information, answer the question using "
        "a single word or phase.")
    with pytest.raises(DatasetError, match="sqa3d: missing field situation"):
        dataset_preset("sqa3d").build_prompt({"question": "What is ahead?"})
    with pytest.raises(DatasetError, match="nextqa: missing fields question, options"):
        dataset_preset("nextqa").build_prompt({})
    with pytest.raises(DatasetError, match="unknown field video_id"):
        dataset_preset("nextqa").build_prompt({"question": "Why?", "options": OPTIONS, "video_id": 3})


def test_preset_as_dict_and_frozen():
    d = json.loads(json.dumps(DATASETS["music-avqa"].as_dict()))
    assert d == {"name": "music-avqa", "prompt_builder": "music_avqa_prompt",
                 "prompt_fields": ["question_template", "templ_values"], "frame_num": 4,
                 "modalities": ["rgb", "audio"], "downstream_task": "oeqa", "num_beams": 5, "max_new_tokens": 10,
                 "min_length": 1, "length_penalty": -1.0, "max_txt_len": 77, "question_max_words": 50,
                 "answers": [], "crema_config": "lavis/projects/crema/eval/music_avqa_eval.yaml"}
    assert json.loads(json.dumps(DATASETS["nextqa"].as_dict()))["answers"][4] == "Option E"
    assert {k: p.as_dict()["prompt_builder"] for k, p in DATASETS.items()} == {
        "nextqa": "nextqa_prompt", "music-avqa": "music_avqa_prompt", "sqa3d": "sqa3d_prompt"}
    assert isinstance(DATASETS["sqa3d"], DatasetPreset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["sqa3d"].num_beams = 3


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown 'msrvtt', expected one of nextqa, music-avqa, sqa3d"):
        dataset_preset("msrvtt")


# --- 3D points: threedvqa_datasets.py l.249-255, crema.py l.554 ---------------------------------------

def _points(n, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.int64)


def test_points_more_than_5000():
    # l.249-252: idxes = torch.sort(torch.randperm(N)[:5000])[1] is an argsort, a permutation of 0..4999:
    # the first 5000 points; their order is irrelevant to the Q-Former, so file order is kept
    feat, coords = _points(6000)
    f, c, m = crema_points(feat, coords)
    assert f.shape == (5000, 8) and c.shape == (5000, 3) and m.shape == (5000,)
    np.testing.assert_array_equal(f, feat[:5000])
    np.testing.assert_array_equal(c, coords[:5000])
    assert m.dtype == np.int64 and (m == 1).all()  # crema.py l.554: atts = torch.ones(...)


def test_points_fewer_are_padded():
    # l.254-255: torch.zeros(5000 - N, 1408) features and torch.zeros(5000 - N, 3) voxels appended;
    # crema.py l.554: the mask is all ones, padding included
    feat, coords = _points(3, d=1408)
    f, c, m = crema_points(feat, coords)
    assert (f.dtype, c.dtype, m.dtype) == (np.float32, np.int64, np.int64)
    np.testing.assert_array_equal(f[:3], feat)
    np.testing.assert_array_equal(c[:3], coords)
    assert not f[3:].any() and not c[3:].any()
    assert f.shape == (5000, 1408) and (m == 1).all() and m.shape == (5000,)


def test_points_exactly_5000():
    # l.249: `> 5000` is false, the else branch appends 0 rows: unchanged
    feat, coords = _points(5000)
    f, c, m = crema_points(feat, coords.astype(np.int32))
    np.testing.assert_array_equal(f, feat)
    np.testing.assert_array_equal(c, coords)
    assert c.dtype == np.int64 and m.sum() == 5000


def test_points_errors():
    feat, coords = _points(10)
    with pytest.raises(DatasetError, match="pc coords: shape"):
        crema_points(feat, coords[:9])
    with pytest.raises(DatasetError, match=r"pc coords: voxel coordinates must lie in \[0, 256\)"):
        crema_points(feat, np.full((10, 3), 256))  # crema.py l.189: a 256-position table
    with pytest.raises(DatasetError, match="pc coords: dtype"):
        crema_points(feat, coords.astype(np.float32))
    with pytest.raises(DatasetError, match="pc feat: shape"):
        crema_points(feat[:, 0], coords)
    with pytest.raises(DatasetError, match="n:"):
        crema_points(feat, coords, n=0)

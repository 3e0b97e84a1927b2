"""CREMA's dataset conventions for NExT-QA, MUSIC-AVQA and SQA3D: question cleaning, prompts, the
generation settings of its evaluation, and the 3D (point) input rule.

Read from CREMA's source (github.com/Yui010206/CREMA, commit a76043b); file:line references are to
that commit. The prompt strings are CREMA's exactly, typos included ("single word or phase").

    preset = dataset_preset("music-avqa")
    prompt = preset.build_prompt({"question_template": "Is the <Object> playing?", "templ_values": '["cello"]'})

Which prompt a sample gets depends on the annotation format, never on the modalities: MUSIC-AVQA's
"audio information" prompt is for audio pre-training records (an `id` key), SQA3D's "3D Model
information" prompt for 3D-LLM pre-training records (no `question_id`). An audio-only or 3D-only
evaluation of MUSIC-AVQA or SQA3D still uses the dataset's main prompt.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

CREMA_COMMIT = "a76043b1d092e1ce57107a871140c330f9e64eb3"

# BlipQuestionProcessor's default, and what every CREMA eval config gets (none sets max_words but NExT-QA,
# whose 50 is unused: its dataset never calls the text processor).
BLIP_MAX_WORDS = 50
_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")  # blip_processors.py l.130
_PLACEHOLDER = re.compile(r"<(.*?)>")  # music_avqa_datasets.py l.111

OPTION_LETTERS = "ABCDE"  # rgbd_vqa_datasets.py l.28 ANS_MAPPING
NEXTQA_SUFFIX = " Considering the information presented in the frame, select the correct answer from the options."
MUSIC_AVQA_SUFFIX = " Based on the frames and audio information, answer the question using a single word or phase."
MUSIC_AVQA_AUDIO_SUFFIX = " Based on the audio information, answer the question using a single word or phase."
SQA3D_SUFFIX = " Based on the frames and 3D Model information, answer the question using a single word or phase."
SQA3D_3D_SUFFIX = " Based on 3D Model information, answer the question using a single word or phase."

PC_POINTS = 5000  # threedvqa_datasets.py l.249
PC_GRID = 256  # crema.py l.189: the 3D positional table has 256 positions per axis


class DatasetError(ValueError):
    """Input a dataset's prompt or 3D rule cannot take; the message names the field."""


# --- text -------------------------------------------------------------------------------------------

def blip_question(text: str, max_words: int = BLIP_MAX_WORDS) -> str:
    """LAVIS BlipQuestionProcessor: lowercase, delete .!"()*#:;~ (no space left in their place), strip
    trailing spaces only, keep the first max_words of a split on single spaces (so runs of spaces count
    as empty words). Leading spaces, `?`, `,` and `'` are kept; "" stays "" as in LAVIS."""
    if not isinstance(text, str):
        raise DatasetError(f"text: expected text, got {type(text).__name__}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise DatasetError(f"max_words: expected a positive integer, got {max_words!r}")
    question = _BLIP_PUNCTUATION.sub("", text.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{field}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{field}: empty")
    return value


# --- prompts ----------------------------------------------------------------------------------------

def nextqa_prompt(question: str, options: Sequence[str]) -> str:
    """NExT-QA (rgbd_vqa_datasets.py l.61-66): question and options as given, no text processing.
    The target is "Option X" (nextqa_answer)."""
    _text(question, "question")
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise DatasetError(f"options: expected a list of {len(OPTION_LETTERS)} answers, got {type(options).__name__}")
    if len(options) != len(OPTION_LETTERS):
        raise DatasetError(f"options: {len(options)} given, NExT-QA has exactly {len(OPTION_LETTERS)} (A-E)")
    prompt = "Question: " + question
    for i, (letter, option) in enumerate(zip(OPTION_LETTERS, options)):
        prompt += f" Option {letter}: " + _text(option, f"options[{i}]")
    return prompt + NEXTQA_SUFFIX


def nextqa_answer(index: int) -> str:
    """The NExT-QA target for answer index 0-4: "Option A" .. "Option E" (rgbd_vqa_datasets.py l.68)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(OPTION_LETTERS):
        raise DatasetError(f"answer: expected an option index 0-{len(OPTION_LETTERS) - 1}, got {index!r}")
    return "Option " + OPTION_LETTERS[index]


def music_avqa_question(question_template: str, templ_values: str | Sequence[str] = "") -> str:
    """A MUSIC-AVQA question with its `<...>` placeholders filled (music_avqa_datasets.py l.108-115).

    templ_values is the record's string (a list literal such as '["cello", "piano"]', read with
    ast.literal_eval as CREMA does) or the list itself; "" means no values. CREMA pairs the placeholder
    occurrences with the values in order and replaces *every* occurrence of each pair's placeholder, so
    "<Object> and <Object>" with ["piano", "ukulele"] becomes "piano and piano" (kept: the model was
    trained on it). Surplus values are ignored, as CREMA's zip ignores them (the annotation files have
    such records); fewer values than placeholders would leave a placeholder in the prompt: refused."""
    _text(question_template, "question_template")
    values = _templ_values(templ_values)
    placeholders = _PLACEHOLDER.findall(question_template)
    if len(values) < len(placeholders):
        raise DatasetError(f"templ_values: {len(values)} values for {len(placeholders)} placeholders "
                           f"{['<' + p + '>' for p in placeholders]} in question_template")
    question = question_template
    for name, value in zip(placeholders, values):
        question = question.replace("<" + name + ">", value)
    return question


def _templ_values(templ_values) -> list[str]:
    if isinstance(templ_values, str):
        if not templ_values:  # CREMA l.108: an empty string fills nothing
            return []
        try:
            templ_values = ast.literal_eval(templ_values)
        except (ValueError, SyntaxError):
            raise DatasetError(f"templ_values: {templ_values!r} is not a list literal such as '[\"cello\"]'") from None
    if not isinstance(templ_values, (list, tuple)):
        raise DatasetError(f"templ_values: expected a list of strings, got {type(templ_values).__name__}")
    for i, value in enumerate(templ_values):
        if not isinstance(value, str):
            raise DatasetError(f"templ_values[{i}]: expected text, got {type(value).__name__}")
    return list(templ_values)


def music_avqa_prompt(question_template: str, templ_values: str | Sequence[str] = "") -> str:
    """MUSIC-AVQA (music_avqa_datasets.py l.116): the filled question through blip_question, for every
    modality combination (audio-only evaluation included)."""
    return "Question: " + blip_question(music_avqa_question(question_template, templ_values)) + MUSIC_AVQA_SUFFIX


def music_avqa_audio_prompt(question: str) -> str:
    """CREMA's prompt for audio pre-training records (music_avqa_datasets.py l.128; chosen by an `id`
    key in the record, not by the modalities): no template, the question through blip_question."""
    _text(question, "question")
    return "Question: " + blip_question(question) + MUSIC_AVQA_AUDIO_SUFFIX


def sqa3d_prompt(situation: str, question: str) -> str:
    """SQA3D (threedvqa_datasets.py l.218, the eval dataset; l.93 is the same): situation and question each
    through blip_question, which drops the situation's final period before ". Question: " is added."""
    _text(situation, "situation")
    _text(question, "question")
    return blip_question(situation) + ". Question: " + blip_question(question) + SQA3D_SUFFIX


def sqa3d_3d_prompt(question: str) -> str:
    """CREMA's prompt for 3D-LLM pre-training records without a situation (threedvqa_datasets.py l.225, eval
    dataset; the training dataset's l.99 ends "answer the question." instead)."""
    _text(question, "question")
    return "Question: " + blip_question(question) + SQA3D_3D_SUFFIX


# --- presets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetPreset:
    """How CREMA evaluates one dataset. Generation fields are named as reference.config's
    GenerationConfig; max_new_tokens is CREMA's max_len (crema.py passes it as max_new_tokens)."""

    name: str
    prompt_builder: Callable[..., str]
    prompt_fields: tuple[str, ...]  # the builder's keyword arguments; all required
    frame_num: int
    modalities: tuple[str, ...]  # CREMA modality names, from the eval config's data_type
    downstream_task: str  # "mcqa": score option letters; "oeqa": beam-search an answer
    num_beams: int
    max_new_tokens: int
    min_length: int
    length_penalty: float
    max_txt_len: int = 77  # crema.py l.201 hard-codes it, whatever the config says
    question_max_words: int | None = BLIP_MAX_WORDS  # blip_question's limit; None: no text processing
    answers: tuple[str, ...] = ()  # mcqa targets, in answer-index order
    crema_config: str = ""

    def build_prompt(self, fields: Mapping[str, object]) -> str:
        """The prompt for one sample; `fields` must hold exactly prompt_fields."""
        if not isinstance(fields, Mapping):
            raise DatasetError(f"{self.name}: expected a mapping of {list(self.prompt_fields)}, "
                               f"got {type(fields).__name__}")
        missing = [f for f in self.prompt_fields if f not in fields]
        if missing:
            raise DatasetError(f"{self.name}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                               f"(expected {', '.join(self.prompt_fields)})")
        extra = sorted(set(fields) - set(self.prompt_fields), key=str)
        if extra:
            raise DatasetError(f"{self.name}: unknown field{'s' if len(extra) > 1 else ''} "
                               f"{', '.join(map(str, extra))} (expected {', '.join(self.prompt_fields)})")
        return self.prompt_builder(**{f: fields[f] for f in self.prompt_fields})

    def request_options(self) -> dict:
        """The generation options a request carries to be answered as CREMA's evaluation answers."""
        return {"task": self.downstream_task, "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}

    def as_dict(self) -> dict:
        """JSON-ready: the builder by its function name, tuples as lists."""
        return {"name": self.name, "prompt_builder": self.prompt_builder.__name__,
                "prompt_fields": list(self.prompt_fields), "frame_num": self.frame_num,
                "modalities": list(self.modalities), "downstream_task": self.downstream_task,
                "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "min_length": self.min_length,
                "length_penalty": self.length_penalty, "max_txt_len": self.max_txt_len,
                "question_max_words": self.question_max_words, "answers": list(self.answers),
                "crema_config": self.crema_config}


DATASETS: dict[str, DatasetPreset] = {
    # Task videoqa calls model.generate(samples) with its defaults (vqa.py l.340; crema.py l.507-509), so
    # the yaml's num_beams/max_len/min_len are unread. mcqa is crema.py's default (l.59, l.825) and the only
    # mode the videoqa metric can score (vqa.py l.368, l.410: an option index); nextqa_eval.yaml l.17 says
    # oeqa, which would score 0. mcqa: greedy (num_beams=1, l.706), argmax of the second step's logits
    # over the letter ids (l.712-716). Modalities: defaults_qa.yaml l.10, crema.py l.824.
    "nextqa": DatasetPreset(
        name="nextqa", prompt_builder=nextqa_prompt, prompt_fields=("question", "options"),
        frame_num=4, modalities=("rgb",), downstream_task="mcqa",
        num_beams=1, max_new_tokens=30, min_length=1, length_penalty=1.0,
        question_max_words=None, answers=tuple("Option " + c for c in OPTION_LETTERS),
        crema_config="lavis/projects/crema/eval/nextqa_eval.yaml"),
    # Task gqa (music_avqa_eval.yaml l.78, l.86-90): predict_answers(num_beams=5, max_len=10, min_len=1);
    # length_penalty is not passed, predict_answers' default -1 (crema.py l.747) equals the yaml's -1.
    # Modalities: the eval yaml's data_type [video, audio] (l.25). CREMA's zero-shot script runs them as
    # "audio_rgb-skip" (run_scripts/crema/inference/music_avqa.sh l.25): -skip is a checkpoint choice.
    "music-avqa": DatasetPreset(
        name="music-avqa", prompt_builder=music_avqa_prompt, prompt_fields=("question_template", "templ_values"),
        frame_num=4, modalities=("rgb", "audio"), downstream_task="oeqa",
        num_beams=5, max_new_tokens=10, min_length=1, length_penalty=-1.0,
        crema_config="lavis/projects/crema/eval/music_avqa_eval.yaml"),
    # Task sqa3d (sqa3d_eval.yaml l.70, l.84-86); length_penalty: predict_answers' default -1 (crema.py
    # l.747). Modalities: the eval yaml's data_type [video, pc] (l.20); run_scripts/crema/inference/sqa3d.sh
    # l.15 runs "pc_rgb".
    "sqa3d": DatasetPreset(
        name="sqa3d", prompt_builder=sqa3d_prompt, prompt_fields=("situation", "question"),
        frame_num=4, modalities=("rgb", "pc"), downstream_task="oeqa",
        num_beams=5, max_new_tokens=40, min_length=1, length_penalty=-1.0,
        crema_config="lavis/projects/crema/eval/sqa3d_eval.yaml"),
}


def dataset_preset(name: str) -> DatasetPreset:
    """The preset called `name`; a DatasetError lists the known names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DatasetError(f"dataset: unknown {name!r}, expected one of {', '.join(DATASETS)}") from None


# --- 3D input ---------------------------------------------------------------------------------------

def crema_points(feat: np.ndarray, coords: np.ndarray, n: int = PC_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CREMA's point input (threedvqa_datasets.py l.249-255): feat [N, D], coords [N, 3] voxels in
    [0, 256) -> feat [n, D] float32, coords [n, 3] int64, mask [n] int64.

    More than n points: CREMA keeps `idxes = torch.sort(torch.randperm(N)[:n])[1]`, the *argsort* of the
    random draw, i.e. points 0..n-1 in a random order, not a random subset. The Q-Former's cross-attention
    does not depend on the order, so the first n points are kept in file order here. n or fewer: zero
    features at voxel (0, 0, 0) pad to n (CREMA pads 1408 zeros; D is kept here). The mask is all ones:
    CREMA attends to padding (crema.py l.254 and l.554, `torch.ones`), and a padded row reaches the Q-Former
    as 0.01 x the position encoding of voxel (0, 0, 0), not as zeros."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DatasetError(f"n: expected a positive number of points, got {n!r}")
    feat, coords = np.asarray(feat), np.asarray(coords)
    if feat.ndim != 2 or feat.shape[1] == 0:
        raise DatasetError(f"pc feat: shape {feat.shape}, expected [N, D] with D > 0")
    if not (np.issubdtype(feat.dtype, np.floating) or np.issubdtype(feat.dtype, np.integer)):
        raise DatasetError(f"pc feat: dtype {feat.dtype}, expected real numbers")
    if coords.shape != (feat.shape[0], 3):
        raise DatasetError(f"pc coords: shape {coords.shape}, expected [{feat.shape[0]}, 3] (one voxel per point)")
    if not np.issubdtype(coords.dtype, np.integer):
        raise DatasetError(f"pc coords: dtype {coords.dtype}, expected integer voxel coordinates")
    if coords.size and (coords.min() < 0 or coords.max() >= PC_GRID):
        raise DatasetError(f"pc coords: voxel coordinates must lie in [0, {PC_GRID}), "
                           f"got {coords.min()}..{coords.max()}")
    kept = min(feat.shape[0], n)
    out_feat = np.zeros((n, feat.shape[1]), dtype=np.float32)
    out_coords = np.zeros((n, 3), dtype=np.int64)
    out_feat[:kept], out_coords[:kept] = feat[:kept], coords[:kept]
    return out_feat, out_coords, np.ones(n, dtype=np.int64)


def structured_prompt(dataset: str | None, question: str, options: Sequence[str] | None = None,
                      situation: str | None = None, templ_values: str | Sequence[str] | None = None) -> str:
    """The prompt for a request that carries a dataset's structured fields (CLI flags, Triton inputs):
    nextqa: question + options; music-avqa: question (the template) + templ_values; sqa3d: situation +
    question. A field the dataset does not take, or any field without a dataset, is a DatasetError."""
    given = {k: v for k, v in (("options", options), ("situation", situation), ("templ_values", templ_values))
             if v is not None}
    if dataset is None:
        raise DatasetError(f"{', '.join(given) or 'structured fields'}: these need a dataset's conventions "
                           f"(export with --dataset {'|'.join(DATASETS)}, or ask with --dataset)")
    preset = dataset_preset(dataset)
    takes = set(preset.prompt_fields) - {"question", "question_template"}  # the question fills those
    extra = sorted(set(given) - takes)
    if extra:
        raise DatasetError(f"{', '.join(extra)}: {dataset} takes {', '.join(sorted(takes))} besides the question")
    if "situation" in takes and situation is None:
        raise DatasetError("situation: sqa3d prompts begin with the situation; it is missing")
    fields = {"question": question, "question_template": question, "options": [], "templ_values": "", **given}
    return preset.build_prompt({f: fields[f] for f in preset.prompt_fields})

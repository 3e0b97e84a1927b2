"""Question text for the runtime: cleaning at the boundary, and CREMA's HF-tokenizer semantics with
`tokenizers` only.

`clean_question` is what every entry point (CLI, Triton) applies to a raw question: strict UTF-8,
whitespace collapsed. Tokenization has the same behaviour as reference/tokenizer.py (parity tests
check it): whitespace is collapsed there too, questions get </s> appended and are padded to the
longest in the batch. A question longer than the exported maximum (max_txt_len, EOS included) is cut
to its first max_txt_len - 1 tokens + EOS, as CREMA's tokenizer call (`truncation=True,
max_length=max_txt_len`) cuts it; `lengths` tells callers how long it was, so answers can say so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

EOS_ID, PAD_ID = 1, 0


class QuestionError(ValueError):
    """A question that cannot be asked (invalid UTF-8, empty); the message names the field."""


def normalize_whitespace(text: str) -> str:
    """Any run of whitespace (newlines, tabs, repeated spaces) -> one space; ends stripped. A line
    break inside a question is layout, not content: the model never saw one in training."""
    return " ".join(text.split())


def clean_question(raw: str | bytes) -> str:
    """A raw question (bytes off the wire, or a str from argv) -> the text the model reads.

    Bytes must be strict UTF-8; a str must not hold lone surrogates (argv carries undecodable bytes
    as surrogate escapes). Either is refused naming the offset, as is an empty question."""
    if isinstance(raw, str):
        raw = _argv_bytes(raw)
    elif not isinstance(raw, (bytes, bytearray, memoryview)):
        raise QuestionError(f"question: expected text, got {type(raw).__name__}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuestionError(f"question: not valid UTF-8 at byte {e.start} ({e.reason})") from None
    text = normalize_whitespace(text)
    if not text:
        raise QuestionError("question: empty (an empty question has no answer)")
    return text


def _argv_bytes(text: str) -> bytes:
    """A str back to the bytes it came from; surrogate escapes become the bytes they stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:  # a surrogate that escapes no byte (e.g. from a JSON "\ud800")
        raise QuestionError(f"question: not valid UTF-8 at character {e.start} (lone surrogate "
                            f"{text[e.start]!r})") from None


class QuestionTokenizer:
    def __init__(self, path: str | Path, max_len: int):
        self.tok = Tokenizer.from_file(str(path))
        self.max_len = max_len

    def _ids(self, questions: list[str]) -> list[list[int]]:
        texts = [normalize_whitespace(q) for q in questions]
        return [enc.ids for enc in self.tok.encode_batch(texts, add_special_tokens=False)]

    def lengths(self, questions: list[str]) -> list[int]:
        """Each question's tokens with </s>, before any cut."""
        return [len(ids) + 1 for ids in self._ids(questions)]

    def token_counts(self, questions: list[str]) -> list[tuple[int, int]]:
        """(read, given) per question: given > read when it is cut to max_len."""
        return [(min(n, self.max_len), n) for n in self.lengths(questions)]

    def encode(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> question_ids, question_mask: [B, L] int64, L = longest question + </s>, at most max_len."""
        rows = [ids[: self.max_len - 1] + [EOS_ID] for ids in self._ids(questions)]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return ids, mask

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

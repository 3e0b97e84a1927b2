"""Question tokenization for the runtime: CREMA's HF-tokenizer semantics with `tokenizers` only.

Same behaviour as reference/tokenizer.py (parity tests check it): questions get </s> appended and
are padded to the longest in the batch. Unlike CREMA, a question longer than the exported maximum
is refused rather than silently cut.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

EOS_ID, PAD_ID = 1, 0


class QuestionTooLong(ValueError):
    pass


class QuestionTokenizer:
    def __init__(self, path: str | Path, max_len: int):
        self.tok = Tokenizer.from_file(str(path))
        self.max_len = max_len

    def encode(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> question_ids, question_mask: [B, L] int64, L = longest question + </s>."""
        rows = []
        for i, enc in enumerate(self.tok.encode_batch(list(questions), add_special_tokens=False)):
            if len(enc.ids) + 1 > self.max_len:
                raise QuestionTooLong(f"questions[{i}]: {len(enc.ids) + 1} tokens, the exported maximum is "
                                      f"{self.max_len} (max_txt_len)")
            rows.append(enc.ids + [EOS_ID])
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return ids, mask

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

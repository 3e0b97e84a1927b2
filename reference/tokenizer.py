"""T5-style text tokenizer: the real checkpoint's `tokenizer.json`, or one built for the presets.

Both are `tokenizers.Tokenizer` objects saved as `tokenizer.json`, so the torch-free runtime reads
the same file. Special ids follow T5: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
"""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .config import ANSWER_LETTERS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"

# Whole-word pieces of the preset vocabulary: CREMA's prompt words plus everyday QA words.
_WORDS = """
Frame Depth Map Optical Flow Surface Normalization Audio 3D Model Question Answer Options Option
what which who where when why how is are was were the a an of in on at to from with and or not
no yes it this that these those there here do does did can could will would should what's
color colour red green blue yellow orange purple white black gray grey pink brown cyan magenta
shape circle square triangle star ball box cube sphere object objects thing things
left right up down top bottom middle center moving moves move motion direction still static
near nearer far farther closer close front behind first second third last before after during
sound sounds hear heard beep tone high low loud quiet silent music noise voice
surface orientation facing flat tilted wall floor ceiling plane
big small large tiny bigger smaller size many few number count one two three four five six seven
eight nine ten zero man woman person people dog cat car video clip scene frame image picture
doing happen happens happened appear appears begin end start stop turn look looking go going
play playing instrument piano guitar violin drum room chair table bed door window sofa
unanswerable none both all some other another same different
What Which Who Where When Why How Is Are Was Were Do Does Did Can The A An In On
""".split()
_CHARS = string.ascii_letters + string.digits + string.punctuation


def build_preset_tokenizer() -> Tokenizer:
    """A deterministic Unigram tokenizer with T5's conventions (Metaspace, </s> appended)."""
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for letter in ANSWER_LETTERS:  # single pieces, as in T5 ("▁A" ...), for mcqa scoring
        add("▁" + letter, -2.0)
    for digit in string.digits:
        add("▁" + digit, -2.0)
    for word in _WORDS:
        add("▁" + word, -2.0)
    add("▁", -8.0)
    for ch in _CHARS:
        add(ch, -10.0)
        add("▁" + ch, -10.0)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    tok.add_special_tokens([PAD, EOS, UNK])
    return tok


def normalize_whitespace(text: str) -> str:
    """Any run of whitespace (newlines, tabs, repeated spaces) -> one space, ends stripped: the same
    rule as runtime.text.normalize_whitespace (reference and runtime do not import each other)."""
    return " ".join(text.split())


class TextTokenizer:
    """CREMA's uses of the T5 tokenizer, with HF `padding="longest", truncation=True` semantics."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        for name, want in ((PAD, 0), (EOS, 1)):
            if tokenizer.token_to_id(name) != want:
                raise ValueError(f"tokenizer must map {name} to id {want} (T5 convention)")
        self.pad_id, self.eos_id = 0, 1

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} (the T5 fast-tokenizer file; "
                                    "save one with transformers' T5TokenizerFast.save_pretrained)")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def preset(cls) -> "TextTokenizer":
        return cls(build_preset_tokenizer())

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self.tok.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_len: int, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids [B, L] int64, mask [B, L] int64), padded to the longest, cut to max_len.

        Questions and answers (add_eos) have their whitespace collapsed as runtime.text does; the
        frame prefixes (add_eos=False, e.g. "Frame 1: ") are CREMA's literal strings, kept verbatim."""
        texts = [normalize_whitespace(t) for t in texts] if add_eos else list(texts)
        rows = []
        for enc in self.tok.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids[: max_len - 1] if add_eos else enc.ids[:max_len]
            rows.append(ids + [self.eos_id] if add_eos else ids)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def answer_ids(self, answer_num: int) -> list[int]:
        """Token ids of "A".."E" (first answer_num), taken from the vocabulary, never hard-coded."""
        out = []
        for letter in ANSWER_LETTERS[:answer_num]:
            ids = self.tok.encode(letter, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} is not a single token in this tokenizer: {ids}")
            out.append(ids[0])
        return out

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

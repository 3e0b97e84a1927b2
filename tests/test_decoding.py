"""runtime/decoding.py: the partial top-k equals a stable full sort, and the loops' tokens do not depend on it.

NaN: `_topk` ranks NaN below every number (-inf included), lower index first among NaNs, as
`np.argsort(-x, kind="stable")` does. Logits never hold NaN in practice; the rule is pinned so the
behaviour is defined, not to match torch (whose topk ranks NaN first).
"""
import numpy as np
import pytest

from runtime import decoding
from runtime.decoding import _topk


def stable_topk(x: np.ndarray, k: int) -> np.ndarray:
    """The previous implementation: a stable sort of every row."""
    return np.argsort(-x, axis=-1, kind="stable")[:, :k]


def check(x: np.ndarray, k: int) -> None:
    got = _topk(x, k)
    want = stable_topk(x, k)
    assert got.shape == want.shape and np.array_equal(got, want), (x.shape, k, got, want)


KS = (1, 2, 6, 10, 20)
WIDTHS = (700, 1536, 2048, 5000, 5 * 3001)  # short rows (full sort) to long rows (partial); tails of 0..63 columns


def rows(seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, n = int(rng.integers(1, 6)), int(rng.choice(WIDTHS))
    if kind == "normal":
        return rng.standard_normal((r, n)).astype(np.float32)
    if kind == "few values":  # ties everywhere, including across the k-th position
        return rng.integers(-3, 3, (r, n)).astype(np.float32)
    if kind == "straddle":  # the top values are one tie group larger than k, spread over the row
        x = rng.standard_normal((r, n)).astype(np.float32)
        top = rng.choice(n, size=int(rng.integers(2, 40)), replace=False)
        x[:, top] = 9.0
        x[:, top[: len(top) // 2]] = 10.0
        return x
    if kind == "signed zeros":  # -0.0 == 0.0: a tie, lower index first
        return rng.choice(np.array([-0.0, 0.0, -1.0], np.float32), size=(r, n))
    if kind == "inf":
        x = np.full((r, n), -np.inf, np.float32)
        x[:, rng.integers(0, n, 3)] = rng.standard_normal(3).astype(np.float32)
        x[0] = -np.inf  # an all -inf row
        return x
    if kind == "nan":
        x = rng.standard_normal((r, n)).astype(np.float32)
        x[rng.random((r, n)) < rng.choice([0.002, 0.01, 0.5, 0.999])] = np.nan
        return x
    raise ValueError(kind)


KINDS = ("normal", "few values", "straddle", "signed zeros", "inf", "nan")


@pytest.mark.parametrize("kind", KINDS)
def test_topk_equals_stable_sort(kind):
    for seed in range(60):
        x = rows(seed, kind)
        for k in KS:
            check(x, k)


def test_topk_special_rows_in_one_batch():
    """Rows that take the sorting fallback (NaN) next to rows that do not, and degenerate rows."""
    rng = np.random.default_rng(3)
    n = 5 * 3001
    x = rng.standard_normal((7, n)).astype(np.float32)
    x[1] = np.nan
    x[2, :] = 0.25  # all equal
    x[3, 5:] = np.nan  # fewer than k numbers
    x[4, -7:] = 50.0  # the best values in the tail (columns past the last full group)
    x[5, ::64] = 50.0  # the best values all in one group
    groups = n // decoding._GROUP
    x[6, 7], x[6, 7 + groups] = 50.0, np.nan  # the best value shares its group with a NaN
    for k in KS:
        check(x, k)
    top = _topk(x, 10)
    assert list(top[2]) == list(range(10))
    assert set(top[3][:5]) == set(range(5)) and list(top[3][5:]) == list(range(5, 10))  # NaN last


def test_topk_other_dtypes_and_k_limits():
    rng = np.random.default_rng(4)
    x64 = rng.integers(0, 50, (3, 8000)).astype(np.float64)
    x16 = rng.standard_normal((3, 8000)).astype(np.float16)  # float16: many ties
    for x in (x64, x16):
        for k in (1, 10, 125, 8000):
            check(x, k)


def test_topk_beam_search_shape():
    """The loop's shape: [requests, beams * vocab] of log-probs plus running scores, -inf at EOS,
    beams that have not started yet at -1e9 (ties far below the answer)."""
    rng = np.random.default_rng(5)
    b, nb, vocab = 3, 5, 32128
    logits = rng.standard_normal((b * nb, vocab)).astype(np.float32) * 4
    logp = decoding._log_softmax(logits).reshape(b, nb, vocab)
    logp[:, :, decoding.EOS] = -np.inf
    running = np.zeros((b, nb), np.float32)
    running[:, 1:] = decoding._NEG
    acc = (logp + running[:, :, None]).reshape(b, nb * vocab)
    check(acc, 2 * nb)


class BigramModel:
    """A numpy step model over a random table with coarse (tied) logits; its state depends on the
    history, so a wrong `reorder` changes the tokens."""

    def __init__(self, batch: int, vocab: int, seed: int, levels: int = 4):
        rng = np.random.default_rng(seed)
        self.states = 97
        self.table = rng.integers(0, levels, (self.states, vocab)).astype(np.float32)
        self.table[:, decoding.EOS] += rng.random(self.states) < 0.3  # EOS often best: beams finish
        self.state = np.arange(batch) % self.states

    def first(self) -> np.ndarray:
        return self.table[self.state]

    def expand(self, n: int) -> None:
        self.state = np.repeat(self.state, n)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        if reorder is not None:
            self.state = self.state[reorder]
        self.state = (self.state * 31 + tokens) % self.states
        return self.table[self.state]


@pytest.mark.parametrize("num_beams, length_penalty, min_length", [(5, 1.0, 1), (3, -1.0, 1), (4, 0.0, 4), (2, 2.0, 2)])
def test_beam_search_tokens_unchanged(monkeypatch, num_beams, length_penalty, min_length):
    """Same hypotheses as the loop with the stable full sort, on heavily tied (4 levels) and
    nearly distinct logits."""
    hypotheses = []
    for seed in range(6):
        def run():
            model = BigramModel(batch=3, vocab=6000, seed=seed, levels=(4, 1000)[seed % 2])
            return decoding.beam_search(model, num_beams, max_new_tokens=8, min_length=min_length,
                                        length_penalty=length_penalty)
        new = run()
        with monkeypatch.context() as m:
            m.setattr(decoding, "_topk", stable_topk)
            old = run()
        assert new == old
        hypotheses += new
    assert len({tuple(h) for h in hypotheses}) > 3
    assert length_penalty > 1 or any(len(h) < 8 for h in hypotheses)  # some beams finished early


def test_greedy_keeps_each_step_and_masks_eos():
    model = BigramModel(batch=2, vocab=600, seed=1, levels=50)
    tokens, scores = decoding.greedy(model, max_new_tokens=5, min_length=3)
    assert all(s.dtype == np.float32 for s in scores)
    assert np.isneginf(scores[0][:, decoding.EOS]).all() and np.isneginf(scores[1][:, decoding.EOS]).all()
    assert [t[0] for t in tokens] == list(scores[0].argmax(-1))

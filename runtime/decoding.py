"""Decoding loops in numpy over a KV-cached step model: greedy, beam search, mcqa scoring.

They reproduce transformers' `generate` (v5) token for token in FP32: beam search is its
vectorised algorithm (top 2*beams continuations, finished-hypothesis merging, `early_stopping=False`
heuristic, length penalty on the generated length), greedy its argmax with EOS padding, and both
apply `min_length` by masking EOS.

Ties in top-k go to the lower index (a stable sort's order). torch.topk leaves the order of equal
values unspecified (CPU: topk(zeros(3000), 5) -> [3, 4, 1, 0, 2]); in HF's beam search equal scores
at the cut are in practice -1e9-masked candidates, which never reach the returned hypothesis, and an
exact tie of real log-probs has no rule that matches torch in every case.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

EOS, PAD = 1, 0
_NEG = np.float32(-1.0e9)


class StepModel(Protocol):
    def first(self) -> np.ndarray:
        """Logits [B, V] of the first position; keeps the KV cache."""

    def expand(self, n: int) -> None:
        """Repeat every row of the cache n times (beams)."""

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """Feed tokens [R] (after gathering cache rows by `reorder`) -> logits [R, V]."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float32, with torch's operation order (x - max - lse)."""
    shifted = np.subtract(x, x.max(axis=-1, keepdims=True), dtype=np.float32)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted


_GROUP = 64  # columns per group of _topk's threshold pass


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices [R, k] of the k largest of each row of x [R, N], largest first; ties: lower index first,
    NaN below everything. Always equal to `np.argsort(-x, axis=-1, kind="stable")[:, :k]`.

    Long rows are not sorted: the k-th largest of the maxima of N/64 disjoint column groups is a
    threshold t with at least k elements >= t, so the answer lies in the groups whose maximum is
    >= t (or NaN) and the leftover tail; only those ~k*64 candidates are sorted (all of a row whose
    top value fills most groups, e.g. an all-equal row: as slow as the full sort, still exact)."""
    r, n = x.shape
    groups = n // _GROUP
    if k < 1 or groups < max(4 * k, 8):
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    body = x[:, :groups * _GROUP].reshape(r, _GROUP, groups)  # group j: columns j, j + groups, ...
    gmax = body.max(axis=1)
    t = np.partition(gmax, groups - k, axis=-1)[:, groups - k]  # NaN counts as largest here
    rows, cols = np.nonzero(~(gmax < t[:, None]))  # a NaN group may hold large non-NaN values too
    cols = (cols[:, None] + groups * np.arange(_GROUP)).reshape(-1)
    rows = np.repeat(rows, _GROUP)
    tail = np.arange(groups * _GROUP, n)
    rows = np.concatenate([rows, np.repeat(np.arange(r), tail.size)])
    cols = np.concatenate([cols, np.tile(tail, r)])
    vals = x[rows, cols]
    keep = vals >= t[rows]  # drops NaN
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))  # by row, then value descending, then index
    counts = np.bincount(rows, minlength=r)
    start = np.cumsum(counts) - counts
    out = np.empty((r, k), dtype=np.int64)
    full = counts >= k
    out[full] = cols[order[start[full][:, None] + np.arange(k)]]
    for i in np.flatnonzero(~full):  # fewer than k values >= t: only when the row holds NaN
        out[i] = np.argsort(-x[i], kind="stable")[:k]
    return out


def trim(ids) -> list[int]:
    """Generated ids up to and including the first EOS."""
    out = []
    for t in ids:
        out.append(int(t))
        if t == EOS:
            break
    return out


def greedy(model: StepModel, max_new_tokens: int, min_length: int = 1) -> tuple[list[list[int]], list[np.ndarray]]:
    """-> generated ids per row, and the processed logits [B, V] of each step (for mcqa)."""
    logits = model.first()
    b = logits.shape[0]
    tokens = np.zeros((b, 0), dtype=np.int64)
    unfinished = np.ones(b, dtype=bool)
    scores = []
    for step in range(max_new_tokens):
        logits = np.array(logits, dtype=np.float32)  # one copy: `scores` keeps it
        if 1 + step < min_length:  # decoder length includes the start token
            logits[:, EOS] = -np.inf
        scores.append(logits)
        nxt = np.where(unfinished, logits.argmax(-1), PAD)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        unfinished &= nxt != EOS
        if not unfinished.any() or step + 1 == max_new_tokens:
            break
        logits = model.step(nxt, None)
    return [trim(r) for r in tokens], scores


def beam_search(model: StepModel, num_beams: int, max_new_tokens: int, min_length: int = 1,
                length_penalty: float = 1.0) -> list[list[int]]:
    """transformers' beam search (early_stopping=False, one EOS id); -> best hypothesis per row."""
    first = model.first()
    b, vocab = first.shape
    nb, k = num_beams, 2 * num_beams
    max_length, cur = 1 + max_new_tokens, 1
    running = np.full((b, nb, max_length), EOS, dtype=np.int64)
    running[:, :, 0] = 0
    sequences = running.copy()
    running_scores = np.zeros((b, nb), dtype=np.float32)
    running_scores[:, 1:] = _NEG
    beam_scores = np.full((b, nb), _NEG, dtype=np.float32)
    finished = np.zeros((b, nb), dtype=bool)
    unsatisfied = np.ones((b, 1), dtype=bool)
    top_mask = np.arange(k) < nb
    model.expand(nb)
    logits = np.repeat(first, nb, axis=0)
    while True:
        logp = _log_softmax(logits)
        if cur < min_length:
            logp[:, EOS] = -np.inf
        acc = logp.reshape(b, nb, vocab)
        acc += running_scores[:, :, None]  # in place: no full-size copy per step
        acc = acc.reshape(b, nb * vocab)
        idx = _topk(acc, k)
        topk_lp = np.take_along_axis(acc, idx, axis=1)
        src, tok = idx // vocab, idx % vocab
        topk_seq = np.take_along_axis(running, src[:, :, None], axis=1)
        topk_seq[:, :, cur] = tok
        hits = (tok == EOS) | (cur + 1 >= max_length)

        run_lp = topk_lp + hits.astype(np.float32) * _NEG
        nxt = _topk(run_lp, nb)
        running = np.take_along_axis(topk_seq, nxt[:, :, None], axis=1)
        running_scores = np.take_along_axis(run_lp, nxt, axis=1)
        reorder = (np.take_along_axis(src, nxt, axis=1) + np.arange(b)[:, None] * nb).reshape(-1)

        just_finished = hits & top_mask[None, :]
        fin_lp = topk_lp / np.float32((cur + 1 - 1) ** length_penalty)
        fin_lp = fin_lp + (~unsatisfied).astype(np.float32) * _NEG
        fin_lp = fin_lp + (~just_finished).astype(np.float32) * _NEG
        merged_scores = np.concatenate([beam_scores, fin_lp], axis=1)
        keep = _topk(merged_scores, nb)
        sequences = np.take_along_axis(np.concatenate([sequences, topk_seq], axis=1), keep[:, :, None], axis=1)
        beam_scores = np.take_along_axis(merged_scores, keep, axis=1)
        finished = np.take_along_axis(np.concatenate([finished, just_finished], axis=1), keep, axis=1)

        cur += 1
        best = running_scores[:, :1] / np.float32((cur - 1) ** length_penalty)
        worst = np.where(finished, beam_scores.min(axis=1, keepdims=True), _NEG)
        unsatisfied &= (best > worst).any(axis=1, keepdims=True)
        if not unsatisfied.any() or hits.all():
            break
        logits = model.step(running[:, :, cur - 1].reshape(-1), reorder)
    return [trim(row[1:]) for row in sequences[:, 0]]


def mcqa_scores(tokens: list[list[int]], step_logits: list[np.ndarray], answer_ids: list[int]) -> np.ndarray:
    """Option logits [B, options]: the second step's, unless a row's first token was EOS (DESIGN §2)."""
    rows = []
    for i, ids in enumerate(tokens):
        step = 1 if len(step_logits) > 1 and ids[0] != EOS else 0
        rows.append(step_logits[step][i, answer_ids])
    return np.stack(rows)

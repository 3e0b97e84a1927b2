"""Benchmark evaluation: the official annotation formats CREMA evaluates on (NExT-QA, MUSIC-AVQA, SQA3D) and our
synthetic task, the paper's metrics computed as CREMA's own evaluation code computes them, and a resumable
runner that records one JSON line per question. Backend- and prompt-agnostic (an `answer_fn` does the asking)
and torch-free.

    items = load_annotations("nextqa", "val.json")
    result = evaluate(items, answer_fn, "out/nextqa.jsonl", media_root="data/nextqa/frames")
    print(result["table"])
"""
from evaluation.annotations import DATASETS, AnnotationError, Item, load_annotations
from evaluation.media import MissingMedia, load_points, resolve_media
from evaluation.metrics import compute_metrics, is_correct, metrics_markdown
from evaluation.runner import evaluate, read_predictions

__all__ = [
    "DATASETS", "AnnotationError", "Item", "load_annotations",
    "MissingMedia", "load_points", "resolve_media",
    "compute_metrics", "is_correct", "metrics_markdown",
    "evaluate", "read_predictions",
]

"""Video decoding and frame preprocessing (DESIGN §2), with OpenCV and numpy only.

read_video(path_or_bytes, n_frames, image_size) -> [n_frames, 3, image_size, image_size] float32:
frames sampled uniformly as LAVIS `load_video` (the middle of n equal intervals), RGB, resized
bicubic to a square, scaled to [0, 1] and normalised with CLIP's mean and std.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class VideoError(ValueError):
    """A video that cannot be used; the message names the file and the reason."""


def uniform_indices(num_frames: int, n: int) -> list[int]:
    """LAVIS 'uniform' sampling: the middle frame of each of n equal intervals over the clip.

    A clip shorter than n frames repeats frames (indices collide) rather than failing, so the
    model always sees n frames.
    """
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    return [min((a + b) // 2, num_frames - 1) for a, b in zip(edges[:-1], edges[1:])]


def normalize_frames(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> normalised float32 [T, 3, image_size, image_size]."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise VideoError(f"frames: shape {rgb.shape}, expected [T, H, W, 3] RGB")
    out = np.stack([cv2.resize(f, (image_size, image_size), interpolation=cv2.INTER_CUBIC) for f in rgb])
    out = (out.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _frame_count(cap: cv2.VideoCapture) -> int:
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if n > 0:
        return n
    n = 0  # some containers do not record it: count by decoding
    while cap.grab():
        n += 1
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    return n


def _open(path: Path) -> cv2.VideoCapture:
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: not a video OpenCV can decode")
    return cap


def frame_count(path: str | Path) -> int:
    cap = _open(Path(path))
    try:
        total = _frame_count(cap)
    finally:
        cap.release()
    if total <= 0:
        raise VideoError(f"{path}: the video has no frames")
    return total


def decode_indices(path: str | Path, indices: list[int]) -> np.ndarray:
    """RGB frames [len(indices), H, W, 3] uint8 at the given frame indices (repeats allowed)."""
    path = Path(path)
    cap = _open(path)
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    try:
        index = 0
        while index <= max(indices):
            if not cap.grab():
                break
            if index in wanted:
                ok, bgr = cap.retrieve()
                if not ok:
                    raise VideoError(f"{path}: frame {index} cannot be decoded")
                frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
    if not frames:
        raise VideoError(f"{path}: no frame could be decoded (truncated or corrupt)")
    # A truncated file may end before its recorded length: reuse the last decoded frame.
    last = frames[max(frames)]
    return np.stack([frames.get(i, last) for i in indices])


def decode_frames(path: str | Path, n_frames: int) -> np.ndarray:
    """n uniformly sampled RGB frames [n, H, W, 3] uint8 from a video file."""
    return decode_indices(path, uniform_indices(frame_count(path), n_frames))


def decode_with_successors(path: str | Path, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The n sampled frames and the frame after each (the last frame pairs with itself)."""
    total = frame_count(path)
    picked = uniform_indices(total, n_frames)
    both = decode_indices(path, picked + [min(i + 1, total - 1) for i in picked])
    return both[:n_frames], both[n_frames:]


def read_video(source: str | Path | bytes, n_frames: int, image_size: int) -> np.ndarray:
    """A video file (path) or its bytes -> normalised frames [n_frames, 3, image_size, image_size]."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise VideoError("video bytes: empty")
        fd, tmp = tempfile.mkstemp(suffix=".video")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            return normalize_frames(decode_frames(tmp, n_frames), image_size)
        finally:
            os.unlink(tmp)
    return normalize_frames(decode_frames(source, n_frames), image_size)

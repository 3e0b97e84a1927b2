"""`crema demo`: write a short clip as a real video file and answer a question about it."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_clip(path: str | Path, frames: int = 16, size: int = 96, fps: int = 8) -> Path:
    """A red ball moving left to right on a grey background, written as MPEG-4 (mp4v)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for t in range(frames):
        img = np.full((size, size, 3), 128, np.uint8)
        x = int(size * (0.15 + 0.7 * t / max(frames - 1, 1)))
        cv2.circle(img, (x, size // 2), size // 8, (0, 0, 255), -1)  # BGR red
        writer.write(img)
    writer.release()
    return path

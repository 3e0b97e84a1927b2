"""Extra visual modalities computed from what a user has, rendered as RGB images for the shared ViT.

CREMA's paper extracted them offline (UniMatch flow, ZoeDepth depth, a normal estimator); the
runtime accepts such pre-extracted frames and computes what it can online:

  optical_flow(prev, next)   RGB frames [H, W, 3] uint8 -> flow [H, W, 2] float32 (dx, dy) in pixels,
                             OpenCV DIS (medium preset) on grey levels
  flow_to_rgb(flow)          -> [H, W, 3] uint8 with the Middlebury colour wheel (hue = direction,
                             saturation = magnitude / max magnitude), as RAFT/UniMatch visualise flow;
                             the max is floored at 1 pixel so a still scene's sub-pixel noise stays
                             white instead of being stretched to full colour
  depth_to_rgb(depth)        depth [H, W] -> [H, W, 3] uint8 grey: inverse depth, min-max normalised
                             per frame, near = bright (as MiDaS/ZoeDepth visualise depth: nearby
                             objects stand out, a distant wall's slope is compressed)
  normals_from_depth(depth)  depth [H, W] -> unit normals [H, W, 3] by central differences.
                             Camera assumption: orthographic, one depth unit = one pixel (scale with
                             `pixel_size`); normals point towards the camera (+z).
  normals_to_rgb(normals)    -> [H, W, 3] uint8, (n + 1) / 2 * 255
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ModalityError(ValueError):
    """Input for a modality that cannot be used; the message names it."""


# --- optical flow ----------------------------------------------------------------------------

def optical_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    if prev.shape != nxt.shape or prev.ndim != 3 or prev.shape[2] != 3:
        raise ModalityError(f"optical flow: frames {prev.shape} and {nxt.shape}, expected two [H, W, 3] RGB frames")
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (prev, nxt)]
    return dis.calc(grey[0], grey[1], None)


def _colour_wheel() -> np.ndarray:
    """The Middlebury wheel: 55 colours red -> yellow -> green -> cyan -> blue -> magenta -> red."""
    segments = [(15, (255, 0, 0), (255, 255, 0)), (6, (255, 255, 0), (0, 255, 0)), (4, (0, 255, 0), (0, 255, 255)),
                (11, (0, 255, 255), (0, 0, 255)), (13, (0, 0, 255), (255, 0, 255)), (6, (255, 0, 255), (255, 0, 0))]
    rows = []
    for n, start, end in segments:
        t = np.arange(n)[:, None] / n
        rows.append(np.array(start) * (1 - t) + np.array(end) * t)
    return np.concatenate(rows)


WHEEL = _colour_wheel()


def flow_to_rgb(flow: np.ndarray, min_scale: float = 1.0) -> np.ndarray:
    u, v = flow[..., 0], flow[..., 1]
    radius = np.sqrt(u ** 2 + v ** 2)
    radius = radius / max(float(radius.max()), min_scale)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]; rightward flow -> +-1 -> red
    position = (angle + 1) / 2 * (len(WHEEL) - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % len(WHEEL)
    f = (position - k0)[..., None]
    colour = (1 - f) * WHEEL[k0] / 255 + f * WHEEL[k1] / 255
    colour = 1 - radius[..., None] * (1 - colour)  # low magnitude fades to white
    return np.clip(colour * 255, 0, 255).astype(np.uint8)


def flow_frames(frames: np.ndarray, successors: np.ndarray) -> np.ndarray:
    """Sampled frames [T, H, W, 3] and the frame after each -> flow images [T, H, W, 3] uint8."""
    return np.stack([flow_to_rgb(optical_flow(a, b)) for a, b in zip(frames, successors)])


# --- depth and normals -----------------------------------------------------------------------

def read_depth(path: str | Path) -> np.ndarray:
    """A depth map from .npy ([H, W] float) or a 16-bit PNG -> float32 [H, W]."""
    path = Path(path)
    if not path.is_file():
        raise ModalityError(f"{path}: no such depth file")
    if path.suffix == ".npy":
        depth = np.load(path, allow_pickle=False)
    else:
        depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if depth is None:
            raise ModalityError(f"{path}: not an image OpenCV can read")
        if depth.ndim == 3:
            raise ModalityError(f"{path}: {depth.shape[2]} channels, expected a single-channel (16-bit) depth PNG")
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ModalityError(f"{path}: shape {depth.shape}, expected [H, W]")
    if not np.isfinite(depth).all():
        raise ModalityError(f"{path}: contains NaN or infinite depth")
    return depth


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    far = float(depth.max())
    inverse = 1.0 / np.maximum(depth, max(far, 1e-6) * 1e-3)  # zero/negative (invalid) depth: nearest valid
    lo, hi = float(inverse.min()), float(inverse.max())
    grey = np.zeros_like(inverse) if hi <= lo else (inverse - lo) / (hi - lo)
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def normals_from_depth(depth: np.ndarray, pixel_size: float = 1.0) -> np.ndarray:
    dz_dy, dz_dx = np.gradient(depth.astype(np.float64), pixel_size)
    n = np.stack([-dz_dx, -dz_dy, np.ones_like(dz_dx)], axis=-1)
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    return np.clip((normals + 1) / 2 * 255, 0, 255).round().astype(np.uint8)


class DepthEstimator:
    """A pluggable monocular depth model as an ONNX graph.

    Contract: one input [N, 3, H, W] float32 RGB in [0, 1] (H, W as the graph fixes or any), one
    output [N, H', W'] or [N, 1, H', W'] float32 depth (larger = farther); the output is resized
    back to the frame's size.
    """

    def __init__(self, path: str | Path):
        import onnxruntime as ort
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModalityError(f"{path}: ONNX Runtime cannot load the depth model: {e}") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise ModalityError(f"{path}: a depth model takes one [N, 3, H, W] input and gives one output")
        self.input = inputs[0].name
        h, w = inputs[0].shape[2:]
        self.size = (w, h) if isinstance(h, int) and isinstance(w, int) else None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames [T, H, W, 3] uint8 -> depth [T, H, W] float32."""
        t, h, w, _ = frames.shape
        x = frames if self.size is None else np.stack([cv2.resize(f, self.size, interpolation=cv2.INTER_CUBIC)
                                                       for f in frames])
        depth = self.session.run(None, {self.input: (x.astype(np.float32) / 255).transpose(0, 3, 1, 2)})[0]
        depth = depth.reshape(t, *depth.shape[-2:])
        return np.stack([cv2.resize(d, (w, h), interpolation=cv2.INTER_LINEAR) for d in depth])

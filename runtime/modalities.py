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
  disparity_to_depth(d)      relative inverse depth [H, W] -> relative depth 1 / d [H, W] (see below)

Depth models: `DepthEstimator` runs a user's ONNX depth model (its contract below);
`ExportedDepthEstimator` runs the artifacts' `depth_estimator` stage (a transformers ZoeDepth / Depth
Anything / DPT model exported by `crema export --depth-model DIR`) with the preprocessing its manifest
section records. Both give depth [T, H, W] at the frames' size, larger = farther, for depth_to_rgb and
normals_from_depth.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .files import (FRAME_PIXELS, MAX_NPY_BYTES, NPY_MAGIC, PNG_MAGIC, InputFileError, check_dimensions, fit_size,
                    npy_header, png_size, read_npy)
from .video import uniform_indices


class ModalityError(InputFileError):
    """Input for a modality that cannot be used; the message names it (a ValueError)."""


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


ROWS = 64  # rows per block in flow_to_rgb / normals_from_depth: float64 temporaries stay small


def flow_to_rgb(flow: np.ndarray, min_scale: float = 1.0) -> np.ndarray:
    """flow [H, W, 2] -> [H, W, 3] uint8, ROWS rows at a time (the same values as all at once)."""
    radius = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2)
    scale = max(float(radius.max()), min_scale) if radius.size else min_scale
    out = np.empty(flow.shape[:2] + (3,), np.uint8)
    for r in range(0, flow.shape[0], ROWS):
        out[r:r + ROWS] = _wheel_colour(flow[r:r + ROWS], radius[r:r + ROWS] / scale)
    return out


def _wheel_colour(flow: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Flow [h, W, 2] and its magnitude / max magnitude [h, W] -> Middlebury colours [h, W, 3] uint8."""
    u, v = flow[..., 0], flow[..., 1]
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

def read_depth(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """One depth map, a .npy [H, W] or a (16-bit) single-channel PNG, path or bytes -> float32 [H', W'],
    downscaled (INTER_AREA) to FRAME_PIXELS as video frames are, so a map at the video's size still
    matches the decoded frames. Sizes are checked from the headers before anything is decoded."""
    label = name or str(source)
    kind = _depth_kind(source, label)
    if kind == "npy":
        head = _checked_npy(source, label)
        if len(head.shape) != 2:
            raise ModalityError(f"{label}: shape {head.shape}, expected [H, W]")
        return _fit_depth(read_npy(source, label, MAX_NPY_BYTES), label)
    return _fit_depth(_read_png(source, label), label)


def read_depth_maps(source: str | Path | bytes, n: int, name: str | None = None) -> np.ndarray:
    """n depth maps [n, H', W'] float32, sampled uniformly from a .npy [T', H, W] (only those maps
    are loaded), a folder of per-frame .npy/.png maps, or one map ([H, W] .npy or PNG) repeated."""
    label = name or str(source)
    if not isinstance(source, (bytes, bytearray)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.suffix in (".npy", ".png"))
        if not files:
            raise ModalityError(f"{label}: no .npy or .png depth maps in the folder")
        return np.stack([read_depth(files[i]) for i in uniform_indices(len(files), n)])
    head = _checked_npy(source, label) if _depth_kind(source, label) == "npy" else None
    if head is not None and len(head.shape) == 3:
        total = head.shape[0]
        if total == 0:
            raise ModalityError(f"{label}: 0 depth maps in the array, expected [T, H, W] with T > 0")
        return np.stack([_fit_depth(read_npy(source, label, MAX_NPY_BYTES, rows=[i])[0], label)
                         for i in uniform_indices(total, n)])
    return np.repeat(read_depth(source, label)[None], n, axis=0)


def _depth_kind(source, label: str) -> str:
    """"npy" or "png" from the first bytes (a suffix can lie; bytes have none)."""
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:8])
    else:
        if not Path(source).is_file():
            raise ModalityError(f"{label}: no such depth file")
        with open(source, "rb") as f:
            head = f.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(PNG_MAGIC):
        return "png"
    raise ModalityError(f"{label}: neither a .npy file nor a PNG")


def _checked_npy(source, label: str):
    """A depth .npy's header: [H, W] or [T, H, W] of real numbers, each map within the size limits."""
    try:
        head = npy_header(source, label)
        if len(head.shape) not in (2, 3):
            raise ModalityError(f"{label}: shape {head.shape}, expected [T, H, W] or [H, W] depth")
        if head.dtype.kind not in "fiu":
            raise ModalityError(f"{label}: dtype {head.dtype}, expected real numbers")
        check_dimensions(head.shape[-2], head.shape[-1], label)
    except InputFileError as e:
        raise ModalityError(str(e)) from None
    return head


def _read_png(source, label: str) -> np.ndarray:
    """A single-channel PNG -> [H, W], its IHDR size checked before OpenCV decodes it."""
    try:
        check_dimensions(*png_size(source, label), label)
    except InputFileError as e:
        raise ModalityError(str(e)) from None
    if isinstance(source, (bytes, bytearray)):
        depth = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        depth = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise ModalityError(f"{label}: not an image OpenCV can read")
    if depth.ndim == 3:
        raise ModalityError(f"{label}: {depth.shape[2]} channels, expected a single-channel (16-bit) depth PNG")
    return depth


def _fit_depth(depth: np.ndarray, label: str) -> np.ndarray:
    """[H, W] of any real dtype -> finite float32 [H', W'] within FRAME_PIXELS (INTER_AREA)."""
    if depth.ndim != 2:
        raise ModalityError(f"{label}: shape {depth.shape}, expected [H, W]")
    if depth.dtype not in (np.uint8, np.uint16, np.float32, np.float64):  # what cv2.resize takes
        depth = depth.astype(np.float32)
    h, w = depth.shape
    fh, fw = fit_size(h, w, FRAME_PIXELS)
    if (fh, fw) != (h, w):  # NaN and inf survive INTER_AREA's weighted means: checked below
        depth = cv2.resize(depth, (fw, fh), interpolation=cv2.INTER_AREA)
    depth = np.ascontiguousarray(depth, dtype=np.float32)
    if not np.isfinite(depth).all():
        raise ModalityError(f"{label}: contains NaN or infinite depth")
    return depth


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    far = float(depth.max())
    inverse = 1.0 / np.maximum(depth, max(far, 1e-6) * 1e-3)  # zero/negative (invalid) depth: nearest valid
    lo, hi = float(inverse.min()), float(inverse.max())
    grey = np.zeros_like(inverse) if hi <= lo else (inverse - lo) / (hi - lo)
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def normals_from_depth(depth: np.ndarray, pixel_size: float = 1.0) -> np.ndarray:
    """depth [H, W] -> unit normals [H, W, 3] float32, normalised ROWS rows at a time."""
    dz_dy, dz_dx = np.gradient(depth.astype(np.float64), pixel_size)
    out = np.empty(depth.shape + (3,), np.float32)
    for r in range(0, depth.shape[0], ROWS):
        gx, gy = dz_dx[r:r + ROWS], dz_dy[r:r + ROWS]
        n = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
        out[r:r + ROWS] = n / np.linalg.norm(n, axis=-1, keepdims=True)
    return out


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    return np.clip((normals + 1) / 2 * 255, 0, 255).round().astype(np.uint8)


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """Relative inverse depth (disparity) [H, W], larger = nearer -> relative depth 1 / d [H, W] float32.

    Disparity from a relative model (MiDaS/DPT, Depth Anything) is known only up to scale and shift, so
    this depth is too: its unit is arbitrary. d is floored at 1e-3 of the map's maximum (zero or negative
    disparity, the sky or a ReLU's zeros, becomes the farthest valid depth; a map of zeros becomes a flat
    depth of 1). depth_to_rgb inverts again, so the rendered image is the min-max normalised (floored)
    disparity itself: near = bright, as the model's own visualisation."""
    d = np.asarray(disparity, dtype=np.float32)
    top = float(d.max()) if d.size else 0.0
    if not top > 0:
        return np.ones_like(d)
    return (1.0 / np.maximum(d, top * 1e-3)).astype(np.float32)


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


INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


class ExportedDepthEstimator:
    """The artifacts' `depth_estimator` stage with its preprocessing (manifest section "depth_estimator",
    runtime/specs.depth_estimator_spec): RGB frames [T, H, W, 3] uint8 -> depth [T, H, W] float32, larger =
    farther (metric: metres; disparity: converted by disparity_to_depth, unit arbitrary).

    stage: anything called like runtime.pipeline.Stage (`stage(pixel_values=x)["predicted_depth"]`).
    Preprocessing, as the model's image processor with a fixed size: ZoeDepth's reflect padding of
    int(sqrt(side / 2) * 3) pixels ("pad": "reflect"), a resize to input_size [h, w] ("resize": OpenCV
    bilinear/bicubic; the aspect ratio is not kept, the graph's size is fixed), x * rescale, then
    (x - mean) / std per channel. The output is resized back (bilinear: no overshoot below zero) to the
    padded frame size, the padding cut off.
    """

    def __init__(self, stage, depth: dict):
        self.stage, self.depth = stage, depth
        self.size = tuple(depth["input_size"])  # (h, w)
        self.mean = np.asarray(depth["mean"], np.float32)
        self.std = np.asarray(depth["std"], np.float32)

    def _pads(self, h: int, w: int) -> tuple[int, int]:
        if self.depth.get("pad") != "reflect":
            return 0, 0
        return int(np.sqrt(h / 2) * 3), int(np.sqrt(w / 2) * 3)

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames [T, H, W, 3] uint8 -> pixel_values [T, 3, h, w] float32."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ModalityError(f"depth estimator: frames {frames.shape}, expected [T, H, W, 3] RGB")
        ph, pw = self._pads(*frames.shape[1:3])
        h, w = self.size
        out = []
        for f in frames:
            if ph or pw:  # torch's "reflect" = OpenCV's REFLECT_101 (the edge pixel is not repeated)
                f = cv2.copyMakeBorder(f, ph, ph, pw, pw, cv2.BORDER_REFLECT_101)
            out.append(cv2.resize(f, (w, h), interpolation=INTERPOLATION[self.depth["resize"]]))
        x = np.stack(out).astype(np.float32) * np.float32(self.depth["rescale"])
        return np.ascontiguousarray(((x - self.mean) / self.std).transpose(0, 3, 1, 2))

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames [T, H, W, 3] uint8 -> the model's output at the frames' size [T, H, W] float32
        (metric depth or disparity, as the section's "output" says)."""
        t, h, w, _ = frames.shape
        raw = self.stage(pixel_values=self.preprocess(frames))["predicted_depth"]
        ph, pw = self._pads(h, w)
        return np.stack([cv2.resize(np.ascontiguousarray(d, np.float32), (w + 2 * pw, h + 2 * ph),
                                    interpolation=cv2.INTER_LINEAR)[ph:ph + h, pw:pw + w] for d in raw])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames [T, H, W, 3] uint8 -> depth [T, H, W] float32, larger = farther."""
        out = self.predict(frames)
        if self.depth["output"] == "disparity":
            return np.stack([disparity_to_depth(d) for d in out])
        return np.maximum(out, 0.0)  # metric depth: negative values are not depths (depth_to_rgb floors them too)

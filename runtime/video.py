"""Video decoding and frame preprocessing (DESIGN §2), with OpenCV and numpy only.

decode_frames(path_or_bytes, n) -> RGB [n, H, W, 3] uint8, sampled uniformly as LAVIS `load_video`
(the middle of n equal intervals); normalize_frames -> [n, 3, S, S] float32 (bicubic to a square,
[0, 1], CLIP's mean and std). Memory is bounded whatever the file claims: the header's frame size
is checked before decoding (runtime/files.py MAX_SIDE, MAX_PIXELS), frames are decoded one at a
time, only the sampled ones are kept, each downscaled (INTER_AREA) to FRAME_PIXELS at once. A
header that claims more frames than decode is sampled again over the frames that did.

read_frame_folder(folder, n) -> RGB [n, H, W, 3] uint8 from a folder of PNG/JPEG frames, as CREMA's
LAVIS `load_frames` reads its depth/flow/normal (and NExT-QA rgb) folders: the .png/.jpg/.jpeg files
sorted by name (other files and hidden ones ignored), sampled uniformly over N - 1 images as
`load_frames` does (it keeps the last one for flow's missing successor; a 1-image folder repeats it),
each converted to RGB as PIL's `.convert('RGB')` does (grey repeated, alpha dropped, 16-bit colour by
its high byte; 16-bit grey only when every value is below 256: PIL clips the rest to white), sizes
checked from the headers before decoding, downscaled to FRAME_PIXELS like video frames. The sampled
frames must share one size. Given the model's image size, each frame is resized straight to it with
Pillow's BICUBIC, as CREMA's `img.resize((w, h))` does (antialiased: exact, where OpenCV's INTER_CUBIC
differs by up to 150/255 on real downscales; docs/resize.md).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

from .files import InputFileError, check_dimensions, fit_size, image_size

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class VideoError(InputFileError):
    """A video that cannot be used; the message names the file (or "video bytes") and the reason."""


def uniform_indices(num_frames: int, n: int) -> list[int]:
    """LAVIS 'uniform' sampling: the middle frame of each of n equal intervals over the clip.

    A clip shorter than n frames repeats frames (indices collide) rather than failing, so the
    model always sees n frames.
    """
    if num_frames < 1:
        raise ValueError(f"uniform_indices: {num_frames} frames, nothing to sample")
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    return [min((a + b) // 2, num_frames - 1) for a, b in zip(edges[:-1], edges[1:])]


def normalize_frames(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> normalised float32 [T, 3, image_size, image_size]."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise VideoError(f"frames: shape {rgb.shape}, expected [T, H, W, 3] RGB")
    square = (image_size, image_size)  # frames already at the size (Pillow-resized folders) are kept as they are
    out = np.stack([f if f.shape[:2] == square else cv2.resize(f, square, interpolation=cv2.INTER_CUBIC) for f in rgb])
    out = (out.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


@contextmanager
def video_file(source: str | Path | bytes, name: str | None = None) -> Iterator[tuple[Path, str]]:
    """(a path OpenCV can open, the name errors use): a path as given, or bytes written to one
    temporary file and named "video bytes" (OpenCV sniffs the container itself); `name` overrides."""
    if not isinstance(source, (bytes, bytearray)):
        yield Path(source), name or str(source)
        return
    label = name or "video bytes"
    if not source:
        raise VideoError(f"{label}: empty")
    fd, tmp = tempfile.mkstemp(prefix="crema-", suffix=".video")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        yield Path(tmp), label
    finally:
        os.unlink(tmp)


def _open(path: Path, label: str) -> cv2.VideoCapture:
    """An opened capture whose header's frame size is within the limits (checked before decoding)."""
    if not path.is_file():
        raise VideoError(f"{label}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{label}: empty file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{label}: not a video OpenCV can decode")
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        if width or height:  # 0 x 0: the container does not say; each decoded frame is checked
            check_dimensions(height, width, label)
    except InputFileError as e:
        cap.release()
        raise VideoError(str(e)) from None
    return cap


def _header_count(path: Path, label: str) -> int:
    """The frame count the header claims, or (when it records none) the count by grabbing."""
    cap = _open(path, label)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:
            n = 0
            while cap.grab():
                n += 1
    finally:
        cap.release()
    if n <= 0:
        raise VideoError(f"{label}: the video has no frames")
    return n


def _fit(bgr: np.ndarray, label: str) -> np.ndarray:
    """A decoded BGR frame -> RGB [H', W', 3] uint8 within FRAME_PIXELS (INTER_AREA), before anything else."""
    h, w = bgr.shape[:2]
    try:
        check_dimensions(h, w, label)
    except InputFileError as e:
        raise VideoError(str(e)) from None
    fh, fw = fit_size(h, w)
    if (fh, fw) != (h, w):
        bgr = cv2.resize(bgr, (fw, fh), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _scan(path: Path, label: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames 0..max(wanted) one at a time, keeping the wanted ones -> (them, frames decoded);
    fewer than max(wanted) + 1 decoded means the video ended early."""
    cap = _open(path, label)
    frames: dict[int, np.ndarray] = {}
    index = 0
    try:
        while index <= max(wanted) and cap.grab():
            if index in wanted:
                ok, bgr = cap.retrieve()
                if not ok:
                    raise VideoError(f"{label}: frame {index} cannot be decoded")
                frames[index] = _fit(bgr, label)
            index += 1
    finally:
        cap.release()
    return frames, index


def _sample(path: Path, label: str, pick) -> tuple[list[int], dict[int, np.ndarray]]:
    """pick(total) -> frame indices; decoded frames for them. When decoding ends before the highest
    index (a header that claims more frames than there are, a truncated file), indices are picked
    again over the frames that decoded and the missing ones decoded in a second pass."""
    wanted = pick(_header_count(path, label))
    frames, decoded = _scan(path, label, set(wanted))
    if decoded > max(wanted):
        return wanted, frames
    if decoded == 0:
        raise VideoError(f"{label}: no frame could be decoded (truncated or corrupt)")
    wanted = pick(decoded)
    frames = {i: f for i, f in frames.items() if i in wanted}
    missing = set(wanted) - set(frames)
    if missing:
        more, _ = _scan(path, label, missing)
        frames.update(more)
    lost = sorted(missing - set(frames))
    if lost:
        raise VideoError(f"{label}: frame {lost[0]} decoded once, not the second time")
    return wanted, frames


def decode_frames(source: str | Path | bytes, n_frames: int, name: str | None = None) -> np.ndarray:
    """A video file (path) or its bytes -> n uniformly sampled RGB frames [n, H, W, 3] uint8. A video
    of fewer than n frames repeats frames (a 1-frame video: that frame n times, as LAVIS gives it)."""
    with video_file(source, name) as (path, label):
        picked, frames = _sample(path, label, lambda total: uniform_indices(total, n_frames))
    return np.stack([frames[i] for i in picked])


def decode_with_successors(source: str | Path | bytes, n_frames: int,
                           name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n sampled frames [n, H, W, 3] and the frame after each (the last frame pairs with itself).
    A 1-frame video is refused: there is no motion to measure (its flow would be a blank image)."""
    with video_file(source, name) as (path, label):
        def pick(total: int) -> list[int]:
            if total < 2:
                raise VideoError(f"{label}: 1 frame; optical flow (flow) needs a video of at least 2 frames")
            picked = uniform_indices(total, n_frames)
            return picked + [min(i + 1, total - 1) for i in picked]

        both, frames = _sample(path, label, pick)
    return np.stack([frames[i] for i in both[:n_frames]]), np.stack([frames[i] for i in both[n_frames:]])


def decode_scaled(source: str | Path | bytes, n_frames: int, size: int, name: str | None = None) -> np.ndarray:
    """n frames sampled as decode_frames samples them, each scaled straight to [size, size] the way CREMA's
    `load_video` gets them from decord's `VideoReader(height=size, width=size)`: FFmpeg's `scale` filter
    with bilinear interpolation (FFmpeg 4's default; decord bundles 4.1) on the decoder's own pixel format
    (YUV), then RGB -> [n, size, size, 3] uint8. No RGB-domain resize can match it (docs/resize.md).
    Decoded with PyAV (the soundtrack's decoder too); the header's frame size is checked first."""
    import av

    with video_file(source, name) as (path, label):
        wanted = uniform_indices(_header_count(path, label), n_frames)
        frames: dict[int, np.ndarray] = {}
        try:
            with av.open(str(path)) as container:
                graph = None
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted and i not in frames:
                        graph = graph or _scale_graph(frame, size)
                        graph.push(frame)
                        frames[i] = graph.pull().to_ndarray()
                    if len(frames) == len(set(wanted)):
                        break
        except av.error.FFmpegError as e:
            raise VideoError(f"{label}: not a video FFmpeg can decode ({e})") from None
    missing = sorted(set(wanted) - set(frames))
    if missing:
        raise VideoError(f"{label}: frame {missing[0]} of the {len(wanted)} sampled did not decode (truncated?)")
    return np.stack([frames[i] for i in wanted])


def _scale_graph(first, size: int):
    """buffer -> scale=size:size:flags=bilinear -> rgb24 -> sink, for frames shaped as `first`."""
    import av
    from fractions import Fraction

    graph = av.filter.Graph()
    nodes = [graph.add_buffer(width=first.width, height=first.height, format=first.format.name,
                              time_base=first.time_base or Fraction(1, 1000)),
             graph.add("scale", f"{size}:{size}:flags=bilinear"),  # FFmpeg >= 5 defaults to bicubic: say it
             graph.add("format", "rgb24"), graph.add("buffersink")]
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    graph.configure()
    return graph


# --- folders of frames ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def frame_files(folder: str | Path, label: str | None = None) -> list[Path]:
    """A folder's frame images (.png/.jpg/.jpeg, any case; not hidden), sorted by name as CREMA sorts."""
    label = label or str(folder)
    files = sorted((p for p in Path(folder).iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
                   key=lambda p: p.name)
    if not files:
        raise VideoError(f"{label}: no .png/.jpg/.jpeg images in the folder")
    return files


def folder_indices(count: int, n: int) -> list[int]:
    """CREMA's `load_frames` sampling over a folder of `count` images: uniform over the first count - 1
    (the interval ends at len - 1, "for flow"), so the last image is never picked unless it is the only one."""
    return uniform_indices(max(count - 1, 1), n)


def read_frame_folder(folder: str | Path, n_frames: int, name: str | None = None,
                      size: int | None = None, orient=None) -> np.ndarray:
    """n frames sampled from a folder of images -> RGB [n, H, W, 3] uint8 (module docstring); with `size`,
    each resized to [size, size] as CREMA resizes them (Pillow BICUBIC); `orient` (RGB -> RGB) first,
    e.g. `unflip_nextqa_flow`."""
    label = name or str(folder)
    files = frame_files(folder, label)
    picked = folder_indices(len(files), n_frames)
    sizes = {}
    for i in sorted(set(picked)):
        try:
            sizes[i] = image_size(files[i], f"{label}: {files[i].name}")
            check_dimensions(*sizes[i], f"{label}: {files[i].name}")
        except InputFileError as e:
            raise VideoError(str(e)) from None
    first = picked[0]
    for i, (h, w) in sizes.items():
        if (h, w) != sizes[first]:
            raise VideoError(f"{label}: {files[i].name} is {w}x{h}, {files[first].name} is "
                             f"{sizes[first][1]}x{sizes[first][0]}: the frames of a folder must share one size")
    orient = orient or (lambda rgb: rgb)
    read = (lambda bgr: _fit(bgr, label)) if size is None else (lambda bgr: pil_resize(orient(bgr[..., ::-1]), size))
    frames = {i: read(_image_bgr(files[i], f"{label}: {files[i].name}")) for i in sizes}
    return np.stack([frames[i] for i in picked])


def unflip_nextqa_flow(rgb: np.ndarray) -> np.ndarray:
    """NExT-QA's flow frames as CREMA reads them (data_utils.py l.167-170, type 'flow'): mirrored left-right,
    then rotated 90 degrees counter-clockwise (PIL FLIP_LEFT_RIGHT, then transpose(2) = ROTATE_90)."""
    return np.rot90(rgb[:, ::-1])


def pil_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """RGB [H, W, 3] uint8 -> [size, size, 3]: Pillow's BICUBIC, CREMA's frame-folder resize."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BICUBIC))


def _image_bgr(path: Path, label: str) -> np.ndarray:
    """An image file -> BGR [H, W, 3] uint8, converted as PIL's `.convert('RGB')` converts what it opens."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF rotation, as PIL's open
    if image is None:
        raise VideoError(f"{label}: not an image OpenCV can decode")
    if image.dtype == np.uint16:
        if image.ndim == 2:  # PIL "I;16" -> RGB clips at 255: refuse what would turn white
            top = int(image.max())
            if top > 255:
                raise VideoError(f"{label}: a 16-bit grey image with values up to {top}; as an image it would be "
                                 "clipped to white above 255 (CREMA's .convert('RGB')). Depth maps go to the "
                                 "depth input (request field depth), rendered by the runtime; frames must be 8-bit")
            image = image.astype(np.uint8)
        else:  # 16-bit colour: PIL keeps the high byte
            image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise VideoError(f"{label}: {image.dtype} pixels, expected an 8- or 16-bit image")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:  # BGRA (OpenCV reads grey + alpha as BGRA too): alpha dropped, as PIL does
        return np.ascontiguousarray(image[..., :3])
    if image.shape[2] != 3:
        raise VideoError(f"{label}: {image.shape[2]} channels, expected grey, RGB or RGBA")
    return image

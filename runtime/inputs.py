"""Raw inputs -> a pipeline Request: what a user has (video, depth, audio, 3D) to each modality's tensor.

    request = request_from_files(config, "What is nearer?", video="clip.mp4", depth="depth.npy")

rgb     the video's uniformly sampled frames
flow    optical flow from each sampled frame to the next video frame (runtime/modalities.py)
depth   pre-extracted maps (.npy [T', H, W] or [H, W], a 16-bit PNG, or a folder of per-frame maps),
        or an ONNX depth model run on the sampled frames
norm    surface normals from the depth maps
audio   a sound file -> fbank clips (runtime/audio.py)
pc      a .npz with `feat` [P, Dv] and `coords` [P, 3]
Any visual modality may also come as pre-extracted, normalised frames (.npy [T, 3, S, S]).
A server passes what it received instead of paths: video and depth as bytes (a video file, a .npy
or 16-bit PNG), audio as bytes, pc as (feat, coords) arrays, frames as arrays.
"""
from __future__ import annotations

import numpy as np

from .audio import audio_clips, read_audio, samples_needed
from .files import InputFileError, check_points, read_npy, read_points
from .modalities import (DepthEstimator, ModalityError, depth_to_rgb, flow_frames, normals_from_depth,
                         normals_to_rgb, read_depth_maps)
from .pipeline import Request
from .specs import VISUAL, modality_names
from .video import decode_frames, decode_with_successors, normalize_frames


def _label(source, field: str) -> str:
    """How errors name an input: "depth bytes" for what a server received, else the path."""
    return f"{field} bytes" if isinstance(source, (bytes, bytearray)) else str(source)


def _depth_maps(source, n: int, frames: np.ndarray | None, depth_model) -> np.ndarray:
    """Depth [n, H, W] for the sampled frames."""
    if depth_model is not None:
        if frames is None:
            raise ModalityError("depth: a depth model needs the video (request field video)")
        return DepthEstimator(depth_model)(frames)
    if source is None:
        raise ModalityError("depth: give depth maps or a depth model (the configuration needs depth or norm)")
    if isinstance(source, (bytes, bytearray)) and not source:
        raise ModalityError("depth bytes: empty")
    return read_depth_maps(source, n, _label(source, "depth"))


def _check_frame_size(name: str, maps: np.ndarray, frames: np.ndarray | None) -> None:
    if frames is not None and maps.shape[1:3] != frames.shape[1:3]:
        raise ModalityError(f"{name}: maps of {maps.shape[1]}x{maps.shape[2]}, the video is "
                            f"{frames.shape[1]}x{frames.shape[2]} (both after downscaling to the frame budget)")


def request_from_files(config: dict, question: str, video=None, depth=None, depth_model=None, audio=None,
                       pc=None, frames: dict | None = None) -> Request:
    """Build the Request the configured modalities need. Paths, or bytes/arrays as the module says.
    Every error is a ValueError (ModalityError, VideoError, AudioError, InputFileError) naming the input."""
    names = modality_names(config)
    t, size = config["frame_num"], config["vision"]["image_size"]
    frames = dict(frames or {})
    for m in frames:
        if m not in names:
            raise ModalityError(f"{m}: pre-extracted frames given, but {m!r} is not configured ({', '.join(names)})")
    request = Request(question)
    need = [m for m in names if m in VISUAL and m not in frames]
    rgb = successors = None
    if "flow" in need:
        if video is None:
            raise ModalityError("flow: needs the video or pre-extracted flow frames")
        rgb, successors = decode_with_successors(video, t)
    elif need and video is not None:
        rgb = decode_frames(video, t)
    depth_maps = None
    for m in need:
        if m == "rgb":
            if rgb is None:
                raise ModalityError("rgb: needs the video or pre-extracted rgb frames")
            images = rgb
        elif m == "flow":
            images = flow_frames(rgb, successors)
        else:  # depth, norm
            if depth_maps is None:
                depth_maps = _depth_maps(depth, t, rgb, depth_model)
                _check_frame_size("depth", depth_maps, rgb)
            images = (np.stack([depth_to_rgb(d) for d in depth_maps]) if m == "depth"
                      else np.stack([normals_to_rgb(normals_from_depth(d)) for d in depth_maps]))
        request.frames[m] = normalize_frames(images, size)
    for m, source in frames.items():
        request.frames[m] = _frames(source, m)
    if "audio" in names:
        if audio is None:
            raise ModalityError("audio: the configuration needs an audio file (request field audio)")
        a = config["audio"]
        samples = read_audio(audio, max_samples=samples_needed(a["num_clips"], a["clip_frames"]))
        request.audio = audio_clips(samples, a["num_clips"], a["clip_frames"], a["num_mel_bins"])
    if "pc" in names:
        if pc is None:
            raise ModalityError("pc: the configuration needs 3D features (feat [P, D] and coords [P, 3]: a .npz, "
                                "or the request fields pc_feat and pc_coords)")
        request.pc_feat, request.pc_coords = _points(pc)
    return request


def _frames(source, m: str) -> np.ndarray:
    """Pre-extracted frames of modality m: an array, or a .npy path/bytes (header-checked)."""
    if isinstance(source, np.ndarray):
        return np.asarray(source, dtype=np.float32)
    return read_npy(source, f"frames[{m!r}] {_label(source, 'frames')}").astype(np.float32)


def _points(pc) -> tuple[np.ndarray, np.ndarray]:
    """pc: a .npz path with `feat` and `coords`, or the (feat, coords) arrays."""
    if isinstance(pc, tuple):
        return check_points(*pc, name="pc")
    try:
        return read_points(pc)
    except InputFileError as e:
        raise ModalityError(f"pc: {e}") from None

"""Raw inputs -> a pipeline Request: what a user has (video, depth, audio, 3D) to each modality's tensor.

    request = request_from_files(config, "What is nearer?", video="clip.mp4", depth="depth.npy")

rgb     the video's uniformly sampled frames
flow    optical flow from each sampled frame to the next video frame (runtime/modalities.py)
depth   pre-extracted maps (.npy [T', H, W] or [H, W], a 16-bit PNG, or a folder of per-frame maps),
        or an ONNX depth model run on the sampled frames
norm    surface normals from the depth maps
audio   a sound file -> fbank clips (runtime/audio.py); without one, the video's soundtrack (PyAV), read
        and resampled as a sound file is; a video without a soundtrack is refused, naming the audio field
pc      a .npz with `feat` [P, Dv] and `coords` [P, 3]
Any visual modality may also come as its own frames (`frames`, modality -> source): pre-extracted,
normalised frames (an array or a .npy [T, 3, S, S]), a folder of PNG/JPEG images (CREMA's datasets store
depth/flow/normal frames so; sampled as CREMA's `load_frames`, runtime/video.py read_frame_folder) or a
video of its own (sampled as the rgb video). Images and videos are taken as the ViT's images: a depth
video is not rendered again as depth maps are.
A server passes what it received instead of paths: video and depth as bytes (a video file, a .npy
or 16-bit PNG), audio as bytes, pc as (feat, coords) arrays, frames as arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio import NoSoundtrack, audio_clips, read_audio, read_video_audio, samples_needed
from .files import NPY_MAGIC, InputFileError, check_points, read_bytes, read_npy, read_points
from .modalities import (DepthEstimator, ModalityError, depth_to_rgb, flow_frames, normals_from_depth,
                         normals_to_rgb, read_depth_maps)
from .pipeline import Request
from .specs import VISUAL, modality_names
from .video import decode_frames, decode_with_successors, normalize_frames, read_frame_folder


def _label(source, field: str) -> str:
    """How errors name an input: "depth bytes" for what a server received, else the path."""
    return f"{field} bytes" if isinstance(source, (bytes, bytearray)) else str(source)


def _depth_maps(source, n: int, frames: np.ndarray | None, depth_model) -> np.ndarray:
    """Depth [n, H, W] for the sampled frames [n, H, W, 3]. depth_model, when given, is used instead of maps:
    a path to a user's ONNX depth model (runtime.modalities.DepthEstimator's contract) or a loaded estimator
    called on the frames (Pipeline.depth_estimator: the artifacts' exported depth model)."""
    if depth_model is not None:
        if frames is None:
            raise ModalityError("depth: a depth model needs the video (request field video)")
        return (depth_model if callable(depth_model) else DepthEstimator(depth_model))(frames)
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
        request.frames[m] = _frames(source, m, t, size)
    if "audio" in names:
        a = config["audio"]
        budget = samples_needed(a["num_clips"], a["clip_frames"])
        if audio is not None:
            samples = read_audio(audio, max_samples=budget)
        elif video is not None:
            try:
                samples = read_video_audio(video, _label(video, "video"), max_samples=budget)
            except NoSoundtrack as e:
                raise ModalityError(f"audio: the configuration needs audio and the video has no soundtrack ({e}); "
                                    "give a sound file (request field audio)") from None
        else:
            raise ModalityError("audio: the configuration needs an audio file (request field audio) or a video "
                                "with a soundtrack (request field video)")
        request.audio = audio_clips(samples, a["num_clips"], a["clip_frames"], a["num_mel_bins"])
    if "pc" in names:
        if pc is None:
            raise ModalityError("pc: the configuration needs 3D features, which a video cannot give (feat [P, D] "
                                "and coords [P, 3]: request fields pc_feat and pc_coords)")
        request.pc_feat, request.pc_coords = _points(pc)
        if config.get("dataset") == "sqa3d":  # its convention: always 5000 points (runtime/datasets.py)
            from .datasets import crema_points
            request.pc_feat, request.pc_coords, _ = crema_points(request.pc_feat, request.pc_coords)
    return request


def _frames(source, m: str, t: int, size: int) -> np.ndarray:
    """Frames of modality m -> [t, 3, size, size] float32 (an array or .npy as given; the pipeline checks
    its shape): an array, a .npy (path or bytes; header-checked), a folder of images, or a video."""
    if isinstance(source, np.ndarray):
        return np.asarray(source, dtype=np.float32)
    label = f"frames[{m!r}] {_label(source, 'frames')}"
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:len(NPY_MAGIC)])
    elif Path(source).is_dir():
        return normalize_frames(read_frame_folder(source, t, label, size), size)
    else:
        head = read_bytes(source, label, len(NPY_MAGIC))
    if head == NPY_MAGIC:
        return read_npy(source, label).astype(np.float32)
    return normalize_frames(decode_frames(source, t, label), size)


def _points(pc) -> tuple[np.ndarray, np.ndarray]:
    """pc: a .npz path with `feat` and `coords`, or the (feat, coords) arrays."""
    if isinstance(pc, tuple):
        return check_points(*pc, name="pc")
    try:
        return read_points(pc)
    except InputFileError as e:
        raise ModalityError(f"pc: {e}") from None

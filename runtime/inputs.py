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

import tempfile
from pathlib import Path

import numpy as np

from .audio import audio_clips, read_audio
from .modalities import (DepthEstimator, ModalityError, depth_to_rgb, flow_frames, normals_from_depth,
                         normals_to_rgb, read_depth)
from .pipeline import Request
from .specs import VISUAL, modality_names
from .video import decode_frames, decode_with_successors, normalize_frames, uniform_indices


def _depth_maps(source, n: int, frames: np.ndarray | None, depth_model) -> np.ndarray:
    """Depth [n, H, W] for the sampled frames."""
    if depth_model is not None:
        if frames is None:
            raise ModalityError("depth: a depth model needs the video (--video)")
        return DepthEstimator(depth_model)(frames)
    if source is None:
        raise ModalityError("depth: give depth maps or a depth model (the configuration needs depth or norm)")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".png"))
        if not files:
            raise ModalityError(f"{path}: no .npy or .png depth maps in the folder")
        maps = [read_depth(files[i]) for i in uniform_indices(len(files), n)]
        return np.stack(maps)
    if path.suffix == ".npy":
        depth = np.load(path, allow_pickle=False).astype(np.float32)
        if depth.ndim == 2:
            depth = depth[None]
        if depth.ndim != 3:
            raise ModalityError(f"{path}: shape {depth.shape}, expected [T, H, W] or [H, W] depth")
        if not np.isfinite(depth).all():
            raise ModalityError(f"{path}: contains NaN or infinite depth")
        return depth[uniform_indices(len(depth), n)]
    return np.repeat(read_depth(path)[None], n, axis=0)


def _check_frame_size(name: str, maps: np.ndarray, frames: np.ndarray | None) -> None:
    if frames is not None and maps.shape[1:3] != frames.shape[1:3]:
        raise ModalityError(f"{name}: maps of {maps.shape[1]}x{maps.shape[2]}, the video is "
                            f"{frames.shape[1]}x{frames.shape[2]}")


def _bytes_to_file(data: bytes, folder: str, name: str) -> Path:
    """Bytes -> a file OpenCV/numpy can open. Depth's suffix comes from its magic bytes (numpy and
    OpenCV pick the reader by suffix); a video's container is sniffed by OpenCV itself."""
    if not data:
        raise ModalityError(f"{name} bytes: empty")
    suffix = ".video"
    if name == "depth":
        suffix = next((s for magic, s in DEPTH_MAGIC.items() if data.startswith(magic)), None)
        if suffix is None:
            raise ModalityError("depth bytes: neither a .npy file nor a PNG")
    path = Path(folder) / f"{name}{suffix}"
    path.write_bytes(data)
    return path


DEPTH_MAGIC = {b"\x93NUMPY": ".npy", b"\x89PNG": ".png"}


def request_from_files(config: dict, question: str, video=None, depth=None, depth_model=None, audio=None,
                       pc=None, frames: dict | None = None) -> Request:
    """Build the Request the configured modalities need. Paths, or bytes/arrays as the module says."""
    if not isinstance(video, (bytes, bytearray)) and not isinstance(depth, (bytes, bytearray)):
        return _request(config, question, video, depth, depth_model, audio, pc, frames)
    with tempfile.TemporaryDirectory(prefix="crema-") as tmp:
        names = {}
        if isinstance(video, (bytes, bytearray)):
            names[(video := _bytes_to_file(bytes(video), tmp, "video"))] = "video bytes"
        if isinstance(depth, (bytes, bytearray)):
            names[(depth := _bytes_to_file(bytes(depth), tmp, "depth"))] = "depth bytes"
        try:
            return _request(config, question, video, depth, depth_model, audio, pc, frames)
        except ValueError as e:  # name what the caller sent, not our temporary file
            message = str(e)
            for path, name in names.items():
                message = message.replace(str(path), name)
            raise type(e)(message) from e


def _frames(source) -> np.ndarray:
    x = source if isinstance(source, np.ndarray) else np.load(source, allow_pickle=False)
    return np.asarray(x, dtype=np.float32)


def _points(pc) -> tuple[np.ndarray, np.ndarray]:
    """pc: a .npz path with `feat` and `coords`, or the (feat, coords) arrays."""
    if isinstance(pc, tuple):
        feat, coords = pc
    else:
        with np.load(pc, allow_pickle=False) as data:
            if "feat" not in data or "coords" not in data:
                raise ModalityError(f"{pc}: expected arrays 'feat' [P, D] and 'coords' [P, 3]")
            feat, coords = data["feat"], data["coords"]
    return np.asarray(feat, dtype=np.float32), np.asarray(coords).astype(np.int64)


def _request(config: dict, question: str, video, depth, depth_model, audio, pc, frames) -> Request:
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
            raise ModalityError("flow: needs the video (--video) or pre-extracted flow frames")
        rgb, successors = decode_with_successors(video, t)
    elif need and video is not None:
        rgb = decode_frames(video, t)
    depth_maps = None
    for m in need:
        if m == "rgb":
            if rgb is None:
                raise ModalityError("rgb: needs the video (--video) or pre-extracted rgb frames")
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
        request.frames[m] = _frames(source)
    if "audio" in names:
        if audio is None:
            raise ModalityError("audio: the configuration needs an audio file (--audio)")
        a = config["audio"]
        request.audio = audio_clips(read_audio(audio), a["num_clips"], a["clip_frames"], a["num_mel_bins"])
    if "pc" in names:
        if pc is None:
            raise ModalityError("pc: the configuration needs 3D features (--pc FILE.npz with feat and coords)")
        request.pc_feat, request.pc_coords = _points(pc)
    return request

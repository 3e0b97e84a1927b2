"""`crema ask`: the client of the `crema` ensemble (tritonclient, HTTP or gRPC). No torch, no ONNX Runtime.

    client = CremaClient("127.0.0.1:8000")
    result = client.ask("What color is the shape?", video=Path("clip.mp4").read_bytes(), ...)

Inputs: the question; video and depth as file bytes (any container OpenCV reads; .npy or 16-bit PNG
depth); pre-extracted frames per visual modality as [T, 3, S, S] float32; audio file bytes (none: the
server takes the video's soundtrack); point features [P, D] float32 and voxel coordinates [P, 3] int64;
task options. Only what is given is sent. From files (tensors_from_files), a visual modality's frames may
also be a folder of images or a video: they are sampled and normalised here (runtime.video, OpenCV) to
the served model's [T, 3, S, S], which CremaClient.frame_shapes reads from the server.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pathlib import Path

from runtime.files import NPY_MAGIC, InputFileError, read_bytes, read_npy, read_points

from .layout import ANSWER_NAMES, ENSEMBLE

PROTOCOLS = ("http", "grpc")
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
             np.dtype(object): "BYTES"}


class AskError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""


@dataclass
class AskResult:
    answer: str
    option_scores: list[float]
    seconds: float
    question_tokens: tuple[int, int] | None = None  # (read, given): given > read when cut to max_txt_len


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected http or grpc")
    return module


def request_tensors(question: str | bytes, video: bytes | None = None, depth: bytes | None = None,
                    audio: bytes | None = None, pc_feat: np.ndarray | None = None, pc_coords: np.ndarray | None = None,
                    frames: dict[str, np.ndarray] | None = None, task: str | None = None,
                    num_beams: int | None = None, max_new_tokens: int | None = None,
                    options: list[str] | None = None, situation: str | None = None,
                    templ_values: str | None = None) -> dict[str, np.ndarray]:
    """The ensemble's input tensors, by name, for what is given. options, situation, templ_values: a
    dataset's structured request (the server builds the prompt of the dataset it was exported with)."""
    text = lambda x: np.array([x if isinstance(x, bytes) else x.encode()], dtype=object)  # noqa: E731
    out = {"question": text(question)}
    if options is not None:
        out["options"] = np.array([o.encode() for o in options], dtype=object)
    for name, value in (("video", video), ("depth", depth), ("audio", audio), ("task", task),
                        ("situation", situation), ("templ_values", templ_values)):
        if value is not None:
            out[name] = text(value)
    if pc_feat is not None:
        out["pc_feat"] = np.ascontiguousarray(pc_feat, dtype=np.float32)
    if pc_coords is not None:
        out["pc_coords"] = np.ascontiguousarray(pc_coords, dtype=np.int64)
    for m, x in (frames or {}).items():
        out[f"{m}_frames"] = np.ascontiguousarray(x, dtype=np.float32)
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            out[name] = np.array([value], dtype=np.int32)
    return out


def tensors_from_files(question: str, video=None, depth=None, audio=None, pc=None, frames: dict | None = None,
                       frame_shapes: dict[str, tuple[int, int]] | None = None, **options) -> dict[str, np.ndarray]:
    """Like request_tensors, from paths: pc is a .npz with feat and coords, frames modality -> a .npy, a
    folder of images or a video (these need frame_shapes[modality] = (frames, image size): the served
    model's, CremaClient.frame_shapes()). A missing, unreadable or malformed file is an InputFileError
    naming the field and the file."""
    feat, coords = read_points(pc) if pc is not None else (None, None)
    arrays = {m: _frames_file(p, m, frame_shapes) for m, p in (frames or {}).items()}
    return request_tensors(question, _file_bytes(video, "video"), _file_bytes(depth, "depth"),
                           _file_bytes(audio, "audio"), feat, coords, arrays, **options)


def needs_frame_shapes(frames: dict | None) -> bool:
    """Whether some frames source is a folder or a video (not a .npy): tensors_from_files then needs the
    served model's frame shapes."""
    return any(not _is_npy(p, f"frames[{m!r}] {p}") for m, p in (frames or {}).items())


def _is_npy(path, label: str) -> bool:
    return not Path(path).is_dir() and read_bytes(path, label, len(NPY_MAGIC)) == NPY_MAGIC


def _frames_file(path, m: str, frame_shapes: dict | None) -> np.ndarray:
    """A .npy as it is; a folder of images or a video sampled and normalised as the server's runtime would."""
    label = f"frames[{m!r}] {path}"
    if _is_npy(path, label):
        return read_npy(path, label)
    if frame_shapes is None:
        raise InputFileError(f"{label}: a folder or video needs the served model's frame count and size "
                             "(frame_shapes: CremaClient.frame_shapes())")
    if m not in frame_shapes:
        raise InputFileError(f"{label}: the served model takes no {m}_frames (its visual modalities: "
                             f"{', '.join(frame_shapes) or 'none'})")
    from runtime.video import decode_frames, normalize_frames, read_frame_folder  # OpenCV: only here

    t, size = frame_shapes[m]
    images = read_frame_folder(path, t, label, size) if Path(path).is_dir() else decode_frames(path, t, label)
    return normalize_frames(images, size)


def _file_bytes(path, field: str) -> bytes | None:
    """A file's bytes to send as `field` (None when no path); refused clearly when it cannot be read."""
    if path is None:
        return None
    data = read_bytes(path, f"{field}: {path}")
    if not data:
        raise InputFileError(f"{field}: {path}: an empty file")
    return data


class CremaClient:
    def __init__(self, url: str, protocol: str = "http", model: str = ENSEMBLE, timeout_s: float = 300.0):
        self.module = _module(protocol)
        self.protocol, self.model, self.url = protocol, model, url
        if protocol == "http":
            self.client = self.module.InferenceServerClient(url, connection_timeout=timeout_s,
                                                            network_timeout=timeout_s)
        else:
            self.client = self.module.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def infer(self, tensors: dict[str, np.ndarray]) -> AskResult:
        inputs = []
        for name, x in tensors.items():
            tensor = self.module.InferInput(name, list(x.shape), DATATYPES[x.dtype])
            tensor.set_data_from_numpy(x)
            inputs.append(tensor)
        outputs = [self.module.InferRequestedOutput(n) for n in ANSWER_NAMES]
        start = time.perf_counter()
        try:
            if self.protocol == "grpc":
                result = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            else:
                result = self.client.infer(self.model, inputs, outputs=outputs)
        except OSError as e:
            raise AskError(f"no Triton server answers at {self.url} ({self.protocol}): {e}") from e
        except Exception as e:  # InferenceServerException (either protocol) carries the server's message
            message = (e.message() if hasattr(e, "message") else "") or str(e)
            if "failed to connect" in message.lower() or "unavailable" in message.lower():
                raise AskError(f"no Triton server answers at {self.url} ({self.protocol}): {message}") from e
            raise AskError(f"the server refused the request: {message}") from e
        seconds = time.perf_counter() - start
        return AskResult(result.as_numpy("answer").reshape(-1)[0].decode(),
                         [float(x) for x in result.as_numpy("option_scores")], seconds,
                         tuple(int(x) for x in result.as_numpy("question_tokens")))

    def frame_shapes(self) -> dict[str, tuple[int, int]]:
        """Modality -> (frames, image size) of the served model's `{m}_frames` inputs, from its metadata."""
        try:
            meta = self.client.get_model_metadata(self.model)
        except Exception as e:  # noqa: BLE001 - either protocol's InferenceServerException, or no server
            message = (e.message() if hasattr(e, "message") else "") or str(e)
            raise AskError(f"no model metadata from {self.url} ({self.protocol}): {message}") from e
        inputs = meta["inputs"] if isinstance(meta, dict) else [
            {"name": i.name, "shape": list(i.shape)} for i in meta.inputs]
        return {i["name"][:-len("_frames")]: (int(i["shape"][0]), int(i["shape"][-1]))
                for i in inputs if i["name"].endswith("_frames")}

    def ask(self, question: str, **inputs) -> AskResult:
        return self.infer(request_tensors(question, **inputs))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "CremaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

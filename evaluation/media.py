"""Find an item's media under a media root, in the layouts CREMA's dataset configs use.

nextqa      video: <root>/<video>.mp4 (SeViLA's layout) or the frame folder <root>/<video>/ of .jpg/.png
            (CREMA's: videos.storage is a frames root, rgbd_vqa_datasets.py); depth, flow, norm: CREMA's
            sibling frame folders <root>_depth/<video>/, <root>_flow/<video>/, <root>_norm/<video>/.
music_avqa  video and audio: <root>/<video_id>.mp4 (CREMA reads both from the same mp4:
            music_avqa_datasets.py get_video_path / get_audio_path).
sqa3d       pc: ours, <root>/pc/<scene>.npz or <root>/<scene>.npz with `feat` [N, D] and `coords` [N, 3]
            (load_points); or 3D-LLM's pair as CREMA stores it, <root>/voxelized_features_sam_nonzero_preprocess/
            <scene>.pt (torch, [N, 1408]) with <root>/voxelized_voxels_sam_nonzero_preprocess/<scene>.npy
            ([N, 3]), returned as pc_feat / pc_coords (a torch-free backend converts them to our .npz first).
            video: <root>/video/<scene>.mp4 or <root>/<scene>.mp4; frames: <root>/frame/<scene>/.
synthetic   the clip folder <root>/<video>/ holding clip.mp4 (video), audio.wav, depth.npy, pc.npz.

resolve_media returns {modality: Path} for what exists; a required modality that is absent raises
MissingMedia naming the paths it looked for.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from evaluation.annotations import Item

SYNTHETIC_FILES = {"video": "clip.mp4", "depth": "depth.npy", "audio": "audio.wav", "pc": "pc.npz"}  # generator's CLIP_FILES
REQUIRED = {"nextqa": ("video",), "music-avqa": ("video",), "sqa3d": ("pc",), "synthetic": ("video",)}
_FRAME_EXTS = (".jpg", ".jpeg", ".png")
PC_FEAT_DIR, PC_VOXEL_DIR = "voxelized_features_sam_nonzero_preprocess", "voxelized_voxels_sam_nonzero_preprocess"


class MissingMedia(FileNotFoundError):
    """An item's media file is not there: `path` is the (first) path looked for."""

    def __init__(self, item_id: str, modality: str, paths: list[Path]):
        self.item_id, self.modality, self.paths = item_id, modality, [Path(p) for p in paths]
        self.path = self.paths[0] if self.paths else None
        tried = " or ".join(str(p) for p in self.paths)
        super().__init__(f"item {item_id!r}: no {modality}: {tried} does not exist")


def _frames_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in _FRAME_EXTS for p in path.iterdir())


def _candidates(item: Item, root: Path) -> dict[str, list[tuple[str, Path]]]:
    """modality -> [(kind, path)] in order of preference; kind says how to test it (file, frames, dir)."""
    m = item.media
    if item.dataset == "nextqa":
        v = m["video"]
        out = {"video": [("file", root / f"{v}.mp4"), ("frames", root / v)]}
        for extra in ("depth", "flow", "norm"):
            out[extra] = [("frames", Path(f"{root.resolve()}_{extra}") / v)]
        return out
    if item.dataset == "music-avqa":
        path = root / f"{m['video']}.mp4"
        return {"video": [("file", path)], "audio": [("file", path)]}
    if item.dataset == "sqa3d":
        s = m["scene"]
        return {"pc": [("file", root / "pc" / f"{s}.npz"), ("file", root / f"{s}.npz"),
                       ("pair", root / PC_FEAT_DIR / f"{s}.pt")],
                "video": [("file", root / "video" / f"{s}.mp4"), ("file", root / f"{s}.mp4")],
                "frames": [("frames", root / "frame" / s)]}
    if item.dataset == "synthetic":
        return {k: [("file", root / m["video"] / name)] for k, name in SYNTHETIC_FILES.items()}
    raise ValueError(f"unknown dataset {item.dataset!r}")


def _found(kind: str, path: Path) -> bool:
    if kind == "file":
        return path.is_file()
    if kind == "frames":
        return _frames_dir(path)
    if kind == "pair":  # 3D-LLM features with their voxel coordinates
        return path.is_file() and (path.parent.parent / PC_VOXEL_DIR / f"{path.stem}.npy").is_file()
    raise AssertionError(kind)


def resolve_media(item: Item, root: str | Path, required: tuple[str, ...] | None = None) -> dict[str, Path]:
    """{modality: path} of the item's media found under `root`; `required` (default REQUIRED[dataset]) must
    all be found, else MissingMedia. 3D-LLM features come back as pc_feat and pc_coords."""
    root = Path(root)
    required = REQUIRED[item.dataset] if required is None else tuple(required)
    candidates = _candidates(item, root)
    unknown = [r for r in required if r not in candidates]
    if unknown:
        raise ValueError(f"{item.dataset} has no {unknown} media (known: {', '.join(candidates)})")
    found: dict[str, Path] = {}
    for modality, options in candidates.items():
        hit = next(((kind, p) for kind, p in options if _found(kind, p)), None)
        if hit is None:
            if modality in required:
                raise MissingMedia(item.id, modality, [p for _, p in options])
            continue
        kind, path = hit
        if kind == "pair":
            found["pc_feat"], found["pc_coords"] = path, path.parent.parent / PC_VOXEL_DIR / f"{path.stem}.npy"
        else:
            found[modality] = path
    return found


def load_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Our 3D input: a .npz with `feat` [N, D] (float) and `coords` [N, 3]; ValueError when malformed."""
    path = Path(path)
    if not path.is_file():
        raise MissingMedia(path.stem, "pc", [path])
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of feat and coords")
        with z:
            arrays = {k: z[k] for k in ("feat", "coords") if k in z.files}
            names = z.files
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not an npz, truncated, pickled
        raise ValueError(f"{path}: not a readable .npz: {e}") from e
    if len(arrays) != 2:
        raise ValueError(f"{path}: expected arrays 'feat' and 'coords', found {names}")
    feat, coords = arrays["feat"], arrays["coords"]
    if feat.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 3 or len(feat) != len(coords):
        raise ValueError(f"{path}: expected feat [N, D] and coords [N, 3], got {feat.shape} and {coords.shape}")
    if not np.issubdtype(feat.dtype, np.floating) or not np.issubdtype(coords.dtype, np.number):
        raise ValueError(f"{path}: expected float feat and numeric coords, got {feat.dtype} and {coords.dtype}")
    return feat, coords

"""Numpy-only readers for the array files a request may carry, bounded before anything is loaded.

Imports only numpy and the standard library: the Triton client (`crema ask`) uses it without
onnxruntime or OpenCV.

  read_points(path)                     .npz with `feat` [P, D] and `coords` [P, 3] -> (float32, int64)
  check_points(feat, coords, name)      the same checks on arrays
  npy_header(source, name)              a .npy's shape/dtype from its header, nothing loaded
  read_npy(source, name, max_bytes)     a .npy (path or bytes) -> array, refused from the header when
                                        larger than max_bytes; `rows=` loads only those rows of axis 0
  png_size(source, name)                a PNG's (height, width) from its IHDR chunk
  image_size(path, name)                a PNG's or JPEG's (height, width) from its header (JPEG: the SOF
                                        segment, found by walking the segments before it)
  check_dimensions(h, w, name)          refuses absurd image/video sizes before decoding
  fit_size(h, w)                        the size a frame is downscaled to (FRAME_PIXELS budget)

Budgets (DESIGN: memory bounded by design, whatever the file claims):
  MAX_SIDE = 16384 px per side and MAX_PIXELS = 40 MP per frame/map, from headers, before decoding
  (8K UHD, 7680x4320 = 33 MP, passes; one decoded 40 MP BGR frame is 120 MB).
  FRAME_PIXELS = 1920x1080 (2.07 MP): larger frames and depth maps are downscaled with INTER_AREA
  right after decoding (the ViT sees 224 px; 1080p and smaller pass untouched, 4K is halved exactly).
  MAX_NPY_BYTES = 256 MB loaded from one .npy (pre-extracted frames are a few MB; a depth stack is
  read map by map). MAX_POINTS_BYTES = 512 MB per .npz array (90k points of 1408 float32 features).
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_SIDE = 16384
MAX_PIXELS = 40_000_000
FRAME_PIXELS = 1920 * 1080
MAX_NPY_BYTES = 256 << 20
MAX_POINTS_BYTES = 512 << 20
NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
MAX_JPEG_SEGMENTS = 256  # segments walked to find a JPEG's frame header (EXIF, ICC, ... come first)


class InputFileError(ValueError):
    """An input file (or its bytes) that cannot be used; the message names it and says why."""


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / 2 ** 20:.0f} MB"


def _label(source, name: str | None) -> str:
    if name:
        return name
    return "bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


# --- image and frame sizes ---------------------------------------------------------------------

def check_dimensions(height: int, width: int, name: str) -> None:
    """Refuse a frame/map size before decoding it: each side in 1..MAX_SIDE, at most MAX_PIXELS."""
    if height <= 0 or width <= 0:
        raise InputFileError(f"{name}: {width}x{height} pixels, an empty image")
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise InputFileError(f"{name}: {width}x{height} pixels, over the limit of {MAX_SIDE} per side and "
                             f"{MAX_PIXELS // 1_000_000} megapixels")


def fit_size(height: int, width: int, budget: int = FRAME_PIXELS) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, to at most `budget` pixels; unchanged when within it."""
    if height * width <= budget:
        return height, width
    scale = math.sqrt(budget / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def png_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """A PNG's (height, width) from its IHDR chunk (the first 24 bytes); nothing is decoded."""
    label = _label(source, name)
    head = bytes(source[:24]) if isinstance(source, (bytes, bytearray, memoryview)) else read_bytes(source, label, 24)
    if not head.startswith(PNG_MAGIC) or head[12:16] != b"IHDR":
        raise InputFileError(f"{label}: not a PNG (no PNG signature and IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def image_size(path: str | Path, name: str | None = None) -> tuple[int, int]:
    """A PNG's or a JPEG's (height, width) from its header; nothing is decoded. Anything else is an
    InputFileError: the content decides, not the suffix."""
    label = _label(path, name)
    head = read_bytes(path, label, 24)
    if head.startswith(PNG_MAGIC):
        return png_size(head, label)
    if not head.startswith(JPEG_MAGIC):
        raise InputFileError(f"{label}: neither a PNG nor a JPEG image")
    with open(path, "rb") as f:
        return _jpeg_size(f, label)


# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f, label: str) -> tuple[int, int]:
    """Walk an open JPEG's marker segments, from after SOI, to its SOF -> (height, width)."""
    f.seek(2)
    for _ in range(MAX_JPEG_SEGMENTS):
        byte = f.read(1)
        if not byte:  # truncated
            break
        if byte != b"\xff":
            raise InputFileError(f"{label}: a corrupt JPEG (no marker where one belongs)")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            break
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # no length: TEM, RST0..7, SOI
            continue
        if code in (0xD9, 0xDA):  # EOI, start of scan: the frame header should have come before
            break
        size = f.read(2)
        if len(size) < 2 or struct.unpack(">H", size)[0] < 2:
            break
        length = struct.unpack(">H", size)[0]
        if code in _JPEG_SOF:
            data = f.read(5)
            if len(data) < 5:
                break
            height, width = struct.unpack(">HH", data[1:5])
            return height, width
        f.seek(length - 2, io.SEEK_CUR)
    raise InputFileError(f"{label}: a JPEG without a readable frame header (SOF)")


def read_bytes(path, label: str, n: int = -1) -> bytes:
    """A file's bytes (the first n when n >= 0); a missing, folder or unreadable path is an
    InputFileError naming `label`."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise InputFileError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{label}: a folder, expected a file") from None
    except OSError as e:
        raise InputFileError(f"{label}: cannot be read ({e.strerror})") from None


# --- .npy ----------------------------------------------------------------------------------------

class NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # where the data starts, in bytes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _open_binary(source, label: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputFileError(f"{label}: empty")
        return io.BytesIO(source)
    path = Path(source)
    if not path.is_file():
        raise InputFileError(f"{label}: no such file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise InputFileError(f"{label}: cannot be read ({e.strerror})") from None


def npy_header(source: str | Path | bytes, name: str | None = None) -> NpyHeader:
    """Shape, dtype and data offset from a .npy header; refuses non-.npy data and object arrays."""
    label = _label(source, name)
    with _open_binary(source, label) as f:
        if f.read(6) != NPY_MAGIC:
            raise InputFileError(f"{label}: not a .npy file")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise InputFileError(f"{label}: a corrupt .npy header ({e})") from e
        offset = f.tell()
    if dtype.hasobject:
        raise InputFileError(f"{label}: an object array (pickled data is not accepted)")
    return NpyHeader(tuple(shape), dtype, bool(fortran), offset)


def read_npy(source: str | Path | bytes, name: str | None = None, max_bytes: int = MAX_NPY_BYTES,
             rows: list[int] | None = None) -> np.ndarray:
    """A .npy file or its bytes -> array. Only `rows` of axis 0 are loaded when given (a path is
    memory-mapped, bytes are viewed in place); what would be loaded is checked against max_bytes
    from the header first."""
    label = _label(source, name)
    head = npy_header(source, label)
    size = head.nbytes
    if rows is not None:
        if not head.shape:
            raise InputFileError(f"{label}: a scalar, expected an array")
        if any(not 0 <= r < head.shape[0] for r in rows):
            raise InputFileError(f"{label}: {head.shape[0]} rows, rows {sorted(set(rows))} requested")
        if not head.fortran_order:  # C order: only the requested rows are touched
            size = len(rows) * (size // max(head.shape[0], 1))
    if size > max_bytes:
        raise InputFileError(f"{label}: shape {head.shape} {head.dtype} is {_size(size)} to load, "
                             f"over the limit of {_size(max_bytes)}")
    array = _npy_data(source, head, label)
    return np.array(array) if rows is None else np.asarray(array[rows])  # copies: the file can close


def _npy_data(source, head: NpyHeader, label: str) -> np.ndarray:
    count = math.prod(head.shape)
    order = "F" if head.fortran_order else "C"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) < head.offset + head.nbytes:
            raise InputFileError(f"{label}: truncated .npy ({len(source)} bytes, the header needs "
                                 f"{head.offset + head.nbytes})")
        return np.frombuffer(source, head.dtype, count, head.offset).reshape(head.shape, order=order)
    if Path(source).stat().st_size < head.offset + head.nbytes:
        raise InputFileError(f"{label}: truncated .npy (shorter than its header's shape {head.shape})")
    if count == 0:
        return np.zeros(head.shape, head.dtype)
    return np.memmap(source, head.dtype, "r", head.offset, head.shape, order)


# --- 3D point features ---------------------------------------------------------------------------

def check_points(feat, coords, name: str = "pc") -> tuple[np.ndarray, np.ndarray]:
    """feat [P, D] float and coords [P, 3] integer voxels -> (float32, int64); refused otherwise."""
    feat, coords = np.asarray(feat), np.asarray(coords)
    if feat.ndim != 2 or feat.shape[0] == 0 or feat.shape[1] == 0:
        raise InputFileError(f"{name}: feat of shape {feat.shape}, expected [P, D] with P, D > 0")
    if coords.shape != (feat.shape[0], 3):
        raise InputFileError(f"{name}: coords of shape {coords.shape}, expected [{feat.shape[0]}, 3] "
                             f"(one voxel per point of feat)")
    if not np.issubdtype(feat.dtype, np.number) or np.issubdtype(feat.dtype, np.complexfloating):
        raise InputFileError(f"{name}: feat of dtype {feat.dtype}, expected real numbers")
    if not (np.issubdtype(coords.dtype, np.integer) or np.issubdtype(coords.dtype, np.floating)):
        raise InputFileError(f"{name}: coords of dtype {coords.dtype}, expected integer voxel coordinates")
    whole = np.issubdtype(coords.dtype, np.integer) or np.isfinite(coords).all() and (coords == np.round(coords)).all()
    if not whole:
        raise InputFileError(f"{name}: coords are not whole numbers (integer voxel coordinates expected)")
    return feat.astype(np.float32, copy=False), coords.astype(np.int64, copy=False)


def read_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A .npz with `feat` [P, D] and `coords` [P, 3] -> (feat float32, coords int64)."""
    label = str(path)
    head = read_bytes(path, label, 6)
    if head.startswith(NPY_MAGIC):
        raise InputFileError(f"{label}: a .npy array, expected a .npz with arrays 'feat' [P, D] and 'coords' [P, 3] "
                             f"(np.savez(path, feat=..., coords=...))")
    if not head.startswith(b"PK"):
        raise InputFileError(f"{label}: not a .npz (zip) file; expected arrays 'feat' [P, D] and 'coords' [P, 3]")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise InputFileError(f"{label}: a corrupt .npz ({e})") from e
    with archive:
        members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
        missing = [k for k in ("feat", "coords") if k not in members]
        if missing:
            raise InputFileError(f"{label}: no {' or '.join(repr(k) for k in missing)} array (has "
                                 f"{sorted(members) or 'none'}); expected 'feat' [P, D] and 'coords' [P, 3]")
        arrays = {k: _npz_member(archive, members[k], f"{label}[{k!r}]") for k in ("feat", "coords")}
    return check_points(arrays["feat"], arrays["coords"], label)


def _npz_member(archive: zipfile.ZipFile, member: str, label: str) -> np.ndarray:
    info = archive.getinfo(member)
    if info.file_size > MAX_POINTS_BYTES:
        raise InputFileError(f"{label}: {_size(info.file_size)} uncompressed, over the limit of "
                             f"{_size(MAX_POINTS_BYTES)}")
    try:
        data = archive.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputFileError(f"{label}: cannot be read from the archive ({e})") from e
    return read_npy(data, label, MAX_POINTS_BYTES)

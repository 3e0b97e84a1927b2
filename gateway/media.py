"""Media a chat request carries: base64 data (bare or a `data:` URL) or `file://` URLs under the
directories the operator allows. Nothing is fetched from the network (http(s) URLs are refused: SSRF).

Sizes are bounded before any work: a base64 string's decoded size is computed from its length before
it is decoded, a file's from fstat before it is read, a .npz member's from its zip header before it is
inflated; all media of one request share one byte budget (`Budget`, 413 past it).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from runtime.files import NPY_MAGIC, InputFileError, check_points, read_npy

from .errors import ApiError


class Budget:
    """Decoded bytes one request's media may take together."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0

    def take(self, n: int, param: str) -> None:
        if self.used + n > self.max_bytes:
            raise ApiError(f"{param}: {n} bytes, which brings this request's media to {self.used + n} bytes, over "
                           f"this gateway's limit of {self.max_bytes}", param, "payload_too_large", 413)
        self.used += n


class Media:
    """Loads one request's media: `bytes_of(value, param)` -> bytes; `points_of(value, param)` ->
    (feat [P, D] float32, coords [P, 3] int64)."""

    def __init__(self, allow_dirs: list[Path], budget: Budget):
        self.allow_dirs, self.budget = allow_dirs, budget

    def bytes_of(self, value, param: str) -> bytes:
        """A `data:` URL, a `file://` URL, or bare base64 (its alphabet has no ':')."""
        if not isinstance(value, str) or not value:
            raise ApiError(f"{param}: expected a non-empty string (base64, a data: URL or a file:// URL)", param,
                           "invalid_type")
        scheme = value.split(":", 1)[0].lower() if ":" in value[:16] else ""
        if scheme == "data":
            return self._data_url(value, param)
        if scheme == "file":
            return self._file_url(value, param)
        if scheme in ("http", "https"):
            raise ApiError(f"{param}: http(s) URLs are not fetched by this gateway (send the data as base64, or a "
                           "file:// URL under an allowed directory)", param, "unsupported_url")
        if scheme:
            raise ApiError(f"{param}: {scheme}: URLs are not supported (base64, data: or file:// only)", param,
                           "unsupported_url")
        return self._base64(value, param)

    def _base64(self, text: str, param: str) -> bytes:
        self.budget.take(len(text) // 4 * 3, param)  # the decoded size, before decoding
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(f"{param}: not valid base64", param, "invalid_base64") from None
        if not data:
            raise ApiError(f"{param}: empty", param, "invalid_value")
        return data

    def _data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise ApiError(f"{param}: a data: URL must be base64 (data:<type>;base64,<data>)", param, "invalid_url")
        return self._base64(payload, param)

    def _file_url(self, url: str, param: str) -> bytes:
        parts = urlsplit(url)
        path = Path(unquote(parts.path))
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not path.is_absolute():
            raise ApiError(f"{param}: expected file:///absolute/path", param, "invalid_url")
        real = path.resolve()  # symlinks followed: one pointing out of an allowed directory is outside it
        if not any(real.is_relative_to(d) for d in self.allow_dirs):
            raise ApiError(f"{param}: {path} is not under a directory this gateway allows"
                           + ("" if self.allow_dirs else " (it allows none: --allow-dir)"), param, "path_not_allowed",
                           403)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise ApiError(f"{param}: {path}: cannot be opened ({e.strerror})", param, "file_not_readable") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ApiError(f"{param}: {path}: not a regular file", param, "file_not_readable")
            self.budget.take(info.st_size, param)
            return f.read(info.st_size)

    def points_of(self, value, param: str) -> tuple[np.ndarray, np.ndarray]:
        """A .npz with `feat` [P, D] and `coords` [P, 3] (np.savez), given as bytes_of takes it."""
        data = self.bytes_of(value, param)
        if data.startswith(NPY_MAGIC) or not data.startswith(b"PK"):
            raise ApiError(f"{param}: not a .npz (zip) archive with arrays 'feat' [P, D] and 'coords' [P, 3]", param,
                           "invalid_points")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
                missing = [k for k in ("feat", "coords") if k not in members]
                if missing:
                    raise InputFileError(f"{param}: no {' or '.join(missing)} array (has {sorted(members)})")
                arrays = {k: self._member(archive, members[k], f"{param}[{k!r}]") for k in ("feat", "coords")}
            return check_points(arrays["feat"], arrays["coords"], param)
        except (InputFileError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise ApiError(str(e) if isinstance(e, InputFileError) else f"{param}: a corrupt .npz ({e})", param,
                           "invalid_points") from None

    def _member(self, archive: zipfile.ZipFile, name: str, label: str) -> np.ndarray:
        size = archive.getinfo(name).file_size  # inflated size, from the zip header: bounded before reading
        self.budget.take(size, label)
        return read_npy(archive.read(name), label, size)

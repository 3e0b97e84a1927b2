"""Memory is bounded by design, whatever the file claims: long sound files, huge frames, bombs.

Peak memory is measured in a child process: its peak RSS (VmHWM, reset after a warm-up request on
small files, so library loading does not count) minus its RSS before the request.
Bounds: FRAMES_MB = 300 for visual modalities. Why: frames are cut to FRAME_PIXELS (1920x1080) as
they are decoded; at that size OpenCV's DIS flow takes about 120 MB, the kept frames and depth maps
(8 + 4 of 6-8 MB) and the normals' float64 gradients most of the rest: 1080p input measures about
260 MB. AUDIO_MB = 50: only about 10 s of samples are decoded (a few MB; 9 MB measured).
On the files here the code before this bound took 0.5-1.8 GB.
"""
import json
import struct
import subprocess
import sys
import textwrap
import zlib

import cv2
import numpy as np
import pytest
import soundfile

from reference.config import preset
from runtime.files import FRAME_PIXELS, InputFileError, fit_size, read_npy
from runtime.inputs import request_from_files
from runtime.modalities import ModalityError, read_depth
from runtime.video import VideoError, decode_frames

FRAMES_MB, AUDIO_MB = 300, 50

CHILD = textwrap.dedent("""
    import json, sys
    from runtime.inputs import request_from_files

    def rss_mb(field):  # VmRSS (now) or VmHWM (peak since the last reset), in MB
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status[field].split()[0]) / 1024

    config, warm, files = json.loads(sys.argv[1])
    request_from_files(config, "Q?", **warm)
    with open("/proc/self/clear_refs", "w") as f:  # the peak restarts from here (a fork's ru_maxrss
        f.write("5")                               # carries the parent's, so it cannot be used)
    before = rss_mb("VmRSS")
    try:
        r = request_from_files(config, "Q?", **files)
    except ValueError as e:
        print(json.dumps({"mb": rss_mb("VmHWM") - before, "error": str(e)}))
        sys.exit()
    shapes = {m: list(f.shape) for m, f in r.frames.items()}
    if r.audio is not None:
        shapes["audio"] = list(r.audio.shape)
    print(json.dumps({"mb": rss_mb("VmHWM") - before, "shapes": shapes}))
""")


def _peak(config: dict, warm: dict, files: dict) -> dict:
    """Build a request from `files` in a fresh process: its peak memory increase in MB ("mb") and the
    shapes it built ("shapes") or the error it gave ("error")."""
    args = json.dumps([config, {k: str(v) for k, v in warm.items()}, {k: str(v) for k, v in files.items()}])
    proc = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _config(modalities, preset_name="flant5xl"):
    return preset(preset_name, modalities=tuple(modalities)).to_dict()


def write_silence_ogg(path, minutes: float, rate: int = 44100):
    """A silent OGG/Vorbis (tiny on disk, long when decoded); written in small blocks (libsndfile's
    Vorbis encoder crashes on very large writes)."""
    block = np.zeros(8192, np.float32)
    with soundfile.SoundFile(path, "w", rate, 1, format="OGG", subtype="VORBIS") as f:
        for _ in range(int(minutes * 60 * rate) // len(block)):
            f.write(block)
    return path


def write_noise_wav(path, minutes: float, rate: int = 44100, channels: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    with soundfile.SoundFile(path, "w", rate, channels, format="WAV", subtype="PCM_16") as f:
        for _ in range(int(minutes * 60)):
            f.write((0.1 * rng.standard_normal((rate, channels))).astype(np.float32))
    return path


def write_mjpg(path, frames: int, width: int, height: int):
    """An MJPG AVI of a pattern that shifts by 5 grey levels per frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    assert writer.isOpened()
    y, x = np.mgrid[0:height, 0:width]
    for i in range(frames):
        image = np.empty((height, width, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = (x // 8 + 5 * i) % 256, (y // 8) % 256, 128
        writer.write(image)
    writer.release()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    write_mjpg(d / "v.avi", 4, 64, 48)
    cv2.imwrite(str(d / "d.png"), np.full((48, 64), 1000, np.uint16))
    np.save(d / "d.npy", np.ones((3, 48, 64), np.float16))
    soundfile.write(d / "a.wav", np.zeros(16000, np.float32), 16000)
    soundfile.write(d / "a.ogg", np.zeros(44100, np.float32), 44100, format="OGG", subtype="VORBIS")
    return d


def test_thirty_minutes_of_silent_ogg_decodes_only_what_is_used(small, tmp_path):
    ogg = write_silence_ogg(tmp_path / "silence.ogg", minutes=30)
    assert ogg.stat().st_size < 1 << 20
    result = _peak(_config(["audio"]), {"audio": small / "a.ogg"}, {"audio": ogg})
    assert result["shapes"]["audio"] == [2, 512, 128]
    assert result["mb"] < AUDIO_MB, f"{result['mb']:.0f} MB for a 30-minute OGG"


def test_ten_minute_wav_decodes_only_what_is_used(small, tmp_path):
    wav = write_noise_wav(tmp_path / "long.wav", minutes=10)
    result = _peak(_config(["audio"]), {"audio": small / "a.wav"}, {"audio": wav})
    assert result["shapes"]["audio"] == [2, 512, 128]
    assert result["mb"] < AUDIO_MB, f"{result['mb']:.0f} MB for a 10-minute WAV"


def test_a_4000x3000_mjpg_is_downscaled_on_decoding(small, tmp_path):
    """rgb, flow, depth (a 16-bit PNG at the video's size) and normals from 12-megapixel frames."""
    video = write_mjpg(tmp_path / "big.avi", 4, 4000, 3000)
    depth = tmp_path / "depth.png"
    y, x = np.mgrid[0:3000, 0:4000]
    cv2.imwrite(str(depth), (1000 + x // 4 + y // 8).astype(np.uint16))
    config = _config(["rgb", "flow", "depth", "norm"])
    result = _peak(config, {"video": small / "v.avi", "depth": small / "d.png"}, {"video": video, "depth": depth})
    assert result["shapes"]["flow"] == [4, 3, 224, 224]
    assert result["mb"] < FRAMES_MB, f"{result['mb']:.0f} MB for four 4000x3000 frames"


def test_depth_at_the_video_size_follows_the_frames_downscaling(tmp_path):
    video = write_mjpg(tmp_path / "big.avi", 2, 4000, 3000)
    np.save(tmp_path / "depth.npy", np.ones((3000, 4000), np.float32))
    cv2.imwrite(str(tmp_path / "depth.png"), np.full((3000, 4000), 700, np.uint16))
    frames = decode_frames(video, 2)
    assert frames.shape[1:3] == fit_size(3000, 4000) and frames.shape[1] * frames.shape[2] <= FRAME_PIXELS
    assert read_depth(tmp_path / "depth.npy").shape == read_depth(tmp_path / "depth.png").shape == frames.shape[1:3]
    small = decode_frames(write_mjpg(tmp_path / "hd.avi", 2, 1920, 1080), 2)
    assert small.shape[1:3] == (1080, 1920), "1080p is within the budget: not resampled"


def test_a_depth_npy_stack_loads_only_the_sampled_maps(small, tmp_path):
    """[48, 1080, 1920] float16 (200 MB on disk): only frame_num maps are read."""
    path = tmp_path / "stack.npy"
    stack = np.lib.format.open_memmap(path, "w+", np.float16, (48, 1080, 1920))
    for i in range(len(stack)):
        stack[i] = 1 + i / 10
    stack.flush()
    del stack
    result = _peak(_config(["depth"]), {"depth": small / "d.npy"}, {"depth": path})
    assert result["shapes"]["depth"] == [4, 3, 224, 224]
    assert result["mb"] < FRAMES_MB, f"{result['mb']:.0f} MB for 4 of 48 1080p depth maps"


def write_png_bomb(path, width: int, height: int):
    """A valid all-black 8-bit grey PNG: a few MB on disk, width * height bytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compress, row = zlib.compressobj(1), bytes(width + 1)  # filter byte + pixels
    idat = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_png_decompression_bomb_is_refused_from_its_header(small, tmp_path):
    bomb = write_png_bomb(tmp_path / "bomb.png", 20000, 20000)  # 400 megapixels
    assert bomb.stat().st_size < 4 << 20
    result = _peak(_config(["depth"]), {"depth": small / "d.png"}, {"depth": bomb})
    assert "20000x20000 pixels, over the limit" in result.get("error", ""), result
    assert result["mb"] < 20, "refused before decoding"
    with pytest.raises(ModalityError, match="depth bytes: 20000x20000 pixels, over the limit"):
        request_from_files(_config(["depth"], "tiny"), "Q?", depth=bomb.read_bytes())


def test_absurd_video_dimensions_are_refused_before_decoding(tmp_path):
    wide = write_mjpg(tmp_path / "wide.avi", 2, 17000, 64)
    assert cv2.VideoCapture(str(wide)).get(cv2.CAP_PROP_FRAME_WIDTH) == 17000
    with pytest.raises(VideoError, match=r"wide.avi: 17000x64 pixels, over the limit of 16384 per side"):
        decode_frames(wide, 2)
    with pytest.raises(VideoError, match=r"^video bytes: 17000x64 pixels, over the limit"):
        decode_frames(wide.read_bytes(), 2)


def test_npy_headers_are_checked_before_loading(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 100), np.float32))
    with pytest.raises(InputFileError, match=r"a.npy: shape \(10, 100\) float32 is 4000 bytes to load, over the "
                                             r"limit of 1000 bytes"):
        read_npy(tmp_path / "a.npy", max_bytes=1000)
    assert read_npy(tmp_path / "a.npy", max_bytes=1000, rows=[0, 5]).shape == (2, 100)  # 800 bytes
    header = tmp_path / "claims.npy"  # a header claiming 2 x 20000 x 20000 float32 (3.2 GB), no data
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2, 20000, 20000)})
    with pytest.raises(ModalityError, match=r"claims.npy: 20000x20000 pixels, over the limit"):
        request_from_files(_config(["depth"], "tiny"), "Q?", depth=header)
    with pytest.raises(InputFileError, match="truncated .npy"):
        read_npy(header, rows=[0], max_bytes=4 << 30)


def test_the_file_readers_need_only_numpy():
    """runtime/files.py serves `crema ask` too, which has neither OpenCV nor ONNX Runtime."""
    code = ("import sys, runtime.files; heavy = {'cv2', 'onnxruntime', 'torch', 'soundfile', 'soxr'} & set(sys.modules);"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

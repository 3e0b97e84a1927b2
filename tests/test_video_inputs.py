"""A visual modality from its own folder of frames (as CREMA's datasets store depth, flow and normals) or
its own video; a model of video-derived modalities from `--video` alone, in the runtime, the CLI and over
Triton. Real files: PNG/JPEG frames written with OpenCV (grey+alpha PNGs by hand), videos with PyAV."""
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import soundfile

from reference.config import preset
from runtime.files import fit_size
from runtime.inputs import request_from_files
from runtime.video import VideoError, decode_frames, normalize_frames, pil_resize, read_frame_folder
from test_audio import write_av
from triton_models.client import needs_frame_shapes, tensors_from_files


def _config(modalities, **kw):
    return preset("tiny", modalities=modalities, **kw).to_dict()


def _grey_folder(folder, count, size=(40, 50), suffix=".png"):
    """count frames; frame i is uniformly grey 20 * i + 10 (so a pixel tells which frame it is)."""
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"frame_{i:04d}{suffix}"), np.full(size, 20 * i + 10, np.uint8))
    return folder


def _png(path, array, colour_type, bit_depth=8):
    """A PNG written byte by byte (OpenCV cannot write grey + alpha): colour_type 0 grey, 2 RGB, 4 grey+alpha."""
    h, w = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    raw = b"".join(b"\x00" + array[r].astype(dtype).tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _grey_of(frames: np.ndarray) -> list[int]:
    """The grey level of each normalised frame [T, 3, S, S] (uniformly grey frames), back in 0..255."""
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return [int(round(float((f[0, 0, 0] * std[0] + mean[0]) * 255))) for f in frames]


# --- folders of frames ---------------------------------------------------------------------------

def test_a_folder_is_sampled_as_crema_samples_its_frame_folders(tmp_path):
    """CREMA's load_frames samples over len - 1 frames: of 10 frames, 2 are 2 and 6 (over all 10, as
    for a video, they would be 2 and 7). Names sort as strings; other files and hidden ones are ignored."""
    folder = _grey_folder(tmp_path / "depth", 10)
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._frame_0003.png").write_bytes(b"macOS metadata, not an image")
    (folder / "sub").mkdir()
    cfg = _config(("rgb", "depth"))
    frames = np.zeros((2, 3, 56, 56), np.float32)
    r = request_from_files(cfg, "Q?", frames={"rgb": frames, "depth": folder})
    assert r.frames["depth"].shape == (2, 3, 56, 56) and r.frames["depth"].dtype == np.float32
    assert _grey_of(r.frames["depth"]) == [20 * 2 + 10, 20 * 6 + 10]
    one = _grey_folder(tmp_path / "one", 1)
    assert _grey_of(request_from_files(cfg, "Q?", frames={"rgb": frames, "depth": one}).frames["depth"]) == [10, 10]


def test_folder_frames_are_decoded_resized_and_normalised_as_video_frames(tmp_path):
    """Frames written from a video's decoded frames (lossless PNG) give those frames, resized as CREMA resizes
    a folder's frames (Pillow BICUBIC; a video's own frames are resized with OpenCV)."""
    rng = np.random.default_rng(0)
    video = write_av(tmp_path / "v.mp4", frames=rng.integers(0, 256, (10, 48, 64, 3), dtype=np.uint8))
    decoded = decode_frames(video, 10)  # every frame, RGB
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(decoded):
        cv2.imwrite(str(tmp_path / "frames" / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    cfg = _config(("rgb", "flow"))
    r = request_from_files(cfg, "Q?", video=video, frames={"flow": tmp_path / "frames"})
    np.testing.assert_array_equal(r.frames["flow"], normalize_frames(np.stack([pil_resize(f, 56) for f in decoded[[2, 6]]]),
                                                                     56))
    as_video = request_from_files(cfg, "Q?", video=video, frames={"flow": video})  # a video of its own
    np.testing.assert_array_equal(as_video.frames["flow"], r.frames["rgb"])


def test_images_convert_to_rgb_as_pil_convert_rgb_does(tmp_path):
    """grey -> repeated, alpha dropped, 16-bit colour -> its high byte, 16-bit grey within 0..255 kept;
    colour order is RGB (OpenCV's BGR is undone); JPEG within its loss."""
    cases = {
        "grey.png": (lambda p: cv2.imwrite(str(p), np.full((4, 6), 77, np.uint8)), (77, 77, 77)),
        "grey_alpha.png": (lambda p: _png(p, np.dstack([np.full((4, 6), 90, np.uint8), np.full((4, 6), 3, np.uint8)]),
                                          4), (90, 90, 90)),
        "rgba.png": (lambda p: cv2.imwrite(str(p), np.full((4, 6, 4), (30, 20, 200, 9), np.uint8)), (200, 20, 30)),
        "rgb16.png": (lambda p: _png(p, np.full((4, 6, 3), (0x1234, 0xABCD, 0x00FF), np.uint16), 2, 16),
                      (0x12, 0xAB, 0x00)),
        "grey16.png": (lambda p: _png(p, np.full((4, 6), 200, np.uint16), 0, 16), (200, 200, 200)),
        "red.png": (lambda p: cv2.imwrite(str(p), np.full((4, 6, 3), (0, 0, 255), np.uint8)), (255, 0, 0)),
        "grey.jpg": (lambda p: cv2.imwrite(str(p), np.full((8, 8), 120, np.uint8)), (120, 120, 120)),
        "colour.jpeg": (lambda p: cv2.imwrite(str(p), np.full((8, 8, 3), (40, 160, 220), np.uint8)), (220, 160, 40)),
    }
    for name, (write, rgb) in cases.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        write(folder / name)
        frames = read_frame_folder(folder, 2)
        assert frames.dtype == np.uint8 and frames.shape[0] == 2 and frames.shape[3] == 3, name
        tolerance = 2 if name.endswith(("jpg", "jpeg")) else 0
        assert np.abs(frames.astype(int) - np.array(rgb)).max() <= tolerance, (name, frames[0, 0, 0])


@pytest.mark.parametrize("make, message", [
    (lambda d: None, r"no \.png/\.jpg/\.jpeg images in the folder"),
    (lambda d: (d / "readme.txt").write_text("frames come later"), r"no \.png/\.jpg/\.jpeg images in the folder"),
    (lambda d: (d / "a.png").write_text("not a picture"), r"a.png: neither a PNG nor a JPEG image"),
    (lambda d: (d / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF"), r"a.jpg: a JPEG without a readable frame"),
    (lambda d: [cv2.imwrite(str(d / f"{i}.png"), np.zeros((40 if i < 2 else 30, 50), np.uint8)) for i in range(4)],
     r"2.png is 50x30, 0.png is 50x40: the frames of a folder must share one size"),
    (lambda d: _png(d / "d.png", np.full((4, 6), 1000, np.uint16), 0, 16),
     r"d.png: a 16-bit grey image with values up to 1000.*Depth maps go to the depth input"),
    (lambda d: (d / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + struct.pack(">II", 20000, 20000)
                                           + b"\x08\x02\x00\x00\x00"), r"huge.png: 20000x20000 pixels, over the limit"),
])
def test_bad_folders_are_named(tmp_path, make, message):
    folder = tmp_path / "flow_frames"
    folder.mkdir()
    make(folder)
    cfg = _config(("rgb", "flow"))
    with pytest.raises(VideoError, match=r"^frames\['flow'\] .*flow_frames: .*" + message):
        request_from_files(cfg, "Q?", frames={"rgb": np.zeros((2, 3, 56, 56), np.float32), "flow": folder})


def test_large_frames_are_downscaled_to_the_frame_budget(tmp_path):
    (tmp_path / "big").mkdir()
    cv2.imwrite(str(tmp_path / "big" / "0.png"), np.full((1600, 2400, 3), 50, np.uint8))
    assert read_frame_folder(tmp_path / "big", 2).shape == (2, *fit_size(1600, 2400), 3)


def test_folder_frames_are_resized_exactly_as_cremas_loader_resizes_them(tmp_path):
    """CREMA's load_frames (data_utils.py l.163-174): `Image.open(f)` ... `.convert('RGB')` (depth, norm)
    ... `img.resize((224, 224))` (Pillow's default BICUBIC, antialiased), then /255 and CLIP's mean/std.
    Our folder path equals that bit for bit on a 640x360 downscale with fine detail; OpenCV's INTER_CUBIC
    (the video path's resize) does not."""
    from PIL import Image

    from runtime.video import MEAN, STD, normalize_frames
    rng = np.random.default_rng(0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        image = (np.linspace(0, 255, 640)[None, :, None] * np.ones((360, 1, 3)) + rng.normal(0, 40, (360, 640, 3)))
        cv2.putText(image, f"frame {i}", (40, 200), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 4)
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    got = normalize_frames(read_frame_folder(folder, 4, size=224), 224)
    files = sorted(folder.iterdir())
    indices = [0, 1, 2, 3]  # CREMA: uniform over len - 1 = 4 images, the middle of each interval
    want = np.stack([np.asarray(Image.open(files[i]).convert("RGB").resize((224, 224))) for i in indices])
    want = ((want.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want)
    cubic = normalize_frames(read_frame_folder(folder, 4), 224)
    assert np.abs(cubic - want).max() > 0.5  # the old OpenCV path: far from CREMA's on this downscale


# --- videos of one frame -------------------------------------------------------------------------

def test_a_one_frame_video(tmp_path):
    """As a modality's own video (or rgb): its frame repeated, as LAVIS does; for optical flow it is refused."""
    one = write_av(tmp_path / "one.mp4", frames=np.full((1, 32, 32, 3), 90, np.uint8))
    r = request_from_files(_config(("rgb", "depth")), "Q?", video=one, frames={"depth": one})
    np.testing.assert_array_equal(r.frames["depth"][0], r.frames["depth"][1])
    np.testing.assert_array_equal(r.frames["depth"], r.frames["rgb"])
    with pytest.raises(VideoError, match=r"one.mp4: 1 frame; optical flow \(flow\) needs a video of at least 2"):
        request_from_files(_config(("rgb", "flow")), "Q?", video=one)


# --- the Triton client reads folders and videos itself ---------------------------------------------

def test_the_client_samples_folders_and_videos_at_the_served_shape(tmp_path):
    folder = _grey_folder(tmp_path / "norm", 10)
    video = write_av(tmp_path / "flow.mp4", frames=np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), np.uint8))
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 56, 56), np.float32))
    frames = {"rgb": tmp_path / "rgb.npy", "norm": folder, "flow": video}
    assert needs_frame_shapes(frames) and not needs_frame_shapes({"rgb": tmp_path / "rgb.npy"})
    tensors = tensors_from_files("Q?", frames=frames, frame_shapes={m: (2, 56) for m in ("rgb", "flow", "norm")})
    want = request_from_files(_config(("rgb", "flow", "norm")), "Q?", frames=frames)
    for m in frames:
        np.testing.assert_array_equal(tensors[f"{m}_frames"], want.frames[m])
    with pytest.raises(ValueError, match=r"frames\['norm'\] .*norm: a folder or video needs the served model's"):
        tensors_from_files("Q?", frames={"norm": folder})
    with pytest.raises(ValueError, match=r"the served model takes no norm_frames \(its visual modalities: rgb\)"):
        tensors_from_files("Q?", frames={"norm": folder}, frame_shapes={"rgb": (2, 56)})


# --- the command line ----------------------------------------------------------------------------

def crema(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "crema.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_crema_run_from_a_video_alone_and_frame_folders(tmp_path):
    """`crema run --artifacts A --video v.mp4`: rgb, flow and the AAC soundtrack, no --audio; ONNX Runtime
    equals the reference. `--visual flow=DIR/` takes a folder. Missing inputs name the flags."""
    t = np.arange(32000) / 16000
    soundfile.write(tmp_path / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    frames = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    video = write_av(tmp_path / "v.mp4", "aac", tmp_path / "a.wav", frames=frames)
    mods = ["--modalities", "rgb_flow_audio"]
    crema("export", "--preset", "tiny", *mods, "--out", str(tmp_path / "art"), "--quiet")
    ort = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(video), "--question", "What?").stdout
    assert "answer:" in ort
    assert ort == crema("run", "--preset", "tiny", *mods, "--video", str(video), "--question", "What?").stdout
    folder = _grey_folder(tmp_path / "flow", 5)
    out = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(video), "--visual", f"flow={folder}",
                "--question", "What?").stdout
    assert "answer:" in out
    silent = write_av(tmp_path / "silent.mp4", frames=frames)
    proc = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(silent), "--question", "What?", check=False)
    assert proc.returncode == 2 and "silent.mp4: no audio stream" in proc.stderr
    assert "give a sound file (--audio)" in proc.stderr and "request field" not in proc.stderr, proc.stderr
    proc = crema("run", "--preset", "tiny", "--modalities", "rgb_pc", "--video", str(video), "--question", "What?",
                 check=False)
    assert proc.returncode == 2 and "which a video cannot give" in proc.stderr and "--pc" in proc.stderr, proc.stderr


# --- over Triton ---------------------------------------------------------------------------------

def test_over_triton_the_soundtrack_and_frame_folders(served, tmp_path):
    """The demo model served: a request without audio answers from the video's soundtrack (the demo
    clips carry it) as the in-process runtime does, and right; `crema ask --visual rgb=DIR/` samples a
    folder at the served model's frame shape."""
    from triton_models.client import CremaClient
    from synthetic.generator import clip_files

    p, data = served["pipeline"], served["data"]
    url = served["service"].endpoints.http_url
    q = next(q for q in served["questions"] if q.qtype == "sound")
    files = clip_files(data / q.clip)
    del files["audio"]
    want = p.answer([request_from_files(p.config, q.question, **files)])[0].text
    with CremaClient(url) as client:
        assert client.frame_shapes() == {m: (1, 56) for m in ("rgb", "depth", "flow", "norm")}
        assert client.infer(tensors_from_files(q.question, **files)).answer == want == q.answer
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, frame in enumerate(decode_frames(files["video"], 4)):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    q = next(x for x in served["questions"] if x.qtype == "colour" and x.clip == q.clip)
    files = clip_files(data / q.clip)
    local = p.answer([request_from_files(p.config, q.question, **files, frames={"rgb": folder})])[0].text
    args = [f"--{k}={v}" for k, v in files.items()] + ["--visual", f"rgb={folder}"]
    out = crema("ask", "--url", url, *args, "--question", q.question).stdout
    assert f"answer:   {local}\n" in out

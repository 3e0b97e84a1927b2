"""Video decoding with OpenCV: uniform sampling, normalisation, and clear errors on bad files."""
import struct

import cv2
import numpy as np
import pytest

from crema.demo import write_clip
from runtime.video import (MEAN, STD, VideoError, decode_frames, decode_with_successors, normalize_frames,
                           uniform_indices)


def read_video(source, n_frames, image_size):
    """What runtime/inputs.py does for rgb: decode the sampled frames (path or bytes), normalise."""
    return normalize_frames(decode_frames(source, n_frames), image_size)


def test_uniform_indices_match_lavis():
    assert uniform_indices(16, 4) == [2, 6, 10, 14]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # short clip: frames repeat


def test_read_video_file_and_bytes(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=16, size=64)
    frames = read_video(clip, 4, 56)
    assert frames.shape == (4, 3, 56, 56) and frames.dtype == np.float32
    pixels = frames.transpose(0, 2, 3, 1) * STD + MEAN  # back to [0, 1] RGB
    background = pixels[:, 2, 2]
    np.testing.assert_allclose(background, 128 / 255, atol=0.03)
    red = pixels[..., 0] - pixels[..., 2]
    xs = [np.unravel_index(np.argmax(r), r.shape)[1] for r in red]
    assert xs == sorted(xs) and xs[-1] > xs[0], "the ball moves left to right"
    np.testing.assert_array_equal(read_video(clip.read_bytes(), 4, 56), frames)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is not a video at all" * 10, "not a video|no frames|no frame"),
])
def test_bad_video_files(tmp_path, content, message):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=message):
        read_video(path, 4, 56)


def test_truncated_video_still_decodes_or_fails_clearly(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=16, size=64)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    try:
        frames = read_video(cut, 4, 56)
    except VideoError as e:
        assert "cut.mp4" in str(e)
    else:
        assert frames.shape == (4, 3, 56, 56) and np.isfinite(frames).all()


def test_missing_file():
    with pytest.raises(VideoError, match="no such file"):
        read_video("/nonexistent/clip.mp4", 4, 56)


def _write_mjpg(path, frames: int, size=(64, 48)):
    """An MJPG AVI whose frame i has its own pattern (so sampled frames can be told apart)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    for i in range(frames):
        writer.write(np.stack([(x * 3 + i * 11) % 256, (y * 5 + i * 29) % 256, np.full_like(x, i * 9)], -1)
                     .astype(np.uint8))
    writer.release()
    return path


def _all_frames(path) -> np.ndarray:
    """Every frame OpenCV decodes, RGB [N, H, W, 3]: the truth the sampled frames are compared with."""
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return np.stack(frames)
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _claim_frames(data: bytes, n: int) -> bytes:
    """The AVI with its frame counts (avih dwTotalFrames, strh dwLength, odml dmlh) set to n."""
    data = bytearray(data)
    for tag, offset in ((b"avih", 8 + 16), (b"strh", 8 + 32), (b"dmlh", 8)):
        at = data.find(tag)
        assert at > 0, tag
        struct.pack_into("<I", data, at + offset, n)
    return bytes(data)


def test_a_header_that_claims_more_frames_than_decode(tmp_path):
    """As Debian's tree.avi (444 frames declared, 68 decode): sample over the frames that decode."""
    honest = _write_mjpg(tmp_path / "honest.avi", 20)
    lying = tmp_path / "lying.avi"
    lying.write_bytes(_claim_frames(honest.read_bytes(), 444))
    assert cv2.VideoCapture(str(lying)).get(cv2.CAP_PROP_FRAME_COUNT) == 444
    truth = _all_frames(honest)
    assert len(truth) == len(_all_frames(lying)) == 20
    picked = uniform_indices(20, 4)
    np.testing.assert_array_equal(decode_frames(lying, 4), truth[picked])
    np.testing.assert_array_equal(decode_frames(lying.read_bytes(), 4), decode_frames(honest, 4))
    frames, successors = decode_with_successors(lying, 4)
    np.testing.assert_array_equal(frames, truth[picked])
    np.testing.assert_array_equal(successors, truth[[min(i + 1, 19) for i in picked]])


def test_a_truncated_video_is_sampled_over_the_frames_that_remain(tmp_path):
    """Cut after 7 whole frames, the header still says 20: frames come from those 7, as from an honest 7."""
    full = _write_mjpg(tmp_path / "full.avi", 20)
    data = full.read_bytes()
    movi = data.find(b"movi")
    chunks = [i for i in range(movi, len(data)) if data.startswith(b"00dc", i)]  # one per frame
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: chunks[7]])
    assert cv2.VideoCapture(str(cut)).get(cv2.CAP_PROP_FRAME_COUNT) == 20
    truth = _all_frames(full)[:7]
    assert len(_all_frames(cut)) == 7
    np.testing.assert_array_equal(decode_frames(cut, 4), truth[uniform_indices(7, 4)])
    np.testing.assert_array_equal(decode_frames(cut, 4), decode_frames(_write_mjpg(tmp_path / "seven.avi", 7), 4))
    frames, successors = decode_with_successors(cut, 3)
    np.testing.assert_array_equal(successors, truth[[min(i + 1, 6) for i in uniform_indices(7, 3)]])


def test_decode_scaled_equals_decord_as_crema_loads_videos():
    """CREMA's load_video (data_utils.py l.185) reads videos with decord, scaled inside FFmpeg; its frames
    were recorded once (tests/data/decord/README.md). decode_scaled gives them bit for bit; OpenCV decoding
    + INTER_CUBIC (decode_frames + normalize_frames) does not."""
    from pathlib import Path

    from runtime.video import decode_scaled
    data = Path(__file__).parent / "data" / "decord"
    want = np.load(data / "decord_56.npy")
    got = decode_scaled(data / "clip.mp4", 4, 56)
    np.testing.assert_array_equal(got, want)
    assert decode_scaled((data / "clip.mp4").read_bytes(), 4, 56).tobytes() == want.tobytes()  # bytes too
    cubic = np.stack([cv2.resize(f, (56, 56), interpolation=cv2.INTER_CUBIC)
                      for f in decode_frames(data / "clip.mp4", 4)])
    assert np.abs(cubic.astype(int) - want).max() > 50
    with pytest.raises(VideoError, match="video bytes"):
        decode_scaled(b"not a video", 4, 56)

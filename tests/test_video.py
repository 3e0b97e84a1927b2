"""Video decoding with OpenCV: uniform sampling, normalisation, and clear errors on bad files."""
import numpy as np
import pytest

from crema.demo import write_clip
from runtime.video import MEAN, STD, VideoError, read_video, uniform_indices


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

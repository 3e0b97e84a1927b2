"""Raw files -> requests for every modality; errors name the missing or broken input."""
import io

import numpy as np
import pytest
import soundfile

from crema.demo import write_clip
from reference.config import preset
from runtime.inputs import request_from_files
from runtime.modalities import ModalityError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    write_clip(d / "clip.mp4", frames=12, size=64)
    np.save(d / "depth.npy", np.random.default_rng(0).random((6, 64, 64), dtype=np.float32))
    buf = io.BytesIO()
    t = np.arange(16000) / 16000
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 660 * t)).astype(np.float32), 16000, format="WAV")
    (d / "a.wav").write_bytes(buf.getvalue())
    cfg = preset("tiny")
    np.savez(d / "pc.npz", feat=np.zeros((7, cfg.feature_dim), np.float32), coords=np.ones((7, 3), np.int64))
    return d


def _config(modalities, **kw):
    return preset("tiny", modalities=modalities, **kw).to_dict()


def test_every_modality_from_raw_files(files):
    cfg = _config(("rgb", "depth", "flow", "norm", "audio"))
    r = request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=files / "depth.npy", audio=files / "a.wav")
    for m in ("rgb", "depth", "flow", "norm"):
        assert r.frames[m].shape == (2, 3, 56, 56) and np.isfinite(r.frames[m]).all()
    assert not np.allclose(r.frames["flow"], r.frames["rgb"]) and not np.allclose(r.frames["depth"], r.frames["norm"])
    assert r.audio.shape == (2, 64, 128)
    pc = request_from_files(_config(("pc",)), "Q?", pc=files / "pc.npz")
    assert pc.pc_feat.shape == (7, 48) and pc.pc_coords.dtype == np.int64


@pytest.mark.parametrize("modalities, kwargs, message", [
    (("rgb", "flow"), {}, "flow: needs the video"),
    (("rgb", "depth"), {"video": "clip.mp4"}, "depth: give depth maps or a depth model"),
    (("rgb", "audio"), {"video": "clip.mp4"}, r"audio: the configuration needs audio and the video has no "
                                              r"soundtrack \(.*clip.mp4: no audio stream\); give a sound file "
                                              r"\(request field audio\)"),
    (("audio",), {}, r"audio: the configuration needs an audio file \(request field audio\) or a video"),
    (("pc",), {}, "pc: the configuration needs 3D features"),
    (("rgb", "flow", "pc"), {"video": "clip.mp4"}, r"pc: .*which a video cannot give.*request fields pc_feat and "
                                                   r"pc_coords"),
    (("rgb",), {"video": "clip.mp4", "frames": {"depth": "x.npy"}}, "'depth' is not configured"),
])
def test_missing_inputs_are_named(files, modalities, kwargs, message):
    kwargs = {k: (files / v if isinstance(v, str) else v) for k, v in kwargs.items()}
    with pytest.raises(ModalityError, match=message) as e:
        request_from_files(_config(modalities), "Q?", **kwargs)
    assert "--" not in str(e.value), "a Triton client sends request fields, not command-line flags"


def test_depth_of_the_wrong_size(files, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((2, 10, 10), np.float32))
    with pytest.raises(ModalityError, match="depth: maps of 10x10, the video is 64x64"):
        request_from_files(_config(("rgb", "norm")), "Q?", video=files / "clip.mp4", depth=tmp_path / "small.npy")
    np.savez(tmp_path / "bad.npz", points=np.zeros((2, 3)))
    with pytest.raises(ModalityError, match="no 'feat' or 'coords' array"):
        request_from_files(_config(("pc",)), "Q?", pc=tmp_path / "bad.npz")


def test_bytes_and_arrays_give_what_files_give(files):
    """What a server receives (file bytes, arrays) builds the same request as the files."""
    cfg = _config(("rgb", "depth", "flow", "norm", "audio"))
    from_files = request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=files / "depth.npy",
                                    audio=files / "a.wav")
    from_bytes = request_from_files(cfg, "Q?", video=(files / "clip.mp4").read_bytes(),
                                    depth=(files / "depth.npy").read_bytes(), audio=(files / "a.wav").read_bytes())
    for m in from_files.frames:
        np.testing.assert_array_equal(from_bytes.frames[m], from_files.frames[m])
    np.testing.assert_array_equal(from_bytes.audio, from_files.audio)
    with np.load(files / "pc.npz") as pc:
        arrays = request_from_files(_config(("rgb", "pc")), "Q?", video=files / "clip.mp4", pc=(pc["feat"], pc["coords"]))
    assert arrays.pc_feat.shape == (7, preset("tiny").feature_dim) and arrays.pc_coords.dtype == np.int64
    with pytest.raises(ModalityError, match="depth bytes: neither a .npy file nor a PNG"):
        request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=b"GIF89a...", audio=files / "a.wav")
    with pytest.raises(ValueError, match="^video bytes: not a video"):
        request_from_files(cfg, "Q?", video=b"\x00" * 64, depth=files / "depth.npy", audio=files / "a.wav")


def test_depth_with_no_maps_is_named_not_an_index_error(files, tmp_path):
    """np.zeros((0, H, W)) as a .npy, from a path and as bytes over the server (was IndexError: index -1)."""
    np.save(tmp_path / "none.npy", np.zeros((0, 64, 64), np.float32))
    cfg = _config(("rgb", "depth"))
    with pytest.raises(ModalityError, match=r"none.npy: 0 depth maps in the array"):
        request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=tmp_path / "none.npy")
    with pytest.raises(ModalityError, match=r"^depth bytes: 0 depth maps in the array"):
        request_from_files(cfg, "Q?", video=(files / "clip.mp4").read_bytes(),
                           depth=(tmp_path / "none.npy").read_bytes())


def test_depth_png_bytes_give_what_the_file_gives(files, tmp_path):
    import cv2
    depth = (1000 + np.arange(64 * 64).reshape(64, 64) % 500).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), depth)
    cfg = _config(("rgb", "norm"))
    a = request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=tmp_path / "d.png")
    b = request_from_files(cfg, "Q?", video=files / "clip.mp4", depth=(tmp_path / "d.png").read_bytes())
    np.testing.assert_array_equal(a.frames["norm"], b.frames["norm"])


def _npy_named_npz(path, array):
    with open(path, "wb") as f:  # np.save(path) would append ".npy"
        np.save(f, array)


@pytest.mark.parametrize("write, message", [
    (lambda p: _npy_named_npz(p, np.zeros((7, 48), np.float32)), r"pc.npz: a .npy array, expected a .npz"),
    (lambda p: p.write_bytes(b"feat and coords"), r"pc.npz: not a .npz \(zip\) file"),
    (lambda p: np.savez(p, feat=np.zeros((7, 48))), r"pc.npz: no 'coords' array \(has \['feat'\]\)"),
    (lambda p: np.savez(p, feat=np.zeros(7), coords=np.ones((7, 3))), r"feat of shape \(7,\), expected \[P, D\]"),
    (lambda p: np.savez(p, feat=np.zeros((7, 48)), coords=np.ones((7, 2))),
     r"coords of shape \(7, 2\), expected \[7, 3\]"),
    (lambda p: np.savez(p, feat=np.zeros((7, 48)), coords=np.full((7, 3), 0.5)), r"coords are not whole numbers"),
])
def test_bad_point_files_are_named(tmp_path, write, message):
    """--pc x.npy (np.load returns an array), not a zip, missing keys, wrong shapes: a clear ModalityError."""
    path = tmp_path / "pc.npz"
    write(path)
    with pytest.raises(ModalityError, match=r"^pc: .*" + message):
        request_from_files(_config(("pc",)), "Q?", pc=path)


def test_a_video_alone_gives_rgb_flow_and_its_soundtrack(tmp_path):
    """A model of rgb, flow and audio answers from the video file alone: the audio is the soundtrack,
    exactly the WAV's fbank when the soundtrack is that PCM (from a path, and from bytes as a server
    receives them); AAC in an mp4 is the WAV's within the codec's tolerance (tests/test_audio.py)."""
    from test_audio import write_av

    t = np.arange(24000) / 16000
    soundfile.write(tmp_path / "a.wav", (0.3 * np.sin(2 * np.pi * 660 * t)).astype(np.float32), 16000)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    video = write_av(tmp_path / "v.avi", "pcm_s16le", tmp_path / "a.wav", frames=frames)
    cfg = _config(("rgb", "flow", "audio"))
    alone = request_from_files(cfg, "Q?", video=video)
    given = request_from_files(cfg, "Q?", video=video, audio=tmp_path / "a.wav")
    assert set(alone.frames) == {"rgb", "flow"} and alone.audio.shape == (2, 64, 128)
    np.testing.assert_array_equal(alone.audio, given.audio)
    for m in given.frames:
        np.testing.assert_array_equal(alone.frames[m], given.frames[m])
    np.testing.assert_array_equal(request_from_files(cfg, "Q?", video=video.read_bytes()).audio, given.audio)
    aac = write_av(tmp_path / "v.mp4", "aac", tmp_path / "a.wav", frames=frames)
    assert np.abs(request_from_files(_config(("audio",)), "Q?", video=aac).audio - given.audio).mean() < 0.05
    silent = write_av(tmp_path / "silent.mp4", frames=frames)
    with pytest.raises(ModalityError, match=r"^audio: .* has no soundtrack \(video bytes: no audio stream\)"):
        request_from_files(cfg, "Q?", video=silent.read_bytes())


def test_a_model_exported_for_sqa3d_always_gets_5000_points(files):
    """SQA3D's convention (threedvqa_datasets.py l.249-255, runtime/datasets.py crema_points): more points
    are cut to the first 5000, fewer padded with zero features at voxel (0, 0, 0); other models get every
    point given."""
    cfg = preset("tiny", modalities=("rgb", "pc")).to_dict()
    rng = np.random.default_rng(0)
    for n in (120, 6000):
        feat, coords = rng.standard_normal((n, 48)).astype(np.float32), rng.integers(0, 32, (n, 3))
        plain = request_from_files(cfg, "Q?", video=files / "clip.mp4", pc=(feat, coords))
        sqa3d = request_from_files({**cfg, "dataset": "sqa3d"}, "Q?", video=files / "clip.mp4", pc=(feat, coords))
        assert plain.pc_feat.shape == (n, 48) and sqa3d.pc_feat.shape == (5000, 48)
        kept = min(n, 5000)
        np.testing.assert_array_equal(sqa3d.pc_feat[:kept], feat[:kept])
        assert not sqa3d.pc_feat[kept:].any() and not sqa3d.pc_coords[kept:].any()

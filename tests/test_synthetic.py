"""The synthetic task: deterministic by seed, real files, and each answer recoverable from its modality."""

import json

import av
import cv2
import numpy as np
import pytest

from reference.config import preset
from runtime.audio import read_audio, read_video_audio
from runtime.inputs import request_from_files
from runtime.modalities import normals_from_depth
from runtime.video import decode_frames
from synthetic.generator import (COLOURS, LIGHTING, QUESTION_TYPES, WALL_GREY, Scene, generate, random_scene, read_questions,
                                 render_video)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "a", clips=4, seed=3, frames=8, size=64)


def test_deterministic_by_seed(data, tmp_path):
    again = generate(tmp_path / "b", clips=4, seed=3, frames=8, size=64)
    assert (data / "questions.jsonl").read_text() == (again / "questions.jsonl").read_text()
    for clip in ("clip00000", "clip00003"):
        for name in ("depth.npy", "audio.wav", "pc.npz", "scene.json"):
            assert (data / clip / name).read_bytes() == (again / clip / name).read_bytes(), name
        np.testing.assert_array_equal(decode_frames(data / clip / "clip.mp4", 8),
                                      decode_frames(again / clip / "clip.mp4", 8))
    other = generate(tmp_path / "c", clips=4, seed=4, frames=8, size=64)
    assert (other / "questions.jsonl").read_text() != (data / "questions.jsonl").read_text()


def test_questions_cover_every_modality_in_both_forms(data):
    qs = read_questions(data)
    assert len(qs) == 4 * len(QUESTION_TYPES)
    assert {q.modality for q in qs} == {"rgb", "flow", "depth", "norm", "audio", "pc"}
    for q in qs:
        assert q.options[" ABCDE".index(q.answer_letter) - 1] == q.answer and len(set(q.options)) == 5
        assert q.answer in q.prompt("mcqa") and q.prompt("oeqa") == q.question


def test_answers_are_in_the_files(data):
    """Ground truth is recoverable: the nearer object is nearer in depth, the wall faces as stated."""
    for q in read_questions(data):
        depth = np.load(data / q.clip / "depth.npy")
        if q.qtype == "nearer":
            size = depth.shape[1]
            row = size - size // 8 - 2
            left, right = depth[0, row, size // 4], depth[0, row, 3 * size // 4]
            scene = json.loads((data / q.clip / "scene.json").read_text())
            assert q.answer == scene["still"][0 if left < right else 1] and q.answer in ("square", "circle")
        if q.qtype == "facing":
            n = normals_from_depth(depth[0])[2, 2]
            want = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "front": (0, 0)}[q.answer]
            assert np.sign(np.round(n[:2], 3)).tolist() == list(want)
        if q.qtype == "sound":
            rms = float(np.sqrt(np.mean(read_audio(data / q.clip / "audio.wav") ** 2)))
            assert (rms < 0.01) == (q.answer == "quiet")


SCENE = Scene(colour="red", shape="circle", motion="still", squares=("blue", "green"), still=("square", "circle"),
              nearer=0, facing="left", sound="beep", shape3d="cube")


def _render(lighting: str, **changes) -> tuple[np.ndarray, np.ndarray]:
    from dataclasses import replace
    return render_video(replace(SCENE, **changes), 2, 64, np.random.default_rng(0), lighting)


def test_depth_lighting_is_a_monocular_cue():
    """Lit by depth, the nearer still object is the brighter one, the wall darkens where it recedes, and the
    moving shape keeps its colour; flat lighting draws none of that."""
    row, cols = 64 - 64 // 8 - 2, (64 // 4, 3 * 64 // 4)
    base = [np.sum(COLOURS[c]) for c in SCENE.squares]  # the still objects' unlit colours, left then right
    for nearer in (0, 1):
        video, depth = _render("depth", nearer=nearer)
        light = [video[0, row, x].sum() / b for x, b in zip(cols, base)]  # brightness factor of each object
        assert depth[0, row, cols[nearer]] < depth[0, row, cols[1 - nearer]]
        assert light[nearer] > light[1 - nearer] + 0.15
    video, depth = _render("depth", facing="left")  # faces left: depth grows to the right
    assert depth[0, 5, 60] > depth[0, 5, 5] and video[0, 5, 60, 0] < video[0, 5, 5, 0]
    flat, _ = _render("flat", facing="left")
    assert (flat[0, 5, :, 0] == 128).all()
    front, _ = _render("depth", facing="front")
    assert abs(int(front[0, 5, 5, 0]) - 128) <= 1 and WALL_GREY > 128
    mover = np.all(video[0] == COLOURS["red"], axis=-1)  # the moving shape, unshaded
    assert mover.sum() > 50


def test_flat_lighting_is_the_shipped_models_training_data(tmp_path):
    """`crema train-demo` reproduces the shipped weights only if flat-lit clips are drawn as before lighting
    existed: the same random stream, a flat 128 wall, colours unscaled."""
    video, _ = _render("flat", facing="up")
    assert (video[0, :20, 2] == 128).all() and np.all(video[0, 56, 16] == COLOURS["blue"])
    with pytest.raises(ValueError, match="lighting"):
        _render("sunny")
    assert LIGHTING == ("depth", "varied", "flat")


def test_raw_input_path_reads_a_clip(data):
    cfg = preset("tiny", modalities=("rgb", "depth", "flow", "norm", "audio"), pc_grid=256).to_dict()
    r = request_from_files(cfg, "Q?", video=data / "clip00001" / "clip.mp4", depth=data / "clip00001" / "depth.npy",
                           audio=data / "clip00001" / "audio.wav")
    assert set(r.frames) == {"rgb", "depth", "flow", "norm"} and r.audio.shape == (2, 64, 128)


def _all_frames(path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return np.stack(frames)


def _video_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def test_the_clip_carries_its_soundtrack_and_the_frames_opencv_wrote(data, tmp_path):
    """clip.mp4 holds audio.wav's samples (FLAC: lossless, so exactly) beside a video stream whose
    packets and decoded frames are those of the OpenCV-only mp4 the demo model was trained on."""
    for clip in ("clip00000", "clip00001", "clip00002", "clip00003"):
        video, wav = data / clip / "clip.mp4", data / clip / "audio.wav"
        with av.open(str(video)) as c:
            audio = c.streams.audio[0]
            assert (audio.codec_context.name, audio.rate, len(audio.layout.channels)) == ("flac", 16000, 1)
        np.testing.assert_array_equal(read_video_audio(video), read_audio(wav))
    rng = np.random.default_rng(3)  # the fixture's seed: clip00000's scene and frames, rendered again
    frames, _ = render_video(random_scene(rng), 8, 64, rng)
    writer = cv2.VideoWriter(str(tmp_path / "old.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 64))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    np.testing.assert_array_equal(_all_frames(data / "clip00000" / "clip.mp4"), _all_frames(tmp_path / "old.mp4"))
    assert _video_packets(data / "clip00000" / "clip.mp4") == _video_packets(tmp_path / "old.mp4")
    assert not list(data.glob("*/.*")), "the temporary OpenCV-only video is removed"

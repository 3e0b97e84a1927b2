"""Synthetic multimodal video QA, deterministic by seed: real files that the raw-input path reads.

Each clip (a folder) holds `clip.mp4` (a shape moving over a grey wall, a still square and a still
circle, with its soundtrack), `depth.npy` [frames, H, W] (ground-truth depth: the wall is a tilted
plane, the two still objects sit at different depths), `audio.wav` (the soundtrack, 16 kHz 16-bit:
training reads it) and `pc.npz` (3D point features of an object and their voxel coordinates). In
clip.mp4 (write_clip_video) the video stream is OpenCV's mp4v encoding, its packets copied unchanged, so
the frames are those the shipped demo model was trained on, and the soundtrack is audio.wav's samples
in FLAC (lossless: from the video alone the model gets the fbank it was trained on, docs/decisions.md).
Every question type needs one modality:

  colour    rgb    What color is the moving shape?            red | green | blue | yellow | purple
  motion    flow   Which way does the shape move?             left | right | up | down | still
  nearer    depth  Which is nearer, the square or the circle?  square | circle
  facing    norm   Which way does the wall face?              left | right | up | down | front
  sound     audio  What sound do you hear?                    beep | tone | music | noise | quiet
  shape3d   pc     What shape is the 3D object?               sphere | cube | star | triangle | box

The square and the circle have the same size, random colours and random sides (asked by shape, not
side: the nearer object is the brightest blob of the depth image, which a model reads without having
to tell left from right). Lighting (render_video): "flat" (the demo model's training clips) draws a
flat grey wall and unshaded objects, so only depth tells which is nearer and only normals where the
wall faces; "depth" (the default: the clips the demo asks about) lets light fall off with depth and
far objects fade, the monocular cues the demo's depth estimator reads (`crema train-depth`, trained
on "varied" lighting). Depth is in pixel units (the
orthographic camera of runtime/modalities.normals_from_depth): the wall is tilted 0.8 depth units
per pixel, about 39 degrees, away from where it faces. Questions come as oeqa (answer
word) and mcqa (five options A-E, answer letter).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import soundfile

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 40), "blue": (40, 70, 220), "yellow": (220, 200, 40),
           "purple": (150, 50, 200)}
MOTIONS = ("left", "right", "up", "down", "still")
FACINGS = ("left", "right", "up", "down", "front")
STILL_SHAPES = ("square", "circle")  # the two still objects; "nearer" answers with one of them
NEARER_OPTIONS = STILL_SHAPES + ("both", "neither", "triangle")
SOUNDS = ("beep", "tone", "music", "noise", "quiet")
SHAPES_3D = ("sphere", "cube", "star", "triangle", "box")
QUESTION_TYPES = {"colour": "rgb", "motion": "flow", "nearer": "depth", "facing": "norm", "sound": "audio",
                  "shape3d": "pc"}
LETTERS = "ABCDE"
CLIP_FILES = {"video": "clip.mp4", "depth": "depth.npy", "audio": "audio.wav", "pc": "pc.npz"}  # request_from_files kwargs
SAMPLE_RATE = 16000
FPS = 8
LIGHTING = ("depth", "varied", "flat")  # render_video
MOVER_DEPTH = 0.3  # the moving shape's depth, in units of the frame size
SHADE_OBJECT, SHADE_WALL = 0.4, 0.15  # fall of brightness per frame size of depth (shade)
WALL_GREY = round(128 / (1 - SHADE_WALL * (1 - MOVER_DEPTH)))  # the wall's mean depth is one frame size
HAZE = 1.5  # colour lost per frame size of depth beyond the moving shape (shade)
VARIED_SLOPES = ((0.2, 0.6), (0.1, 0.6))  # "varied" lighting: (objects', the wall's) falloff ranges
AUDIO_CODEC = "flac"  # in mp4: lossless (FFmpeg's native encoder, LGPL)


@dataclass(frozen=True)
class Scene:
    colour: str          # the moving shape's colour
    shape: str           # circle | square | triangle (drawn; not asked)
    motion: str
    squares: tuple       # (colour, colour) of the two still objects, left then right
    still: tuple         # their shapes, left then right: ("square", "circle") or ("circle", "square")
    nearer: int          # index of the nearer still object
    facing: str
    sound: str
    shape3d: str


@dataclass(frozen=True)
class Question:
    id: str
    clip: str
    qtype: str
    modality: str
    question: str
    answer: str
    options: tuple
    answer_letter: str

    def prompt(self, form: str) -> str:
        """oeqa: the question; mcqa: the question with its five options."""
        if form == "oeqa":
            return self.question
        opts = " ".join(f"({l}) {o}" for l, o in zip(LETTERS, self.options))
        return f"Question: {self.question} Options: {opts}. Answer:"


def random_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    squares = tuple(rng.choice(colours, size=2, replace=False))
    return Scene(colour=str(rng.choice(colours)), shape=str(rng.choice(["circle", "square", "triangle"])),
                 motion=str(rng.choice(MOTIONS)), squares=(str(squares[0]), str(squares[1])),
                 still=tuple(STILL_SHAPES[::int(rng.choice([1, -1]))]),
                 nearer=int(rng.integers(2)), facing=str(rng.choice(FACINGS)), sound=str(rng.choice(SOUNDS)),
                 shape3d=str(rng.choice(SHAPES_3D)))


def _wall_depth(facing: str, size: int) -> np.ndarray:
    """Depth of a plane `size` pixels away, tilted 0.8 pixels per pixel away from where it faces."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    slope = {"left": (x - c), "right": -(x - c), "up": (y - c), "down": -(y - c), "front": 0 * x}[facing]
    return size + 0.8 * slope


def shade(img: np.ndarray, depth: np.ndarray, wall: np.ndarray, slopes=(SHADE_OBJECT, SHADE_WALL)) -> np.ndarray:
    """Light that falls off with depth (the monocular cue a depth estimator reads): RGB [H, W, 3] uint8 scaled
    by 1 - slope * (depth / size - MOVER_DEPTH), slopes = (objects', the wall's where `wall` [H, W] bool), and
    objects farther than the moving shape lose colour (haze: blended toward their grey by HAZE per frame
    size; brightness alone against five known colours was too subtle: the estimator never learned it).
    The moving shape keeps its colour. The wall's fall is gentle: the demo model, trained on flat-lit clips,
    misreads colours on a steep one (SHADE_WALL 0.4: colour 90% held out, 0.15: 100%)."""
    beyond = depth / depth.shape[0] - MOVER_DEPTH  # frame sizes behind the moving shape
    slope = np.where(wall, slopes[1], slopes[0])
    out = img.astype(np.float32) * np.clip(1 - slope * beyond, 0.0, None)[..., None]
    haze = np.where(wall, 0.0, np.clip(HAZE * beyond, 0.0, 1.0))[..., None]  # objects behind it fade to grey
    out = (1 - haze) * out + haze * out.mean(axis=-1, keepdims=True)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _still_depths(nearer: int, size: int) -> tuple[float, float]:
    return (0.1 * size, 0.6 * size) if nearer == 0 else (0.6 * size, 0.1 * size)


def render_video(scene: Scene, frames: int, size: int, rng: np.random.Generator,
                 lighting: str = "depth") -> tuple[np.ndarray, np.ndarray]:
    """-> RGB frames [frames, size, size, 3] uint8 and depth [frames, size, size] float32.

    lighting (LIGHTING): "depth": light falls off with depth (shade), so the still objects' depths and the
    wall's tilt can be estimated from the frames; "varied": so, with falloffs drawn per clip from
    VARIED_SLOPES (the depth estimator's training clips: it learns the direction of the cue, not one
    strength, and learns the gentle wall of "depth" lighting, which alone it did not); "flat": unshaded,
    a flat grey wall, depth invisible in RGB (the demo model's training clips: there each question has
    exactly one modality that answers it)."""
    if lighting not in LIGHTING:
        raise ValueError(f"lighting {lighting!r}: expected one of {LIGHTING}")
    slopes = (SHADE_OBJECT, SHADE_WALL)
    if lighting == "varied":
        slopes = tuple(float(rng.uniform(lo, hi)) for lo, hi in VARIED_SLOPES)
    wall_depth, still_depths = _wall_depth(scene.facing, size), _still_depths(scene.nearer, size)
    sq, half = size // 8, size // 8
    centres = [(size // 4, size - half - 2), (3 * size // 4, size - half - 2)]
    # the moving shape stays above the squares: x in [0.3, 0.7], y in [0.2, 0.35] of the frame, +-0.25 moving
    start = rng.uniform((0.3, 0.2), (0.7, 0.35)) * size
    step = size * 0.5 / max(frames - 1, 1)
    delta = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step), "still": (0, 0)}[scene.motion]
    start = start - np.array(delta) * (frames - 1) / 2  # centred path
    video = np.empty((frames, size, size, 3), np.uint8)
    depth = np.empty((frames, size, size), np.float32)
    for t in range(frames):
        img = np.full((size, size, 3), 128 if lighting == "flat" else WALL_GREY, np.uint8)
        d = wall_depth.copy()
        wall = np.ones((size, size), bool)
        for i, ((cx, cy), colour, kind) in enumerate(zip(centres, scene.squares, scene.still)):
            still = np.zeros((size, size), np.uint8)
            if kind == "square":
                still[cy - half:cy + half, cx - half:cx + half] = 1
            else:
                cv2.circle(still, (cx, cy), half, 1, -1)
            img[still > 0] = COLOURS[colour]
            wall &= still == 0
            d[still > 0] = still_depths[i]
        x, y = (start + np.array(delta) * t).astype(int)
        colour = COLOURS[scene.colour]
        mask = np.zeros((size, size), np.uint8)
        if scene.shape == "circle":
            cv2.circle(mask, (int(x), int(y)), sq, 1, -1)
        elif scene.shape == "square":
            cv2.rectangle(mask, (int(x) - sq, int(y) - sq), (int(x) + sq, int(y) + sq), 1, -1)
        else:
            pts = np.array([[x, y - sq], [x - sq, y + sq], [x + sq, y + sq]], np.int32)
            cv2.fillPoly(mask, [pts], 1)
        img[mask > 0] = colour
        wall &= mask == 0
        d[mask > 0] = MOVER_DEPTH * size
        video[t], depth[t] = img if lighting == "flat" else shade(img, d, wall, slopes), d
    return video, depth


def render_audio(sound: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    if sound == "beep":
        wave = 0.5 * np.sin(2 * np.pi * 1000 * t) * ((t * 4) % 1 < 0.5)
    elif sound == "tone":
        wave = 0.5 * np.sin(2 * np.pi * 220 * t)
    elif sound == "music":
        notes = np.array([262, 330, 392, 523])[(t * 4).astype(int) % 4]
        wave = 0.3 * np.sin(2 * np.pi * notes * t) + 0.15 * np.sin(4 * np.pi * notes * t)
    elif sound == "noise":
        wave = 0.3 * rng.standard_normal(len(t))
    else:
        wave = 0.001 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def render_points(shape3d: str, dim: int, points: int, grid: int, rng: np.random.Generator) -> dict:
    """3D-LLM-style point features: a per-shape prototype (fixed, seed 0) plus noise, on voxels."""
    prototypes = np.random.default_rng(0).standard_normal((len(SHAPES_3D), dim)).astype(np.float32)
    feat = prototypes[SHAPES_3D.index(shape3d)] + 0.5 * rng.standard_normal((points, dim)).astype(np.float32)
    coords = rng.integers(0, grid, size=(points, 3))
    return {"feat": feat.astype(np.float32), "coords": coords.astype(np.int64)}


def write_clip_video(path: str | Path, video: np.ndarray, audio: np.ndarray | None = None, fps: int = FPS) -> None:
    """RGB frames [T, H, W, 3] -> an mp4 (OpenCV, mp4v), and the soundtrack (mono 16 kHz int16 samples)
    muxed in as FLAC: OpenCV writes the video to a temporary file, whose packets are then copied (remuxed,
    not re-encoded) next to the encoded audio, so the video stream is bit-identical to OpenCV's."""
    path = Path(path)
    plain = path.with_name(f".{path.stem}.video{path.suffix}")
    writer = cv2.VideoWriter(str(plain if audio is not None else path), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             (video.shape[2], video.shape[1]))
    for frame in video:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    if audio is None:
        return
    try:
        with av.open(str(plain)) as src, av.open(str(path), "w") as dst:
            video_in = src.streams.video[0]
            video_out = dst.add_stream_from_template(video_in)
            audio_out = dst.add_stream(AUDIO_CODEC, rate=SAMPLE_RATE, layout="mono")
            for packet in src.demux(video_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = video_out
                dst.mux(packet)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, np.int16)[None], format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, 0
            for packet in [*audio_out.encode(frame), *audio_out.encode(None)]:
                dst.mux(packet)
    finally:
        plain.unlink(missing_ok=True)


def _options(answer: str, values: tuple, rng: np.random.Generator) -> tuple:
    others = [v for v in values if v != answer]
    options = [answer] + list(rng.choice(others, size=4, replace=False))
    rng.shuffle(options)
    return tuple(str(o) for o in options)


def questions_for(scene: Scene, clip: str, rng: np.random.Generator) -> list[Question]:
    specs = {
        "colour": ("What color is the moving shape?", scene.colour, tuple(COLOURS)),
        "motion": ("Which way does the shape move?", scene.motion, MOTIONS),
        "nearer": ("Which is nearer, the square or the circle?", scene.still[scene.nearer], NEARER_OPTIONS),
        "facing": ("Which way does the wall face?", scene.facing, FACINGS),
        "sound": ("What sound do you hear?", scene.sound, SOUNDS),
        "shape3d": ("What shape is the 3D object?", scene.shape3d, SHAPES_3D),
    }
    out = []
    for qtype, (text, answer, values) in specs.items():
        options = _options(answer, values, rng)
        out.append(Question(f"{clip}-{qtype}", clip, qtype, QUESTION_TYPES[qtype], text, answer, options,
                            LETTERS[options.index(answer)]))
    return out


def generate(out: str | Path, clips: int, seed: int = 0, frames: int = 16, size: int = 96,
             audio_seconds: float = 2.0, pc_dim: int = 1408, pc_points: int = 64, pc_grid: int = 256,
             lighting: str = "depth") -> Path:
    """Write `clips` clips and `questions.jsonl` under `out`; the same seed gives the same data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / "questions.jsonl", "w") as f:
        for i in range(clips):
            clip = f"clip{i:05d}"
            folder = out / clip
            folder.mkdir(exist_ok=True)
            scene = random_scene(rng)
            video, depth = render_video(scene, frames, size, rng, lighting)
            soundfile.write(folder / CLIP_FILES["audio"], render_audio(scene.sound, audio_seconds, rng), SAMPLE_RATE,
                            subtype="PCM_16")
            pcm, _ = soundfile.read(folder / CLIP_FILES["audio"], dtype="int16")  # the WAV's samples, exactly
            write_clip_video(folder / CLIP_FILES["video"], video, pcm)
            np.save(folder / CLIP_FILES["depth"], depth)
            np.savez(folder / CLIP_FILES["pc"], **render_points(scene.shape3d, pc_dim, pc_points, pc_grid, rng))
            (folder / "scene.json").write_text(json.dumps(asdict(scene)))
            for q in questions_for(scene, clip, rng):
                f.write(json.dumps(asdict(q)) + "\n")
    return out


def clip_files(folder: str | Path) -> dict[str, Path]:
    """A clip folder's files that exist, as `runtime.inputs.request_from_files` keyword arguments."""
    folder = Path(folder)
    return {k: folder / name for k, name in CLIP_FILES.items() if (folder / name).exists()}


def read_questions(directory: str | Path) -> list[Question]:
    rows = (json.loads(line) for line in open(Path(directory) / "questions.jsonl"))
    return [Question(**{**r, "options": tuple(r["options"])}) for r in rows]

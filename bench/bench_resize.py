"""Benchmark: the runtime's 224-px frame resize against CREMA's own, on realistic frame sizes.

    .venv/bin/python -m pip install --no-deps --target out/bench-deps decord   # once
    .venv/bin/python bench/bench_resize.py [--repeat 3] [--out docs/resize.md]

decord is CREMA's video reader, not a dependency of this project: install it aside as above (the script
looks in out/bench-deps); Pillow is a dependency (frame folders, runtime/video.py).
CREMA (Yui010206/CREMA, lavis/datasets/data_utils.py) stretches the whole frame to a 224x224 square
(no crop), then /255 and CLIP's mean/std (blip_processors.py ToTensorVideo + NormalizeVideo):
  folders  load_frames l.174 `img.resize((width, height))`: Pillow's default filter for RGB, BICUBIC
           (a = -0.5, support widened by the downscale factor: antialiased). NExT-QA rgb; depth/flow/norm.
  videos   load_video l.185 `VideoReader(uri, height=, width=)`: decord's FFmpeg `scale=224:224`
           (swscale, vf_scale's default flags 'bilinear', FFmpeg 4.1 in the decord 0.6.0 wheel),
           done while converting YUV to RGB. MUSIC-AVQA and SQA3D eval (blip_video_eval).

Part 1 (folders): every candidate resizes the same uint8 RGB frames that Pillow's reference gets, so
only the resize differs (a row checks that cv2 and Pillow decode the same JPEG alike). Frame sets: the
demo clips' frames (64 px, decoded by runtime.video; 224 is an upscale) and synthetic natural-like
640x360, 1280x720 and 3840x2160 frames (gradients, shading, grain, hard-edged shapes, thin lines, a
grating, text), so 1.6x-17x downscales are exercised.
Part 2 (videos): the 640x360 and 720p frames written as mp4 (the project's write_clip_video, mp4v), read
by decord at 224x224 (the reference), by cv2 (the runtime's decode) + RGB resizes, and by PyAV (already
a dependency) with swscale. Differences are in 0-255 units before normalisation (the runtime's
normalised output mapped back); ms/frame: the resize step alone (no decode, no normalising; PyAV rows
include the YUV -> RGB conversion at 224), best of --repeat rounds.
The tables replace the "## Measurements" section of --out (the rest of the file stays).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "out" / "bench-deps"))  # decord, installed aside (module docstring)

from bench.machine import describe  # noqa: E402
from runtime import video  # noqa: E402

try:
    import decord
    from PIL import Image
except ImportError as e:
    sys.exit(f"{e.name} missing: .venv/bin/python -m pip install --no-deps --target out/bench-deps decord "
             "(see this file's docstring)")

S = 224
HEADING = "## Measurements"


# --- frames ----------------------------------------------------------------------------------------

def natural_frame(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 frame with a camera image's mix of low and high frequencies."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([rng.uniform(60, 190) + rng.uniform(-60, 60) * xx / w + rng.uniform(-60, 60) * yy / h
                    for _ in range(3)], axis=-1)
    img += cv2.resize(rng.normal(0, 35, (h // 40 + 2, w // 40 + 2, 3)).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_CUBIC)  # shading
    img += cv2.GaussianBlur(rng.normal(0, 20, (h, w, 3)).astype(np.float32), (0, 0), 0.7)  # grain, foliage
    img = np.clip(img, 0, 255).astype(np.uint8)
    color = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    u = h / 360  # features scale with the frame, as a higher-resolution camera sees the same scene
    for _ in range(10):  # objects with hard edges
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 60) * u)
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + r, y + r // 2), color(), -1)
        else:
            cv2.circle(img, (x, y), r, color(), -1, cv2.LINE_AA)
    for _ in range(6):  # thin lines: wires, strings of an instrument
        cv2.line(img, tuple(int(v) for v in rng.integers(0, [w, h])), tuple(int(v) for v in rng.integers(0, [w, h])),
                 color(), max(1, int(u)), cv2.LINE_AA)
    gx, gy, period = int(w * 0.6), int(h * 0.1), max(2, int(3 * u))  # a grating (fence, striped shirt)
    for x in range(gx, gx + w // 5, period):
        cv2.line(img, (x, gy), (x, gy + h // 4), (20, 20, 20), max(1, period // 2))
    for i in range(4):  # text: captions, scoreboards
        cv2.putText(img, "NExT-QA 0123 music", (int(w * 0.05), int(h * (0.55 + 0.12 * i))), cv2.FONT_HERSHEY_SIMPLEX,
                    u * (0.4 + 0.25 * i), color(), max(1, int(u * (1 + i // 2))), cv2.LINE_AA)
    return img


def natural_clip(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """n frames of one scene panning right (consecutive frames differ, as a video's do)."""
    base = natural_frame(h, w + 4 * n, np.random.default_rng(seed))
    return np.stack([base[:, 4 * i:4 * i + w] for i in range(n)])


def demo_frames(work: Path) -> np.ndarray:
    """The project's synthetic clips, decoded as the runtime decodes them (4 frames each)."""
    from reference.config import preset
    from synthetic.generator import CLIP_FILES
    from training.demo import demo_data
    out = demo_data(work / "demo", 2, 1, preset("demo").to_dict())
    return np.concatenate([video.decode_frames(p / CLIP_FILES["video"], 4) for p in sorted(out.glob("clip*"))])


# --- resizes: uint8 RGB [H, W, 3] -> [S, S, 3] ------------------------------------------------------

def pil(f: np.ndarray, resample=None) -> np.ndarray:
    """CREMA's load_frames call: Image.resize((W, H)) with Pillow's default filter (BICUBIC for RGB)."""
    img = Image.fromarray(f)
    return np.asarray(img.resize((S, S)) if resample is None else img.resize((S, S), resample))


def cv(interp: int):
    return lambda f: cv2.resize(f, (S, S), interpolation=interp)


def area_then_cubic(f: np.ndarray) -> np.ndarray:
    """INTER_AREA down to at most 2*S a side, then INTER_CUBIC to S (a prefilter against aliasing)."""
    h, w = f.shape[:2]
    f = cv2.resize(f, (min(w, 2 * S), min(h, 2 * S)), interpolation=cv2.INTER_AREA)
    return cv2.resize(f, (S, S), interpolation=cv2.INTER_CUBIC)


def runtime_path(f: np.ndarray) -> np.ndarray:
    """The runtime as it is: _fit (INTER_AREA to FRAME_PIXELS) then normalize_frames, mapped back to 0-255."""
    rgb = video._fit(cv2.cvtColor(f, cv2.COLOR_RGB2BGR), "bench")
    x = video.normalize_frames(rgb[None], S)[0].transpose(1, 2, 0)
    return (x * video.STD + video.MEAN) * 255.0


def runtime_resize(f: np.ndarray) -> np.ndarray:
    """What runtime_path times: _fit (with its BGR -> RGB) and the INTER_CUBIC resize, not the normalising."""
    return cv2.resize(video._fit(f, "bench"), (S, S), interpolation=cv2.INTER_CUBIC)


def pil_taps(n_in: int, n_out: int, support: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc (libImaging/Resample.c) for BICUBIC: per output
    pixel, the source indices of its taps [n_out, K] and their fixed-point weights (22 fraction bits)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    sup = support * fscale
    ksize = int(math.ceil(sup)) * 2 + 1
    index, weight = np.zeros((n_out, ksize), np.int64), np.zeros((n_out, ksize))
    for o in range(n_out):
        c = (o + 0.5) * scale
        lo, hi = max(int(c - sup + 0.5), 0), min(int(c + sup + 0.5), n_in)
        w = bicubic((np.arange(lo, hi) - c + 0.5) / fscale)
        weight[o, :hi - lo] = w / w.sum() if w.sum() != 0 else w
        index[o] = np.minimum(lo + np.arange(ksize), n_in - 1)  # taps past hi have weight 0
    weight = np.where(weight < 0, np.trunc(weight * (1 << 22) - 0.5), np.trunc(weight * (1 << 22) + 0.5))
    return index, weight.astype(np.int32)


def bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


_TAPS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def pil_numpy(f: np.ndarray) -> np.ndarray:
    """Pillow's BICUBIC resize in numpy, as Resample.c computes it: a horizontal pass rounded to uint8,
    then a vertical one; int32 sums from 1 << 21, >> 22, clipped to 0-255."""
    x = np.ascontiguousarray(f.transpose(1, 0, 2))  # columns first: each pass gathers whole rows
    for second in (False, True):
        if x.shape[0] != S:  # Pillow skips a pass whose size does not change
            index, weight = _TAPS.get(x.shape[0]) or _TAPS.setdefault(x.shape[0], pil_taps(x.shape[0], S))
            acc = np.full((S, *x.shape[1:]), 1 << 21, np.int32)
            for t in range(index.shape[1]):
                acc += x[index[:, t]] * weight[:, t, None, None]
            x = np.clip(acc >> 22, 0, 255).astype(np.uint8)
        if not second:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
    return x


CANDIDATES = {  # name: (output, what is timed)
    "Pillow BICUBIC (CREMA's call)": (pil, pil),
    "numpy port of Pillow BICUBIC": (pil_numpy, pil_numpy),
    "runtime now: _fit + cv2 INTER_CUBIC": (runtime_path, runtime_resize),
    "cv2 INTER_CUBIC": (cv(cv2.INTER_CUBIC),) * 2,
    "cv2 INTER_LINEAR": (cv(cv2.INTER_LINEAR),) * 2,
    "cv2 INTER_AREA": (cv(cv2.INTER_AREA),) * 2,
    "cv2 INTER_AREA to <=448, INTER_CUBIC": (area_then_cubic,) * 2,
}


def ffmpeg_scale(frames: list, flags: str | None) -> np.ndarray:
    """decord's filter graph in PyAV: buffer -> scale=S:S (flags as given) -> rgb24 sink, frame by frame."""
    import av
    f0 = frames[0]
    g = av.filter.Graph()
    nodes = [g.add_buffer(width=f0.width, height=f0.height, format=f0.format.name, time_base=Fraction(1, 1000)),
             g.add("scale", f"{S}:{S}" + (f":flags={flags}" if flags else "")), g.add("format", "rgb24"),
             g.add("buffersink")]
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    g.configure()
    out = []
    for fr in frames:
        g.push(fr)
        out.append(g.pull().to_ndarray())
    return np.stack(out)


# --- measuring ---------------------------------------------------------------------------------------

def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    mse = float((d ** 2).mean())
    return {"max": float(d.max()), "mean": float(d.mean()), "psnr": math.inf if mse < 1e-6 else 10 * math.log10(255 ** 2 / mse)}


def per_frame_ms(run, n: int, repeat: int) -> float:
    """run() handles n frames; its best time of `repeat`, per frame."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best / n * 1e3


def row(label: str, name: str, out: np.ndarray | None, ref: np.ndarray | None, ms: float | None) -> dict:
    r = {"frames": label, "candidate": name, **(compare(out, ref) if out is not None else {}), "ms": ms}
    cells = table([r])[-1].strip("|").split("|")[2:]
    print(f"  {label:16} {name:46} max {cells[0]:>6}  mean {cells[1]:>6}  PSNR {cells[2]:>6}  ms/frame {cells[3]:>7}",
          flush=True)
    return r


def frames_part(sets: dict[str, np.ndarray], repeat: int) -> list[dict]:
    rows = []
    for label, frames in sets.items():
        ref = np.stack([pil(f) for f in frames])
        for name, (fn, timed) in CANDIDATES.items():
            out = np.stack([fn(f) for f in frames])
            rows.append(row(label, name, out, ref, per_frame_ms(lambda: [timed(f) for f in frames], len(frames), repeat)))
        jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1] for f in frames]
        by_cv2 = np.stack([cv2.cvtColor(cv2.imdecode(j, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB) for j in jpegs])
        by_pil = np.stack([np.asarray(Image.open(io.BytesIO(j.tobytes()))) for j in jpegs])
        rows.append(row(label, "(JPEG q90 decode alone: cv2 vs Pillow)", by_cv2, by_pil, None))
    return rows


def video_part(clips: dict[str, np.ndarray], work: Path, repeat: int) -> list[dict]:
    import av

    from synthetic.generator import write_clip_video
    rows = []
    for label, clip in clips.items():
        path = work / f"{label.split()[0]}.mp4"
        write_clip_video(path, clip)
        n = len(clip)
        ref = decord.VideoReader(str(path), height=S, width=S).get_batch(list(range(n))).asnumpy()
        full = decord.VideoReader(str(path)).get_batch(list(range(n))).asnumpy()  # decord without its scale
        ours = video.decode_frames(path, n)  # cv2.VideoCapture, as the runtime decodes

        def decode_yuv():
            with av.open(str(path)) as c:
                return list(c.decode(video=0))

        def decode_cv2():
            cap = cv2.VideoCapture(str(path))
            frames = [cap.read()[1] for _ in range(n)]
            cap.release()
            return frames

        yuv = decode_yuv()
        rgb_resize = {"runtime now: cv2 decode + _fit + INTER_CUBIC": (runtime_path, runtime_resize),
                      "cv2 decode + INTER_AREA": (cv(cv2.INTER_AREA),) * 2,
                      "cv2 decode + Pillow BICUBIC": (pil,) * 2,
                      "cv2 decode + Pillow BILINEAR": ((lambda f: pil(f, Image.BILINEAR)),) * 2}
        for name, (fn, timed) in rgb_resize.items():
            rows.append(row(label, name, np.stack([fn(f) for f in ours]), ref,
                            per_frame_ms(lambda: [timed(f) for f in ours], n, repeat)))
        sws = lambda fr: fr.reformat(width=S, height=S, format="rgb24", interpolation="BILINEAR").to_ndarray()  # noqa: E731
        rows.append(row(label, "PyAV decode + reformat(BILINEAR)", np.stack([sws(fr) for fr in yuv]), ref,
                        per_frame_ms(lambda: [sws(fr) for fr in yuv], n, repeat)))
        for flags, name in (("bilinear", "PyAV decode + scale=224:224:flags=bilinear"),
                            (None, "PyAV decode + scale=224:224 (FFmpeg 8 default)")):
            rows.append(row(label, name, ffmpeg_scale(yuv, flags), ref,
                            per_frame_ms(lambda: ffmpeg_scale(yuv, flags), n, repeat)))
        rows.append(row(label, "(cv2 decode vs decord decode, full size)", ours, full, None))
        rows.append(row(label, "(decode alone: cv2.VideoCapture to BGR)", None, None, per_frame_ms(decode_cv2, n, repeat)))
        rows.append(row(label, "(decode alone: PyAV to YUV)", None, None, per_frame_ms(decode_yuv, n, repeat)))
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| frames | candidate | max abs | mean abs | PSNR dB | ms/frame |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "" if "psnr" not in r else "exact" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        diff = [f"{r['max']:.0f}", f"{r['mean']:.3f}"] if "max" in r else ["", ""]
        ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
        lines.append(f"| {r['frames']} | {r['candidate']} | {diff[0]} | {diff[1]} | {psnr} | {ms} |")
    return lines


def write(out: Path, machine: str, frame_rows: list[dict], video_rows: list[dict]) -> None:
    section = [HEADING, "",
               f"`.venv/bin/python bench/bench_resize.py`, on {machine}; "
               f"Pillow {Image.__version__}, decord {decord.__version__}, OpenCV {cv2.__version__} "
               f"({cv2.getNumThreads()} threads), numpy {np.__version__}. 0-255 units before normalisation; "
               "ms/frame: the resize alone, best of the rounds.", "",
               "### Frames (folders): reference Pillow `img.resize((224, 224))` (BICUBIC)", "", *table(frame_rows), "",
               "### Videos: reference decord `VideoReader(height=224, width=224)` (FFmpeg scale, bilinear)", "",
               *table(video_rows), ""]
    text = out.read_text() if out.exists() else ""
    if HEADING in text:
        head, _, rest = text.partition(HEADING)
        nxt = rest.find("\n## ")
        text = head + "\n".join(section) + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text + ("\n" if text else "") + "\n".join(section)
    out.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "resize.md")
    args = ap.parse_args()
    machine = describe(gpu=False)
    print(machine)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"demo clips 64x64": demo_frames(work),
                "640x360": natural_clip(360, 640, 8, 1),
                "1280x720": natural_clip(720, 1280, 8, 2),
                "3840x2160 (4K)": natural_clip(2160, 3840, 2, 3)}
        print("frames (folders): reference Pillow BICUBIC")
        frame_rows = frames_part(sets, args.repeat)
        print("videos: reference decord at 224x224")
        video_rows = video_part({k: sets[k] for k in ("640x360", "1280x720")}, work, args.repeat)
    write(args.out, machine, frame_rows, video_rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

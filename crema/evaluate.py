"""`crema evaluate`: a dataset's official annotations asked through one backend, with the paper's metrics.

    crema evaluate --dataset nextqa --annotations val.json --media videos/ --out eval/ --artifacts A
    crema evaluate --dataset music-avqa ... --url 127.0.0.1:8001 --protocol grpc     (Triton, `crema serve`)
    crema evaluate --dataset sqa3d ... --blip2-dir B --crema-ckpt P --crema-ckpt F   (the PyTorch reference)

Each item is asked as CREMA asks it (runtime/datasets.py): its prompt template, its generation settings
(NExT-QA: mcqa scoring of the option letters; MUSIC-AVQA and SQA3D: beam search), SQA3D's 5000 points,
its frames as CREMA's loaders give them (frame folders: Pillow BICUBIC, NExT-QA flow un-mirrored; video
files: scaled inside FFmpeg as decord scales them, runtime/video.py decode_scaled).
Answers go to OUT/predictions.jsonl one line at a time (evaluation/runner.py: an interrupted run resumes
where it stopped); the metrics to OUT/metrics.json and OUT/metrics.md. The synthetic task asks its
questions as they are, with the model's own settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluation.annotations import Item, load_annotations
from evaluation.media import load_points, resolve_media
from evaluation.runner import evaluate
from runtime.datasets import DATASETS, crema_points, music_avqa_prompt, nextqa_prompt, sqa3d_prompt
from runtime.specs import VISUAL, modality_names

DATASET_NAMES = ("nextqa", "music-avqa", "sqa3d", "synthetic")


def prompt(item: Item) -> str:
    """The text the model reads for `item`: CREMA's prompt for its dataset."""
    if item.dataset == "nextqa":
        return nextqa_prompt(item.question, item.options)
    if item.dataset == "music-avqa":
        return music_avqa_prompt(item.extra["template"], item.extra["templ_values"])
    if item.dataset == "sqa3d":
        return sqa3d_prompt(item.extra["situation"], item.question)
    return item.question


def generation(dataset: str) -> dict:
    """Request options of CREMA's evaluation of `dataset` (the model's own for the synthetic task)."""
    return DATASETS[dataset].request_options() if dataset in DATASETS else {}


def visual_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Visual modality -> (frames, image size) the model takes."""
    t, size = config["frame_num"], config["vision"]["image_size"]
    return {m: (t, size) for m in modality_names(config) if m in VISUAL}


def inputs(item: Item, media_root: Path, modalities: list[str], shapes: dict | None = None) -> dict:
    """request_from_files' keyword arguments for `item` (video, depth, audio, pc as (feat, coords), frames).
    shapes: visual modality -> (frames, image size), needed for NExT-QA's flow folders (read here: CREMA
    un-mirrors them first)."""
    found = resolve_media(item, media_root)
    out: dict = {"frames": {}}
    video = found.get("video")
    if video is not None and video.is_dir():  # CREMA's frame folders (NExT-QA)
        out["frames"]["rgb"] = video
    elif video is not None:
        out["video"] = video
        if item.dataset in ("music-avqa", "sqa3d") and "rgb" in (shapes or {}):  # CREMA reads these with decord
            from runtime.video import decode_scaled, normalize_frames
            t, size = shapes["rgb"]
            out["frames"]["rgb"] = normalize_frames(decode_scaled(video, t, size, f"item {item.id!r} video"), size)
    elif "frames" in found:  # SQA3D: CREMA's frame folder of the scene
        out["frames"]["rgb"] = found["frames"]
    for m in ("depth", "flow", "norm"):
        if m in found and m in modalities and item.dataset == "nextqa":
            out["frames"][m] = found[m]
    if "flow" in out["frames"]:
        from runtime.video import normalize_frames, read_frame_folder, unflip_nextqa_flow
        t, size = shapes["flow"]
        images = read_frame_folder(out["frames"]["flow"], t, f"item {item.id!r} flow", size, unflip_nextqa_flow)
        out["frames"]["flow"] = normalize_frames(images, size)
    if item.dataset == "synthetic":
        out.update({k: found[k] for k in ("depth", "audio") if k in found})
    if "pc_feat" in found:
        raise ValueError(f"item {item.id!r}: 3D-LLM's .pt features need torch: convert them to .npz "
                         f"(feat, coords) under {media_root}/pc/ first (docs/reproduce.md)")
    if "pc" in found and "pc" in modalities:
        feat, coords = load_points(found["pc"])
        if item.dataset == "sqa3d":  # CREMA always feeds 5000 points (padding at voxel (0,0,0), attended)
            feat, coords, _ = crema_points(feat, coords)
        out["pc"] = (feat.astype(np.float32), coords.astype(np.int64))
    return out


class RuntimeBackend:
    """The torch-free ONNX Runtime pipeline over an artifact directory."""

    def __init__(self, artifacts, precision: str = "fp32", providers=None, threads: int | None = None):
        from runtime.pipeline import Pipeline
        self.pipeline = Pipeline(artifacts, precision=precision, providers=providers, threads=threads)
        self.config = self.pipeline.config
        self.shapes, self.modalities = visual_shapes(self.config), modality_names(self.config)

    def __call__(self, question: str, files: dict, options: dict) -> dict:
        from runtime.inputs import request_from_files
        request = request_from_files(self.config, question, depth_model=self.pipeline.depth_estimator
                                     if files.get("depth") is None else None, **files)
        answer = self.pipeline.answer([request], **options)[0]
        return {"prediction": answer.text, "question_tokens": list(answer.question_tokens)}


class TritonBackend:
    """The `crema` ensemble of a Triton server (`crema serve`), over HTTP or gRPC."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 300.0):
        from triton_models.client import CremaClient
        self.client = CremaClient(url, protocol, timeout_s=timeout_s)
        self.shapes = self.client.frame_shapes()
        # its visual modalities from the ensemble's metadata; audio and pc are read when an item has them
        self.modalities = sorted(self.shapes) + ["audio", "pc"]

    def __call__(self, question: str, files: dict, options: dict) -> dict:
        from triton_models.client import request_tensors, tensors_from_files
        files = dict(files)
        pc = files.pop("pc", None)
        frames = files.pop("frames")
        arrays = {m: x for m, x in frames.items() if isinstance(x, np.ndarray)}  # read here already
        paths = {m: x for m, x in frames.items() if m not in arrays}
        tensors = tensors_from_files(question, frames=paths, frame_shapes=self.shapes, **files, **options)
        tensors.update(request_tensors(question, frames=arrays))
        if pc is not None:
            tensors.update(request_tensors(question, pc_feat=pc[0], pc_coords=pc[1]))
        result = self.client.infer(tensors)
        return {"prediction": result.answer, "question_tokens": list(result.question_tokens)}


class ReferenceBackend:
    """The PyTorch reference model (reference.model.Crema)."""

    def __init__(self, model):
        self.model, self.config = model, model.cfg.to_dict()
        self.shapes, self.modalities = visual_shapes(self.config), modality_names(self.config)

    def __call__(self, question: str, files: dict, options: dict) -> dict:
        import torch

        from reference.model import CremaInputs
        from runtime.inputs import request_from_files
        r = request_from_files(self.config, question, **files)
        batch = lambda x: None if x is None else torch.from_numpy(x)[None]  # noqa: E731
        inputs = CremaInputs([r.question], {m: batch(x) for m, x in r.frames.items()}, batch(r.audio),
                             batch(r.pc_feat), batch(r.pc_coords))
        if options.get("task", self.model.cfg.downstream_task) != self.model.cfg.downstream_task:
            raise ValueError(f"task {options['task']}: load the reference with --downstream {options['task']}")
        settings = {k: options[k] for k in ("num_beams", "max_new_tokens") if k in options}
        return {"prediction": self.model.generate(inputs, **settings)[0].text}


def run(dataset: str, annotations, media, out, backend, modalities: list[str] | None = None, progress: bool = True,
        limit: int | None = None) -> dict:
    """Evaluate `backend` on the annotations; writes OUT/predictions.jsonl, metrics.json, metrics.md.
    modalities: what to read of each item's media (default: the backend's)."""
    items = load_annotations(dataset, annotations)[:limit]
    modalities = backend.modalities if modalities is None else modalities
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options, media = generation(dataset), Path(media)

    def answer(item: Item) -> dict:
        return backend(prompt(item), inputs(item, media, modalities, backend.shapes), options)

    result = evaluate(items, answer, out / "predictions.jsonl", progress=progress)
    (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2) + "\n")
    (out / "metrics.md").write_text(result["table"] + "\n")
    return result


def add_evaluate(sub) -> None:
    from crema.cli import _model_args
    p = sub.add_parser("evaluate", help="ask a dataset's official annotations through one backend (ONNX Runtime, "
                                        "Triton or the PyTorch reference) and report CREMA's metrics")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--annotations", type=Path, required=True,
                   help="nextqa: SeViLA's json; music-avqa: json_update; sqa3d: 3D-LLM's; synthetic: questions.jsonl")
    p.add_argument("--media", type=Path, required=True, help="the media root (docs/reproduce.md: layouts)")
    p.add_argument("--out", type=Path, required=True,
                   help="predictions.jsonl (resumed when it exists), metrics.json, metrics.md")
    p.add_argument("--limit", type=int, help="the first N items only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    b = p.add_argument_group("backend (one of --artifacts, --url, or a model source for the reference)")
    b.add_argument("--artifacts", type=Path, help="ONNX Runtime over an artifact directory")
    b.add_argument("--precision", default="fp32", help="with --artifacts: fp32 | int8 | mixed | fp16")
    b.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt"])
    b.add_argument("--url", help="Triton (`crema serve`) host:port")
    b.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    _model_args(p)
    p.set_defaults(func=cmd_evaluate)


def _backend(args):
    from crema.cli import MODEL_SOURCES, UsageError, _given, load_model
    references = _given(args, MODEL_SOURCES)
    chosen = [f for f, given in (("--artifacts", args.artifacts), ("--url", args.url), ("a model source",
                                                                                        references)) if given]
    if len(chosen) != 1:
        raise UsageError("give exactly one backend: --artifacts, --url, or a model source (--preset, --checkpoint, "
                         f"--blip2-dir){'; got ' + ' and '.join(chosen) if chosen else ''}")
    if args.artifacts:
        return RuntimeBackend(args.artifacts, args.precision, args.provider)
    if args.url:
        from triton_models.client import AskError
        try:
            return TritonBackend(args.url, args.protocol)
        except AskError as e:
            raise ValueError(str(e)) from None
    if args.dataset in DATASETS and args.downstream is None:  # the reference's task is part of its config
        args.downstream = DATASETS[args.dataset].downstream_task
    return ReferenceBackend(load_model(args))


def cmd_evaluate(args) -> None:
    result = run(args.dataset, args.annotations, args.media, args.out, _backend(args), progress=not args.quiet,
                 limit=args.limit)
    print(result["table"])
    print(result["summary"])
    for e in result["errors"][:10]:
        print(f"  {e['id']}: {e['error']}")
    if len(result["errors"]) > 10:
        print(f"  ... {len(result['errors']) - 10} more in {result['predictions_path']}")
    print(f"wrote {args.out}/metrics.json, metrics.md, predictions.jsonl")

"""`crema <subcommand>`: info, run, export, parity, checkpoint, demo, train-demo, train-depth, calibrate,
convert-fp16, build-trt, triton-repo, serve, ask, gateway, deploy. Heavy packages load inside each command (`crema ask` loads neither torch nor ORT).

Each subcommand has its parser function (`add_{name}`) beside its `cmd_{name}`. A user error is one
line, `error: <message>`, on stderr with exit code 2; no option is silently ignored."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# Pure-Python constants (no torch, no ONNX Runtime): the choices stay those the packages accept.
from crema.deploy import add_deploy
from crema.evaluate import add_evaluate
from gateway.cli import add_gateway
from reference.config import DATASETS, DOWNSTREAM_TASKS
from runtime.artifacts import PRECISIONS
from triton_models.layout import MAX_QUEUE, QUEUE_TIMEOUT_MS


class UsageError(ValueError):
    """Options that do not go together; the message names the option."""


# --- options shared by several subcommands -------------------------------------------------------

MODEL_SOURCES = (("--preset", "preset"), ("--checkpoint", "checkpoint"), ("--blip2-dir", "blip2_dir"))
BLIP2_EXTRAS = (("--crema-ckpt", "crema_ckpt"), ("--beats-ckpt", "beats_ckpt"))
EXPORT_FIXED = (("--modalities", "modalities"), ("--task", "task"), ("--frames", "frame_num"))
ORT_OPTIONS = (("--threads", "threads"), ("--low-memory", "low_memory"), ("--precision", "precision"),
               ("--provider", "provider"))


def _crema_options(p) -> None:
    p.add_argument("--modalities", help="e.g. rgb_depth_flow_norm, rgb_audio, rgb_depth-skip")
    p.add_argument("--task", type=task_name, help="how the modalities are fused: concat | espresso | espresso_concat, "
                                              "or CREMA's names (e.g. espresso-concat-seq)")
    p.add_argument("--downstream", choices=DOWNSTREAM_TASKS, help="open-ended or multiple-choice QA")
    p.add_argument("--frames", type=int, dest="frame_num", help="frames per clip (frame_num)")


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", help="demo: the trained demo model; tiny | bench | flant5xl: preset shapes, "
                                      "seeded random weights")
    src.add_argument("--checkpoint", type=Path, help="a directory written by `crema checkpoint`")
    src.add_argument("--blip2-dir", type=Path, help="HF BLIP-2 FlanT5 directory (safetensors + tokenizer.json)")
    src.add_argument("--crema-ckpt", type=Path, action="append",
                     help="CREMA LAVIS checkpoint (.pth), with --blip2-dir; give it twice to overlay a fine-tuned "
                          "checkpoint on crema_pretrained.pth, as CREMA loads them (the later one wins)")
    src.add_argument("--beats-ckpt", type=Path, help="BEATs checkpoint (.pt), when audio is configured")
    opt = p.add_argument_group("CREMA options (override the preset or checkpoint)")
    _crema_options(opt)
    opt.add_argument("--seed", type=int, help="seed of a preset's random weights (default 0)")
    opt.add_argument("--reference-precision", choices=["fp32", "crema"], default="fp32",
                     help="crema: as CREMA ran inference (ViT/BEATs under fp16 autocast, T5 in bf16; bf16 on CPU)")


def task_name(text: str) -> str:
    """argparse type of --task: ours, or CREMA's name for it."""
    from reference.config import ConfigError
    from reference.weights import task_options
    try:
        return task_options(text)["task"]
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def key_value(text: str) -> tuple[str, str]:
    """argparse type of `--visual MODALITY=FILE` (run and ask)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value:
        raise argparse.ArgumentTypeError(f"expected MODALITY=FILE (e.g. depth=depth_frames.npy), got {text!r}")
    return key.strip(), value


def _raw_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", required=True, help="the question (with --dataset music-avqa: its template, "
                                                     "<...> placeholders filled from --templ-values)")
    d = p.add_argument_group("asked as CREMA asks a dataset's questions (its prompt and generation settings)")
    d.add_argument("--dataset", choices=DATASETS)
    d.add_argument("--option", action="append", help="nextqa: an answer option (five, in order A..E)")
    d.add_argument("--situation", help="sqa3d: the situation text")
    d.add_argument("--templ-values", help="music-avqa: the placeholder values, e.g. '[\"cello\"]'")
    p.add_argument("--video", type=Path, help="the video file (rgb frames; optical flow is computed from it; "
                                              "its soundtrack is the audio when --audio is not given)")
    p.add_argument("--depth", type=Path, help="depth maps: .npy [T, H, W] or [H, W], 16-bit PNG, or a folder "
                                              "of them (depth, and normals computed from it)")
    p.add_argument("--audio", type=Path, help="a sound file (WAV, FLAC, OGG), resampled to 16 kHz mono "
                                              "(default: the video's soundtrack)")
    p.add_argument("--pc", type=Path, help="3D: .npz with 'feat' [points, feature_dim] and 'coords' [points, 3]")
    p.add_argument("--visual", action="append", default=[], type=key_value, metavar="MODALITY=PATH",
                   help="a visual modality's own frames (rgb, depth, flow, norm), used as images: a .npy of "
                        "normalised frames [T, 3, S, S], a folder of PNG/JPEG frames (sampled as CREMA's "
                        "load_frames) or a video; repeatable. Depth maps (values, not images) go to --depth")


def visual_files(pairs: list[tuple[str, str]]) -> dict[str, Path]:
    """--visual pairs -> modality -> path; a modality given twice is refused."""
    out: dict[str, Path] = {}
    for modality, path in pairs:
        if modality in out:
            raise UsageError(f"--visual {modality}: given twice")
        out[modality] = Path(path)
    return out


# request fields (named by runtime and server errors) -> the flags that give them here
FIELD_FLAGS = {"video": "--video", "depth": "--depth", "audio": "--audio", "pc_feat": "--pc", "pc_coords": "--pc"}


def flag_names(message: str) -> str:
    """An error naming request fields ("request field audio") -> naming this command's flags ("--audio")."""
    def flags(match: re.Match) -> str:
        out: list[str] = []
        for field in match.group(1).split(" and "):
            flag = FIELD_FLAGS.get(field) or (f"--visual {field[:-len('_frames')]}=PATH" if field.endswith("_frames")
                                              else field)
            if flag not in out:
                out.append(flag)
        return " and ".join(out)

    return re.sub(r"(?:the )?request fields? (\w+(?: and \w+)*)", flags, message)


def _given(args, options) -> list[str]:
    """The flags among `options` ((flag, dest) pairs) that the user set."""
    return [flag for flag, dest in options if getattr(args, dest, None) not in (None, False)]


def _seed(args) -> int:
    return 0 if args.seed is None else args.seed


def _overrides(args) -> dict:
    from reference.config import parse_modalities
    out = {}
    if getattr(args, "dataset", None):  # its conventions: generation settings, answer form, structured requests
        from reference.config import GenerationConfig
        from runtime.datasets import dataset_preset
        p = dataset_preset(args.dataset)
        out.update(dataset=p.name, downstream_task=p.downstream_task,
                   generation=GenerationConfig(p.num_beams, p.max_new_tokens, p.min_length, p.length_penalty))
    if args.modalities:
        out["modalities"] = parse_modalities(args.modalities)
    if args.task:
        out["task"] = args.task
    if args.downstream:
        out["downstream_task"] = args.downstream
    if args.frame_num:
        out["frame_num"] = args.frame_num
    return out


def _config(args):
    from reference.config import preset
    return preset(args.preset, **_overrides(args))


def check_model_source(args) -> None:
    """Exactly one model source, and only the options that source reads (before anything loads)."""
    if len(_given(args, MODEL_SOURCES)) != 1:
        raise UsageError("give exactly one of --preset, --checkpoint, --blip2-dir")
    extras = _given(args, BLIP2_EXTRAS)
    if extras and not args.blip2_dir:
        raise UsageError(f"{extras[0]}: only with --blip2-dir")
    if args.seed is not None and (not args.preset or args.preset == "demo"):
        raise UsageError("--seed: only with a preset's random weights (--preset tiny | bench | flant5xl)")


def load_model(args):
    """The reference model from exactly one source, at --reference-precision."""
    model = _load_model(args)
    if getattr(args, "reference_precision", "fp32") == "crema":
        from reference.model import crema_precision
        crema_precision(model, "cpu")
    return model


def _load_model(args):
    check_model_source(args)
    from reference import weights
    if args.preset == "demo":
        return weights.demo_model(**_overrides(args))
    if args.preset:
        return weights.preset_model(_config(args), seed=_seed(args))
    if args.checkpoint:
        return weights.load_checkpoint(args.checkpoint, **_overrides(args))
    model, report = weights.load_pretrained(args.blip2_dir, args.crema_ckpt, args.beats_ckpt, **_overrides(args))
    print(report.summary(), file=sys.stderr)
    return model


# --- info --------------------------------------------------------------------------------------

def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and LLM token budget of a preset (no weights allocated)")
    p.add_argument("--preset", required=True)
    _crema_options(p)
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    import torch

    from reference.model import Crema
    from reference.tokenizer import TextTokenizer
    from reference.weights import parameter_table

    cfg = _config(args)
    start = time.perf_counter()
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Crema(cfg, TextTokenizer.preset())
    rows = parameter_table(model)
    width = max(len(name) for name, _ in rows)
    print(f"preset {args.preset}: modalities {'_'.join(cfg.modalities)}, task {cfg.task}, "
          f"{cfg.downstream_task}, {cfg.frame_num} frames, {cfg.num_query_token} query tokens")
    for name, n in rows:
        print(f"  {name:<{width}}  {n:>15,}  ({n / 1e6:,.1f} M)")
    tokens = model.multimodal_token_count(audio_clips=cfg.audio.num_clips)
    print(f"LLM input tokens per request: {tokens} multimodal + the question (at most {cfg.max_txt_len})")
    print(f"  (prefixes counted with the preset tokenizer; computed in {time.perf_counter() - start:.2f} s)")


# --- run ---------------------------------------------------------------------------------------

def add_run(sub) -> None:
    p = sub.add_parser("run", help="answer one question in process: ONNX Runtime (--artifacts) or the PyTorch "
                                   "reference")
    _model_args(p)
    ort = p.add_argument_group("ONNX Runtime (with --artifacts, the model and CREMA options are fixed at "
                               "export, except --downstream)")
    ort.add_argument("--artifacts", type=Path, help="an artifact directory from `crema export` (runs without torch)")
    ort.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    ort.add_argument("--low-memory", action="store_true",
                     help="no ORT memory arena: lower peak memory, about 8%% slower vision stage")
    ort.add_argument("--precision", choices=PRECISIONS,
                     help="fp32 (default), INT8 graphs from `crema calibrate` (mixed: only the stages it chose) or "
                          "FP16 graphs from `crema convert-fp16`")
    ort.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt"],
                     help="ONNX Runtime execution providers in priority order (repeatable; "
                          "default cpu; cuda/tensorrt need onnxruntime-gpu and a GPU)")
    p.add_argument("--beams", type=int, help="override the number of beams (oeqa)")
    p.add_argument("--max-new-tokens", type=int, help="override the answer length limit")
    _raw_input_args(p)
    p.add_argument("--depth-model", type=Path, help="an ONNX monocular depth model to run on the frames instead")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> None:
    """ONNX Runtime with --artifacts (torch is never imported), else the PyTorch reference."""
    exported = None
    if args.artifacts:
        from runtime.artifacts import Artifacts
        exported = Artifacts(args.artifacts, verify=False).manifest["config"].get("dataset")
    dataset_prompt(args, exported)
    (run_artifacts if args.artifacts else run_reference)(args)


def dataset_prompt(args, exported: str | None = None) -> None:
    """--dataset D: the question becomes D's prompt (built from it and --option / --situation / --templ-values,
    runtime/datasets.py) and D's generation settings the defaults of --downstream/--task, --beams and
    --max-new-tokens. Without --dataset, structured flags use the artifacts' own dataset (`exported`)."""
    from runtime.datasets import DatasetError, dataset_preset, structured_prompt
    given = {k: v for k, v in (("options", args.option), ("situation", args.situation),
                               ("templ_values", args.templ_values)) if v is not None}
    dataset = args.dataset or (exported if given else None)
    if dataset is None:
        if given:
            raise UsageError("--option/--situation/--templ-values: only with --dataset (or artifacts exported "
                             "with --dataset)")
        return
    try:
        args.question = structured_prompt(dataset, args.question, **given)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    if not args.dataset:
        return  # the artifacts' generation settings are the dataset's already
    options = dataset_preset(dataset).request_options()
    task = "downstream" if hasattr(args, "downstream") else "task"
    for dest, key in ((task, "task"), ("beams", "num_beams"), ("max_new_tokens", "max_new_tokens")):
        if getattr(args, dest) is None:
            setattr(args, dest, options[key])


def read_request(args, question: str, config: dict):
    """CLI files -> runtime.pipeline.Request (numpy), each modality extracted as runtime/inputs.py says."""
    from runtime.inputs import request_from_files

    try:
        return request_from_files(config, question, video=args.video, depth=args.depth, depth_model=args.depth_model,
                                  audio=args.audio, pc=args.pc, frames=visual_files(args.visual))
    except ValueError as e:
        raise ValueError(flag_names(str(e))) from None


def run_artifacts(args) -> None:
    """`crema run --artifacts`: the ONNX Runtime pipeline."""
    from runtime.artifacts import Artifacts
    from runtime.text import clean_question

    question = clean_question(args.question)
    manifest = Artifacts(args.artifacts, verify=False).manifest  # options are checked before any graph loads
    check_artifact_options(args, manifest)
    from runtime.pipeline import Pipeline
    pipeline = Pipeline(args.artifacts, threads=args.threads, memory_arena=not args.low_memory,
                        precision=args.precision or "fp32", providers=args.provider)
    if args.depth is None and args.depth_model is None:  # no maps, no ONNX model: the exported estimator, if any
        args.depth_model = pipeline.depth_estimator
    request = read_request(args, question, pipeline.config)
    start = time.perf_counter()
    answer = pipeline.answer([request], num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                             task=args.downstream)[0]
    note = ", random preset weights" if _random_weights(manifest.get("source") or {}) else ""
    _print_answer(question, answer.text, answer.option_scores, time.perf_counter() - start,
                  f"ONNX Runtime {args.precision or 'fp32'}{note}", answer.question_tokens)


def check_artifact_options(args, manifest: dict) -> None:
    """Refuse model options that artifacts fix at export: a model source, or a config value that
    differs from the exported one (the same value is accepted). --downstream is a request option."""
    from reference.config import parse_modalities

    given = _given(args, MODEL_SOURCES + BLIP2_EXTRAS + (("--seed", "seed"),))
    if given:
        source = ", ".join(f"{k}={v}" for k, v in (manifest.get("source") or {}).items()) or "unknown"
        raise UsageError(f"{given[0]}: the model comes from --artifacts (exported from {source}); give one or "
                         "the other")
    config = manifest["config"]
    exported = {"modalities": "_".join(config["modalities"]), "task": config["task"],
                "frame_num": config["frame_num"]}
    for flag, dest in EXPORT_FIXED:
        value = getattr(args, dest)
        compared = "_".join(parse_modalities(value)) if dest == "modalities" and value else value
        if value is not None and compared != exported[dest]:
            raise UsageError(f"{flag} {value}: these artifacts were exported with {exported[dest]}; fixed at "
                             "export (export again to change it)")


def run_reference(args) -> None:
    """`crema run` with a model source: the PyTorch reference."""
    from runtime.text import clean_question

    given = _given(args, ORT_OPTIONS)
    if given:
        raise UsageError(f"{given[0]}: an ONNX Runtime option, only with --artifacts")
    question = clean_question(args.question)
    check_model_source(args)
    import torch

    from reference.model import CremaInputs
    model = load_model(args)
    request = read_request(args, question, model.cfg.to_dict())
    batch = lambda x: None if x is None else torch.from_numpy(x)[None]  # noqa: E731
    inputs = CremaInputs([request.question], {m: batch(x) for m, x in request.frames.items()},
                         batch(request.audio), batch(request.pc_feat), batch(request.pc_coords))
    start = time.perf_counter()
    overrides = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens)) if v}
    answer = model.generate(inputs, **overrides)[0]
    random = _random_weights(vars(args))
    note = f", preset {args.preset!r}: seeded random weights, not a trained model" if random else ""
    _print_answer(question, answer.text, answer.option_scores, time.perf_counter() - start,
                  f"PyTorch reference{note}")


def _print_answer(question: str, text: str, option_scores, seconds: float, how: str, question_tokens=None) -> None:
    print(f"question: {question}")
    print(f"answer:   {text}")
    if option_scores:
        print("scores:   " + "  ".join(f"{l}={s:.3f}" for l, s in zip("ABCDE", option_scores)))
    if question_tokens and question_tokens[1] > question_tokens[0]:
        print(f"note: the question is {question_tokens[1]} tokens; the model read its first {question_tokens[0]} "
              "(max_txt_len, cut as CREMA cuts it)", file=sys.stderr)
    print(f"({seconds:.2f} s, {how})", file=sys.stderr)


def _random_weights(source: dict) -> bool:
    return bool(source.get("preset")) and source["preset"] != "demo"


# --- export, parity, checkpoint ----------------------------------------------------------------

def add_export(sub) -> None:
    p = sub.add_parser("export", help="export every stage to ONNX: an artifact directory with manifest and tokenizer")
    _model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dataset", choices=DATASETS,
                   help="export with a CREMA dataset's conventions: its generation settings and answer form, and "
                        "requests may carry its structured fields (options, situation, templ_values)")
    p.add_argument("--depth-model", type=Path, metavar="DIR",
                   help="a local Hugging Face depth model (ZoeDepth, Depth Anything, DPT: config.json, weights, "
                        "preprocessor_config.json), exported as the depth_estimator stage: `crema run` then computes "
                        "depth (and normals) from the video when no depth maps are given")
    p.set_defaults(func=cmd_export)


def fp32_weights_only(args) -> None:
    if args.reference_precision != "fp32":
        raise UsageError("--reference-precision crema: only to run the reference (export and checkpoints keep FP32 "
                         "weights; ONNX precisions are chosen at run time)")


def cmd_export(args) -> None:
    from export.onnx_export import export_artifacts
    fp32_weights_only(args)
    if args.depth_model is not None:  # refused in seconds, before the model loads
        from export.depth import check_depth_model
        check_depth_model(args.depth_model)
    model = load_model(args)
    if args.preset == "demo":
        from reference.weights import DEMO_SOURCE
        source = DEMO_SOURCE
    elif args.preset:
        source = {"preset": args.preset, "seed": _seed(args)}
    elif args.checkpoint:
        source = {"checkpoint": str(args.checkpoint.resolve())}
    else:
        source = {k: str(Path(v).resolve()) for k, v in (("blip2_dir", args.blip2_dir), ("beats_ckpt", args.beats_ckpt))
                  if v}
        if args.crema_ckpt:  # in overlay order
            source["crema_ckpt"] = [str(Path(v).resolve()) for v in args.crema_ckpt]
    out = export_artifacts(model, args.out, source, progress=not args.quiet, depth_model=args.depth_model)
    print(f"wrote {out}")


def add_parity(sub) -> None:
    p = sub.add_parser("parity", help="compare an artifact directory with the PyTorch reference, stage by stage")
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--json", type=Path, help="where to write the report (default: ARTIFACTS/parity.json)")
    p.set_defaults(func=cmd_parity)


def cmd_parity(args) -> None:
    from export.parity import format_report, parity_report, write_report
    report = parity_report(args.artifacts)
    print(format_report(report))
    json_path = args.json or Path(args.artifacts) / "parity.json"
    write_report(report, json_path)
    print(f"(table written to {json_path})", file=sys.stderr)
    if not report["ok"]:
        raise SystemExit(1)


def add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="write a preset's weights, config and tokenizer as a checkpoint directory")
    _model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_checkpoint)


def cmd_checkpoint(args) -> None:
    from reference.weights import save_checkpoint
    fp32_weights_only(args)
    model = load_model(args)
    print(save_checkpoint(model, args.out, extra={"seed": _seed(args), "preset": args.preset}))


# --- demo, training, INT8 ----------------------------------------------------------------------

def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate a new synthetic clip, serve the trained demo model with Triton, "
                                    "ask its questions, print answers, ground truth and latencies")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--clips", type=int, default=1, help="how many clips to generate and ask about")
    p.add_argument("--in-process", action="store_true", help="ONNX Runtime in this process instead of a Triton server")
    p.add_argument("--precision", choices=("fp32", "int8", "mixed"), default="int8",
                   help="int8 (default)/mixed: calibrate the export first (`crema calibrate`, seconds on the "
                        "demo model); FP32 if INT8 misses the fidelity bounds")
    p.add_argument("--strict", action="store_true", help="exit 1 when an answer is wrong")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from crema.demo import run_demo
    wrong = run_demo(args.out, clips=args.clips, triton=not args.in_process, precision=args.precision)
    if wrong and args.strict:
        raise SystemExit(1)


def add_train_demo(sub) -> None:
    p = sub.add_parser("train-demo", help="train the demo preset on the synthetic task (CPU, deterministic, "
                                          "~12 min on 2 cores) and report held-out accuracy and the ablation")
    p.add_argument("--out", type=Path, default=Path("out/train-demo"), help="checkpoint directory to write")
    p.add_argument("--work", type=Path, help="where to generate the data (default: OUT/data)")
    p.add_argument("--steps", type=int)
    p.add_argument("--train-clips", type=int)
    p.add_argument("--test-clips", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_train_demo)


def _settings(cls, args):
    """A settings dataclass from the flags the user gave (the rest keep their defaults)."""
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None})


def cmd_train_demo(args) -> None:
    from training.demo import TrainSettings, metrics_table, train_demo
    metrics = train_demo(args.out, _settings(TrainSettings, args), work=args.work)
    print(metrics_table(metrics))
    _compare_with_shipped(metrics, Path(args.out))
    print(f"wrote {args.out} (checkpoint + metrics.json); `crema run --checkpoint {args.out}` uses it")


def _compare_with_shipped(metrics: dict, out: Path) -> None:
    """One line: this run's overall accuracy next to the shipped weights' (reference/demo)."""
    import json

    from reference.weights import DEMO_CHECKPOINT
    shipped = DEMO_CHECKPOINT / "metrics.json"
    if not shipped.is_file() or out.resolve() == DEMO_CHECKPOINT:
        return
    ref = json.loads(shipped.read_text())
    same = ref["settings"] == json.loads(json.dumps(metrics["settings"]))  # tuples became lists
    diff = 100 * (metrics["accuracy"]["overall"] - ref["accuracy"]["overall"])
    print(f"shipped weights (reference/demo): overall {100 * ref['accuracy']['overall']:.1f}%; this run "
          f"{100 * metrics['accuracy']['overall']:.1f}% ({diff:+.1f} points"
          f"{'' if same else ', different settings'})")


def add_train_depth(sub) -> None:
    p = sub.add_parser("train-depth", help="train the demo's depth estimator on shaded synthetic clips (CPU, "
                                           "deterministic, ~13 min on 2 cores); report depth error and the demo "
                                           "model's accuracy from the video alone")
    p.add_argument("--out", type=Path, default=Path("out/train-depth"),
                   help="Hugging Face depth model directory to write (`crema export --depth-model OUT`)")
    p.add_argument("--work", type=Path, help="where to generate the data (default: OUT/data)")
    p.add_argument("--steps", type=int)
    p.add_argument("--train-clips", type=int)
    p.add_argument("--demo-clips", type=int, help="new demo clips it is evaluated on (default 50)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_train_depth)


def cmd_train_depth(args) -> None:
    from training.depth import DepthSettings, report_markdown, train_depth
    metrics = train_depth(args.out, _settings(DepthSettings, args), work=args.work)
    print(report_markdown(metrics))
    print(f"wrote {args.out}; `crema export --preset demo --depth-model {args.out}` exports it with the demo model")


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="INT8 graphs for every stage (ORT static QDQ / dynamic), TensorRT "
                                         "calibration tables, and the fidelity report vs FP32")
    p.add_argument("--artifacts", type=Path, required=True, help="an artifact directory from `crema export`")
    p.add_argument("--data", type=Path, help="calibration clips + questions.jsonl (calibration/data.py); "
                                            "default: synthetic clips, seed 2")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--questions", type=int, default=120, help="calibration questions")
    p.add_argument("--eval-questions", type=int, default=300, help="questions for the fidelity report (seed 1)")
    p.add_argument("--dynamic", action="append", default=[], metavar="STAGE",
                   help="quantize this stage dynamically instead of static QDQ; repeatable")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="NAME",
                   help="keep nodes whose name contains NAME in FP32 (T5's DenseReluDense/wo always is); repeatable")
    p.add_argument("--force", action="store_true",
                   help="install the INT8 graphs even when they miss the fidelity bounds (benchmarks on random weights)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> None:
    from calibration.calibrate import calibrate, format_report, report_path
    from calibration.quantize import KEEP_FP32
    report = calibrate(args.artifacts, data=args.data, method=args.method, questions=args.questions,
                       eval_questions=args.eval_questions, dynamic=tuple(args.dynamic),
                       keep_fp32=KEEP_FP32 + tuple(args.keep_fp32), force=args.force)
    print(format_report(report))
    installed = "INT8 graphs installed" if report["installed"] else "nothing installed: the artifacts are as they were"
    print(f"({installed}; report: {report_path(args.artifacts, report)})", file=sys.stderr)
    if not report["ok"]:
        raise SystemExit(1)


def add_convert_fp16(sub) -> None:
    p = sub.add_parser("convert-fp16", help="FP16 graphs for every stage (for GPUs), checked per stage against FP32, "
                                            "installed beside them only when within DESIGN §5's bound")
    p.add_argument("--artifacts", type=Path, required=True, help="an artifact directory from `crema export`")
    p.add_argument("--data", type=Path, help="held-out clips + questions.jsonl (calibration/data.py); default: "
                                            "synthetic clips, seed 1")
    p.add_argument("--questions", type=int, default=60, help="held-out questions (their stage inputs and answers)")
    p.add_argument("--keep-fp32", action="append", metavar="EXCEPTION",
                   help="an FP32 exception (export/fp16.py: position_buckets, t5_ffn_output, t5_norm_residual, "
                        "softmax, layer_normalization; none: no exception); repeatable; given, it replaces the default (the "
                        "first three)")
    p.add_argument("--force", action="store_true",
                   help="install the FP16 graphs even when they miss the bound (benchmarks on random weights)")
    p.set_defaults(func=cmd_convert_fp16)


def cmd_convert_fp16(args) -> None:
    from export.fp16 import KEEP_FP32, convert_fp16, format_report, report_path
    keep = tuple(k for k in args.keep_fp32 if k != "none") if args.keep_fp32 else KEEP_FP32
    report = convert_fp16(args.artifacts, data=args.data, questions=args.questions, keep_fp32=keep, force=args.force)
    print(format_report(report))
    installed = "FP16 graphs installed" if report["installed"] else "nothing installed: the artifacts are as they were"
    print(f"({installed}; report: {report_path(args.artifacts, report)})", file=sys.stderr)
    if not report["ok"]:
        raise SystemExit(1)


def add_build_trt(sub) -> None:
    p = sub.add_parser("build-trt", help="TensorRT engines from the ONNX graphs (NVIDIA GPU; profiles from the "
                                         "stage specs, INT8 ranges from `crema calibrate`)")
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--precision", choices=["fp16", "int8"], default="fp16")  # TensorRT's, not the ORT PRECISIONS
    p.set_defaults(func=cmd_build_trt)


def cmd_build_trt(args) -> None:
    from calibration.tensorrt import TensorRTUnavailable, build_engines
    try:
        build_engines(args.artifacts, args.precision)
    except TensorRTUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)


# --- Triton ------------------------------------------------------------------------------------

def add_triton_repo(sub) -> None:
    p = sub.add_parser("triton-repo", help="generate a Triton model repository (ensemble, python models, "
                                           "configs) from an artifact directory")
    p.add_argument("--artifacts", type=Path, required=True, help="an artifact directory from `crema export`")
    p.add_argument("--out", type=Path, required=True, help="the repository folder to write (replaced)")
    p.add_argument("--flavour", choices=["python", "native"], default="python",
                   help="python: every stage a python model over ONNX Runtime (the pip server, CPU); native: "
                        "onnxruntime_onnx / tensorrt_plan models for NVIDIA's Triton containers")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="which graphs to serve (int8/mixed need `crema calibrate`, fp16 `crema convert-fp16`)")
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument("--max-input-mb", type=int, default=64, help="refuse requests whose inputs exceed this")
    p.add_argument("--trt-engines", type=Path, help="native: a folder of {stage}.plan from `crema build-trt`")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="python flavour: run the stage and llm models on the server's GPUs with ONNX Runtime's "
                        "CUDA provider (onnxruntime-gpu beside Triton; the decode loop keeps its cache on the GPU)")
    p.add_argument("--cache-mb", type=int, default=64, help="response cache of each encoder model (per instance; "
                                                           "0: none); it keeps successful outputs only")
    p.add_argument("--cores", type=int, help="CPU hosts: every model instance needs N free cores to run (Triton's "
                                            "rate limiter), so concurrent requests do not oversubscribe the CPU")
    p.add_argument("--queue-timeout-ms", type=int, default=QUEUE_TIMEOUT_MS,
                   help="a request waiting longer in any model's queue is rejected (0: no limit); a client's "
                        "deadline may shorten it")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="requests waiting in any one model's queue; more are rejected (0: no limit)")
    p.set_defaults(func=cmd_triton_repo)


def cmd_triton_repo(args) -> None:
    from triton_models.repository import generate_repository, validate
    repo = generate_repository(args.artifacts, args.out, flavour=args.flavour, precision=args.precision,
                               instances=args.instances, max_input_mb=args.max_input_mb, trt_engines=args.trt_engines,
                               cores=args.cores, cache_mb=args.cache_mb, device=args.device,
                               queue_timeout_ms=args.queue_timeout_ms, max_queue=args.max_queue)
    models = validate(repo)
    print(f"wrote {repo}: {len(models)} models ({', '.join(sorted(models))}), flavour {args.flavour}, "
          f"{args.precision}")
    if args.flavour == "native":
        print("serve it with NVIDIA's Triton container (docs/triton.md); the pip server runs --flavour python only")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a repository: Triton behind a validating front, supervised (loopback); "
                                     "Ctrl-C stops it")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--tritonserver", type=Path, help="a tritonserver binary (default: the one in nvidia-pytriton)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-in-flight", type=int, default=16, help="requests forwarded to Triton at once")
    p.add_argument("--max-queued", type=int, default=256, help="requests waiting (bodies unread); more get 503")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds a request may take")
    p.add_argument("--log", type=Path, help="Triton's log file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import signal

    from triton_models.service import ServerError, Service
    limits = {"max_in_flight": args.max_in_flight, "max_queued": args.max_queued, "timeout_s": args.request_timeout}
    try:
        service = Service(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, binary=args.tritonserver, log_file=args.log, limits=limits,
                          log=lambda line: print(line, flush=True))
        stop = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
        print(f"starting Triton on {args.repo} ...", flush=True)
        service.start(timeout=args.timeout)
    except ServerError as e:
        raise ValueError(str(e)) from None  # main prints it: error: ..., exit code 2
    e = service.endpoints
    print(f"ready: HTTP {e.http_url}  gRPC {e.grpc_url}  metrics {e.host}:{e.metrics}  (Triton log: {service.log_path})\n"
          f"ask:   crema ask --url {e.http_url} --video clip.mp4 --question \"...\"   (Ctrl-C stops the server)",
          flush=True)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        code = service.stop()
        sup, front = service.supervisor, service.front_counts
        print(f"stopped (tritonserver exit code {code}); {sup.count('restart')} restarts, {sup.count('reload')} "
              f"model reloads, {sup.count('load')} model loads; requests: {front['forwarded']} answered by Triton, "
              f"{front['rejected']} refused by the front, {front['aborted']} failed by a restart, "
              f"{front['busy']} turned away busy")


def add_ask(sub) -> None:
    p = sub.add_parser("ask", help="ask the `crema` ensemble on a Triton server (HTTP or gRPC)")
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port (HTTP 8000, gRPC 8001 by default)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--task", choices=DOWNSTREAM_TASKS, help="default: the model's")
    p.add_argument("--beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--timeout", type=float, default=300, help="seconds")
    _raw_input_args(p)
    p.set_defaults(func=cmd_ask)


def cmd_ask(args) -> None:
    """--dataset: the prompt is built here; structured flags without it: by the server (its dataset)."""
    from runtime.text import clean_question
    fields = {}
    if args.dataset:
        dataset_prompt(args)
    else:
        fields = {"options": args.option, "situation": args.situation, "templ_values": args.templ_values}
    from triton_models.client import AskError, CremaClient, needs_frame_shapes, tensors_from_files

    question = clean_question(args.question)
    frames = visual_files(args.visual)
    read = lambda shapes=None: tensors_from_files(  # noqa: E731
        question, video=args.video, depth=args.depth, audio=args.audio, pc=args.pc, frames=frames,
        frame_shapes=shapes, task=args.task, num_beams=args.beams, max_new_tokens=args.max_new_tokens, **fields)
    folders = needs_frame_shapes(frames)  # a folder or video of frames: sampled here at the served model's shape
    tensors = None if folders else read()
    try:
        with CremaClient(args.url, args.protocol, timeout_s=args.timeout) as client:
            result = client.infer(tensors if tensors is not None else read(client.frame_shapes()))
    except AskError as e:
        print(f"error: {flag_names(str(e))}", file=sys.stderr)
        raise SystemExit(2)
    _print_answer(question, result.answer, result.option_scores, result.seconds, f"Triton {args.protocol} {args.url}",
                  result.question_tokens)


# --- the command ---------------------------------------------------------------------------------

SUBCOMMANDS = (add_info, add_run, add_export, add_parity, add_checkpoint, add_demo, add_calibrate, add_convert_fp16,
               add_build_trt, add_train_demo, add_train_depth, add_triton_repo, add_serve, add_ask, add_gateway,
               add_deploy, add_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crema", description="CREMA inference runtime: reference, export, serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # our errors name the problem; OSError: a file the user named
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

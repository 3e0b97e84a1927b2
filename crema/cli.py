"""`crema <subcommand>`: info, run, export, parity, checkpoint, demo, train-demo, calibrate, build-trt,
triton-repo, serve, ask. Heavy packages load inside each command (`crema ask` loads neither torch nor ORT)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", help="demo: the trained demo model; tiny | bench | flant5xl: preset shapes, "
                                      "seeded random weights")
    src.add_argument("--checkpoint", type=Path, help="a directory written by `crema checkpoint`")
    src.add_argument("--blip2-dir", type=Path, help="HF BLIP-2 FlanT5 directory (safetensors + tokenizer.json)")
    src.add_argument("--crema-ckpt", type=Path, help="CREMA LAVIS checkpoint (.pth), with --blip2-dir")
    src.add_argument("--beats-ckpt", type=Path, help="BEATs checkpoint (.pt), when audio is configured")
    opt = p.add_argument_group("CREMA options (override the preset or checkpoint)")
    opt.add_argument("--modalities", help="e.g. rgb_depth_flow_norm, rgb_audio, rgb_depth-skip")
    opt.add_argument("--task", choices=["concat", "espresso", "espresso_concat"])
    opt.add_argument("--downstream", choices=["oeqa", "mcqa"], help="open-ended or multiple-choice QA")
    opt.add_argument("--frames", type=int, dest="frame_num", help="frames per clip (frame_num)")
    opt.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")


def _raw_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", required=True)
    p.add_argument("--video", type=Path, help="the video file (rgb frames; optical flow is computed from it)")
    p.add_argument("--depth", type=Path, help="depth maps: .npy [T, H, W] or [H, W], 16-bit PNG, or a folder "
                                              "of them (depth, and normals computed from it)")
    p.add_argument("--audio", type=Path, help="a sound file (WAV, FLAC, OGG), resampled to 16 kHz mono")
    p.add_argument("--pc", type=Path, help="3D: .npz with 'feat' [points, feature_dim] and 'coords' [points, 3]")
    p.add_argument("--visual", action="append", default=[], metavar="MODALITY=FILE.npy",
                   help="pre-extracted, normalised frames [T, 3, S, S] of a visual modality; repeatable")


def _overrides(args) -> dict:
    from reference.config import parse_modalities
    out = {}
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
    if not args.preset:
        raise SystemExit("error: --preset is required here")
    return preset(args.preset, **_overrides(args))


def load_model(args):
    """The reference model from exactly one source."""
    from reference import weights
    sources = [s for s in (args.preset, args.checkpoint, args.blip2_dir) if s]
    if len(sources) != 1:
        raise SystemExit("error: give exactly one of --preset, --checkpoint, --blip2-dir")
    if args.preset == "demo":
        return weights.demo_model(**_overrides(args))
    if args.preset:
        return weights.preset_model(_config(args), seed=args.seed)
    if args.checkpoint:
        return weights.load_checkpoint(args.checkpoint, **_overrides(args))
    model, report = weights.load_pretrained(args.blip2_dir, args.crema_ckpt, args.beats_ckpt, **_overrides(args))
    print(report.summary(), file=sys.stderr)
    return model


# --- info --------------------------------------------------------------------------------------

def cmd_info(args) -> None:
    import torch

    from reference.model import Crema
    from reference.tokenizer import TextTokenizer

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


def parameter_table(model) -> list[tuple[str, int]]:
    """(part, parameter count) for each part of the model, and the total."""
    from reference.lora import MultiLoRALinear

    def count(params) -> int:
        return sum(p.numel() for p in params)

    cfg, rows = model.cfg, []
    if cfg.visual_modalities:
        # HF stores EVA's q/v biases as one qkv bias whose k third is zero: not an EVA parameter
        k_bias = cfg.vision.num_layers * cfg.vision.hidden_size
        rows.append((f"vision encoder (EVA ViT, {cfg.vision.num_layers} blocks)",
                     count(model.vision_model.parameters()) - k_bias))
    if "audio" in cfg.modality_names:
        rows.append(("audio encoder (BEATs) + projection", count(model.audio_encoder.parameters())
                     + count(model.projection_audio.parameters())))
    lora = {m: 0 for m in cfg.modality_names}
    for module in model.qformer.modules():
        if isinstance(module, MultiLoRALinear):
            for m in lora:
                lora[m] += count(getattr(module, f"w_a_{m}").parameters()) + count(getattr(module, f"w_b_{m}").parameters())
    rows.append(("Q-Former (BLIP-2, shared)", count(model.qformer.parameters()) - sum(lora.values())))
    for m in cfg.modality_names:
        head = [getattr(model, f"query_tokens_{m}")] + list(getattr(model, f"t5_proj_{m}").parameters())
        if hasattr(model, f"ln_{m}"):
            head += list(getattr(model, f"ln_{m}").parameters())
        rows.append((f"MMQA-{m}: LoRA r={cfg.lora_rank} + query tokens, t5_proj, ln", lora[m] + count(head)))
    if cfg.espresso:
        rows.append(("espresso fusion", count(model.fusion.parameters())))
    rows.append((f"LLM (Flan-T5, {cfg.t5.num_layers}+{cfg.t5.num_decoder_layers} layers)",
                 count(model.language_model.parameters())))
    rows.append(("total", sum(n for _, n in rows)))
    return rows


# --- run ---------------------------------------------------------------------------------------

def read_request(args, config: dict):
    """CLI files -> runtime.pipeline.Request (numpy), each modality extracted as runtime/inputs.py says."""
    from runtime.inputs import request_from_files

    frames = dict(item.split("=", 1) for item in args.visual)
    return request_from_files(config, args.question, video=args.video, depth=args.depth,
                              depth_model=args.depth_model, audio=args.audio, pc=args.pc, frames=frames)


def _print_answer(question: str, text: str, option_scores, seconds: float, how: str) -> None:
    print(f"question: {question}")
    print(f"answer:   {text}")
    if option_scores:
        print("scores:   " + "  ".join(f"{l}={s:.3f}" for l, s in zip("ABCDE", option_scores)))
    print(f"({seconds:.2f} s, {how})", file=sys.stderr)


def cmd_run(args) -> None:
    if args.artifacts:  # the ONNX Runtime pipeline: torch is never imported
        from runtime.pipeline import Pipeline
        pipeline = Pipeline(args.artifacts, threads=args.threads, memory_arena=not args.low_memory,
                            precision=args.precision, providers=args.provider)
        request = read_request(args, pipeline.config)
        start = time.perf_counter()
        answer = pipeline.answer([request], num_beams=args.beams, max_new_tokens=args.max_new_tokens)[0]
        note = ", random preset weights" if _random_weights(pipeline.artifacts.manifest["source"]) else ""
        _print_answer(args.question, answer.text, answer.option_scores, time.perf_counter() - start,
                      f"ONNX Runtime {args.precision}{note}")
        return
    import torch

    from reference.model import CremaInputs
    model = load_model(args)
    request = read_request(args, model.cfg.to_dict())
    batch = lambda x: None if x is None else torch.from_numpy(x)[None]  # noqa: E731
    inputs = CremaInputs([request.question], {m: batch(x) for m, x in request.frames.items()},
                         batch(request.audio), batch(request.pc_feat), batch(request.pc_coords))
    start = time.perf_counter()
    overrides = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens)) if v}
    answer = model.generate(inputs, **overrides)[0]
    note = f", preset {args.preset!r}: seeded random weights, not a trained model" if _random_weights(vars(args)) else ""
    _print_answer(args.question, answer.text, answer.option_scores, time.perf_counter() - start,
                  f"PyTorch reference{note}")


def _random_weights(source: dict) -> bool:
    return bool(source.get("preset")) and source["preset"] != "demo"


def cmd_export(args) -> None:
    from export.onnx_export import export_artifacts
    model = load_model(args)
    if args.preset == "demo":
        from reference.weights import DEMO_SOURCE
        source = DEMO_SOURCE
    elif args.preset:
        source = {"preset": args.preset, "seed": args.seed}
    elif args.checkpoint:
        source = {"checkpoint": str(args.checkpoint.resolve())}
    else:
        source = {k: str(Path(v).resolve()) for k, v in (("blip2_dir", args.blip2_dir), ("crema_ckpt", args.crema_ckpt),
                                                         ("beats_ckpt", args.beats_ckpt)) if v}
    out = export_artifacts(model, args.out, source, progress=not args.quiet)
    print(f"wrote {out}")


def cmd_parity(args) -> None:
    from export.parity import format_report, parity_report, write_report
    report = parity_report(args.artifacts)
    print(format_report(report))
    json_path = args.json or Path(args.artifacts) / "parity.json"
    write_report(report, json_path)
    print(f"(table written to {json_path})", file=sys.stderr)
    if not report["ok"]:
        raise SystemExit(1)


def cmd_checkpoint(args) -> None:
    from reference.weights import save_checkpoint
    model = load_model(args)
    print(save_checkpoint(model, args.out, extra={"seed": args.seed, "preset": args.preset}))


def cmd_demo(args) -> None:
    from crema.demo import run_demo
    wrong = run_demo(args.out, clips=args.clips, triton=not args.in_process, precision=args.precision)
    if wrong and args.strict:
        raise SystemExit(1)


def cmd_calibrate(args) -> None:
    from calibration.calibrate import calibrate, format_report
    from calibration.quantize import KEEP_FP32
    report = calibrate(args.artifacts, data=args.data, method=args.method, questions=args.questions,
                       eval_questions=args.eval_questions, dynamic=tuple(args.dynamic),
                       keep_fp32=KEEP_FP32 + tuple(args.keep_fp32))
    print(format_report(report))
    print(f"(report: {Path(args.artifacts) / 'int8' / 'fidelity.json'})", file=sys.stderr)
    if not report["ok"]:
        raise SystemExit(1)


def cmd_build_trt(args) -> None:
    from calibration.tensorrt import TensorRTUnavailable, build_engines
    try:
        build_engines(args.artifacts, args.precision)
    except TensorRTUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)


def cmd_train_demo(args) -> None:
    import json

    from reference.weights import DEMO_CHECKPOINT
    from training.demo import TrainSettings, metrics_table, train_demo
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in TrainSettings.__dataclass_fields__
                                and v is not None})
    metrics = train_demo(args.out, settings, work=args.work)
    print(metrics_table(metrics))
    shipped = DEMO_CHECKPOINT / "metrics.json"
    if shipped.is_file() and Path(args.out).resolve() != DEMO_CHECKPOINT:
        ref = json.loads(shipped.read_text())
        same = ref["settings"] == json.loads(json.dumps(metrics["settings"]))  # tuples became lists
        diff = 100 * (metrics["accuracy"]["overall"] - ref["accuracy"]["overall"])
        print(f"shipped weights (reference/demo): overall {100 * ref['accuracy']['overall']:.1f}%; this run "
              f"{100 * metrics['accuracy']['overall']:.1f}% ({diff:+.1f} points"
              f"{'' if same else ', different settings'})")
    print(f"wrote {args.out} (checkpoint + metrics.json); `crema run --checkpoint {args.out}` uses it")


# --- Triton ------------------------------------------------------------------------------------

def cmd_triton_repo(args) -> None:
    from triton_models.repository import generate_repository, validate
    repo = generate_repository(args.artifacts, args.out, flavour=args.flavour, precision=args.precision,
                               instances=args.instances, max_input_mb=args.max_input_mb, trt_engines=args.trt_engines,
                               cores=args.cores)
    models = validate(repo)
    print(f"wrote {repo}: {len(models)} models ({', '.join(sorted(models))}), flavour {args.flavour}, "
          f"{args.precision}")
    if args.flavour == "native":
        print("serve it with NVIDIA's Triton container (docs/triton.md); the pip server runs --flavour python only")


def cmd_serve(args) -> None:
    import signal

    from triton_models.server import ServerError, TritonServer
    try:
        server = TritonServer(args.repo, binary=args.tritonserver, host=args.host, http_port=args.http_port,
                              grpc_port=args.grpc_port, metrics_port=args.metrics_port, cache_mb=args.cache_mb,
                              log=args.log)
    except ServerError as e:
        raise SystemExit(f"error: {e}")
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    print(f"starting Triton on {args.repo} (log: {server.log_path or 'a temporary file'}) ...", flush=True)
    try:
        server.start(timeout=args.timeout)
    except ServerError as e:
        raise SystemExit(f"error: {e}")
    e = server.endpoints
    print(f"ready: HTTP {e.http_url}  gRPC {e.grpc_url}  metrics {e.host}:{e.metrics}\n"
          f"ask:   crema ask --url {e.http_url} --video clip.mp4 --question \"...\"   (Ctrl-C stops the server)",
          flush=True)
    try:
        while not stop and server.process.poll() is None:
            time.sleep(0.2)
        if not stop:
            raise SystemExit(f"error: tritonserver exited ({server.process.returncode}):\n{server.log_tail()}")
    finally:
        code = server.stop()
        print(f"stopped (tritonserver exit code {code})")


def cmd_ask(args) -> None:
    from triton_models.client import AskError, CremaClient, tensors_from_files
    frames = dict(item.split("=", 1) for item in args.visual)
    tensors = tensors_from_files(args.question, video=args.video, depth=args.depth, audio=args.audio, pc=args.pc,
                                 frames=frames, task=args.task, num_beams=args.beams,
                                 max_new_tokens=args.max_new_tokens)
    try:
        with CremaClient(args.url, args.protocol, timeout_s=args.timeout) as client:
            result = client.infer(tensors)
    except AskError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    _print_answer(args.question, result.answer, result.option_scores, result.seconds, f"Triton {args.protocol} {args.url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crema", description="CREMA inference runtime: reference, export, serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and LLM token budget of a preset (no weights allocated)")
    p.add_argument("--preset", required=True)
    p.add_argument("--modalities")
    p.add_argument("--task", choices=["concat", "espresso", "espresso_concat"])
    p.add_argument("--downstream", choices=["oeqa", "mcqa"])
    p.add_argument("--frames", type=int, dest="frame_num")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="answer one question in process: ONNX Runtime (--artifacts) or the PyTorch reference")
    _model_args(p)
    p.add_argument("--artifacts", type=Path, help="an artifact directory from `crema export` (runs without torch)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="no ORT memory arena: lower peak memory, about 8%% slower vision stage")
    p.add_argument("--precision", choices=["fp32", "int8", "mixed"], default="fp32",
                   help="with --artifacts: INT8 graphs from `crema calibrate` (mixed: only the stages it chose)")
    p.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt"],
                   help="with --artifacts: ONNX Runtime execution providers in priority order (repeatable; "
                        "default cpu; cuda/tensorrt need onnxruntime-gpu and a GPU)")
    p.add_argument("--beams", type=int, help="override the number of beams (oeqa)")
    p.add_argument("--max-new-tokens", type=int, help="override the answer length limit")
    _raw_input_args(p)
    p.add_argument("--depth-model", type=Path, help="an ONNX monocular depth model to run on the frames instead")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="export every stage to ONNX: an artifact directory with manifest and tokenizer")
    _model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help="compare an artifact directory with the PyTorch reference, stage by stage")
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--json", type=Path, help="where to write the report (default: ARTIFACTS/parity.json)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("checkpoint", help="write a preset's weights, config and tokenizer as a checkpoint directory")
    _model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("demo", help="generate a new synthetic clip, serve the trained demo model with Triton, "
                                    "ask its questions, print answers, ground truth and latencies")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--clips", type=int, default=1, help="how many clips to generate and ask about")
    p.add_argument("--in-process", action="store_true", help="ONNX Runtime in this process instead of a Triton server")
    p.add_argument("--precision", choices=["fp32", "int8", "mixed"], default="int8",
                   help="int8 (default)/mixed: calibrate the export first (`crema calibrate`, seconds on the "
                        "demo model); FP32 if INT8 misses the fidelity bounds")
    p.add_argument("--strict", action="store_true", help="exit 1 when an answer is wrong")
    p.set_defaults(func=cmd_demo)

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
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("build-trt", help="TensorRT engines from the ONNX graphs (NVIDIA GPU; profiles from the "
                                         "stage specs, INT8 ranges from `crema calibrate`)")
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--precision", choices=["fp16", "int8"], default="fp16")
    p.set_defaults(func=cmd_build_trt)

    p = sub.add_parser("train-demo", help="train the demo preset on the synthetic task (CPU, deterministic, "
                                          "~12 min on 2 cores) and report held-out accuracy and the ablation")
    p.add_argument("--out", type=Path, default=Path("out/train-demo"), help="checkpoint directory to write")
    p.add_argument("--work", type=Path, help="where to generate the data (default: OUT/data)")
    p.add_argument("--steps", type=int)
    p.add_argument("--train-clips", type=int)
    p.add_argument("--test-clips", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("triton-repo", help="generate a Triton model repository (ensemble, python models, "
                                           "configs) from an artifact directory")
    p.add_argument("--artifacts", type=Path, required=True, help="an artifact directory from `crema export`")
    p.add_argument("--out", type=Path, required=True, help="the repository folder to write (replaced)")
    p.add_argument("--flavour", choices=["python", "native"], default="python",
                   help="python: every stage a python model over ONNX Runtime (the pip server, CPU); native: "
                        "onnxruntime_onnx / tensorrt_plan models for NVIDIA's Triton containers")
    p.add_argument("--precision", choices=["fp32", "int8", "mixed"], default="fp32",
                   help="which graphs to serve (int8/mixed need `crema calibrate`)")
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument("--max-input-mb", type=int, default=64, help="refuse requests whose inputs exceed this")
    p.add_argument("--trt-engines", type=Path, help="native: a folder of {stage}.plan from `crema build-trt`")
    p.add_argument("--cores", type=int, help="CPU hosts: every model instance needs N free cores to run (Triton's "
                                            "rate limiter), so concurrent requests do not oversubscribe the CPU")
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("serve", help="start Triton on a repository (loopback), wait until ready, stop on Ctrl-C")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--tritonserver", type=Path, help="a tritonserver binary (default: the one in nvidia-pytriton)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--cache-mb", type=int, default=256, help="response cache size")
    p.add_argument("--log", type=Path, help="server log file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ask", help="ask the `crema` ensemble on a Triton server (HTTP or gRPC)")
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port (HTTP 8000, gRPC 8001 by default)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--task", choices=["oeqa", "mcqa"], help="default: the model's")
    p.add_argument("--beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--timeout", type=float, default=300, help="seconds")
    _raw_input_args(p)
    p.set_defaults(func=cmd_ask)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # our errors name the problem: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`crema triton-repo`: a Triton model repository generated from an artifact directory's stage specs.

    REPO/
      crema/config.pbtxt             the ensemble: preprocess -> vision (per visual modality) -> mmqa_{m}
                                     (audio: audio_encoder -> mmqa_audio; 3D: mmqa_pc) -> llm
      preprocess/1/model.py          python: video/depth/audio bytes, frames, points -> model inputs
      vision/1/model.onnx            one model per exported stage, its config read from the spec:
      mmqa_{m}/1/model.onnx            python flavour: + model.py (ONNX Runtime in the python backend)
      audio_encoder/                   native flavour: platform onnxruntime_onnx (or tensorrt_plan)
      depth_estimator/               when exported with --depth-model: preprocess calls it (BLS) for requests
                                     without depth maps (an ensemble is a fixed graph; this step is conditional)
      fuse_encode/ decoder_first/    (native flavour only)
      decoder_step/
      llm/1/model.py                 python: tokenizer, fuse_encode and the decode loop over the decoder
                                     (runtime.pipeline.decode_answers); python flavour: the three graphs in
                                     llm/1/, run in its process; native: BLS calls to those models
      crema.json                     what was generated from what (config, source, precision, flavour)

Every config.pbtxt is built as Triton's ModelConfig protobuf (tritonclient ships it) and written in
its text format, so the files parse by construction; `validate` parses a repository back.
Encoder steps (preprocess, vision, audio_encoder, mmqa_*) keep a response cache in their process
(python flavour: triton_models/cache.py, `cache_bytes` per model; not Triton's, which stores errors),
so a repeated video skips them; the batched ones (vision, audio_encoder, visual/audio mmqa) get
dynamic batching. The native flavour's ONNX Runtime/TensorRT models have no cache.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from runtime.artifacts import TOKENIZER, ArtifactError, Artifacts
from runtime.specs import VISUAL, StageSpec, TensorSpec

from .layout import (ANSWER_OUTPUTS, ENSEMBLE, LLM, LLM_STAGES, MAX_QUEUE, MODEL_INFO, PREPROCESS, QUEUE_TIMEOUT_MS,
                     TASK_INPUTS)

FLAVOURS = ("python", "native")
DEVICES = ("cpu", "gpu")  # where the python flavour's stage and llm models run (ONNX Runtime's CPU or CUDA provider)
DTYPES = {"float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64, "int32": mc.TYPE_INT32, "bytes": mc.TYPE_STRING}
MAX_QUEUE_DELAY_US = 500  # dynamic batcher: the visual modalities of one request arrive within this
PYTHON_MODEL = "from triton_models.python_models import {cls} as TritonPythonModel  # noqa: F401\n"


def _dims(t: TensorSpec, batched: bool) -> list[int]:
    dims = t.dims[1:] if batched else t.dims
    return [-1 if isinstance(d, str) else int(d) for d in dims]


def _io(cls, name: str, dtype: str, dims: list[int], optional: bool = False):
    x = cls(name=name, data_type=DTYPES[dtype], dims=dims)
    if optional:
        x.optional = True
    return x


def batched(spec: StageSpec) -> bool:
    """The dynamic batcher may concatenate requests on the spec's batch axis when every tensor starts with it."""
    return spec.batch_axis is not None and all(t.dims[0] == spec.batch_axis for t in spec.inputs + spec.outputs)


def _instances(cfg: mc.ModelConfig, count: int, kind) -> None:
    cfg.instance_group.add(count=count, kind=kind)


def stage_config(spec: StageSpec, flavour: str, cache_bytes: int, instances: int, device: str = "cpu") -> mc.ModelConfig:
    """A stage's ModelConfig: inputs/outputs from its spec; batched stages get max_batch_size = the
    spec's TensorRT profile maximum on the batch axis and the dynamic batcher."""
    is_batched = batched(spec)
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.profile[spec.batch_axis][2] if is_batched else 0)
    if flavour == "python":
        cfg.backend = "python"
    else:
        cfg.platform, cfg.default_model_filename = "onnxruntime_onnx", "model.onnx"
    cfg.input.extend(_io(mc.ModelInput, t.name, t.dtype, _dims(t, is_batched)) for t in spec.inputs)
    cfg.output.extend(_io(mc.ModelOutput, t.name, t.dtype, _dims(t, is_batched)) for t in spec.outputs)
    if is_batched:
        cfg.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    if flavour == "python":
        python_device(cfg, instances, device)
        cfg.parameters["cache_bytes"].string_value = str(cache_bytes)
    else:
        _instances(cfg, instances, mc.ModelInstanceGroup.KIND_AUTO)  # the GPU when the server has one
    return cfg


def queue_policy(cfg: mc.ModelConfig, timeout_ms: int, max_queue: int) -> None:
    """A request waits in this model's queue at most `timeout_ms` (0: no limit), and at most `max_queue`
    wait (0: no limit); beyond either it is rejected with an error (UNAVAILABLE: "exceeds maximum queue
    size" / "timeout") instead of holding memory and a client for ever. A client's own timeout (the
    KServe `timeout` request parameter, in microseconds) may shorten it. Triton applies queue policies
    through its dynamic batcher: unbatched models (max_batch_size 0) get one too, which only queues."""
    policy = cfg.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = timeout_ms * 1000
    policy.allow_timeout_override = True
    policy.max_queue_size = max_queue


def python_device(cfg: mc.ModelConfig, instances: int, device: str) -> None:
    """Instances on the CPU, or on each GPU with ONNX Runtime's CUDA provider (`providers` parameter,
    read by triton_models/python_models.py; Triton gives each instance its GPU's id)."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    gpu = device == "gpu"
    _instances(cfg, instances, mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
    cfg.parameters["providers"].string_value = "cuda" if gpu else "cpu"


def preprocess_io(config: dict, names: list[str]) -> tuple[list, list]:
    """The preprocess model's (= the ensemble's modality) inputs and its outputs, as (name, dtype, dims, optional).

    Every input is optional to Triton: an ensemble waits forever for a missing required input of a
    step (2.51 answers "unexpected deadlock"), so preprocess checks presence and names what is missing."""
    t, s = config["frame_num"], config["vision"]["image_size"]
    a, dv = config["audio"], config["vision"]["hidden_size"]
    visual = [m for m in names if m in VISUAL]
    inputs, outputs = [], []
    if visual:
        inputs.append(("video", "bytes", [1], True))
    if "depth" in names or "norm" in names:
        inputs.append(("depth", "bytes", [1], True))
    inputs += [(f"{m}_frames", "float32", [t, 3, s, s], True) for m in visual]
    outputs += [(f"{m}_pixels", "float32", [t, 3, s, s], False) for m in visual]
    if "audio" in names:
        inputs.append(("audio", "bytes", [1], True))
        outputs.append(("fbank", "float32", [-1, a["clip_frames"], a["num_mel_bins"]], False))
    if "pc" in names:
        inputs += [("pc_feat", "float32", [-1, dv], True), ("pc_coords", "int64", [-1, 3], True)]
        outputs += [("pc_points", "float32", [1, -1, dv], False), ("pc_voxels", "int64", [1, -1, 3], False)]
    return inputs, outputs


def python_config(name: str, inputs: list, outputs: list, instances: int,
                  parameters: dict[str, str] | None = None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.input.extend(_io(mc.ModelInput, *x) for x in inputs)
    cfg.output.extend(_io(mc.ModelOutput, *x) for x in outputs)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for k, v in (parameters or {}).items():
        cfg.parameters[k].string_value = v
    return cfg


QUESTION = ("question", "bytes", [1], True)  # optional for the same reason; the llm model names it missing


def llm_inputs(config: dict, names: list[str]) -> list:
    nq, d = config["num_query_token"], config["t5"]["d_model"]
    return [QUESTION] + [(f"{m}_tokens", "float32", [-1, nq, d], False) for m in names] \
        + TASK_INPUTS


def ensemble_config(config: dict, names: list[str]) -> mc.ModelConfig:
    """The `crema` ensemble: inputs are preprocess's plus the question and task options."""
    pre_in, pre_out = preprocess_io(config, names)
    cfg = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=0)
    cfg.input.extend(_io(mc.ModelInput, *x) for x in [QUESTION] + pre_in + TASK_INPUTS)
    cfg.output.extend(_io(mc.ModelOutput, *x) for x in ANSWER_OUTPUTS)
    steps = cfg.ensemble_scheduling.step

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
        s = steps.add(model_name=model, model_version=-1)
        s.input_map.update(inputs)
        s.output_map.update(outputs)

    step(PREPROCESS, {x[0]: x[0] for x in pre_in}, {x[0]: x[0] for x in pre_out})
    for m in names:
        if m in VISUAL:
            step("vision", {"pixel_values": f"{m}_pixels"}, {"features": f"{m}_features"})
            step(f"mmqa_{m}", {"features": f"{m}_features"}, {"tokens": f"{m}_tokens"})
        elif m == "audio":
            step("audio_encoder", {"fbank": "fbank"}, {"features": "audio_features"})
            step("mmqa_audio", {"features": "audio_features"}, {"tokens": "audio_tokens"})
        else:
            step("mmqa_pc", {"pc_feat": "pc_points", "pc_coords": "pc_voxels"}, {"tokens": "pc_tokens"})
    llm_in = llm_inputs(config, names)
    step(LLM, {x[0]: x[0] for x in llm_in}, {x[0]: x[0] for x in ANSWER_OUTPUTS})
    return cfg


def write_config(directory: Path, cfg: mc.ModelConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def _place(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (graphs reach GBs; artifacts are never modified), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _place_graph(graph: Path, dst: Path) -> None:
    _place(graph, dst)
    weights = graph.with_name(graph.name + ".data")  # graphs over 2 GB: the file they name
    if weights.is_file():
        _place(weights, dst.parent / weights.name)


def _python_model(directory: Path, cls: str, info: dict) -> None:
    version = directory / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(PYTHON_MODEL.format(cls=cls))
    (version / MODEL_INFO).write_text(json.dumps(info, indent=2))


def generate_repository(artifacts: str | Path, out: str | Path, flavour: str = "python", precision: str = "fp32",
                        instances: int = 1, max_input_mb: int = 64, trt_engines: str | Path | None = None,
                        cores: int | None = None, cache_mb: int = 64, device: str = "cpu",
                        queue_timeout_ms: int = QUEUE_TIMEOUT_MS, max_queue: int = MAX_QUEUE) -> Path:
    """Write the repository (atomically: a temp folder renamed into place); returns its path.

    trt_engines: native flavour only, a folder of `{stage}.plan` (crema build-trt); those stages
    become tensorrt_plan models, the rest onnxruntime_onnx.
    cores: CPU hosts: each model instance needs this many of the server's cores to run (Triton's
    rate limiter), so concurrent requests do not run several multi-threaded stages at once.
    cache_mb: each encoder model's response cache (per instance; 0 = none).
    device: python flavour: "gpu" runs the stage models and the llm model (its device-resident decode
    loop) on the server's GPUs with ONNX Runtime's CUDA provider (needs onnxruntime-gpu beside Triton).
    queue_timeout_ms, max_queue: every model's queue policy (`queue_policy`)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
    if trt_engines and flavour != "native":
        raise ValueError("--trt-engines needs --flavour native (the pip Triton server has no TensorRT backend)")
    art = Artifacts(artifacts)
    out = Path(out)
    if out.exists() and not (out / MODEL_INFO).is_file():
        raise FileExistsError(f"{out}: exists and is not a repository written by `crema triton-repo`")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, art, flavour, precision, instances, max_input_mb, trt_engines, cores, cache_mb << 20, device,
               (queue_timeout_ms, max_queue))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write(tmp: Path, art: Artifacts, flavour: str, precision: str, instances: int, max_input_mb: int,
           trt_engines, cores: int | None, cache_bytes: int, device: str, queue: tuple[int, int]) -> None:
    config, names = art.config, art.modalities
    encoders = {"vision", "audio_encoder"} | {f"mmqa_{m}" for m in names}
    # python flavour: the llm model runs the LLM stages in its own process (a BLS hop per decode
    # step would copy the KV cache through shared memory twice a step); native: separate models
    # on the GPU backends, called through BLS.
    local = flavour == "python"
    configs: dict[str, mc.ModelConfig] = {}
    for name, spec in art.specs.items():
        if local and name in LLM_STAGES:
            continue
        version = tmp / name / "1"
        version.mkdir(parents=True)
        cfg = configs[name] = stage_config(spec, flavour, cache_bytes if name in encoders else 0, instances, device)
        plan = Path(trt_engines) / f"{name}.plan" if trt_engines else None
        if plan is not None and plan.is_file():
            cfg.platform, cfg.default_model_filename = "tensorrt_plan", "model.plan"
            _place(plan, version / "model.plan")
        else:
            _place_graph(art.path(name, precision), version / "model.onnx")
        if flavour == "python":
            _python_model(tmp / name, "StageModel", {"stage": name, "config": config})
    if art.depth_spec is not None:  # preprocess calls it (BLS) when a request brings no depth maps
        spec = art.depth_spec
        version = tmp / spec.name / "1"
        version.mkdir(parents=True)
        configs[spec.name] = stage_config(spec, flavour, cache_bytes, instances, device)
        _place_graph(art.dir / spec.file, version / "model.onnx")
        if flavour == "python":
            _python_model(tmp / spec.name, "StageModel", {"stage": spec.name, "config": config, "depth": art.depth})
    pre_in, pre_out = preprocess_io(config, names)
    configs[PREPROCESS] = python_config(PREPROCESS, pre_in, pre_out, instances,
                                        parameters={"max_input_bytes": str(max_input_mb << 20),
                                                    "cache_bytes": str(cache_bytes)})
    _python_model(tmp / PREPROCESS, "PreprocessModel", {"config": config, "depth": art.depth})
    configs[LLM] = python_config(LLM, llm_inputs(config, names), ANSWER_OUTPUTS, instances)
    if local:  # the llm model runs the LLM graphs itself: on the device the stages use
        del configs[LLM].instance_group[:]
        python_device(configs[LLM], instances, device)
    _python_model(tmp / LLM, "LlmModel", {"config": config, "answer_ids": art.manifest["answer_ids"],
                                           "local_stages": local})
    _place(art.dir / TOKENIZER, tmp / LLM / "1" / TOKENIZER)
    for name in LLM_STAGES if local else ():
        _place_graph(art.path(name, precision), tmp / LLM / "1" / f"{name}.onnx")
    if cores:  # Triton's rate limiter: instances run only while `cores` CPU cores are free for them
        for cfg in configs.values():
            cfg.instance_group[0].rate_limiter.resources.add(name="cpu", count=cores)
    for cfg in configs.values():
        queue_policy(cfg, *queue)
    configs[ENSEMBLE] = ensemble_config(config, names)
    (tmp / ENSEMBLE / "1").mkdir(parents=True)
    for name, cfg in configs.items():
        write_config(tmp / name, cfg)
    (tmp / MODEL_INFO).write_text(json.dumps({"flavour": flavour, "precision": precision, "device": device,
                                              "queue_timeout_ms": queue[0], "max_queue": queue[1],
                                              "artifacts": str(art.dir),
                                              "source": art.manifest["source"], "modalities": names,
                                              "rate_limit_cores": cores}, indent=2))


def validate(repo: str | Path) -> dict[str, mc.ModelConfig]:
    """Parse every config.pbtxt with Triton's ModelConfig protobuf; check names and ensemble steps."""
    repo = Path(repo)
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        try:
            cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
        except text_format.ParseError as e:
            raise ArtifactError(f"{path}: not a valid Triton ModelConfig ({e})") from e
        if cfg.name != path.parent.name:
            raise ArtifactError(f"{path}: name {cfg.name!r} differs from its folder")
        configs[cfg.name] = cfg
    for cfg in configs.values():
        for s in cfg.ensemble_scheduling.step:
            if s.model_name not in configs:
                raise ArtifactError(f"{repo}/{cfg.name}: step model {s.model_name!r} is not in the repository")
    return configs

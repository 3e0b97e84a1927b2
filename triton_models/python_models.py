"""The python-backend models of the generated repository; each `1/model.py` imports one class here.

StageModel       one exported stage over ONNX Runtime (python flavour); batched stages concatenate
                 the requests the dynamic batcher hands over on the batch axis, run once, split
PreprocessModel  raw request inputs -> each modality's model input (runtime.inputs, checks included)
LlmModel         question + modality tokens -> fuse_encode -> decode loop over decoder_first /
                 decoder_step (runtime.pipeline.decode_answers) -> answer text, mcqa option scores;
                 the stages run in this process (python flavour: the KV cache stays in ORT values,
                 runtime.pipeline.CachedDecoder) or as other models through BLS (native: Triton cannot
                 keep ORT values across calls, so the cache is numpy and travels with each step,
                 runtime.pipeline.HostCachedDecoder; cross K/V once per request, not per beam)

A bad request gets an error response naming the problem; the model keeps serving the others.
StageModel and PreprocessModel keep their successful outputs in a ResponseCache (triton_models/cache.py;
size: the config parameter `cache_bytes`, 0 = none) and count hits and misses as Prometheus metrics
`crema_cache_hits_total` / `crema_cache_misses_total` {model=...} on Triton's metrics endpoint.
Only importable inside Triton's python backend stub (triton_python_backend_utils).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.artifacts import TOKENIZER
from runtime.inputs import request_from_files
from runtime.pipeline import (RequestError, RequestStopped, Stage, check_inputs, decode_answers, execution_providers,
                              fuse_encode, generation_settings, session_options)
from runtime.modalities import ExportedDepthEstimator
from runtime.specs import VISUAL, StageSpec, depth_estimator_spec, modality_names, stage_specs
from runtime.datasets import structured_prompt
from runtime.text import QuestionTokenizer, clean_question

from .cache import ResponseCache
from .cancel import CancelBoard
from .layout import DEADLINE_PARAMETER, GENERATION_INPUTS, ID_PARAMETER, LLM_STAGES, MODEL_INFO, PROMPT_INPUTS

MAX_QUESTION_BYTES = 4096
RAW_INPUTS = ("video", "depth", "audio", "pc_feat", "pc_coords")


def _model_info(args: dict) -> tuple[Path, dict]:
    version = Path(args["model_repository"]) / args["model_version"]
    return version, json.loads((version / MODEL_INFO).read_text())


def _parameter(args: dict, name: str, default: int) -> int:
    params = json.loads(args["model_config"]).get("parameters", {})
    return int(params.get(name, {}).get("string_value", default))


def _providers(args: dict) -> list:
    """ONNX Runtime providers from the config's `providers` parameter (cpu | cuda), the CUDA one on
    the GPU Triton gave this instance."""
    params = json.loads(args["model_config"]).get("parameters", {})
    names = params.get("providers", {}).get("string_value", "cpu").split(",")
    device = int(args.get("model_instance_device_id") or 0)
    return [(p, {"device_id": device}) if p == "CUDAExecutionProvider" else p for p in execution_providers(names)]


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _text(x, name: str) -> str:
    """One element of a BYTES input as strict UTF-8 text, at most MAX_QUESTION_BYTES."""
    data = bytes(x)
    if len(data) > MAX_QUESTION_BYTES:
        raise RequestError(f"{name}: {len(data)} bytes, the limit is {MAX_QUESTION_BYTES}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name}: not valid UTF-8 at byte {e.start}") from None


def _blob(x: np.ndarray | None) -> bytes | None:
    """A BYTES tensor of one element -> its bytes."""
    return None if x is None else bytes(x.reshape(-1)[0])


def _response(outputs: dict | Exception):
    if isinstance(outputs, RequestStopped):  # past its deadline, or cancelled
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(outputs), pb_utils.TritonError.CANCELLED))
    if isinstance(outputs, ValueError):  # ours: RequestError, ModalityError, VideoError, AudioError, ...
        # INVALID_ARG: the client's request was at fault (HTTP 400 / gRPC INVALID_ARGUMENT, not 500)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(outputs), pb_utils.TritonError.INVALID_ARG))
    if isinstance(outputs, Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(outputs).__name__}: {outputs}"))
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _attempt(handle, *args) -> dict | Exception:
    try:
        return handle(*args)
    except Exception as e:  # noqa: BLE001 - anything answers this request only
        return e


def _respond(requests, handle) -> list:
    """One response per request: handle(request) -> {name: array}, or an error naming the problem."""
    return [_response(_attempt(handle, r)) for r in requests]


class CachedModel:
    """Answers each request from the cache or by `compute(feeds)`; keeps only successes."""

    def init_cache(self, args: dict) -> None:
        self.cache = ResponseCache(_parameter(args, "cache_bytes", 0))
        labels = {"model": args["model_name"]}
        # the families must outlive their metrics: keep both
        self.metric_families = [pb_utils.MetricFamily(name=f"crema_cache_{what}_total", description=text,
                                                      kind=pb_utils.MetricFamily.COUNTER)
                                for what, text in (("hits", "requests answered from the model's response cache"),
                                                   ("misses", "requests the model computed"))]
        self.hits, self.misses = (f.Metric(labels) for f in self.metric_families)

    def answer_all(self, feeds: list[dict], compute) -> list:
        """compute(list of feeds) -> list of outputs or exceptions, one per feed."""
        if not self.cache.max_bytes:
            return [_response(x) for x in compute(feeds)]
        keys = [ResponseCache.key(f) for f in feeds]
        results = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        if len(todo) < len(feeds):
            self.hits.increment(len(feeds) - len(todo))
        if todo:
            self.misses.increment(len(todo))
            for i, out in zip(todo, compute([feeds[i] for i in todo])):
                results[i] = out
                if not isinstance(out, Exception):
                    self.cache.put(keys[i], out)
        return [_response(r) for r in results]


class StageModel(CachedModel):
    def initialize(self, args: dict) -> None:
        version, info = _model_info(args)
        self.spec: StageSpec = (depth_estimator_spec(info["depth"]) if info.get("depth")
                                else stage_specs(info["config"])[info["stage"]])
        # no spinning: a dozen model processes share the cores
        self.stage = Stage(self.spec, version / "model.onnx", session_options(spin=False), _providers(args))
        self.batched = json.loads(args["model_config"])["max_batch_size"] > 0
        self.init_cache(args)

    def execute(self, requests: list) -> list:
        return self.answer_all([{n: _input(r, n) for n in self.spec.input_names} for r in requests], self.compute)

    def compute(self, feeds: list[dict]) -> list:
        if not self.batched or len(feeds) == 1:
            return [_attempt(lambda f: self.stage(**f), f) for f in feeds]
        sizes = [f[self.spec.input_names[0]].shape[0] for f in feeds]
        try:
            out = self.stage(**{n: np.concatenate([f[n] for f in feeds]) for n in self.spec.input_names})
        except Exception:  # noqa: BLE001 - one bad request must not fail the batch: answer each alone
            return [_attempt(lambda f: self.stage(**f), f) for f in feeds]
        parts = {k: np.split(v, np.cumsum(sizes)[:-1]) for k, v in out.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(len(feeds))]


class PreprocessModel(CachedModel):
    def initialize(self, args: dict) -> None:
        _, info = _model_info(args)
        self.config = info["config"]
        self.names = modality_names(self.config)
        self.max_bytes = _parameter(args, "max_input_bytes", 64 << 20)
        # the repository's depth_estimator model, called through BLS when a request has no depth maps
        self.depth_estimator = None if not info.get("depth") else ExportedDepthEstimator(
            BlsStage(depth_estimator_spec(info["depth"])), info["depth"])
        self.init_cache(args)

    def execute(self, requests: list) -> list:
        names = RAW_INPUTS + tuple(f"{m}_frames" for m in self.names if m in VISUAL)
        return self.answer_all([{n: _input(r, n) for n in names} for r in requests],
                               lambda feeds: [_attempt(self.preprocess, f) for f in feeds])

    def preprocess(self, feed: dict) -> dict:
        raw = {n: feed[n] for n in RAW_INPUTS}
        frames = {m: x for m in self.names if m in VISUAL and (x := feed[f"{m}_frames"]) is not None}
        size = sum(len(_blob(x)) if x.dtype == object else x.nbytes for x in [*raw.values(), *frames.values()]
                   if x is not None)
        if size > self.max_bytes:
            raise RequestError(f"request inputs: {size} bytes, over this server's limit of {self.max_bytes} "
                               f"(preprocess parameter max_input_bytes)")
        pc = None
        if raw["pc_feat"] is not None and raw["pc_coords"] is not None:
            pc = (raw["pc_feat"], raw["pc_coords"])
        depth = _blob(raw["depth"])
        request = request_from_files(self.config, "", video=_blob(raw["video"]), depth=depth,
                                     depth_model=self.depth_estimator if depth is None else None,
                                     audio=_blob(raw["audio"]), pc=pc, frames=frames)
        check_inputs(self.config, request)
        out = {f"{m}_pixels": request.frames[m] for m in self.names if m in VISUAL}
        if request.audio is not None:
            out["fbank"] = request.audio
        if request.pc_feat is not None:
            out["pc_points"], out["pc_voxels"] = request.pc_feat[None], request.pc_coords[None]
        return out


class BlsStage:
    """A stage served by another model of this server, called like runtime.pipeline.Stage (numpy in and
    out: decode_answers gives it the host-cache decoder)."""

    def __init__(self, spec: StageSpec):
        self.spec = spec

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        tensors = [pb_utils.Tensor(t.name, np.ascontiguousarray(inputs[t.name], dtype=t.dtype)) for t in self.spec.inputs]
        response = pb_utils.InferenceRequest(model_name=self.spec.name, requested_output_names=self.spec.output_names,
                                             inputs=tensors).exec()
        if response.has_error():
            raise RuntimeError(f"{self.spec.name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.spec.output_names}


class Watchdog:
    """stop() for the decode loop, asked before every decoder step: the request's deadline passed (the
    `crema_deadline_ms` parameter the front sets; Triton passes it through the ensemble), the front marked
    it cancelled (its client went away: triton_models/cancel.py), or Triton flags it cancelled (2.51 does
    so only for requests not yet running; later versions may). Counts the steps it allowed."""

    def __init__(self, request, board: CancelBoard | None):
        self.request, self.board, self.steps = request, board, 0
        params = json.loads(request.parameters() or "{}")
        deadline = params.get(DEADLINE_PARAMETER)
        self.deadline_s = deadline / 1000 if isinstance(deadline, int) else None
        self.id = params.get(ID_PARAMETER) if isinstance(params.get(ID_PARAMETER), str) else None

    def __call__(self) -> str | None:
        if self.deadline_s is not None and time.time() > self.deadline_s:
            return "the request's deadline passed"
        if self.request.is_cancelled() or (self.board is not None and self.board.marked(self.id)):
            return "the request was cancelled (its client went away)"
        self.steps += 1
        return None


class LlmModel:
    def initialize(self, args: dict) -> None:
        version, info = _model_info(args)
        self.config, self.answer_ids = info["config"], info["answer_ids"]
        self.names = modality_names(self.config)
        specs = stage_specs(self.config)
        if info["local_stages"]:  # python flavour: ONNX Runtime in this process
            options = session_options(spin=False)
            self.stages = {n: Stage(specs[n], version / f"{n}.onnx", options, _providers(args))
                           for n in LLM_STAGES}
        else:
            self.stages = {n: BlsStage(specs[n]) for n in LLM_STAGES}
        self.tokenizer = QuestionTokenizer(version / TOKENIZER, self.config["max_txt_len"])
        self.board = CancelBoard.from_env()  # crema serve's cancellation board (None under a plain tritonserver)
        labels = {"model": args["model_name"]}
        self.metric_families = [pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                                for name, text in (("crema_decoder_steps_total", "decoder steps run (first included)"),
                                                   ("crema_requests_stopped_total",
                                                    "requests whose decode loop stopped early: cancelled by "
                                                    "their client or past their gRPC deadline"))]
        self.steps, self.stopped = (f.Metric(labels) for f in self.metric_families)

    def execute(self, requests: list) -> list:
        return _respond(requests, self.answer)

    def question(self, r) -> str:
        data = _blob(_input(r, "question"))
        if data is None:
            raise RequestError("question: missing")
        if len(data) > MAX_QUESTION_BYTES:
            raise RequestError(f"question: {len(data)} bytes, the limit is {MAX_QUESTION_BYTES}")
        return clean_question(data)  # strict UTF-8, whitespace collapsed as the CLI and the reference do

    def tokens(self, r) -> dict[str, np.ndarray]:
        """Each modality's tokens in fuse_encode's layout (one request)."""
        t = self.config["frame_num"]
        out = {}
        for m in self.names:
            x = _input(r, f"{m}_tokens")
            if m in VISUAL and x.shape[0] != t:
                raise RequestError(f"{m}_tokens: {x.shape[0]} frames, the model takes {t}")
            out[m] = x if m == "pc" else x[None]
        return out

    def prompt(self, r) -> str:
        """The question, or the dataset's prompt around it when the request carries structured fields."""
        question = self.question(r)
        fields = {name: _input(r, name) for name, *_ in PROMPT_INPUTS}
        if all(v is None for v in fields.values()):
            return question
        text = {k: [_text(x, k) for x in v.reshape(-1)] for k, v in fields.items() if v is not None}
        return clean_question(structured_prompt(self.config.get("dataset"), question, text.get("options"),
                                                *(text[k][0] if k in text else None
                                                  for k in ("situation", "templ_values"))))

    def answer(self, r) -> dict:
        options = {name: _input(r, name) for name, *_ in GENERATION_INPUTS}
        overrides = {k: (_blob(v).decode(errors="replace") if v.dtype == object else int(v.reshape(-1)[0]))
                     for k, v in options.items() if v is not None}
        g = generation_settings(self.config, **overrides)
        stop = Watchdog(r, self.board)
        question = self.prompt(r)
        hidden, mask = fuse_encode(self.stages["fuse_encode"], self.tokenizer, self.tokens(r), [question])
        try:
            answer = decode_answers(self.stages, hidden, mask, g, self.tokenizer, self.answer_ids, stop)[0]
        except RequestStopped:
            self.stopped.increment(1)
            raise
        finally:
            self.steps.increment(stop.steps)
        return {"answer": np.array([answer.text.encode()], dtype=object),
                "option_scores": np.array(answer.option_scores or [], dtype=np.float32),
                "question_tokens": np.array(self.tokenizer.token_counts([question])[0], dtype=np.int32)}


"""The ONNX Runtime pipeline: requests in, answers out, no torch (DESIGN §3 stages 2-6).

    pipeline = Pipeline("artifacts/")
    answers = pipeline.answer([Request("What color is the ball?", frames={"rgb": frames})])

Sessions are created once. All visual modalities of all requests go through one `vision` call; the
decode loop runs in numpy (runtime/decoding.py) over the KV-cached decoder graphs, whose cache stays
on the execution provider's device (`CachedDecoder`): only logits come back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import decoding
from .artifacts import TOKENIZER, ArtifactError, Artifacts
from .specs import VISUAL, StageSpec, TensorSpec, modality_names
from .text import QuestionTokenizer

LETTERS = "ABCDE"


class RequestStopped(Exception):
    """The decode loop stopped early because `stop()` gave a reason (the client cancelled; a deadline passed)."""


class Watched:
    """A decoder (decoding.StepModel) whose every step first asks `stop()`: None goes on, a reason ends the
    request (RequestStopped)."""

    def __init__(self, model, stop):
        self.model, self.stop, self.steps = model, stop, 0

    def _check(self) -> None:
        reason = self.stop()
        if reason:
            raise RequestStopped(f"{reason}; stopped after {self.steps} decoder steps")
        self.steps += 1

    def first(self) -> np.ndarray:
        self._check()
        return self.model.first()

    def expand(self, n: int) -> None:
        self.model.expand(n)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        self._check()
        return self.model.step(tokens, reorder)


class RequestError(ValueError):
    """A request the pipeline cannot answer; the message names the field."""


@dataclass
class Request:
    """One question about one clip. Arrays are per request (no batch axis).

    frames:    visual modality -> [T, 3, S, S] float32, normalised (runtime/video.py)
    audio:     [clips, clip_frames, mel] float32 normalised fbank
    pc_feat:   [P, Dv] float32; pc_coords: [P, 3] int voxel coordinates
    """

    question: str
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    audio: np.ndarray | None = None
    pc_feat: np.ndarray | None = None
    pc_coords: np.ndarray | None = None


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    option_scores: list[float] | None = None
    question_tokens: tuple[int, int] | None = None  # (read, given): given > read when cut to max_txt_len


class Stage:
    """An ONNX Runtime session bound to its spec: checks input names/shapes, returns named outputs."""

    def __init__(self, spec: StageSpec, path: Path, options: ort.SessionOptions, providers: list):
        self.spec = spec
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises several types for unreadable graphs
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it: {e}") from e
        got = [i.name for i in self.session.get_inputs()]
        if got != spec.input_names or [o.name for o in self.session.get_outputs()] != spec.output_names:
            raise ArtifactError(f"{path}: inputs/outputs {got} do not match the stage spec {spec.input_names} "
                                "(exported by another version? re-export the artifacts)")

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(self.feed(**inputs))

    def feed(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The session's feed: every spec input, checked and cast to its dtype."""
        return {t.name: self._checked(t, inputs[t.name]) for t in self.spec.inputs}

    def _checked(self, t: TensorSpec, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=t.dtype)
        if not t.shape_ok(x.shape):
            raise RequestError(f"{self.spec.name}.{t.name}: shape {x.shape}, expected {t.dims}")
        return x

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.spec.output_names, self.session.run(None, feed)))

    @cached_property
    def device(self) -> tuple[str, int]:
        """(device type, id) of the session's first execution provider: where its outputs can stay."""
        provider = self.session.get_providers()[0]
        options = self.session.get_provider_options().get(provider, {})
        return DEVICES.get(provider, "cpu"), int(options.get("device_id", 0))

    def run_bound(self, inputs: dict, keep: set[str]) -> dict:
        """One run through IOBinding. numpy inputs are checked as by `feed` and copied in; ORT values
        (outputs of an earlier run_bound) are bound as they are, without a copy. Outputs named in
        `keep` stay on the session's device as ORT values, the others come back as numpy arrays."""
        io = self.session.io_binding()
        for t in self.spec.inputs:
            x = inputs[t.name]
            if isinstance(x, ort.OrtValue):
                io.bind_ortvalue_input(t.name, x)
            else:
                io.bind_cpu_input(t.name, self._checked(t, x))
        for name in self.spec.output_names:
            io.bind_output(name, *(self.device if name in keep else ("cpu", 0)))
        self.session.run_with_iobinding(io)
        return {name: value if name in keep else value.numpy()
                for name, value in zip(self.spec.output_names, io.get_outputs())}


class CachedDecoder:
    """decoder_first / decoder_step as runtime.decoding's StepModel, with the KV cache resident on the
    sessions' execution provider (ORT values bound through IOBinding; CPU memory on the CPU provider).

    `present` is bound as the next step's `past` as it is; beams are expanded and reordered by
    decoder_step's `beam_index` gather, inside the graph; the cross K/V [B, H, S, dk] come from
    decoder_first once and are shared by each request's beams (never repeated); the encoder mask
    goes to the device once. Per step only tokens and beam_index [R] go in and logits [R, V] come
    back (R = B requests x beams, request-major)."""

    def __init__(self, first, step, hidden: np.ndarray, mask: np.ndarray):
        self._first, self._step = first, step
        self.hidden = hidden
        self.cross_names = [n for n in step.spec.input_names if n.startswith("cross.")]
        self.present_names = [n for n in step.spec.output_names if n.startswith("present.")]
        self.past_names = [n for n in step.spec.input_names if n.startswith("past.")]
        self.mask = self._resident(np.ascontiguousarray(mask, dtype=np.int64))
        self.past: list = []  # per layer K, V: [R', H, P, dk] of the last step
        self.cross: list = []  # per layer K, V: [B, H, S, dk]
        self.rows = hidden.shape[0]  # R' (rows of `past`)
        self._expansion: np.ndarray | None = None  # past row of each row after `expand`, until the next step

    def _resident(self, x: np.ndarray):
        """x where the decoder runs: an ORT value on the step session's device."""
        return ort.OrtValue.ortvalue_from_numpy(x, *self._step.device)

    def _run(self, stage, inputs: dict, keep: list[str]) -> tuple[np.ndarray, dict]:
        """-> logits (numpy), the outputs named in `keep` (left where they are)."""
        out = stage.run_bound(inputs, set(keep))
        return out["logits"], {n: out[n] for n in keep}

    def first(self) -> np.ndarray:
        """-> logits [B, V] after the start token; keeps present and cross K/V."""
        b = self.hidden.shape[0]
        logits, cache = self._run(self._first, {"decoder_input_ids": np.zeros((b, 1), np.int64),
                                                "encoder_hidden": self.hidden, "encoder_mask": self.mask},
                                  self.present_names + self.cross_names)
        self.past = [cache[n] for n in self.present_names]  # decoder_first names them as decoder_step does
        self.cross = [cache[n] for n in self.cross_names]
        self.rows = b
        return logits

    def expand(self, n: int) -> None:
        """Each row becomes n beam rows at the next step (decoder_step's gather does it)."""
        current = np.arange(self.rows) if self._expansion is None else self._expansion
        self._expansion = np.repeat(current, n)
        self.rows *= n

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """tokens [R]; reorder [R]: the row each row continues (None: its own) -> logits [R, V]."""
        index = np.arange(len(tokens)) if reorder is None else np.asarray(reorder)
        if self._expansion is not None:
            index, self._expansion = self._expansion[index], None
        inputs = {"decoder_input_ids": tokens.reshape(-1, 1), "beam_index": index, "encoder_mask": self.mask,
                  **dict(zip(self.past_names, self.past)), **dict(zip(self.cross_names, self.cross))}
        logits, cache = self._run(self._step, inputs, self.present_names)
        self.past = [cache[n] for n in self.present_names]
        self.rows = len(tokens)
        return logits


class HostCachedDecoder(CachedDecoder):
    """CachedDecoder with the cache in numpy arrays, for decoder stages that are not ORT sessions of
    this process but anything called like a Stage: Triton BLS calls (Triton cannot keep ORT values
    across calls, so past and cross K/V travel with every step), calibration's recorders."""

    def _resident(self, x: np.ndarray) -> np.ndarray:
        return x

    def _run(self, stage, inputs: dict, keep: list[str]) -> tuple[np.ndarray, dict]:
        out = stage(**inputs)
        return out["logits"], {n: out[n] for n in keep}


def cached_decoder(first, step, hidden: np.ndarray, mask: np.ndarray) -> CachedDecoder:
    """The device-resident decoder over this process's ORT sessions, the host-cache one otherwise."""
    local = isinstance(first, Stage) and isinstance(step, Stage)
    return (CachedDecoder if local else HostCachedDecoder)(first, step, hidden, mask)


class Pipeline:
    """threads: ORT intra-op threads (default: one per core).
    precision: fp32 | int8 (every calibrated stage) | mixed (the stages calibration chose) | fp16
    (`crema convert-fp16`'s graphs: float32 in and out, so nothing else changes), see runtime/artifacts.py.
    providers: "cpu", "cuda", "tensorrt" (or ORT provider names) in priority order; CPU is the fallback.
    memory_arena: ORT's CPU arena keeps freed activations for reuse. Measured on the bench preset:
    off, the vision stage ran 8% slower (6.71 s vs 6.21 s) and the peak RSS of a request fell from
    4.6 to 4.2 GiB. On by default (latency); off for memory-bound hosts (`crema run --low-memory`).
    graphs: stage -> a graph file to run instead of the artifacts' (calibration evaluates its staged
    INT8 graphs this way before installing them).
    depth_estimator: the artifacts' exported depth model (`crema export --depth-model`) with its
    preprocessing, a runtime.modalities.ExportedDepthEstimator (FP32 at every precision), or None; pass it
    as runtime.inputs.request_from_files' `depth_model` to compute depth from the video's frames."""

    def __init__(self, artifacts: str | Path, threads: int | None = None, providers: list | None = None,
                 memory_arena: bool = True, spin: bool = True, precision: str = "fp32",
                 graphs: dict[str, Path] | None = None):
        self.artifacts = Artifacts(artifacts)
        self.config = self.artifacts.config
        options = session_options(threads, memory_arena, spin)
        providers = execution_providers(providers or ["cpu"])
        self.precision = precision
        graphs = graphs or {}
        unknown = set(graphs) - set(self.artifacts.specs)
        if unknown:
            raise ArtifactError(f"graphs: no stage {', '.join(sorted(unknown))} in {self.artifacts.dir}")
        self.stages = {name: Stage(spec, Path(graphs[name]) if name in graphs else self.artifacts.path(name, precision),
                                   options, providers)
                       for name, spec in self.artifacts.specs.items()}
        self.depth_estimator = None
        if self.artifacts.depth_spec is not None:
            from .modalities import ExportedDepthEstimator  # OpenCV: only artifacts with a depth model need it here
            spec = self.artifacts.depth_spec
            stage = Stage(spec, self.artifacts.dir / spec.file, options, providers)
            graph = tuple(stage.session.get_inputs()[0].shape[1:])
            if graph != spec.inputs[0].dims[1:]:
                raise ArtifactError(f"{self.artifacts.dir / spec.file}: takes pixel_values {graph}, the manifest's "
                                    f"depth_estimator.input_size says {spec.inputs[0].dims[1:]}")
            self.depth_estimator = ExportedDepthEstimator(stage, self.artifacts.depth)
        self.tokenizer = QuestionTokenizer(self.artifacts.dir / TOKENIZER, self.config["max_txt_len"])
        self.answer_ids = self.artifacts.manifest["answer_ids"]
        self.modalities = self.artifacts.modalities
        self.visual = [m for m in self.modalities if m in VISUAL]

    # --- stages ----------------------------------------------------------------------------
    def check(self, requests: list[Request]) -> None:
        check_requests(self.config, requests)

    def modality_tokens(self, requests: list[Request]) -> dict[str, np.ndarray]:
        """Each modality's tokens in fuse_encode's layout (runtime.specs.modality_token_dims)."""
        b, t = len(requests), self.config["frame_num"]
        out = {}
        if self.visual:  # one batched ViT call for every visual modality of every request
            pixels = np.concatenate([np.stack([r.frames[m] for r in requests]).reshape(-1, *requests[0].frames[m].shape[1:])
                                     for m in self.visual])
            features = self.stages["vision"](pixel_values=pixels)["features"]
            for m, f in zip(self.visual, np.split(features, len(self.visual))):
                tokens = self.stages[f"mmqa_{m}"](features=f)["tokens"]
                out[m] = tokens.reshape(b, t, *tokens.shape[1:])
        if "audio" in self.modalities:
            clips = requests[0].audio.shape[0]
            feats = self.stages["audio_encoder"](fbank=np.concatenate([r.audio for r in requests]))["features"]
            tokens = self.stages["mmqa_audio"](features=feats)["tokens"]
            out["audio"] = tokens.reshape(b, clips, *tokens.shape[1:])
        if "pc" in self.modalities:  # point counts may differ: one call per request
            out["pc"] = np.concatenate([self.stages["mmqa_pc"](pc_feat=r.pc_feat[None], pc_coords=r.pc_coords[None])["tokens"]
                                        for r in requests])
        return out

    def encode(self, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
        """-> T5 encoder_hidden [B, S, d], encoder_mask [B, S]."""
        self.check(requests)
        return fuse_encode(self.stages["fuse_encode"], self.tokenizer, self.modality_tokens(requests),
                           [r.question for r in requests])

    def step_model(self, hidden: np.ndarray, mask: np.ndarray) -> CachedDecoder:
        return cached_decoder(self.stages["decoder_first"], self.stages["decoder_step"], hidden, mask)

    # --- answers ---------------------------------------------------------------------------
    def generation(self, **overrides) -> dict:
        """The config's generation settings with overrides (num_beams, max_new_tokens, min_length,
        length_penalty, task = oeqa | mcqa) applied."""
        return generation_settings(self.config, **overrides)

    def answer(self, requests: list[Request], **overrides) -> list[Answer]:
        """overrides: as `generation`."""
        hidden, mask = self.encode(requests)
        answers = decode_answers(self.stages, hidden, mask, self.generation(**overrides), self.tokenizer,
                                 self.answer_ids)
        for a, counts in zip(answers, self.tokenizer.token_counts([r.question for r in requests])):
            a.question_tokens = counts
        return answers


def check_requests(config: dict, requests: list[Request]) -> None:
    """Refuse, naming the field, what the artifacts cannot answer: empty questions, missing or extra
    modalities, wrong shapes, NaN, voxel coordinates off the grid, mixed audio clip counts."""
    if not requests:
        raise RequestError("no request")
    for i, r in enumerate(requests):
        if not isinstance(r.question, str) or not r.question.strip():
            raise RequestError(f"requests[{i}].question: empty question")
        check_inputs(config, r, f"requests[{i}].")
    if "audio" in modality_names(config) and len({r.audio.shape[0] for r in requests}) > 1:
        raise RequestError("audio: requests in one batch must have the same number of clips")


def check_inputs(config: dict, r: Request, where: str = "") -> None:
    """One request's modality inputs (not its question)."""
    names = modality_names(config)
    visual = [m for m in names if m in VISUAL]
    size, t = config["vision"]["image_size"], config["frame_num"]
    for m in r.frames:
        if m not in visual:
            raise RequestError(f"{where}frames[{m!r}]: modality not in these artifacts (exported: {', '.join(names)})")
    for m in visual:
        x = r.frames.get(m)
        if x is None:
            raise RequestError(f"{where}frames[{m!r}]: missing (the artifacts need {m})")
        if x.shape != (t, 3, size, size):
            raise RequestError(f"{where}frames[{m!r}]: shape {x.shape}, expected {(t, 3, size, size)}")
        _finite(x, f"{where}frames[{m!r}]")
    for name, value, modality in (("audio", r.audio, "audio"), ("pc_feat", r.pc_feat, "pc"),
                                  ("pc_coords", r.pc_coords, "pc")):
        if value is not None and modality not in names:
            raise RequestError(f"{where}{name}: modality {modality!r} not in these artifacts "
                               f"(exported: {', '.join(names)})")
        if value is None and modality in names:
            raise RequestError(f"{where}{name}: missing (the artifacts need {modality})")
    a = config["audio"]
    if r.audio is not None:
        if r.audio.ndim != 3 or r.audio.shape[1:] != (a["clip_frames"], a["num_mel_bins"]) or not len(r.audio):
            raise RequestError(f"{where}audio: shape {r.audio.shape}, expected "
                               f"(clips, {a['clip_frames']}, {a['num_mel_bins']})")
        _finite(r.audio, f"{where}audio")
    if r.pc_feat is not None:
        dv = config["vision"]["hidden_size"]
        if r.pc_feat.ndim != 2 or r.pc_feat.shape[1] != dv or not len(r.pc_feat):
            raise RequestError(f"{where}pc_feat: shape {r.pc_feat.shape}, expected (points, {dv})")
        if r.pc_coords.shape != (r.pc_feat.shape[0], 3):
            raise RequestError(f"{where}pc_coords: shape {r.pc_coords.shape}, expected ({r.pc_feat.shape[0]}, 3)")
        if r.pc_coords.min() < 0 or r.pc_coords.max() >= config["pc_grid"]:
            raise RequestError(f"{where}pc_coords: voxel coordinates must lie in [0, {config['pc_grid']})")
        _finite(r.pc_feat, f"{where}pc_feat")


TASKS = ("oeqa", "mcqa")


def generation_settings(config: dict, **overrides) -> dict:
    """config["generation"] + overrides, and "task" (default: the config's downstream task)."""
    g = {**config["generation"], "task": config["downstream_task"]}
    g.update({k: v for k, v in overrides.items() if v is not None})
    if g["task"] not in TASKS:
        raise RequestError(f"task {g['task']!r}: expected one of {', '.join(TASKS)}")
    for key in ("num_beams", "max_new_tokens"):
        if not 1 <= int(g[key]) <= 64:
            raise RequestError(f"{key} {g[key]}: expected 1..64")
    if g["task"] == "mcqa":
        g["num_beams"] = 1
    return g


def fuse_encode(stage, tokenizer: QuestionTokenizer, tokens: dict[str, np.ndarray],
                questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Modality tokens (modality_tokens' layout) + questions -> encoder_hidden [B, S, d], encoder_mask [B, S]."""
    ids, mask = tokenizer.encode(questions)
    out = stage(**{f"{m}_tokens": x for m, x in tokens.items()}, question_ids=ids, question_mask=mask)
    return out["encoder_hidden"], out["encoder_mask"]


def decode_answers(stages, hidden: np.ndarray, mask: np.ndarray, g: dict, tokenizer: QuestionTokenizer,
                   answer_ids: list[int], stop=None) -> list[Answer]:
    """The decode loop over `stages["decoder_first"]` / `["decoder_step"]` (anything called like a
    Stage: the ORT sessions here, with the cache on their device; Triton BLS calls in triton_models/,
    with a host cache: `cached_decoder`). g: `generation_settings`.
    stop: () -> None or a reason, asked before every decoder step (Watched); a reason raises RequestStopped."""
    if g["task"] == "mcqa" and not answer_ids:
        raise RequestError("task mcqa: these artifacts have no answer-letter token ids (re-export them)")
    model = cached_decoder(stages["decoder_first"], stages["decoder_step"], hidden, mask)
    if stop is not None:
        model = Watched(model, stop)
    if g["task"] == "mcqa":
        tokens, step_logits = decoding.greedy(model, g["max_new_tokens"], g["min_length"])
        scores = decoding.mcqa_scores(tokens, step_logits, answer_ids)
        return [Answer(LETTERS[int(s.argmax())], ids, [float(x) for x in s]) for ids, s in zip(tokens, scores)]
    if g["num_beams"] == 1:
        tokens, _ = decoding.greedy(model, g["max_new_tokens"], g["min_length"])
    else:
        tokens = decoding.beam_search(model, g["num_beams"], g["max_new_tokens"], g["min_length"],
                                      g["length_penalty"])
    return [Answer(tokenizer.decode(ids) or "unanswerable", ids) for ids in tokens]


def session_options(threads: int | None = None, memory_arena: bool = True, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = memory_arena
    # spin: idle ORT threads busy-wait for the next op (lower latency); turn off when other thread
    # pools (torch's in a benchmark, other Triton model processes) share the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}  # ORT device type of a provider


def execution_providers(names: list[str]) -> list[str]:
    """["tensorrt", "cuda"] -> ORT provider names in priority order, CPU always last as the fallback;
    a provider this onnxruntime build lacks is an error that names what it has."""
    available = ort.get_available_providers()
    if any(PROVIDERS.get(n.lower(), n) in DEVICES for n in names) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu wheels: load the CUDA/cuDNN libraries the environment carries
    out = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name)
        if full not in available:
            raise ArtifactError(f"execution provider {name!r} ({full}) is not in this onnxruntime build "
                                f"(available: {', '.join(available)}; CUDA/TensorRT need onnxruntime-gpu)")
        if full not in out:
            out.append(full)
    return [p for p in out if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]


def _finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        raise RequestError(f"{name}: contains NaN or infinite values")

"""One declarative spec per exported stage (DESIGN rule 1): read by export, the runtime, parity,
TensorRT profiles and Triton configs. No other list of tensor names exists.

Specs are built from the model config as a plain dict (the manifest's `config`), so this module
needs neither torch nor the reference package.

Graphs (N = images or clips, B = requests, d = T5 width, Dv = encoder feature width):
  vision           pixel_values [N, 3, S, S]                       -> features [N, Lv, Dv]
  audio_encoder    fbank [N, F, M]                                 -> features [N, La, Dv]
  mmqa_{m}         features [N, L, Dv]                             -> tokens [N, nq, d]
  mmqa_pc          pc_feat [B, P, Dv], pc_coords [B, P, 3]         -> tokens [B, nq, d]
  fuse_encode      {m}_tokens, question_ids/mask [B, Lq]           -> encoder_hidden [B, S, d], encoder_mask [B, S]
  decoder_first    decoder_input_ids [B, 1], encoder_hidden, mask  -> logits [B, V], present self K/V, cross K/V [B, ...]
  decoder_step     decoder_input_ids [R, 1], beam_index [R], mask [B, S], past self K/V [R', ...], cross K/V [B, ...]
                   -> logits [R, V], present self K/V [R, ...]

Optional, when exported with `crema export --depth-model DIR` (manifest section "depth_estimator"):
  depth_estimator  pixel_values [N, 3, H, W]                       -> predicted_depth [N, H', W']

Decoder rows R = B requests x beams, request-major. decoder_step first gathers its past rows by
`beam_index` (R' = the previous step's rows: B right after decoder_first, R after), so a beam
search reorders and expands the self-attention cache inside the graph, where the cache lives; the
cross K/V stay one per request and a request's beams share them (cross-attention reads them with
the beams as query rows), so they are never repeated or copied per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

VISUAL = ("rgb", "depth", "flow", "norm")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32 | int64
    dims: tuple  # ints are fixed, strings are symbolic (dynamic) axes

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def shape_ok(self, shape: tuple) -> bool:
        return len(shape) == len(self.dims) and all(isinstance(d, str) or d == s for d, s in zip(self.dims, shape))


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # TensorRT (min, opt, max) per axis
    batch_axis: str | None = None  # the axis Triton's dynamic batcher may concatenate requests on

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def modality_names(cfg: dict) -> list[str]:
    """The configured modalities without CREMA's `-skip` suffix, in order."""
    return [m.split("-")[0] for m in cfg["modalities"]]


def modality_token_dims(cfg: dict, modality: str) -> tuple:
    """How fuse_encode takes a modality's tokens (what mmqa_{m} gives, reshaped per request)."""
    nq, d = cfg["num_query_token"], cfg["t5"]["d_model"]
    if modality in VISUAL:
        return ("batch", cfg["frame_num"], nq, d)
    if modality == "audio":
        return ("batch", "clips", nq, d)
    return ("batch", nq, d)


def kv_names(cfg: dict, kind: str) -> list[str]:
    """Per decoder layer key/value tensor names: kind is past | present | cross."""
    return [f"{kind}.{i}.{kv}" for i in range(cfg["t5"]["num_decoder_layers"]) for kv in ("key", "value")]


def stage_specs(cfg: dict) -> dict[str, StageSpec]:
    """Every stage the configured modalities need, keyed by name, in pipeline order."""
    f32, i64 = "float32", "int64"
    v, t5, a = cfg["vision"], cfg["t5"], cfg["audio"]
    names = modality_names(cfg)
    dv = v["hidden_size"]
    nq, d = cfg["num_query_token"], t5["d_model"]
    lv = (v["image_size"] // v["patch_size"]) ** 2 + 1
    la = (a["clip_frames"] // a["input_patch_size"]) * (a["num_mel_bins"] // a["input_patch_size"])
    frames, max_batch = cfg["frame_num"], 8
    images = (1, frames * len([m for m in names if m in VISUAL]), max_batch * frames * 4)
    tokens = ("rows", nq, d)
    specs: list[StageSpec] = []
    if any(m in VISUAL for m in names):
        specs.append(StageSpec("vision", (TensorSpec("pixel_values", f32, ("images", 3, v["image_size"], v["image_size"])),),
                               (TensorSpec("features", f32, ("images", lv, dv)),),
                               profile={"images": images}, batch_axis="images"))
    if "audio" in names:
        specs.append(StageSpec("audio_encoder", (TensorSpec("fbank", f32, ("clips", a["clip_frames"], a["num_mel_bins"])),),
                               (TensorSpec("features", f32, ("clips", la, dv)),),
                               profile={"clips": (1, a["num_clips"], max_batch * 8)}, batch_axis="clips"))
    for m in names:
        if m == "pc":
            specs.append(StageSpec("mmqa_pc", (TensorSpec("pc_feat", f32, ("batch", "points", dv)),
                                               TensorSpec("pc_coords", i64, ("batch", "points", 3))),
                                   (TensorSpec("tokens", f32, ("batch", nq, d)),),
                                   profile={"batch": (1, 1, max_batch), "points": (1, 1024, 16384)}))
        else:
            length = lv if m in VISUAL else la
            rows = images if m in VISUAL else (1, a["num_clips"], max_batch * 8)
            specs.append(StageSpec(f"mmqa_{m}", (TensorSpec("features", f32, ("rows", length, dv)),),
                                   (TensorSpec("tokens", f32, tokens),), profile={"rows": rows}, batch_axis="rows"))
    text = (1, 16, cfg["max_txt_len"])
    enc_max = 4096
    fuse_in = tuple(TensorSpec(f"{m}_tokens", f32, modality_token_dims(cfg, m)) for m in names)
    specs.append(StageSpec(
        "fuse_encode",
        fuse_in + (TensorSpec("question_ids", i64, ("batch", "text")), TensorSpec("question_mask", i64, ("batch", "text"))),
        (TensorSpec("encoder_hidden", f32, ("batch", "enc_len", d)), TensorSpec("encoder_mask", i64, ("batch", "enc_len"))),
        profile={"batch": (1, 1, max_batch), "text": text, "clips": (1, a["num_clips"], 8)}))
    h, dk = t5["num_heads"], t5["d_kv"]
    max_new = 64
    kv = lambda name, rows, length: TensorSpec(name, f32, (rows, h, length, dk))  # noqa: E731
    rows = (1, 5, max_batch * 8)  # requests x beams
    dec_profile = {"batch": (1, 1, max_batch), "enc_len": (1, 256, enc_max)}
    specs.append(StageSpec(
        "decoder_first",
        (TensorSpec("decoder_input_ids", i64, ("batch", 1)), TensorSpec("encoder_hidden", f32, ("batch", "enc_len", d)),
         TensorSpec("encoder_mask", i64, ("batch", "enc_len"))),
        (TensorSpec("logits", f32, ("batch", t5["vocab_size"])),)
        + tuple(kv(n, "batch", 1) for n in kv_names(cfg, "present"))
        + tuple(kv(n, "batch", "enc_len") for n in kv_names(cfg, "cross")),
        profile=dec_profile))
    specs.append(StageSpec(
        "decoder_step",
        (TensorSpec("decoder_input_ids", i64, ("rows", 1)), TensorSpec("beam_index", i64, ("rows",)),
         TensorSpec("encoder_mask", i64, ("batch", "enc_len")))
        + tuple(kv(n, "past_rows", "past") for n in kv_names(cfg, "past"))
        + tuple(kv(n, "batch", "enc_len") for n in kv_names(cfg, "cross")),
        (TensorSpec("logits", f32, ("rows", t5["vocab_size"])),)
        + tuple(kv(n, "rows", "past_plus_one") for n in kv_names(cfg, "present")),
        profile={**dec_profile, "rows": rows, "past_rows": rows, "past": (1, 8, max_new)}))
    return {s.name: s for s in specs}


# --- the optional depth estimator (`crema export --depth-model DIR`) ------------------------------

DEPTH_ESTIMATOR = "depth_estimator"
# what predicted_depth means: "metric" = depth in metres (ZoeDepth, Depth Anything metric); "disparity" =
# relative inverse depth, larger = nearer, scale and shift unknown (DPT/MiDaS, Depth Anything relative)
DEPTH_OUTPUTS = ("metric", "disparity")
DEPTH_RESIZE = ("bilinear", "bicubic", "nearest")  # how the runtime resizes frames to the input size
DEPTH_PADS = (None, "reflect")  # "reflect": ZoeDepth's reflect padding of int(sqrt(side / 2) * 3) pixels
MAX_DEPTH_SIDE = 2048  # pixels per side of the depth estimator's input


def depth_estimator_spec(depth: dict) -> StageSpec:
    """The depth estimator's stage from the manifest's "depth_estimator" section (runtime/artifacts.py):
    pixel_values [frames, 3, H, W] float32, frames resized to input_size [H, W], scaled by `rescale` and
    normalised with the image processor's mean/std -> predicted_depth [frames, H', W'] float32
    (H', W' = output_size; metric depth in metres or disparity, as `output` says). With "batch_vote"
    (ZoeDepth with several metric heads: one head is voted for by all frames of a call) a call must hold
    one video's frames, so there is no batch axis for Triton to concatenate requests on."""
    (h, w), (oh, ow) = depth["input_size"], depth["output_size"]
    return StageSpec(DEPTH_ESTIMATOR, (TensorSpec("pixel_values", "float32", ("frames", 3, h, w)),),
                     (TensorSpec("predicted_depth", "float32", ("frames", oh, ow)),),
                     profile={"frames": (1, 4, 32)}, batch_axis=None if depth.get("batch_vote") else "frames")

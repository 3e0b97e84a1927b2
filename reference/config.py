"""CREMA configuration: one object that says everything about shape, plus the presets.

Sizes follow DESIGN §2 (`flant5xl` is the published model). A modality is written as in CREMA's
configs: `rgb`, `depth`, `flow`, `norm`, `audio`, `pc`; `m-skip` runs the base Q-Former without
m's LoRA adapter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VISUAL_MODALITIES = ("rgb", "depth", "flow", "norm")
ALL_MODALITIES = VISUAL_MODALITIES + ("audio", "pc")
TASKS = ("concat", "espresso", "espresso_concat")
DOWNSTREAM_TASKS = ("oeqa", "mcqa")
DATASETS = ("nextqa", "music-avqa", "sqa3d")  # runtime/datasets.py DATASETS: their prompts and settings
ANSWER_LETTERS = "ABCDE"


class ConfigError(ValueError):
    """A configuration that CREMA cannot run."""


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT as in BLIP-2 (no final norm: CREMA applies `ln_{m}` per modality)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6

    @property
    def num_tokens(self) -> int:
        """Patches plus CLS."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base query path, cross-attention every `cross_attention_freq` layers)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class T5Config:
    """Flan-T5 (gated GELU; CREMA overrides the activation to exact erf GELU)."""

    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


@dataclass(frozen=True)
class AudioConfig:
    """BEATs (iter3+, AS2M) on kaldi fbank clips of `clip_frames` x `num_mel_bins`."""

    num_mel_bins: int = 128
    clip_frames: int = 512
    num_clips: int = 2
    input_patch_size: int = 16
    embed_dim: int = 512
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    deep_norm: bool = True
    gru_rel_pos: bool = True
    layer_norm_eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        """BEATs tokens per clip: one per 16x16 fbank patch."""
        return (self.clip_frames // self.input_patch_size) * (self.num_mel_bins // self.input_patch_size)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (CREMA's `predict_answers` / dataset run configs)."""

    num_beams: int = 5
    max_new_tokens: int = 10
    min_length: int = 1
    length_penalty: float = -1.0


@dataclass(frozen=True)
class CremaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    t5: T5Config = field(default_factory=T5Config)
    audio: AudioConfig = field(default_factory=AudioConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    modalities: tuple[str, ...] = ("rgb",)
    frame_num: int = 4
    num_query_token: int = 32
    lora_rank: int = 64
    task: str = "concat"
    downstream_task: str = "oeqa"
    answer_num: int = 5
    max_txt_len: int = 77
    pc_grid: int = 256  # voxel coordinates are < pc_grid on every axis
    # a CREMA dataset whose conventions the model was exported with (runtime/datasets.py): requests may
    # then carry its structured fields (options, situation, templ_values) and get its prompt
    dataset: str | None = None

    def __post_init__(self):
        _validate(self)

    # --- modality helpers -------------------------------------------------------------------
    @property
    def modality_names(self) -> tuple[str, ...]:
        """Modalities without the `-skip` suffix, in configured order."""
        return tuple(m.split("-")[0] for m in self.modalities)

    def skips_lora(self, modality: str) -> bool:
        return f"{modality}-skip" in self.modalities

    @property
    def visual_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in self.modality_names if m in VISUAL_MODALITIES)

    @property
    def feature_dim(self) -> int:
        """Width of every encoder's output as the Q-Former sees it (1408 in CREMA)."""
        return self.vision.hidden_size

    @property
    def espresso(self) -> bool:
        return "espresso" in self.task

    @property
    def fusion_concat(self) -> bool:
        return self.task == "espresso_concat"

    def replace(self, **changes) -> "CremaConfig":
        return dataclasses.replace(self, **changes)

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CremaConfig":
        parts = {"vision": VisionConfig, "qformer": QFormerConfig, "t5": T5Config,
                 "audio": AudioConfig, "generation": GenerationConfig}
        kwargs = {k: (parts[k](**v) if k in parts else v) for k, v in d.items()}
        if "modalities" in kwargs:
            kwargs["modalities"] = tuple(kwargs["modalities"])
        return cls(**kwargs)


def parse_modalities(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`"rgb_depth-skip"`, `"rgb,depth"` or a list -> ("rgb", "depth-skip")."""
    if isinstance(text, str):
        text = text.replace(",", "_").split("_")
    return tuple(m.strip() for m in text if m.strip())


def _validate(cfg: CremaConfig) -> None:
    if not cfg.modalities:
        raise ConfigError("no modality configured")
    for m in cfg.modalities:
        base, _, suffix = m.partition("-")
        if base not in ALL_MODALITIES or suffix not in ("", "skip"):
            raise ConfigError(f"unknown modality {m!r}: expected one of {', '.join(ALL_MODALITIES)}, "
                              "optionally with '-skip'")
    names = cfg.modality_names
    if len(set(names)) != len(names):
        raise ConfigError(f"modality listed twice in {cfg.modalities}")
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}: expected one of {TASKS}")
    if cfg.downstream_task not in DOWNSTREAM_TASKS:
        raise ConfigError(f"unknown downstream task {cfg.downstream_task!r}: expected {DOWNSTREAM_TASKS}")
    if not 1 <= cfg.answer_num <= len(ANSWER_LETTERS):
        raise ConfigError(f"answer_num must be 1..{len(ANSWER_LETTERS)}, got {cfg.answer_num}")
    if cfg.dataset is not None and cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: expected one of {', '.join(DATASETS)}")
    if cfg.frame_num < 1:
        raise ConfigError(f"frame_num must be >= 1, got {cfg.frame_num}")
    has_rgb = "rgb" in names
    if cfg.espresso and (not has_rgb or len(names) < 2):
        raise ConfigError(f"task {cfg.task!r} fuses the other modalities into rgb: it needs rgb and at "
                          f"least one more modality, got {cfg.modalities}")
    # CREMA's token assembly takes the audio branch before the pc branch: with both and no
    # espresso fusion its pc tokens are computed and then dropped. Refuse rather than drop silently.
    if not cfg.espresso and "audio" in names and "pc" in names:
        raise ConfigError("audio and pc together need an espresso task: published CREMA drops the pc "
                          "tokens in this combination")
    v = cfg.vision
    if v.image_size % v.patch_size:
        raise ConfigError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    a = cfg.audio
    if a.clip_frames % a.input_patch_size or a.num_mel_bins % a.input_patch_size:
        raise ConfigError("audio clip_frames and num_mel_bins must be multiples of input_patch_size")
    if cfg.feature_dim // 3 < 1:
        raise ConfigError("feature width too small for the 3D positional encoding")


# --- presets ----------------------------------------------------------------------------------

def _tiny() -> CremaConfig:
    return CremaConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=48, num_layers=2, num_heads=4,
                            mlp_dim=96),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        t5=T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                    vocab_size=512, relative_attention_num_buckets=8, relative_attention_max_distance=32),
        audio=AudioConfig(clip_frames=64, num_clips=2, embed_dim=16, encoder_layers=2,
                          encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
                          conv_pos=8, conv_pos_groups=4, num_buckets=16, max_distance=64),
        generation=GenerationConfig(num_beams=3, max_new_tokens=6, min_length=1, length_penalty=-1.0),
        modalities=("rgb",), frame_num=2, num_query_token=4, lora_rank=4, max_txt_len=32, pc_grid=32,
    )


def _bench() -> CremaConfig:
    # Real per-layer widths, reduced depth: per-layer kernels as in the real model.
    return CremaConfig(
        vision=VisionConfig(num_layers=4),
        qformer=QFormerConfig(num_layers=2),
        t5=T5Config(num_layers=2, num_decoder_layers=2),
        audio=AudioConfig(encoder_layers=2),
        generation=GenerationConfig(num_beams=5, max_new_tokens=10),
        modalities=("rgb", "depth", "flow", "norm"),
    )


def _demo() -> CremaConfig:
    # Trained on the synthetic task (`crema train-demo`); weights ship in reference/demo/.
    return CremaConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128),
        qformer=QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        t5=T5Config(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                    vocab_size=512, relative_attention_num_buckets=16, relative_attention_max_distance=64),
        audio=AudioConfig(clip_frames=64, num_clips=2, embed_dim=32, encoder_layers=2, encoder_embed_dim=64,
                          encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4,
                          num_buckets=16, max_distance=64),
        generation=GenerationConfig(num_beams=1, max_new_tokens=4, min_length=1, length_penalty=1.0),
        modalities=("rgb", "depth", "flow", "norm", "audio", "pc"), task="espresso_concat", frame_num=1,
        num_query_token=8, lora_rank=8, max_txt_len=32, pc_grid=64,
    )


def _flant5xl() -> CremaConfig:
    return CremaConfig(modalities=("rgb", "depth", "flow", "norm"),
                       generation=GenerationConfig(num_beams=5, max_new_tokens=10, min_length=1,
                                                   length_penalty=-1.0))


PRESETS = {"tiny": _tiny, "demo": _demo, "bench": _bench, "flant5xl": _flant5xl}


def preset(name: str, **overrides) -> CremaConfig:
    """A preset's config, with field overrides (e.g. `modalities=("rgb", "audio")`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]().replace(**overrides)

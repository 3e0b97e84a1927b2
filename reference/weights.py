"""Weights: non-degenerate random init for presets, and strict loading of real checkpoints.

Sources, merged into our module names (which mirror HF BLIP-2 for the frozen parts and CREMA's
LAVIS names for the per-modality parts):
  * a HF BLIP-2 FlanT5 directory (`config.json`, `*.safetensors`, `tokenizer.json`): names kept;
  * CREMA LAVIS checkpoints (`.pth`, loaded with `weights_only=True`): renamed by `LAVIS_TO_OURS`,
    overlaid in order (`crema_pretrained.pth`, then a fine-tuned one holding trainable tensors only);
  * a BEATs checkpoint (`{"cfg", "model"}`) for audio: prefixed `audio_encoder.model.`;
  * our own checkpoint directory (`model.safetensors` + `config.json` + `tokenizer.json`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .beats import BEATS_CFG_FIELDS
from .config import (ALL_MODALITIES, TASKS, AudioConfig, ConfigError, CremaConfig, QFormerConfig, T5Config,
                     VisionConfig)
from .lora import MultiLoRALinear
from .model import Crema
from .tokenizer import TextTokenizer


class CheckpointError(ValueError):
    """A checkpoint that does not fit the configured model; the message lists what is wrong."""


# (LAVIS regex, our name). First match wins; EVA's q_bias/v_bias are merged separately.
LAVIS_TO_OURS: list[tuple[str, str]] = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|value)\.w\.",
     r"qformer.encoder.layer.\1.attention.attention.\2."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"^t5_model\.", "language_model."),
]

# (our regex, LAVIS name): the inverse, for writing LAVIS-format checkpoints.
OURS_TO_LAVIS: list[tuple[str, str]] = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.(query|value)\.(weight|bias)$",
     r"Qformer.bert.encoder.layer.\1.attention.self.\2.w.\3"),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.layer\.(\d+)\.", r"Qformer.bert.encoder.layer.\1."),
    (r"^language_model\.", "t5_model."),
]

# Checkpoint keys CREMA does not use (after renaming), with the reason.
UNUSED_KEYS: list[tuple[str, str]] = [
    (r"^\w+_gradsel_embed$", "CREMA's gradient-selection embeddings (training only)"),
    (r"^ln_pc\.", "CREMA defines ln_pc but feeds pc features to the Q-Former without it"),
    (r"^Qformer\.cls\.", "Q-Former LM head (text path, removed by CREMA)"),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",
     "Q-Former text embeddings (removed by CREMA)"),
    (r"^qformer\.embeddings\.", "Q-Former text embeddings (removed by CREMA)"),
    (r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", "Q-Former text-path FFN (removed by CREMA)"),
    (r"^vision_model\.post_layernorm\.", "BLIP-2 ln_vision: CREMA uses ln_{modality} instead"),
    (r"^ln_vision\.", "BLIP-2 ln_vision: CREMA uses ln_{modality} instead"),  # LAVIS name, in crema_*.pth
    (r"^query_tokens$", "BLIP-2 query tokens: CREMA uses query_tokens_{modality}"),
    (r"^language_projection\.", "BLIP-2 projection: CREMA uses t5_proj_{modality}"),
    (r"^t5_proj\.(weight|bias)$", "BLIP-2 projection: CREMA uses t5_proj_{modality}"),  # LAVIS name
    (r"^visual_encoder\.norm\.", "ViT final norm (BLIP-2 drops it)"),
    (r"^audio_encoder\.model\.predictor\.", "BEATs classifier head (CREMA uses the features)"),
]
# Keys of a modality that is not configured: ignored, and reported.
_MODALITY_KEY = re.compile(r"(query_tokens|t5_proj|ln|w_a|w_b)_(%s)\b" % "|".join(ALL_MODALITIES))


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def lavis_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS (CREMA) state dict; merge EVA's q_bias/v_bias into qkv.bias (no k bias)."""
    out, biases = {}, {}
    for key, value in state.items():
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", key)
        if m:
            biases.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        out[_rename(key, LAVIS_TO_OURS)] = value
    for block, qv in biases.items():
        if set(qv) != {"q", "v"}:
            raise CheckpointError(f"visual_encoder.blocks.{block}.attn: has only {set(qv)} of q_bias/v_bias")
        out[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
    return out


def ours_to_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `lavis_to_ours`: what CREMA's LAVIS model would save."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if m:
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                raise CheckpointError(f"{key}: EVA has no key bias, but its k part is non-zero")
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q.clone()
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v.clone()
            continue
        out[_rename(key, OURS_TO_LAVIS)] = value
    return out


# --- strict loading ------------------------------------------------------------------------------

@dataclass
class LoadReport:
    loaded: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    sources: dict[str, int] = field(default_factory=dict)  # source (file or directory) -> tensors loaded from it

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.ignored.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines = [f"loaded {self.loaded} tensors"] + [f"  {n} from {src}" for src, n in self.sources.items()]
        return "\n".join(lines + [f"ignored {n} keys: {r}" for r, n in reasons.items()])


def shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (tied embeddings, BEATs' shared bias table)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _unused_reason(key: str) -> str | None:
    for pattern, reason in UNUSED_KEYS:
        if re.search(pattern, key):
            return reason
    return None


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state(model: Crema, state: dict[str, torch.Tensor], strict: bool = True,
               origins: dict[str, str] | None = None) -> LoadReport:
    """Load `state` (our names) into `model`. Strict: refuse missing, unexpected or mis-shaped keys.

    origins: key -> the file it came from (`merge_sources`), named in shape errors and counted per source.
    """
    origins = dict(origins or {})
    expected = model.state_dict()
    state = dict(state)
    for group in shared_parameter_names(model):  # e.g. T5 embed_tokens = shared: one copy is enough
        present = [n for n in group if n in state]
        for name in group:
            if present and name not in state:
                state[name] = state[present[0]]
                if present[0] in origins:
                    origins[name] = origins[present[0]]
    report, accepted = LoadReport(), {}
    unexpected, mismatched = [], []
    configured = set(model.cfg.modality_names)
    for key, value in state.items():
        if key in expected:
            if tuple(value.shape) != tuple(expected[key].shape):
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                                  + (f" (in {_describe(key, origins[key])})" if key in origins else ""))
            else:
                accepted[key] = value
            continue
        reason = _unused_reason(key)
        m = _MODALITY_KEY.search(key)
        if reason is None and m and m.group(2) not in configured:
            reason = f"modality {m.group(2)!r} is in the checkpoint but not configured"
        if reason:
            report.ignored[key] = reason
        else:
            unexpected.append(key)
    bad_shape = {x.split(":")[0] for x in mismatched}
    missing = [k for k in expected if k not in accepted and k not in bad_shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors with the wrong shape: " + "; ".join(mismatched[:10]))
    if strict and missing:
        problems.append(f"{len(missing)} model weights missing from the checkpoint: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys the model does not have: {_listing(unexpected)}")
    if problems:
        raise CheckpointError("refusing a partial or mismatched load:\n  " + "\n  ".join(problems))
    model.load_state_dict(accepted, strict=False)
    report.loaded = len(accepted)
    for key in accepted:
        if key in origins:
            report.sources[origins[key]] = report.sources.get(origins[key], 0) + 1
    return report


def _describe(key: str, origin: str) -> str:
    """`origin`, with the tensor's LAVIS name where the origin is a CREMA `.pth` and the name differs."""
    lavis = _rename(key, OURS_TO_LAVIS)
    return f"{origin}, LAVIS key {lavis!r}" if origin.endswith((".pth", ".pt")) and lavis != key else origin


def merge_sources(model: Crema, sources: Sequence[tuple[str, dict[str, torch.Tensor]]]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Overlay state dicts (our names) in order, later sources winning, as CREMA's successive
    `load_state_dict(strict=False)` calls do. Returns (state, origins: key -> source name).

    A tensor the model uses that two sources give with different shapes is a CheckpointError naming
    both. Keys the model does not use may differ (the last one is kept and reported as ignored):
    CREMA's `{m}_gradsel_embed` width, for one, depends on the LoRA rank it was trained with. One
    tied tensor (T5's shared / embed_tokens) supplied by a later source replaces all its names.
    """
    expected = model.state_dict()
    groups = shared_parameter_names(model)
    state: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    for name, src in sources:
        for key, value in src.items():
            if key in state and key in expected and tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{key}: shape {tuple(state[key].shape)} in {_describe(key, origins[key])}, but "
                    f"{tuple(value.shape)} in {_describe(key, name)} (model: {tuple(expected[key].shape)})")
        for group in groups:
            if any(n in src for n in group):
                for n in group:
                    if n not in src and n in state:
                        del state[n], origins[n]
        state.update(src)
        origins.update(dict.fromkeys(src, name))
    return state, origins


# --- random non-degenerate weights (DESIGN §4) -----------------------------------------------------

def init_random(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Non-degenerate weights: every matrix ~N(0, 1/fan_in) (0.013-0.027 at real widths, larger at
    tiny widths so activations stay O(1)), embeddings and query tokens ~N(0, std), norm gains
    1 + N(0, 0.1), biases ~N(0, std), LoRA B non-zero (training would start it at zero).

    EVA has no key bias: the k third of each ViT qkv bias stays zero (as a real checkpoint has).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):  # BEATs weight-norm gain: positive
                p.copy_(1.0 + 0.1 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1 and (name.endswith("weight") or "norm" in name.lower()):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("grep_a"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name and "query_tokens" not in name and "shared" not in name:
                fan_in = p[0].numel()  # keeps activations O(1) at every width; about `std` at real widths
                p.copy_(fan_in ** -0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
            if name.endswith("self_attn.qkv.bias"):
                p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
    return model


# --- file formats -------------------------------------------------------------------------------

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_checkpoint(model: Crema, directory: str | Path, extra: dict | None = None) -> Path:
    """Our format: model.safetensors (our names) + config.json (CremaConfig) + tokenizer.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aliases = {name for group in shared_parameter_names(model) for name in group[1:]}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"crema": model.cfg.to_dict(), **(extra or {})}, indent=2))
    model.tokenizer.save(directory)
    return directory


def load_checkpoint(directory: str | Path, **config_overrides) -> Crema:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: missing {name} (not a crema checkpoint directory)")
    cfg = CremaConfig.from_dict(_read_config(directory / CONFIG_FILE))
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    model = Crema(cfg, TextTokenizer.from_file(directory))
    load_state(model, read_safetensors(directory / WEIGHTS_FILE))
    return model


def _read_config(path: Path) -> dict:
    """Our config.json's "crema" entry; unreadable JSON or a missing entry names the file."""
    try:
        return json.loads(path.read_text())["crema"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: no 'crema' entry (not written by `crema checkpoint`)") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One .safetensors file; a truncated or corrupt one is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights (convert .bin weights with "
                              "transformers' save_pretrained(safe_serialization=True))")
    state = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A LAVIS `.pth` ({"model": state_dict} or a bare state_dict), without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: {e}") from e
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return state


def read_beats_checkpoint(path: str | Path, audio: AudioConfig) -> dict[str, torch.Tensor]:
    """A BEATs `.pt` ({"cfg": dict, "model": state_dict}) -> our names; its cfg must match `audio`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a weights-only BEATs checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path}: expected a BEATs checkpoint with 'cfg' and 'model' entries")
    diffs = [f"{k}: checkpoint {ckpt['cfg'][k]!r}, config {getattr(audio, k)!r}"
             for k in BEATS_CFG_FIELDS if k in ckpt["cfg"] and ckpt["cfg"][k] != getattr(audio, k)]
    if diffs:
        raise CheckpointError(f"{path}: BEATs config differs from the audio config: " + "; ".join(diffs))
    return {f"audio_encoder.model.{k}": v for k, v in ckpt["model"].items()}


def config_from_blip2_dir(directory: str | Path, **crema_options) -> CremaConfig:
    """Shapes from a HF BLIP-2 `config.json`; CREMA options (modalities, task, ...) from arguments."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (expected a HF BLIP-2 FlanT5 directory)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        v, q, t = hf["vision_config"], hf["qformer_config"], hf["text_config"]
        vision = VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                              hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"],
                              num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                              layer_norm_eps=v.get("layer_norm_eps", 1e-6))
        qformer = QFormerConfig(hidden_size=q.get("hidden_size", 768), num_layers=q.get("num_hidden_layers", 12),
                                num_heads=q.get("num_attention_heads", 12),
                                intermediate_size=q.get("intermediate_size", 3072),
                                cross_attention_freq=q.get("cross_attention_frequency", 2),
                                layer_norm_eps=q.get("layer_norm_eps", 1e-12))
        t5 = T5Config(d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"], num_layers=t["num_layers"],
                      num_decoder_layers=t.get("num_decoder_layers", t["num_layers"]), num_heads=t["num_heads"],
                      vocab_size=t["vocab_size"],
                      relative_attention_num_buckets=t.get("relative_attention_num_buckets", 32),
                      relative_attention_max_distance=t.get("relative_attention_max_distance", 128),
                      layer_norm_epsilon=t.get("layer_norm_epsilon", 1e-6))
        num_query_token = hf.get("num_query_tokens", 32)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a BLIP-2 config (missing {e})") from e
    return CremaConfig(vision=vision, qformer=qformer, t5=t5, num_query_token=num_query_token, **crema_options)


CremaCheckpoints = str | Path | Sequence[str | Path] | None


def load_pretrained(blip2_dir: str | Path, crema_ckpt: CremaCheckpoints = None,
                    beats_ckpt: str | Path | None = None, strict: bool = True,
                    **crema_options) -> tuple[Crema, LoadReport]:
    """The real model: HF BLIP-2 FlanT5 directory (+ BEATs for audio) + CREMA LAVIS checkpoints.

    crema_ckpt: one path, or several applied in order, each overlaying the ones before, as CREMA
    does: `crema_pretrained.pth` (its `model.finetuned`, loaded by `load_checkpoint_from_config`),
    then a fine-tuned checkpoint (its `model.mmqa_ckpt`, `load_mmqa`); crema.py:853-854. A
    fine-tuned file written by CREMA's runner holds trainable tensors only (runner_base.py:572-581),
    so strictness (every model weight present, nothing unknown) applies to the merged sources only.
    The frozen parts (ViT, T5, Q-Former base) come from `blip2_dir` and BEATs from `beats_ckpt`
    unless a CREMA checkpoint carries them (CREMA's checkpoints load last and win there too).
    """
    blip2_dir = Path(blip2_dir)
    cfg = config_from_blip2_dir(blip2_dir, **crema_options)
    model = Crema(cfg, TextTokenizer.from_file(blip2_dir))
    sources = [(str(blip2_dir), read_safetensors_dir(blip2_dir))]
    if beats_ckpt is not None:
        sources.append((str(beats_ckpt), read_beats_checkpoint(beats_ckpt, cfg.audio)))
    elif "audio" in cfg.modality_names and strict:
        raise CheckpointError("audio is configured: pass the BEATs checkpoint (--beats-ckpt)")
    if crema_ckpt is None:
        crema_ckpt = []
    elif isinstance(crema_ckpt, (str, Path)):
        crema_ckpt = [crema_ckpt]
    for path in crema_ckpt:
        sources.append((str(path), lavis_to_ours(read_lavis_checkpoint(path))))
    state, origins = merge_sources(model, sources)
    return model, load_state(model, state, strict=strict, origins=origins)


# --- CREMA's trainable tensors, and LAVIS-format checkpoints for tests -----------------------------

_TRAINABLE = re.compile(r"\.w_[ab]_\w+\.weight$|^(query_tokens|t5_proj|ln)_\w+|^projection_audio\.|^fusion\.")


def is_crema_trainable(key: str) -> bool:
    """Whether CREMA trains the tensor `key` (our name), i.e. whether its fine-tuned checkpoints hold it.

    Frozen (crema.py at HEAD): the ViT (l.88-89), BEATs (l.95-96), T5 (l.112-113) and the BLIP-2
    Q-Former base (blip2.py:126-127, before the LoRA surgery). Trained: each modality's LoRA
    `w_a_{m}` / `w_b_{m}` (blip2.py:147-150), `query_tokens_{m}`, `t5_proj_{m}`, `ln_{m}`
    (crema.py:138-187), `projection_audio` (l.178) and the espresso `fusion` (l.192-196).
    """
    return bool(_TRAINABLE.search(key))


def write_crema_checkpoint_pair(model: Crema, directory: str | Path, seed: int = 1) -> tuple[Path, Path]:
    """Write what CREMA would load for `model`: (crema_pretrained.pth, a fine-tuned checkpoint).

    Both are LAVIS-named `{"model": state_dict}` files (torch.save; tensors and plain containers only,
    readable with `weights_only=True`). Loaded in this order over a BLIP-2 directory with `model`'s
    frozen weights, they give `model`'s state exactly:
      * pretrained: the Q-Former base and every trainable tensor, the trainable ones perturbed (what
        fine-tuning then changes), plus what real files carry that the model does not use: BLIP-2's
        `query_tokens`, `ln_vision.*`, `t5_proj.*`, `{m}_gradsel_embed` (crema.py:131-136),
        `ln_pc.*` with pc (crema.py:187) and the Q-Former's `position_ids` buffer;
      * fine-tuned: as CREMA's runner saves it (runner_base.py:572-588): trainable tensors (`model`'s
        values) plus buffers (`position_ids`) and gradsel embeddings, with its optimizer, config,
        scaler and epoch entries.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    aliases = {name for group in shared_parameter_names(model) for name in group[1:]}
    ours = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in aliases}
    trainable = {k: v for k, v in ours.items() if is_crema_trainable(k)}
    qformer_base = {k: v for k, v in ours.items() if k.startswith("qformer.") and k not in trainable}
    dq, dv, dt = cfg.qformer.hidden_size, cfg.feature_dim, cfg.t5.d_model
    # crema.py:131: width = every rgb LoRA matrix of the Q-Former's attention (0 without rgb)
    gsize = sum(v.numel() for k, v in trainable.items() if "attention" in k and "rgb" in k and v.dim() > 1)
    extras = {f"{m}_gradsel_embed": torch.zeros(1, gsize) for m in cfg.modality_names}
    extras["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    if "pc" in cfg.modality_names:
        extras.update({"ln_pc.weight": torch.ones(dv), "ln_pc.bias": torch.zeros(dv)})
    blip2_leftovers = {"query_tokens": 0.02 * torch.randn(1, cfg.num_query_token, dq, generator=g),
                       "ln_vision.weight": torch.ones(dv), "ln_vision.bias": torch.zeros(dv),
                       "t5_proj.weight": 0.02 * torch.randn(dt, dq, generator=g), "t5_proj.bias": torch.zeros(dt)}
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in trainable.items()}
    pretrained = {**ours_to_lavis({**qformer_base, **perturbed}), **extras, **blip2_leftovers}
    finetuned = {**ours_to_lavis(trainable), **extras}
    paths = directory / "crema_pretrained.pth", directory / "checkpoint_best.pth"
    torch.save({"model": pretrained}, paths[0])
    torch.save({"model": finetuned, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]},
                "config": {"model": {"arch": "crema", "task": "espresso-concat-seq",
                                     "modalities": "_".join(cfg.modalities)}},
                "scaler": None, "epoch": 19}, paths[1])
    return paths


# --- CREMA's task names ---------------------------------------------------------------------------

# CREMA's `task` string is read by substring: "espresso" adds the fusion (crema.py:192, 283-306),
# "concat" (with espresso) concatenates the fused tokens after the frames (crema.py:309, 333, 360,
# 609, 635, 661); "seq" (base_task.py:245), "gradsel" (base_task.py:252, 307), "gradsel-es" and
# "gradsel-pred-es" (base_task.py:345, 352) only change training. Without "espresso" the modality
# tokens are concatenated: CREMA's own defaults "concate" (crema.py:57), "train" (crema.py:823, the
# eval yamls), "train_discriminator" (the train yamls).
_CREMA_TASK = re.compile(r"^espresso(-concat)?(-seq)?(-gradsel(-pred)?(-es)?)?$")
_CREMA_CONCAT_TASKS = ("train", "train_discriminator", "concate")


def task_options(name: str) -> dict:
    """CremaConfig options for a task name: ours (concat, espresso, espresso_concat) or CREMA's
    (e.g. `espresso-concat-seq-gradsel-es` -> {"task": "espresso_concat"})."""
    if name in TASKS:
        return {"task": name}
    if name in _CREMA_CONCAT_TASKS:
        return {"task": "concat"}
    m = _CREMA_TASK.match(name)
    if m:
        return {"task": "espresso_concat" if m.group(1) else "espresso"}
    raise ConfigError(f"unknown task {name!r}: expected one of ours ({', '.join(TASKS)}) or CREMA's "
                      f"({', '.join(_CREMA_CONCAT_TASKS)}, espresso[-concat][-seq][-gradsel[-pred][-es]], "
                      "e.g. espresso-concat-seq)")


def preset_model(cfg: CremaConfig, seed: int = 0) -> Crema:
    """A preset-shaped model with non-degenerate random weights and the preset tokenizer."""
    return init_random(Crema(cfg, TextTokenizer.preset()), seed=seed)


DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"
DEMO_SOURCE = {"preset": "demo", "checkpoint": "reference/demo (trained by crema train-demo)"}  # manifest "source"
DEMO_DEPTH = Path(__file__).resolve().parent / "demo_depth"  # its depth estimator, written by `crema train-depth`


def demo_model(**config_overrides) -> Crema:
    """The `demo` preset's trained weights, shipped in reference/demo/ (written by `crema train-demo`)."""
    if not (DEMO_CHECKPOINT / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{DEMO_CHECKPOINT}: the demo weights are missing; `crema train-demo --out "
                              f"{DEMO_CHECKPOINT}` recreates them")
    return load_checkpoint(DEMO_CHECKPOINT, **config_overrides)


# --- parameter counts ---------------------------------------------------------------------------

def parameter_table(model: Crema) -> list[tuple[str, int]]:
    """(part, parameter count) for each part of the model, and the total (`crema info`)."""
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
                lora[m] += sum(count(getattr(module, f"{w}_{m}").parameters()) for w in ("w_a", "w_b"))
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

"""The PyTorch reference CREMA: the truth every exported stage and answer is checked against.

Stages (DESIGN §3), each a method so export and parity can take them one by one:
  vision_features  pixel_values [N, 3, H, W]                 -> [N, 257, 1408]  (shared EVA ViT-g)
  audio_features   fbank [N, frames, mel]                    -> [N, La, 1408]   (BEATs + projection)
  pc_features      feats [B, P, 1408], voxels [B, P, 3]      -> [B, P, 1408]    (+ 0.01 * pos. enc.)
  mmqa             modality, features [N, L, 1408]           -> [N, 32, d_t5]   (ln_m, Q-Former+LoRA_m, t5_proj_m)
  assemble         modality tokens + question                -> T5 inputs_embeds [B, S, d_t5], mask [B, S]
  generate         T5 beam search (oeqa) / answer-letter scoring (mcqa)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder, Blip2QFormerModel, Blip2VisionEmbeddings

from .beats import BeatsAudioEncoder
from .config import ANSWER_LETTERS, VISUAL_MODALITIES, CremaConfig
from .lora import MultiLoRALinear
from .tokenizer import TextTokenizer


class InputError(ValueError):
    """A request the model cannot answer; the message names the offending field."""


@dataclass
class CremaInputs:
    """One batch of requests (B = len(questions)); only the configured modalities are given.

    frames:    visual modality -> [B, T, 3, H, W] float, normalised (DESIGN §2), T = frame_num
    audio:     [B, clips, clip_frames, mel] float, normalised kaldi fbank
    pc_feat:   [B, P, feature_dim] float, pre-extracted 3D point features
    pc_coords: [B, P, 3] int, voxel coordinates in [0, pc_grid)
    """

    questions: list[str]
    frames: dict[str, torch.Tensor] = field(default_factory=dict)
    audio: torch.Tensor | None = None
    pc_feat: torch.Tensor | None = None
    pc_coords: torch.Tensor | None = None


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    option_scores: list[float] | None = None  # mcqa: logits of "A".."E"


def _hf_vision_config(cfg: CremaConfig) -> Blip2VisionConfig:
    v = cfg.vision
    return Blip2VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
                             num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                             hidden_act="gelu", layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0,
                             qkv_bias=True, attn_implementation="eager")


def _hf_qformer_config(cfg: CremaConfig) -> Blip2QFormerConfig:
    q = cfg.qformer
    return Blip2QFormerConfig(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                              num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                              hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              layer_norm_eps=q.layer_norm_eps, cross_attention_frequency=q.cross_attention_freq,
                              encoder_hidden_size=cfg.feature_dim, use_qformer_text_input=False,
                              attn_implementation="eager")


def hf_t5_config(cfg: CremaConfig) -> HFT5Config:
    t = cfg.t5
    hf = HFT5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
                    num_decoder_layers=t.num_decoder_layers, num_heads=t.num_heads,
                    relative_attention_num_buckets=t.relative_attention_num_buckets,
                    relative_attention_max_distance=t.relative_attention_max_distance, dropout_rate=0.0,
                    layer_norm_epsilon=t.layer_norm_epsilon, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    attn_implementation="eager")
    hf.dense_act_fn = "gelu"  # CREMA's override: exact erf GELU instead of T5's tanh approximation
    return hf


class VisionEncoder(nn.Module):
    """BLIP-2's EVA ViT without a final norm (HF `Blip2VisionModel` minus `post_layernorm`)."""

    def __init__(self, cfg: CremaConfig):
        super().__init__()
        hf = _hf_vision_config(cfg)
        self.embeddings = Blip2VisionEmbeddings(hf)
        self.encoder = Blip2Encoder(hf)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=self.embeddings(pixel_values)).last_hidden_state


def sinusoid_table(positions: int, width: int) -> torch.Tensor:
    """[positions, width] sin/cos interleaved, as `positional_encodings.PositionalEncoding1D` (3D-LLM)."""
    channels = (width + 1) // 2 * 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :width]


class Crema(nn.Module):
    def __init__(self, cfg: CremaConfig, tokenizer: TextTokenizer):
        super().__init__()
        if tokenizer.vocab_size > cfg.t5.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, T5 vocab_size is {cfg.t5.vocab_size}")
        self.cfg, self.tokenizer = cfg, tokenizer
        names = cfg.modality_names
        dv, dq, dt = cfg.feature_dim, cfg.qformer.hidden_size, cfg.t5.d_model

        if cfg.visual_modalities:
            self.vision_model = VisionEncoder(cfg)
        if "audio" in names:
            self.audio_encoder = BeatsAudioEncoder(cfg.audio)
            self.projection_audio = nn.Linear(cfg.audio.encoder_embed_dim, dv)
        if "pc" in names:
            self.register_buffer("pc_pos_table", sinusoid_table(cfg.pc_grid, dv // 3), persistent=False)

        self.qformer = Blip2QFormerModel(_hf_qformer_config(cfg))
        self._lora: list[MultiLoRALinear] = []  # plain list: the modules are registered in the Q-Former
        for layer in self.qformer.encoder.layer:
            attn = layer.attention.attention
            attn.query = MultiLoRALinear(attn.query, names, cfg.lora_rank)
            attn.value = MultiLoRALinear(attn.value, names, cfg.lora_rank)
            self._lora += [attn.query, attn.value]

        for m in names:
            self.register_parameter(f"query_tokens_{m}", nn.Parameter(torch.zeros(1, cfg.num_query_token, dq)))
            self.add_module(f"t5_proj_{m}", nn.Linear(dq, dt))
            if m != "pc":  # CREMA feeds pc features to the Q-Former without a norm
                self.add_module(f"ln_{m}", nn.LayerNorm(dv))
        if cfg.espresso:
            self.fusion = nn.Sequential(nn.Linear(dt * (len(names) - 1), dt))

        self.language_model = T5ForConditionalGeneration(hf_t5_config(cfg))
        # transformers 5 ties T5's lm_head to the input embeddings; Flan-T5 has a separate lm_head.
        lm = self.language_model
        lm.lm_head.weight = nn.Parameter(lm.shared.weight.detach().clone())
        lm.all_tied_weights_keys.pop("lm_head.weight", None)
        self._prefixes = {name: self._prefix(texts) for name, texts in self._prefix_texts().items()}
        self.answer_ids = tokenizer.answer_ids(cfg.answer_num)  # exported always: any model may be asked mcqa
        # stage ("encoders" | "t5") -> autocast dtype; empty: plain fp32 (see `crema_precision`)
        self.stage_autocast: dict[str, torch.dtype] = {}
        self.eval()

    # --- constants ---------------------------------------------------------------------------
    def _prefix_texts(self) -> dict[str, list[str]]:
        t = self.cfg.frame_num
        frames = ["Frame: "] if t == 1 else [f"Frame {i + 1}: " for i in range(t)]
        return {"frame": frames, "audio": ["Audio: "], "pc": ["3D Model: "]}

    def _prefix(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts, max_len=self.cfg.max_txt_len, add_eos=False)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    @contextlib.contextmanager
    def adapter(self, modality: str):
        """Run the Q-Former with `modality`'s LoRA (or none for `m-skip`)."""
        active = None if self.cfg.skips_lora(modality) else modality
        for m in self._lora:
            m.active = active
        try:
            yield
        finally:
            for m in self._lora:
                m.active = None

    # --- stages ------------------------------------------------------------------------------
    def _autocast(self, stage: str, device: torch.device):
        dtype = self.stage_autocast.get(stage)
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def _encoder_out(self, x: torch.Tensor) -> torch.Tensor:
        # CREMA's encoder output leaves autocast through a fp32 LayerNorm (ln_m, or BEATs' last norm)
        return x.float() if "encoders" in self.stage_autocast else x

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self._autocast("encoders", pixel_values.device):
            return self._encoder_out(self.vision_model(pixel_values))

    def audio_features(self, fbank: torch.Tensor) -> torch.Tensor:
        with self._autocast("encoders", fbank.device):  # CREMA: projection_audio runs outside autocast
            feats = self._encoder_out(self.audio_encoder(fbank))
        return self.projection_audio(feats)

    def pc_features(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        pos = self.pc_pos_table[coords.long()].flatten(-2)  # [B, P, 3 * (dv // 3)]
        pos = nn.functional.pad(pos, (0, feats.shape[-1] - pos.shape[-1]))
        return feats + 0.01 * pos

    def mmqa(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        if modality != "pc":
            features = getattr(self, f"ln_{modality}")(features)
        query = getattr(self, f"query_tokens_{modality}").expand(features.shape[0], -1, -1)
        with self.adapter(modality):
            out = self.qformer(query_embeds=query, encoder_hidden_states=features).last_hidden_state
        return getattr(self, f"t5_proj_{modality}")(out)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def modality_tokens(self, inputs: CremaInputs) -> dict[str, torch.Tensor]:
        """Each modality's T5-space tokens: visual [B, T, nq, d], audio [B, clips, nq, d], pc [B, nq, d]."""
        b, t = len(inputs.questions), self.cfg.frame_num
        tokens = {}
        visual = self.cfg.visual_modalities
        if visual:  # one batched ViT call for every visual modality
            pixels = torch.cat([inputs.frames[m].flatten(0, 1) for m in visual])
            feats = self.vision_features(pixels).split(b * t)
            for m, f in zip(visual, feats):
                tokens[m] = self.mmqa(m, f).unflatten(0, (b, t))
        if inputs.audio is not None and "audio" in self.cfg.modality_names:
            clips = inputs.audio.shape[1]
            tokens["audio"] = self.mmqa("audio", self.audio_features(inputs.audio.flatten(0, 1))).unflatten(0, (b, clips))
        if inputs.pc_feat is not None and "pc" in self.cfg.modality_names:
            tokens["pc"] = self.mmqa("pc", self.pc_features(inputs.pc_feat, inputs.pc_coords))
        return tokens

    def assemble(self, tokens: dict[str, torch.Tensor], question_ids: torch.Tensor,
                 question_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CREMA's token order (DESIGN §2) -> (inputs_embeds [B, S, d], attention mask [B, S])."""
        cfg, b = self.cfg, question_ids.shape[0]
        d = cfg.t5.d_model

        def prefix(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            ids, mask = (x.to(question_ids.device) for x in self._prefixes[name])
            return self.embed(ids).expand(b, -1, -1, -1), mask.expand(b, -1, -1)  # [B, n, P, d], [B, n, P]

        def flat(x: torch.Tensor) -> torch.Tensor:  # [B, ..., d] -> [B, n, d]; masks [B, ...] -> [B, n]
            return x.reshape(b, -1, d) if x.is_floating_point() else x.reshape(b, -1)

        def ones(x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[:-1], dtype=torch.long, device=x.device)

        if "rgb" in tokens:
            rgb, t = tokens["rgb"], cfg.frame_num
            pre, pre_mask = prefix("frame")
            blocks, masks, fused = [pre, rgb], [pre_mask, ones(rgb)], []
            for m in cfg.modality_names:
                if m in ("depth", "flow", "norm"):
                    (fused if cfg.espresso else blocks).append(tokens[m])
                    if not cfg.espresso:
                        masks.append(ones(tokens[m]))
                elif m == "pc" and cfg.espresso:
                    fused.append(tokens["pc"].unsqueeze(1).expand(-1, t, -1, -1))
                elif m == "audio" and cfg.espresso:
                    fused.append(tokens["audio"].mean(dim=1, keepdim=True).expand(-1, t, -1, -1))
            x, mask = torch.cat(blocks, dim=2), torch.cat(masks, dim=2)
            if cfg.espresso:
                extra = self.fusion(torch.cat(fused, dim=-1))
                extra = torch.sigmoid(extra) * extra
                if cfg.fusion_concat:  # second block: all frame prefixes, then all fused tokens
                    x = torch.cat([flat(x), flat(pre), flat(extra)], dim=1)
                    mask = torch.cat([flat(mask), flat(mask)], dim=1)
                else:
                    x = flat(torch.cat([pre, rgb + extra], dim=2))
                    mask = ones(x)
            else:
                x, mask = flat(x), flat(mask)
                if "audio" in tokens:  # no prefix: "seems no prefix works better" (CREMA)
                    x = torch.cat([x, flat(tokens["audio"])], dim=1)
                    mask = torch.cat([mask, flat(ones(tokens["audio"]))], dim=1)
                elif "pc" in tokens:
                    pre_pc, pre_pc_mask = prefix("pc")
                    x = torch.cat([x, flat(pre_pc), tokens["pc"]], dim=1)
                    mask = torch.cat([mask, flat(pre_pc_mask), ones(tokens["pc"])], dim=1)
        else:
            # Without rgb CREMA prefixes audio or pc tokens alike with "Audio: " (its pc-only
            # branch reuses the audio prefix); kept for parity with published checkpoints.
            name = "audio" if "audio" in tokens else "pc"
            pre, pre_mask = prefix("audio")
            x = torch.cat([flat(pre), flat(tokens[name])], dim=1)
            mask = torch.cat([flat(pre_mask), flat(ones(tokens[name]))], dim=1)

        x = torch.cat([x, self.embed(question_ids)], dim=1)
        return x, torch.cat([mask, question_mask], dim=1)

    def multimodal_token_count(self, audio_clips: int = 2) -> int:
        """Tokens `assemble` puts before the question (mirrors its branches; needs no weights)."""
        cfg, nq = self.cfg, self.cfg.num_query_token
        t = cfg.frame_num
        frame_p, audio_p, pc_p = (self._prefixes[k][0].shape[-1] for k in ("frame", "audio", "pc"))
        names = cfg.modality_names
        if "rgb" not in names:
            return audio_p + (audio_clips * nq if "audio" in names else nq)
        if cfg.espresso:
            return t * (frame_p + nq) * (2 if cfg.fusion_concat else 1)
        count = t * (frame_p + nq * len(cfg.visual_modalities))
        if "audio" in names:
            return count + audio_clips * nq
        return count + (pc_p + nq if "pc" in names else 0)

    # --- whole model -------------------------------------------------------------------------
    def check_inputs(self, inputs: CremaInputs) -> None:
        cfg = self.cfg
        b = len(inputs.questions)
        if b == 0:
            raise InputError("questions: empty batch")
        for i, q in enumerate(inputs.questions):
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"questions[{i}]: empty question")
        names = cfg.modality_names
        for m in inputs.frames:
            if m not in VISUAL_MODALITIES:
                raise InputError(f"frames[{m!r}]: unknown visual modality (expected one of {VISUAL_MODALITIES})")
            if m not in names:
                raise InputError(f"frames[{m!r}]: modality not configured (configured: {', '.join(names)})")
        given = {"audio": inputs.audio, "pc_feat": inputs.pc_feat, "pc_coords": inputs.pc_coords}
        for key, value in given.items():
            if value is not None and key.split("_")[0] not in names:
                raise InputError(f"{key}: modality {key.split('_')[0]!r} not configured "
                                 f"(configured: {', '.join(names)})")
        v = cfg.vision
        for m in cfg.visual_modalities:
            _check(inputs.frames.get(m), f"frames[{m!r}]", (b, cfg.frame_num, 3, v.image_size, v.image_size),
                   "[batch, frame_num, 3, image_size, image_size]")
        if "audio" in names:
            a = cfg.audio
            x = _check(inputs.audio, "audio", (b, None, a.clip_frames, a.num_mel_bins),
                       "[batch, clips, clip_frames, mel_bins]")
            if x.shape[1] < 1:
                raise InputError("audio: no clip")
        if "pc" in names:
            f = _check(inputs.pc_feat, "pc_feat", (b, None, cfg.feature_dim), "[batch, points, feature_dim]")
            c = _check(inputs.pc_coords, "pc_coords", (b, f.shape[1], 3), "[batch, points, 3]")
            if c.dtype.is_floating_point and not torch.equal(c, c.round()):
                raise InputError("pc_coords: voxel coordinates must be integers")
            if c.numel() and (c.min() < 0 or c.max() >= cfg.pc_grid):
                raise InputError(f"pc_coords: voxel coordinates must lie in [0, {cfg.pc_grid})")

    def encode_inputs(self, inputs: CremaInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated request -> T5 encoder inputs_embeds [B, S, d] and attention mask [B, S]."""
        self.check_inputs(inputs)
        ids, mask = self.tokenizer.encode(inputs.questions, max_len=self.cfg.max_txt_len)
        device = self.language_model.device  # the reference runs where its weights are (CPU or CUDA)
        return self.assemble(self.modality_tokens(inputs), torch.from_numpy(ids).to(device),
                             torch.from_numpy(mask).to(device))

    @torch.no_grad()
    def forward(self, inputs: CremaInputs, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced T5 logits [B, L, vocab] for decoder_input_ids [B, L]."""
        embeds, mask = self.encode_inputs(inputs)
        with self._autocast("t5", embeds.device):
            return self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                       decoder_input_ids=decoder_input_ids).logits

    def generation_config(self, **overrides) -> HFGenerationConfig:
        g = self.cfg.generation
        mcqa = self.cfg.downstream_task == "mcqa"
        settings = dict(num_beams=1 if mcqa else g.num_beams, max_new_tokens=g.max_new_tokens,
                        min_length=g.min_length, length_penalty=g.length_penalty)
        settings.update(overrides)
        if settings["num_beams"] == 1:  # greedy: the length penalty means nothing
            settings.pop("length_penalty")
        return HFGenerationConfig(do_sample=False, early_stopping=False, decoder_start_token_id=0, eos_token_id=1,
                                  pad_token_id=0, num_return_sequences=1, output_scores=mcqa,
                                  return_dict_in_generate=mcqa, **settings)

    @torch.no_grad()
    def generate(self, inputs: CremaInputs, **overrides) -> list[Answer]:
        """CREMA's `generate`: oeqa beam search, or mcqa scoring of "A".."E" (DESIGN §2).

        overrides: num_beams, max_new_tokens, min_length, length_penalty.
        """
        embeds, mask = self.encode_inputs(inputs)
        gen = self.generation_config(**overrides)
        if self.cfg.downstream_task == "mcqa":
            return self._answer_mcqa(embeds, mask, gen)
        with self._autocast("t5", embeds.device):
            out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
        answers = []
        for row in out:
            ids = _trim(row[1:])  # drop the decoder start token and any padding after EOS
            answers.append(Answer(self.tokenizer.decode(ids) or "unanswerable", ids))
        return answers

    def _answer_mcqa(self, embeds, mask, gen) -> list[Answer]:
        # CREMA takes `scores[1]` of a greedy generate (`scores[0]` when only one step exists),
        # which depends on the batch. Per sample this is: the second step's logits unless the
        # sample's first token was EOS (or max_new_tokens == 1), as a batch of one would give.
        with self._autocast("t5", embeds.device):
            out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
        answers = []
        for i, row in enumerate(out.sequences):
            ids = _trim(row[1:])
            step = 1 if len(out.scores) > 1 and ids[0] != self.tokenizer.eos_id else 0
            scores = out.scores[step][i, self.answer_ids]
            answers.append(Answer(ANSWER_LETTERS[int(scores.argmax())], ids, [float(s) for s in scores]))
        return answers


# --- precision as CREMA ran inference -------------------------------------------------------------

def crema_precision(model: Crema, device: str | torch.device = "cpu") -> Crema:
    """Run `model` (in place; returned) on `device` with the precision of CREMA's inference.

    CREMA (Yui010206/CREMA at HEAD, lavis/models/crema_models/crema.py):
      * ViT and BEATs under autocast (fp16 on CUDA): l.435 and l.448
        `with torch.cuda.amp.autocast(enabled=(self.device != torch.device("cpu"))):`
        around `ln(encoder(input))` / `encoder(this_frame)`; the weights stay fp32 (every project yaml
        sets `vit_precision: fp32`; with fp16 weights autocast would compute the same casts anyway).
      * Q-Former, ln_m, t5_proj_m, projection_audio and the espresso fusion: fp32, no autocast
        (l.454, l.566-570).
      * T5: weights cast to bf16, l.114 `param.data = param.data.bfloat16()` (every parameter, `wo`
        included), and run under bf16 autocast, l.700 `with torch.cuda.amp.autocast(dtype=torch.bfloat16):`.
        Question and prefix embeddings therefore come out of bf16 weights (l.564, l.500).
    On CPU (where CREMA's autocast is disabled and its code does not run) the encoders use bf16
    autocast as well: fp16 autocast is slow or missing for CPU ops. T5's bf16 weight cast cannot be
    undone; reload the model for fp32.
    """
    device = torch.device(device)
    model.to(device)
    model.language_model.to(torch.bfloat16)
    model.stage_autocast = {"encoders": torch.float16 if device.type == "cuda" else torch.bfloat16,
                            "t5": torch.bfloat16}
    return model


def _trim(ids) -> list[int]:
    """Generated ids up to and including the first EOS (generate pads finished rows)."""
    out = []
    for t in ids.tolist():
        out.append(t)
        if t == 1:
            break
    return out


def _check(x, name: str, shape: tuple, layout: str) -> torch.Tensor:
    if x is None:
        raise InputError(f"{name}: missing (the configured modalities need it)")
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, x.shape)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise InputError(f"{name}: shape {tuple(x.shape)}, expected ({want}) = {layout}")
    if x.dtype.is_floating_point and not torch.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return x

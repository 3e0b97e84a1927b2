"""One torch module per exported stage, built from the reference model (runtime/specs.py names them).

Each wrapper's forward takes the spec's inputs in order and returns its outputs in order. The
reference's own modules do the work, except the T5 decoder, which is written as explicit single-step
attention over a KV cache so the graph has plain tensor inputs/outputs instead of HF cache objects.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention

from reference.lora import MultiLoRALinear
from reference.model import Crema


class EncoderStage(nn.Module):
    """One reference encoder method as a module: vision_features or audio_features."""

    def __init__(self, model: Crema, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x):
        return getattr(self.model, self.method)(x)


def merged_qformer(model: Crema, modality: str) -> nn.Module:
    """A copy of the Q-Former with `modality`'s LoRA folded into plain Linear layers (W + B A)."""
    adapter = None if model.cfg.skips_lora(modality) else modality
    qformer = copy.deepcopy(model.qformer)
    for name, module in list(qformer.named_modules()):
        if isinstance(module, MultiLoRALinear):
            merged = nn.Linear(module.in_features, module.out_features)
            with torch.no_grad():
                merged.weight.copy_(module.merged_weight(adapter))
                merged.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(qformer.get_submodule(parent), attr, merged)
    return qformer


class MMQAStage(nn.Module):
    """features [N, L, Dv] -> tokens [N, nq, d] for one modality (ln_m, merged Q-Former, t5_proj_m)."""

    def __init__(self, model: Crema, modality: str):
        super().__init__()
        self.ln = getattr(model, f"ln_{modality}", None)
        self.query_tokens = getattr(model, f"query_tokens_{modality}")
        self.qformer = merged_qformer(model, modality)
        self.proj = getattr(model, f"t5_proj_{modality}")

    def forward(self, features):
        if self.ln is not None:
            features = self.ln(features)
        query = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.proj(self.qformer(query_embeds=query, encoder_hidden_states=features).last_hidden_state)


class MMQAPointCloudStage(MMQAStage):
    """pc_feat [B, P, Dv], pc_coords [B, P, 3] -> tokens [B, nq, d] (positional encoding inside)."""

    def __init__(self, model: Crema):
        super().__init__(model, "pc")
        self.model = model

    def forward(self, pc_feat, pc_coords):
        return super().forward(self.model.pc_features(pc_feat, pc_coords))


class FuseEncodeStage(nn.Module):
    """Modality tokens + question -> T5 encoder states: CREMA's assembly with its prefixes baked in."""

    def __init__(self, model: Crema):
        super().__init__()
        self.model = model
        self.modalities = model.cfg.modality_names

    def forward(self, *args):
        *tokens, question_ids, question_mask = args
        embeds, mask = self.model.assemble(dict(zip(self.modalities, tokens)), question_ids, question_mask)
        hidden = self.model.language_model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden, mask


def _heads(x, n):  # [B, L, n*dk] -> [B, n, L, dk]
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


class _T5DecoderStep(nn.Module):
    """One decoder position over a self-attention KV cache, with HF T5's weights."""

    def __init__(self, model: Crema):
        super().__init__()
        lm = model.language_model
        self.decoder, self.lm_head = lm.decoder, lm.lm_head
        self.heads = lm.config.num_heads
        first = self.decoder.block[0].layer[0].SelfAttention
        self.rel_bias = first.relative_attention_bias
        self.buckets, self.max_distance = first.relative_attention_num_buckets, first.relative_attention_max_distance

    def _self_bias(self, past_len, device):
        """Relative position bias [1, H, 1, past_len + 1] for the query at position past_len."""
        key_pos = torch.arange(past_len + 1, device=device)
        rel = key_pos - past_len
        bucket = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=self.buckets,
                                                       max_distance=self.max_distance)
        return self.rel_bias(bucket).transpose(0, 1)[None, :, None, :]

    def _attend(self, attn, q_in, k, v, bias):
        """q_in [R, 1, d] over k, v [G, H, L, dk] with R = G x n: the n consecutive rows of a group share
        its K/V (self-attention: G = R, n = 1; cross-attention: G = requests, n = beams, so the cross
        K/V are never repeated per beam). bias broadcasts to [G, H, n, L]."""
        q = attn.q(q_in).reshape(k.shape[0], -1, self.heads, k.shape[-1]).transpose(1, 2)  # [G, H, n, dk]
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # T5: no 1/sqrt(d) scaling
        out = (weights @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)
        return attn.o(out)

    def run(self, input_ids, encoder_mask, past, cross):
        """input_ids [R, 1]; past: [(k, v)] per layer with [R, H, P, dk] (none in decoder_first);
        cross: [(k, v)] per layer with [B, H, S, dk], encoder_mask [B, S]; R = B x beams, request-major."""
        x = self.decoder.embed_tokens(input_ids)
        past_len = past[0][0].shape[2] if past else torch.tensor(0)
        self_bias = self._self_bias(past_len, x.device)
        cross_bias = (1.0 - encoder_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        present = []
        for i, block in enumerate(self.decoder.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
            h = sa.layer_norm(x)
            k_new = _heads(sa.SelfAttention.k(h), self.heads)
            v_new = _heads(sa.SelfAttention.v(h), self.heads)
            k = torch.cat([past[i][0], k_new], dim=2) if past else k_new
            v = torch.cat([past[i][1], v_new], dim=2) if past else v_new
            present += [k, v]
            x = x + self._attend(sa.SelfAttention, h, k, v, self_bias)
            x = x + self._attend(ca.EncDecAttention, ca.layer_norm(x), cross[i][0], cross[i][1], cross_bias)
            x = ff(x)
        logits = self.lm_head(self.decoder.final_layer_norm(x))[:, -1]
        return logits, present


class DecoderFirstStage(_T5DecoderStep):
    """decoder_input_ids [B, 1], encoder_hidden, encoder_mask -> logits, present K/V, cross K/V."""

    def forward(self, decoder_input_ids, encoder_hidden, encoder_mask):
        cross = []
        for block in self.decoder.block:
            attn = block.layer[1].EncDecAttention
            cross.append((_heads(attn.k(encoder_hidden), self.heads), _heads(attn.v(encoder_hidden), self.heads)))
        logits, present = self.run(decoder_input_ids, encoder_mask, [], cross)
        return (logits, *present, *[t for kv in cross for t in kv])


class DecoderStepStage(_T5DecoderStep):
    """decoder_input_ids [R, 1], beam_index [R], encoder_mask [B, S], past K/V [R', H, P, dk], cross K/V
    [B, H, S, dk] -> logits [R, V], present K/V [R, H, P + 1, dk]. Row r continues past row
    beam_index[r]: beam reordering and expansion happen here, on the device that holds the cache."""

    def forward(self, decoder_input_ids, beam_index, encoder_mask, *kv):
        n = len(self.decoder.block)
        past = [(kv[2 * i].index_select(0, beam_index), kv[2 * i + 1].index_select(0, beam_index)) for i in range(n)]
        cross = [(kv[2 * n + 2 * i], kv[2 * n + 2 * i + 1]) for i in range(n)]
        logits, present = self.run(decoder_input_ids, encoder_mask, past, cross)
        return (logits, *present)


def stage_module(model: Crema, name: str) -> nn.Module:
    """The torch module behind the stage called `name` in runtime.specs.stage_specs."""
    if name == "vision":
        return EncoderStage(model, "vision_features")
    if name == "audio_encoder":
        return EncoderStage(model, "audio_features")
    if name == "mmqa_pc":
        return MMQAPointCloudStage(model)
    if name.startswith("mmqa_"):
        return MMQAStage(model, name[len("mmqa_"):])
    if name == "fuse_encode":
        return FuseEncodeStage(model)
    if name == "decoder_first":
        return DecoderFirstStage(model)
    if name == "decoder_step":
        return DecoderStepStage(model)
    raise KeyError(f"no stage called {name!r}")


"""CREMA's math written out directly from a state dict (our key names), independent of transformers.

Used to prove that transformers' Blip2/T5 modules, as the reference wires them, compute what
CREMA computes (EVA ViT with q/v biases, Q-Former with per-modality LoRA and no scaling, Flan-T5
with exact GELU, BEATs attention as plain softmax with a gated relative bias).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _heads(x, n):  # [B, L, D] -> [B, n, L, D/n]
    b, l, d = x.shape
    return x.view(b, l, n, d // n).transpose(1, 2)


def _merge(x):  # [B, n, L, d] -> [B, L, n*d]
    b, n, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, n * d)


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def vit(sd, cfg, pixels):
    v, p = cfg.vision, "vision_model."
    x = F.conv2d(pixels, sd[p + "embeddings.patch_embedding.weight"], sd[p + "embeddings.patch_embedding.bias"],
                 stride=v.patch_size).flatten(2).transpose(1, 2)
    cls = sd[p + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[p + "embeddings.position_embedding"]
    d = v.hidden_size
    for i in range(v.num_layers):
        n = f"{p}encoder.layers.{i}."
        y = F.layer_norm(x, (d,), sd[n + "layer_norm1.weight"], sd[n + "layer_norm1.bias"], v.layer_norm_eps)
        w, b = sd[n + "self_attn.qkv.weight"], sd[n + "self_attn.qkv.bias"]
        q = y @ w[:d].T + b[:d]          # EVA: q bias
        k = y @ w[d:2 * d].T             # no k bias
        v_ = y @ w[2 * d:].T + b[2 * d:]  # v bias
        q, k, v_ = (_heads(t, v.num_heads) for t in (q, k, v_))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // v.num_heads), -1) @ v_
        x = x + _linear(sd, n + "self_attn.projection", _merge(att))
        y = F.layer_norm(x, (d,), sd[n + "layer_norm2.weight"], sd[n + "layer_norm2.bias"], v.layer_norm_eps)
        x = x + _linear(sd, n + "mlp.fc2", F.gelu(_linear(sd, n + "mlp.fc1", y)))
    return x


def _lora(sd, name, x, modality):
    y = _linear(sd, name, x)
    if modality is not None:
        y = y + (x @ sd[f"{name}.w_a_{modality}.weight"].T) @ sd[f"{name}.w_b_{modality}.weight"].T
    return y


def qformer(sd, cfg, modality, feats, skip=False):
    """ln_m (not pc) -> LayerNorm(query tokens) -> layers (LoRA on self q/v) -> t5_proj_m."""
    q = cfg.qformer
    d, eps = q.hidden_size, q.layer_norm_eps
    if modality != "pc":
        feats = F.layer_norm(feats, (feats.shape[-1],), sd[f"ln_{modality}.weight"], sd[f"ln_{modality}.bias"])
    x = sd[f"query_tokens_{modality}"].expand(feats.shape[0], -1, -1)
    x = F.layer_norm(x, (d,), sd["qformer.layernorm.weight"], sd["qformer.layernorm.bias"], eps)
    lora = None if skip else modality

    def attention(n, x, kv, use_lora):
        qq = _lora(sd, n + "attention.query", x, lora) if use_lora else _linear(sd, n + "attention.query", x)
        kk = _linear(sd, n + "attention.key", kv)
        vv = _lora(sd, n + "attention.value", kv, lora) if use_lora else _linear(sd, n + "attention.value", kv)
        qq, kk, vv = (_heads(t, q.num_heads) for t in (qq, kk, vv))
        att = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(d // q.num_heads), -1) @ vv
        out = _linear(sd, n + "output.dense", _merge(att))
        return F.layer_norm(out + x, (d,), sd[n + "output.LayerNorm.weight"], sd[n + "output.LayerNorm.bias"], eps)

    for i in range(q.num_layers):
        n = f"qformer.encoder.layer.{i}."
        x = attention(n + "attention.", x, x, True)
        if i % q.cross_attention_freq == 0:
            x = attention(n + "crossattention.", x, feats, False)
        h = _linear(sd, n + "output_query.dense", F.gelu(_linear(sd, n + "intermediate_query.dense", x)))
        x = F.layer_norm(h + x, (d,), sd[n + "output_query.LayerNorm.weight"], sd[n + "output_query.LayerNorm.bias"], eps)
    return _linear(sd, f"t5_proj_{modality}", x)


def _bucket(rel, bidirectional, num_buckets, max_distance):
    ret = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(rel < max_exact, rel, large)


def _t5_bias(sd, name, cfg, lq, lk, bidirectional):
    t = cfg.t5
    pos_q, pos_k = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    buckets = _bucket(pos_k - pos_q, bidirectional, t.relative_attention_num_buckets,
                      t.relative_attention_max_distance)
    return F.embedding(buckets, sd[name]).permute(2, 0, 1)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _t5_attention(sd, n, x, kv, bias, heads):
    q, k, v = (_heads(_linear(sd, n + s, src), heads) for s, src in (("q", x), ("k", kv), ("v", kv)))
    att = torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v  # T5: no 1/sqrt(d) scaling
    return _linear(sd, n + "o", _merge(att))


def _t5_ff(sd, n, x, eps):
    y = _rms(x, sd[n + "layer_norm.weight"], eps)
    h = F.gelu(_linear(sd, n + "DenseReluDense.wi_0", y)) * _linear(sd, n + "DenseReluDense.wi_1", y)
    return x + _linear(sd, n + "DenseReluDense.wo", h)


def t5_logits(sd, cfg, embeds, mask, decoder_ids):
    """Flan-T5 (gated exact GELU, untied lm_head without rescaling) teacher-forced logits."""
    t, p = cfg.t5, "language_model."
    eps, h = t.layer_norm_epsilon, t.num_heads
    neg = torch.finfo(embeds.dtype).min
    enc_mask = (1 - mask[:, None, None, :].float()) * neg
    x = embeds
    bias = _t5_bias(sd, p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", cfg,
                    x.shape[1], x.shape[1], True) + enc_mask
    for i in range(t.num_layers):
        n = f"{p}encoder.block.{i}.layer."
        x = x + _t5_attention(sd, n + "0.SelfAttention.", _rms(x, sd[n + "0.layer_norm.weight"], eps),
                              _rms(x, sd[n + "0.layer_norm.weight"], eps), bias, h)
        x = _t5_ff(sd, n + "1.", x, eps)
    enc = _rms(x, sd[p + "encoder.final_layer_norm.weight"], eps)

    y = F.embedding(decoder_ids, sd[p + "shared.weight"])
    lq = y.shape[1]
    causal = torch.triu(torch.full((lq, lq), neg), 1)
    self_bias = _t5_bias(sd, p + "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", cfg,
                         lq, lq, False) + causal
    for i in range(t.num_decoder_layers):
        n = f"{p}decoder.block.{i}.layer."
        z = _rms(y, sd[n + "0.layer_norm.weight"], eps)
        y = y + _t5_attention(sd, n + "0.SelfAttention.", z, z, self_bias, h)
        z = _rms(y, sd[n + "1.layer_norm.weight"], eps)
        y = y + _t5_attention(sd, n + "1.EncDecAttention.", z, enc, enc_mask, h)
        y = _t5_ff(sd, n + "2.", y, eps)
    y = _rms(y, sd[p + "decoder.final_layer_norm.weight"], eps)
    return y @ sd[p + "lm_head.weight"].T


def beats(sd, cfg, fbank):
    """BEATs features with attention as softmax(q k^T / sqrt(d) + gated relative bias)."""
    a, p = cfg.audio, "audio_encoder.model."
    x = F.conv2d(fbank.unsqueeze(1), sd[p + "patch_embedding.weight"], stride=a.input_patch_size)
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (a.embed_dim,), sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"])
    if a.embed_dim != a.encoder_embed_dim:
        x = _linear(sd, p + "post_extract_proj", x)
    e, d, hn = p + "encoder.", a.encoder_embed_dim, a.encoder_attention_heads
    g, v = sd[e + "pos_conv.0.weight_g"], sd[e + "pos_conv.0.weight_v"]
    w = g * v / v.norm(dim=(0, 1), keepdim=True)
    conv = F.conv1d(x.transpose(1, 2), w, sd[e + "pos_conv.0.bias"], padding=a.conv_pos // 2, groups=a.conv_pos_groups)
    if a.conv_pos % 2 == 0:
        conv = conv[:, :, :-1]
    x = F.layer_norm(x + F.gelu(conv).transpose(1, 2), (d,), sd[e + "layer_norm.weight"], sd[e + "layer_norm.bias"])
    n_tok = x.shape[1]
    pos = torch.arange(n_tok)
    buckets = _bucket(pos[None, :] - pos[:, None], True, a.num_buckets, a.max_distance)
    rel = F.embedding(buckets, sd[e + "layers.0.self_attn.relative_attention_bias.weight"]).permute(2, 0, 1)
    alpha = math.pow(2 * a.encoder_layers, 0.25) if a.deep_norm else 1.0
    for i in range(a.encoder_layers):
        n = f"{e}layers.{i}."
        q, k, vv = (_heads(_linear(sd, n + f"self_attn.{s}_proj", x), hn) for s in "qkv")
        gate = torch.sigmoid(_linear(sd, n + "self_attn.grep_linear", q).view(*q.shape[:3], 2, 4).sum(-1))
        ga, gb = gate[..., :1], gate[..., 1:]
        gated = (ga * (gb * sd[n + "self_attn.grep_a"] - 1.0) + 2.0) * rel
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // hn) + gated, -1) @ vv
        y = _linear(sd, n + "self_attn.out_proj", _merge(att))
        x = F.layer_norm(x * alpha + y, (d,), sd[n + "self_attn_layer_norm.weight"], sd[n + "self_attn_layer_norm.bias"])
        y = _linear(sd, n + "fc2", F.gelu(_linear(sd, n + "fc1", x)))
        x = F.layer_norm(x * alpha + y, (d,), sd[n + "final_layer_norm.weight"], sd[n + "final_layer_norm.bias"])
    return x

"""BEATs audio encoder (Chen et al. 2022, iter3+), as CREMA runs it: fbank clips in, features out.

No maintained package ships BEATs (it lives as source files in research repositories), so it is
written here. Module and parameter names mirror the official checkpoints (`BEATs_iter3_plus_AS2M.pt`:
`{"cfg": ..., "model": state_dict}`), so they load as they are.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import AudioConfig


class _WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dim 2 (torch's legacy `weight_norm(dim=2)` layout)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.padding, self.groups = kernel // 2, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        weight = self.weight_g * v / v.norm(dim=(0, 1), keepdim=True)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class BEATsAttention(nn.Module):
    """Self-attention with a gated relative position bias (GRU-style gate on the query)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = h, d // h
        self.scaling = self.head_dim ** -0.5
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, h)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def _bucket(self, relative: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        relative = relative.abs()
        max_exact = half // 2
        large = max_exact + (torch.log(relative.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (half - max_exact)).long()
        large = torch.clamp(large, max=half - 1)
        return buckets + torch.where(relative < max_exact, relative, large)

    def position_bias(self, length: int) -> torch.Tensor:
        """[H, L, L] bias shared by all layers (computed once from layer 0's table)."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = self._bucket(pos[None, :] - pos[:, None])
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        # BEATs subtracts the row max before adding the bias (alpha = 32 rescaling); softmax is
        # shift-invariant per row, so this equals softmax(q k^T * scaling + gated bias).
        alpha = 32.0
        weights = (q * (self.scaling / alpha)) @ k.transpose(-1, -2)
        weights = (weights - weights.amax(dim=-1, keepdim=True)) * alpha
        gate_a, gate_b = torch.sigmoid(self.grep_linear(q).view(b, self.num_heads, n, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, N, 1]
        weights = weights + gate * position_bias.unsqueeze(0)
        out = torch.softmax(weights, dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class BEATsLayer(nn.Module):
    """Post-norm transformer layer with DeepNorm residual scaling."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(F.gelu(self.fc1(x))))


class BEATsEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.pos_conv = nn.Sequential(_WeightNormConv1d(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups))
        self.layers = nn.ModuleList(BEATsLayer(cfg) for _ in range(cfg.encoder_layers))
        for layer in self.layers[1:]:  # one relative-position table, shared (as in BEATs)
            layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim, eps=cfg.layer_norm_eps)
        self.same_pad = 1 if cfg.conv_pos % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.pos_conv(x.transpose(1, 2))
        if self.same_pad:
            conv = conv[:, :, : -self.same_pad]
        x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
        bias = self.layers[0].self_attn.position_bias(x.shape[1])
        for layer in self.layers:
            x = layer(x, bias)
        return x


class BEATs(nn.Module):
    """fbank [N, frames, mel] -> features [N, (frames/16) * (mel/16), encoder_embed_dim]."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.encoder = BEATsEncoder(cfg)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(fbank.unsqueeze(1))
        x = self.layer_norm(x.flatten(2).transpose(1, 2))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)


class BeatsAudioEncoder(nn.Module):
    """Holds BEATs under `.model`, as CREMA's LAVIS `BeatsEncoder` does (checkpoint key prefix)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.model = BEATs(cfg)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.model(fbank)


# BEATs checkpoint `cfg` entries that must agree with AudioConfig (the rest are training settings).
BEATS_CFG_FIELDS = ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                    "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups",
                    "num_buckets", "max_distance", "deep_norm", "gru_rel_pos")

"""CREMA's audio features in torch: kaldi fbank as `torchaudio.compliance.kaldi.fbank` computes it.

torchaudio cannot be installed beside torch 2.13 (each torchaudio release pins its torch), so its
fbank is written out here with the defaults CREMA's BEATs processor uses: 25 ms povey windows every
10 ms, DC offset removed, pre-emphasis 0.97, 512-point power spectrum, 128 triangular mel bins
from 20 Hz to Nyquist, log with float32 epsilon floor, no dither. The runtime computes the same
with kaldi-native-fbank; tests/test_audio.py compares the two.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582


def _mel(f):
    return 1127.0 * torch.log(1.0 + f / 700.0)


def mel_banks(num_bins: int, padded: int, sample_rate: float, low: float = 20.0, high: float = 0.0) -> torch.Tensor:
    """[num_bins, padded // 2 + 1] triangular filters on the mel scale (kaldi's, last FFT bin zero)."""
    if high <= 0:
        high += sample_rate / 2
    mel_low, mel_high = 1127.0 * math.log(1 + low / 700), 1127.0 * math.log(1 + high / 700)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / padded * torch.arange(padded // 2, dtype=torch.float32))[None, :]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    return F.pad(torch.clamp(torch.minimum(up, down), min=0.0), (0, 1))


def kaldi_fbank(waveform: torch.Tensor, num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """waveform [N] (already scaled by 2^15) -> log mel energies [frames, num_mel_bins]."""
    size, shift, padded = int(sample_rate * 0.025), int(sample_rate * 0.010), 512
    if waveform.numel() < size:
        return torch.empty(0, num_mel_bins)
    frames = 1 + (waveform.numel() - size) // shift
    x = waveform.as_strided((frames, size), (shift, 1))
    x = x - x.mean(dim=1, keepdim=True)
    x = x - 0.97 * F.pad(x.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    window = torch.hann_window(size, periodic=False, dtype=x.dtype).pow(0.85)
    x = F.pad(x * window, (0, padded - size))
    power = torch.fft.rfft(x).abs().pow(2.0)
    energies = power @ mel_banks(num_mel_bins, padded, sample_rate).T
    return torch.clamp(energies, min=torch.finfo(x.dtype).eps).log()


def fbank_clips(waveform: torch.Tensor, num_clips: int = 2, clip_frames: int = 512,
                num_mel_bins: int = 128) -> torch.Tensor:
    """Mono 16 kHz waveform in [-1, 1] -> normalised fbank clips [num_clips, clip_frames, mel].

    As CREMA's BEATs processor in training mode: scale by 2^15, fbank, normalise, zero-pad or cut
    to num_clips * clip_frames frames, split into clips.
    """
    fbank = kaldi_fbank(waveform.float() * 2 ** 15, num_mel_bins)
    fbank = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
    total = num_clips * clip_frames
    fbank = F.pad(fbank, (0, 0, 0, max(0, total - fbank.shape[0])))[:total]
    return fbank.reshape(num_clips, clip_frames, num_mel_bins)

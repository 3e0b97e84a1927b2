"""Audio for CREMA's BEATs path, torch-free: file or bytes -> normalised fbank clips.

read_audio: soundfile decodes (WAV, FLAC, OGG), channels are averaged to mono and the signal is
resampled to 16 kHz with soxr. audio_clips: kaldi fbank (kaldi-native-fbank, with the options of
`torchaudio.compliance.kaldi.fbank` that CREMA uses), normalised (x - 15.41663) / (2 * 6.55582),
zero-padded or cut to `num_clips` clips of `clip_frames` frames (CREMA's training-mode layout: a
fixed shape for every request). Checked against reference/audio.py in tests/test_audio.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582
MIN_SAMPLES = 400  # one 25 ms window at 16 kHz


class AudioError(ValueError):
    """Audio that cannot be used; the message names the source and the reason."""


def read_audio(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """A sound file (path) or its bytes -> mono float32 samples in [-1, 1] at 16 kHz."""
    label = name or ("audio bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(f"{label}: empty")
        handle = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise AudioError(f"{label}: no such file")
        handle = str(source)
    try:
        samples, rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{label}: not a sound file soundfile can decode ({e})") from e
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    if len(mono) < MIN_SAMPLES:
        raise AudioError(f"{label}: {len(mono)} samples at 16 kHz, shorter than one 25 ms fbank window")
    if not np.isfinite(mono).all():
        raise AudioError(f"{label}: contains NaN or infinite samples")
    return mono


def kaldi_fbank(samples: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
    """Samples (already scaled by 2^15) -> log mel energies [frames, num_mel_bins] float32."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.dither = 0.0  # torchaudio's default; kaldi's is 1e-5-ish noise
    opts.frame_opts.frame_length_ms, opts.frame_opts.frame_shift_ms = 25.0, 10.0
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = num_mel_bins
    opts.mel_opts.low_freq, opts.mel_opts.high_freq = 20.0, 0.0
    opts.use_energy, opts.use_log_fbank, opts.use_power = False, True, True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SAMPLE_RATE, samples.astype(np.float32).tolist())
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float32).reshape(
        -1, num_mel_bins)


def audio_clips(samples: np.ndarray, num_clips: int = 2, clip_frames: int = 512,
                num_mel_bins: int = 128) -> np.ndarray:
    """Mono 16 kHz samples in [-1, 1] -> normalised fbank clips [num_clips, clip_frames, mel]."""
    fbank = (kaldi_fbank(samples * 2 ** 15, num_mel_bins) - FBANK_MEAN) / (2 * FBANK_STD)
    total = num_clips * clip_frames
    out = np.zeros((total, num_mel_bins), dtype=np.float32)
    out[: min(total, len(fbank))] = fbank[:total]
    return out.reshape(num_clips, clip_frames, num_mel_bins)

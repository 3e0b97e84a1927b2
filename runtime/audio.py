"""Audio for CREMA's BEATs path, torch-free: file or bytes -> normalised fbank clips.

read_audio: soundfile decodes (WAV, FLAC, OGG), channels are averaged to mono and the signal is
resampled to 16 kHz with soxr; with max_samples (runtime/inputs.py passes samples_needed: about
10 s for 2 clips of 512 frames) only the start of the file is decoded, block by block, so a long
or highly compressed file costs no more memory than a short one. read_video_audio: the same from a
video's soundtrack (PyAV: AAC in mp4, PCM in avi, Opus in mkv, ...; the first audio stream, from its
first decoded sample): only the packets up to the same budget are decoded, and the samples go through
the same conversion, channel averaging and resampling, so PCM muxed into a video gives exactly the
fbank of the WAV it came from. audio_clips: kaldi fbank (kaldi-native-fbank, with the options of
`torchaudio.compliance.kaldi.fbank` that CREMA uses), normalised (x - 15.41663) / (2 * 6.55582),
zero-padded or cut to `num_clips` clips of `clip_frames` frames (CREMA's training-mode layout: a
fixed shape for every request). Checked against reference/audio.py in tests/test_audio.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import av
import kaldi_native_fbank as knf
import numpy as np
import soundfile
import soxr

from .files import InputFileError

SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582
MIN_SAMPLES = 400  # one 25 ms window at 16 kHz


class AudioError(InputFileError):
    """Audio that cannot be used; the message names the source and the reason."""


class NoSoundtrack(AudioError):
    """A video without an audio stream."""


MAX_RATE = 768_000  # Hz; the highest rate audio hardware records (refuses absurd headers)
MARGIN_SECONDS = 0.25  # read past what fbank needs, so resampling the part equals resampling the whole
BLOCK_SAMPLES = 1 << 20  # samples per block read (all channels together): 4 MB of float32


def samples_needed(num_clips: int, clip_frames: int) -> int:
    """16 kHz samples that fill num_clips * clip_frames fbank frames (10 ms shift, one 25 ms window)."""
    return (num_clips * clip_frames - 1) * 160 + MIN_SAMPLES


def _opened(source: str | Path | bytes, name: str | None, bytes_label: str) -> tuple[str, io.BytesIO | str]:
    """(how errors name the input, what soundfile/PyAV open): bytes or an existing file's path."""
    label = name or (bytes_label if isinstance(source, (bytes, bytearray)) else str(source))
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(f"{label}: empty")
        return label, io.BytesIO(source)
    if not Path(source).is_file():
        raise AudioError(f"{label}: no such file")
    return label, str(source)


def read_audio(source: str | Path | bytes, name: str | None = None, max_samples: int | None = None) -> np.ndarray:
    """A sound file (path) or its bytes -> mono float32 samples in [-1, 1] at 16 kHz.

    max_samples: decode only the start of the file that gives these many 16 kHz samples (plus
    MARGIN_SECONDS, so they equal the first max_samples of the whole file's resampling); None: all.
    """
    label, handle = _opened(source, name, "audio bytes")
    try:
        with soundfile.SoundFile(handle) as f:
            rate = f.samplerate
            _check_rate(rate, label)
            mono = _read_mono(f, _source_frames(rate, max_samples))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:  # LibsndfileError names our BytesIO
        raise AudioError(f"{label}: not a sound file soundfile can decode "
                         f"({getattr(e, 'error_string', e)})") from e
    return _to_16k(mono, rate, max_samples, label)


def _check_rate(rate: int, label: str) -> None:
    if not 0 < rate <= MAX_RATE:
        raise AudioError(f"{label}: sample rate {rate} Hz, expected 1 to {MAX_RATE} Hz")


def _source_frames(rate: int, max_samples: int | None) -> int:
    """Frames at `rate` that give max_samples 16 kHz samples plus the resampler's margin; -1: all."""
    return -1 if max_samples is None else -(-max_samples * rate // SAMPLE_RATE) + int(rate * MARGIN_SECONDS)


def _to_16k(mono: np.ndarray, rate: int, max_samples: int | None, label: str) -> np.ndarray:
    """Mono float32 samples at `rate` -> the first max_samples (None: all) at 16 kHz, checked."""
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    if max_samples is not None:
        mono = mono[:max_samples]
    if len(mono) < MIN_SAMPLES:
        raise AudioError(f"{label}: {len(mono)} samples at 16 kHz, shorter than one 25 ms fbank window")
    if not np.isfinite(mono).all():
        raise AudioError(f"{label}: contains NaN or infinite samples")
    return mono


def read_video_audio(source: str | Path | bytes, name: str | None = None,
                     max_samples: int | None = None) -> np.ndarray:
    """A video file's (path or bytes) first audio stream -> mono float32 samples at 16 kHz, as read_audio
    gives them for a sound file (max_samples: the same budget). No audio stream: NoSoundtrack."""
    label, handle = _opened(source, name, "video bytes")
    try:
        with av.open(handle, "r") as container:
            if not container.streams.audio:
                raise NoSoundtrack(f"{label}: no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            _check_rate(rate, label)
            mono = _decode_mono(container, stream, _source_frames(rate, max_samples), label)
    except av.FFmpegError as e:
        raise AudioError(f"{label}: no soundtrack FFmpeg can decode ({e.strerror or e})") from e
    return _to_16k(mono, rate, max_samples, label)


# decoded sample format -> the scale soundfile (libsndfile) applies to the same PCM when it reads floats
_PCM_SCALE = {np.dtype(np.int16): 1 / 0x8000, np.dtype(np.int32): 1 / 0x80000000, np.dtype(np.uint8): 1 / 0x80}


def _decode_mono(container, stream, frames: int, label: str) -> np.ndarray:
    """Decode `stream` until `frames` frames (-1: all), channels averaged -> [n] float32. Conversion and
    averaging are read_audio's (float32 [n, channels], PCM scaled as libsndfile does, mean over axis 1),
    so the same PCM in a WAV and in a video gives the same samples."""
    blocks, total, rate = [], 0, stream.codec_context.sample_rate
    for frame in container.decode(stream):
        if frame.sample_rate != rate:
            raise AudioError(f"{label}: the soundtrack changes sample rate ({rate} -> {frame.sample_rate} Hz)")
        x = frame.to_ndarray()
        channels = len(frame.layout.channels)
        x = x.T if frame.format.is_planar else x.reshape(-1, channels)  # -> [n, channels]
        pcm = x.dtype
        x = np.array(x, dtype=np.float32, order="C")  # a copy: the frame's buffer is left alone
        if pcm == np.uint8:  # unsigned 8-bit PCM is centred on 128
            x -= 128
        if pcm in _PCM_SCALE:
            x *= np.float32(_PCM_SCALE[pcm])
        blocks.append(x.mean(axis=1))
        total += len(x)
        if 0 <= frames <= total:
            break
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return mono if frames < 0 else mono[:frames]


def _read_mono(f: soundfile.SoundFile, frames: int) -> np.ndarray:
    """Up to `frames` frames (-1: all) from an open file, channels averaged block by block [n] float32."""
    blocksize = max(1, BLOCK_SAMPLES // f.channels)
    blocks = [b.mean(axis=1) for b in f.blocks(blocksize, frames=frames, dtype="float32", always_2d=True)]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


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

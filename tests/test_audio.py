"""Audio: the torch-free fbank (kaldi-native-fbank) against the reference's torchaudio-equivalent."""
import io

import numpy as np
import pytest
import soundfile
import torch

from reference.audio import fbank_clips, kaldi_fbank as reference_fbank
from runtime.audio import AudioError, audio_clips, kaldi_fbank, read_audio, samples_needed


def _signal(seconds=1.3, rate=16000, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t * (1 + t))
            + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_fbank_matches_the_reference():
    x = _signal()
    ours = kaldi_fbank(x * 2 ** 15)
    ref = reference_fbank(torch.from_numpy(x) * 2 ** 15).numpy()
    assert ours.shape == ref.shape == (1 + (len(x) - 400) // 160, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


def test_a_pure_tone_peaks_in_its_mel_bin():
    t = np.arange(16000) / 16000
    fbank = kaldi_fbank(0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32) * 2 ** 15)
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    centers = mel(20) + (np.arange(1, 129)) * (mel(8000) - mel(20)) / 129
    expected = int(np.argmin(np.abs(centers - mel(1000))))
    assert set(np.argmax(fbank[5:-5], axis=1)) <= {expected - 1, expected, expected + 1}


def test_clips_match_the_reference_and_pad_or_cut():
    x = _signal(seconds=3.0)
    ours = audio_clips(x, num_clips=2, clip_frames=128)
    ref = fbank_clips(torch.from_numpy(x), num_clips=2, clip_frames=128).numpy()
    assert ours.shape == (2, 128, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    short = audio_clips(_signal(seconds=0.5), num_clips=2, clip_frames=64)
    assert np.all(short[1, -10:] == 0), "short audio is zero-padded after normalisation"


def _wav(samples, rate, subtype="PCM_16"):
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_read_audio_mono_and_resampled(tmp_path):
    x = _signal(seconds=1.0, rate=44100)
    stereo = np.stack([x, x * 0.5], axis=1)
    mono = read_audio(_wav(stereo, 44100))
    assert mono.dtype == np.float32 and abs(len(mono) - 16000) <= 2
    path = tmp_path / "a.wav"
    path.write_bytes(_wav(_signal(), 16000))
    np.testing.assert_allclose(read_audio(path), _signal(), atol=1e-4)  # 16-bit quantisation


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"RIFF....WAVEfmt garbage" * 3, "not a sound file"),
    (None, "shorter than one 25 ms"),
])
def test_bad_audio(content, message):
    if content is None:
        content = _wav(np.zeros(100, np.float32), 16000)
    with pytest.raises(AudioError, match=message):
        read_audio(content)


def test_silent_audio_is_valid_and_flat():
    clips = audio_clips(read_audio(_wav(np.zeros(16000, np.float32), 16000)), num_clips=1, clip_frames=64)
    assert np.isfinite(clips).all() and np.ptp(clips[0, :50]) == 0


@pytest.mark.parametrize("rate, channels, fmt", [(44100, 2, "WAV"), (48000, 1, "OGG"), (22050, 3, "FLAC"),
                                                 (16000, 1, "WAV")])
def test_reading_only_what_fbank_uses_equals_the_whole_file(tmp_path, rate, channels, fmt):
    """max_samples decodes the start of the file only; the samples equal the whole file's resampling."""
    x = np.stack([_signal(seconds=4.0, rate=rate, seed=c) for c in range(channels)], axis=1) * 0.5
    path = tmp_path / f"a.{fmt.lower()}"
    if fmt == "OGG":
        with soundfile.SoundFile(path, "w", rate, channels, format="OGG", subtype="VORBIS") as f:
            for block in np.array_split(x, 64):  # libsndfile's Vorbis encoder dislikes large writes
                f.write(block)
    else:
        soundfile.write(path, x, rate, format=fmt)
    whole = read_audio(path)
    needed = samples_needed(2, 64)  # the tiny preset: 2 clips of 64 frames, 1.27 s at 16 kHz
    part = read_audio(path, max_samples=needed)
    assert len(part) == needed < len(whole)
    np.testing.assert_array_equal(part, whole[:needed])
    np.testing.assert_array_equal(audio_clips(part, 2, 64), audio_clips(whole, 2, 64))
    assert len(read_audio(path, max_samples=10 ** 9)) == len(whole)  # shorter than asked: all of it


def test_errors_name_audio_bytes_not_a_python_object():
    with pytest.raises(AudioError) as e:
        read_audio(b"RIFF....WAVEfmt garbage" * 3)
    assert str(e.value).startswith("audio bytes: not a sound file") and "BytesIO" not in str(e.value), str(e.value)
    assert "0x" not in str(e.value)


def test_absurd_sample_rates_are_refused(tmp_path):
    path = tmp_path / "fast.wav"
    soundfile.write(path, np.zeros(200_000, np.float32), 2_000_000)  # 0.1 s
    with pytest.raises(AudioError, match="fast.wav: sample rate 2000000 Hz, expected 1 to 768000 Hz"):
        read_audio(path)

"""Audio: the torch-free fbank (kaldi-native-fbank) against the reference's torchaudio-equivalent, and
sound files and videos' soundtracks (written here with soundfile and PyAV) read alike."""
import io

import av
import numpy as np
import pytest
import soundfile
import torch

from reference.audio import fbank_clips, kaldi_fbank as reference_fbank
from runtime.audio import (AudioError, NoSoundtrack, audio_clips, kaldi_fbank, read_audio, read_video_audio,
                           samples_needed)


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


# --- a video's soundtrack ---------------------------------------------------------------------------

# encoder -> (the sample format it is fed, the dtype soundfile reads the WAV's samples as)
SAMPLE_FORMATS = {"pcm_s16le": ("s16", "int16"), "pcm_s24le": ("s32", "int32"), "pcm_u8": ("u8", "int16"),
                  "pcm_f32le": ("flt", "float32"), "aac": ("fltp", "float32"), "libopus": ("s16", "int16")}


def write_av(path, audio_codec=None, wav=None, seconds=1.0, fps=8, size=32, frames=None):
    """A real video file (mpeg4 frames; `frames` [T, H, W, 3] RGB or grey ramps of `seconds`) with
    `wav`'s samples as its soundtrack encoded by `audio_codec` (None: no audio stream)."""
    frames = frames if frames is not None else np.stack(
        [np.full((size, size, 3), 20 * i % 256, np.uint8) for i in range(int(seconds * fps))])
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        if audio_codec is not None:  # every stream before the first packet: the header is written then
            info = soundfile.info(str(wav))
            layout = "mono" if info.channels == 1 else "stereo"
            audio = out.add_stream(audio_codec, rate=info.samplerate, layout=layout)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio_codec is None:
            return path
        form, dtype = SAMPLE_FORMATS[audio_codec]
        data = soundfile.read(str(wav), dtype=dtype, always_2d=True)[0]
        if audio_codec == "pcm_u8":  # the WAV's unsigned 8-bit samples, exactly
            data = ((data.astype(np.int32) >> 8) + 128).astype(np.uint8)
        for start in range(0, len(data), 1024):
            block = data[start:start + 1024]
            block = np.ascontiguousarray(block.T if form.endswith("p") else block.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(block, format=form, layout=layout)
            frame.sample_rate, frame.pts = info.samplerate, start
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


def _sound(seconds, rate, channels):
    return np.stack([_signal(seconds=seconds, rate=rate, seed=c) for c in range(channels)], axis=1) * 0.8


@pytest.mark.parametrize("container, codec, rate, channels, subtype", [
    ("avi", "pcm_s16le", 44100, 2, "PCM_16"), ("mkv", "pcm_s24le", 48000, 1, "PCM_24"),
    ("avi", "pcm_u8", 22050, 1, "PCM_U8"), ("mov", "pcm_f32le", 16000, 2, "FLOAT")])
def test_a_pcm_soundtrack_gives_exactly_the_wav(tmp_path, container, codec, rate, channels, subtype):
    """The same PCM as a WAV and muxed into a video: identical samples and fbank, from a path and from
    bytes; only the budget fbank uses is read, and it equals the start of the whole soundtrack."""
    wav = tmp_path / "a.wav"
    soundfile.write(wav, _sound(3.0, rate, channels), rate, subtype=subtype)
    video = write_av(tmp_path / f"v.{container}", codec, wav, seconds=3.0)
    needed = samples_needed(2, 64)
    want = read_audio(wav, max_samples=needed)
    got = read_video_audio(video, max_samples=needed)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(audio_clips(got, 2, 64), audio_clips(want, 2, 64))
    np.testing.assert_array_equal(read_video_audio(video.read_bytes(), max_samples=needed), want)
    whole = read_video_audio(video)
    assert len(whole) == 48000 > needed
    np.testing.assert_array_equal(whole[:needed], got)


@pytest.mark.parametrize("container, codec, rate, min_snr_db", [("mp4", "aac", 44100, 15), ("mkv", "libopus", 48000, 20)])
def test_a_lossy_soundtrack_is_the_wav_within_the_codec_tolerance(tmp_path, container, codec, rate, min_snr_db):
    """AAC (FFmpeg's native encoder, 128 kbit/s default) and Opus (libopus): aligned with the WAV (the
    encoder delay is undone), waveform SNR >= 15 / 20 dB (measured 20.6 / 26.1) and normalised fbank
    within 0.05 on average (measured 0.02)."""
    wav = tmp_path / "a.wav"
    soundfile.write(wav, _sound(3.0, rate, 2), rate, subtype="PCM_16")
    video = write_av(tmp_path / f"v.{container}", codec, wav, seconds=3.0)
    needed = samples_needed(2, 64)
    want, got = read_audio(wav, max_samples=needed), read_video_audio(video, max_samples=needed)
    assert len(got) == needed
    snr = 10 * np.log10(np.mean(want ** 2) / np.mean((got - want) ** 2))
    assert snr >= min_snr_db, snr
    assert np.abs(audio_clips(got, 2, 64) - audio_clips(want, 2, 64)).mean() <= 0.05


def test_a_video_without_soundtrack_or_not_a_video(tmp_path):
    silent = write_av(tmp_path / "silent.mp4")
    with pytest.raises(NoSoundtrack, match=r"silent.mp4: no audio stream$"):
        read_video_audio(silent)
    with pytest.raises(NoSoundtrack, match=r"^video bytes: no audio stream$"):
        read_video_audio(silent.read_bytes())
    with pytest.raises(AudioError, match=r"^video bytes: no soundtrack FFmpeg can decode"):
        read_video_audio(b"not a video at all" * 10)
    with pytest.raises(AudioError, match=r"^video bytes: empty"):
        read_video_audio(b"")

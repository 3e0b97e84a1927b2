"""The `crema` command as a user runs it (subprocesses)."""
import subprocess
import sys

import numpy as np

from crema.demo import write_clip


def crema(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "crema.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_subcommands():
    out = crema("--help").stdout
    for sub in ("info", "run", "export", "parity", "checkpoint", "demo"):
        assert sub in out


def test_info_flant5xl_matches_published_sizes():
    out = crema("info", "--preset", "flant5xl").stdout
    assert "EVA ViT, 39 blocks" in out and "985,894,528" in out  # ViT-g without its 40th block
    assert "2,849,757,184" in out  # Flan-T5-XL, untied lm_head
    assert "Q-Former (BLIP-2, shared)" in out and "MMQA-depth: LoRA r=64" in out
    assert "LLM input tokens per request" in out


def test_run_answers_about_a_video(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    out = crema("run", "--preset", "tiny", "--video", str(clip), "--question", "What color is the ball?")
    assert "question: What color is the ball?" in out.stdout and "answer:" in out.stdout
    # mcqa with a second visual modality from pre-extracted frames
    depth = tmp_path / "depth.npy"
    np.save(depth, np.zeros((2, 3, 56, 56), np.float32))
    out = crema("run", "--preset", "tiny", "--modalities", "rgb_depth", "--downstream", "mcqa",
                "--video", str(clip), "--visual", f"depth={depth}", "--question", "Which option? A B C D E")
    assert "scores:" in out.stdout


def test_run_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    proc = crema("run", "--preset", "tiny", "--video", str(bad), "--question", "Q?", check=False)
    assert proc.returncode == 2 and "bad.mp4" in proc.stderr and "Traceback" not in proc.stderr
    proc = crema("run", "--preset", "tiny", "--modalities", "rgb_sound", "--video", str(bad), "--question", "Q?",
                 check=False)
    assert proc.returncode == 2 and "unknown modality 'sound'" in proc.stderr
    clip = write_clip(tmp_path / "clip.mp4")
    proc = crema("run", "--preset", "tiny", "--video", str(clip), "--question", " ", check=False)
    assert proc.returncode == 2 and "empty question" in proc.stderr


def test_checkpoint_then_run(tmp_path):
    crema("checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ckpt"))
    clip = write_clip(tmp_path / "clip.mp4")
    a = crema("run", "--checkpoint", str(tmp_path / "ckpt"), "--video", str(clip), "--question", "What?").stdout
    b = crema("run", "--preset", "tiny", "--video", str(clip), "--question", "What?").stdout
    assert a == b


def test_demo(tmp_path):
    """The demo model through ONNX Runtime on a new clip: six questions, answers printed with the truth."""
    out = crema("demo", "--out", str(tmp_path)).stdout
    rows = [line for line in out.splitlines() if line.endswith(" ms)")]
    assert len(rows) == 6 and all(r.split()[-3] in ("correct", "WRONG") for r in rows) and "/6 correct" in out
    assert (tmp_path / "clips" / "clip00000" / "clip.mp4").stat().st_size > 0
    assert (tmp_path / "artifacts" / "manifest.json").is_file()


def test_export_parity_run(tmp_path):
    art = tmp_path / "art"
    out = crema("export", "--preset", "tiny", "--out", str(art), "--quiet").stdout
    assert "wrote" in out and (art / "manifest.json").is_file()
    report = crema("parity", "--artifacts", str(art)).stdout
    assert "parity: PASS" in report and "decoder_step" in report and (art / "parity.json").is_file()
    clip = write_clip(tmp_path / "clip.mp4")
    ort_answer = crema("run", "--artifacts", str(art), "--video", str(clip), "--question", "What?").stdout
    assert "answer:" in ort_answer
    ref_answer = crema("run", "--preset", "tiny", "--video", str(clip), "--question", "What?").stdout
    assert ort_answer == ref_answer
    proc = crema("run", "--artifacts", str(tmp_path), "--video", str(clip), "--question", "What?", check=False)
    assert proc.returncode == 2 and "manifest.json: missing" in proc.stderr
    code = ("import sys; from crema.cli import main; "
            f"main(['run', '--artifacts', {str(art)!r}, '--video', {str(clip)!r}, '--question', 'What?']); "
            "assert 'torch' not in sys.modules, 'crema run --artifacts imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_raw_inputs_for_every_modality(tmp_path):
    """video + depth maps + a WAV file: flow, depth, normals and fbank computed; ORT equals the reference."""
    import io

    import soundfile
    clip = write_clip(tmp_path / "clip.mp4", frames=12, size=64)
    np.save(tmp_path / "depth.npy", np.random.default_rng(0).random((12, 64, 64), dtype=np.float32))
    buf = io.BytesIO()
    soundfile.write(buf, np.random.default_rng(1).uniform(-0.5, 0.5, 22050).astype(np.float32), 22050, format="WAV")
    (tmp_path / "a.wav").write_bytes(buf.getvalue())
    mods = ["--modalities", "rgb_depth_flow_norm_audio"]
    crema("export", "--preset", "tiny", *mods, "--out", str(tmp_path / "art"), "--quiet")
    raw = ["--video", str(clip), "--depth", str(tmp_path / "depth.npy"), "--audio", str(tmp_path / "a.wav"),
           "--question", "Which is nearer?"]
    ort_answer = crema("run", "--artifacts", str(tmp_path / "art"), *raw).stdout
    ref_answer = crema("run", "--preset", "tiny", *mods, *raw).stdout
    assert "answer:" in ort_answer and ort_answer == ref_answer
    proc = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(clip), "--question", "Q?", check=False)
    assert proc.returncode == 2 and "depth: give depth maps or a depth model" in proc.stderr


def test_line_breaks_in_a_question_do_not_change_the_answer(tmp_path):
    """The demo model on a new clip: the colour question typed over three lines gets the one-line
    question's (right) answer, from the reference and through ONNX Runtime."""
    from reference.config import preset
    from synthetic.generator import clip_files, read_questions
    from training.demo import demo_data
    data = demo_data(tmp_path / "clips", 1, 1, preset("demo").to_dict())
    q = next(q for q in read_questions(data) if q.qtype == "colour")
    words = q.question.split()
    ragged = f"{' '.join(words[:2])}\n{' '.join(words[2:4])}\n\t{' '.join(words[4:])} "
    files = [f"--{k}={v}" for k, v in clip_files(data / q.clip).items()]
    crema("export", "--preset", "demo", "--out", str(tmp_path / "art"), "--quiet")
    for source in (["--preset", "demo"], ["--artifacts", str(tmp_path / "art")]):
        one_line = crema("run", *source, *files, "--question", q.question).stdout
        assert f"answer:   {q.answer}\n" in one_line
        assert crema("run", *source, *files, "--question", ragged).stdout == one_line


def test_a_dataset_export_builds_its_prompt_from_structured_flags(tmp_path):
    """crema export --dataset nextqa: the config keeps NExT-QA's conventions (mcqa); `crema run --option x5`
    then asks CREMA's NExT-QA prompt, as `--dataset nextqa` on any model does, and the same question
    with the prompt written out by hand gets the same answer."""
    from runtime.datasets import nextqa_prompt
    clip = write_clip(tmp_path / "clip.mp4")
    crema("export", "--preset", "tiny", "--dataset", "nextqa", "--out", str(tmp_path / "art"), "--quiet")
    options = ["it rolls", "it stops", "it jumps", "it spins", "nothing"]
    flags = [x for o in options for x in ("--option", o)]
    out = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(clip), "--question", "What happens?", *flags)
    prompt = nextqa_prompt("What happens?", options)
    assert f"question: {prompt}" in out.stdout and "scores:" in out.stdout  # mcqa: the letters' scores
    by_hand = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(clip), "--question", prompt)
    assert by_hand.stdout == out.stdout
    refused = crema("run", "--artifacts", str(tmp_path / "art"), "--video", str(clip), "--question", "Q?",
                    "--situation", "I sit.", check=False)
    assert refused.returncode == 2 and "situation: nextqa takes options" in refused.stderr

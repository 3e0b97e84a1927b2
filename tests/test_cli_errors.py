"""`crema` refuses what it cannot do: one line `error: ...` on stderr, exit code 2, no traceback; and
no option is silently ignored (subprocesses, as a user runs it)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from crema.demo import write_clip
from test_cli import crema


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-preset export (rgb, concat, 2 frames, oeqa), a checkpoint of the same weights, a clip."""
    root = tmp_path_factory.mktemp("tiny")
    crema("export", "--preset", "tiny", "--out", str(root / "art"), "--quiet")
    crema("checkpoint", "--preset", "tiny", "--out", str(root / "ckpt"))
    write_clip(root / "clip.mp4")
    return root


def refused(proc, *fragments):
    """The run failed as a user error should, and its message holds every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "error: " in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    return proc


def run_art(tiny, *args, question="What?"):
    return crema("run", "--artifacts", str(tiny / "art"), "--video", str(tiny / "clip.mp4"), "--question", question,
                 *args, check=False)


# --- item 10: options are honoured or refused, never ignored ------------------------------------

def test_artifacts_answer_mcqa_when_asked(tiny):
    """--downstream is a request option: the exported oeqa model answers as multiple choice."""
    got = run_art(tiny, "--downstream", "mcqa")
    assert got.returncode == 0, got.stderr
    assert "scores:" in got.stdout and got.stdout.splitlines()[1].split()[-1] in "ABCDE"
    ref = crema("run", "--preset", "tiny", "--downstream", "mcqa", "--video", str(tiny / "clip.mp4"),
                "--question", "What?").stdout
    assert got.stdout.splitlines()[1] == ref.splitlines()[1]  # the same letter as the reference


@pytest.mark.parametrize("args, message", [
    (["--modalities", "rgb_depth"], "--modalities rgb_depth: these artifacts were exported with rgb; fixed at export"),
    (["--frames", "4"], "--frames 4: these artifacts were exported with 2; fixed at export"),
    (["--task", "espresso"], "--task espresso: these artifacts were exported with concat; fixed at export"),
    (["--preset", "tiny"], "--preset: the model comes from --artifacts (exported from preset=tiny, seed=0)"),
    (["--checkpoint", "ckpt"], "--checkpoint: the model comes from --artifacts"),
    (["--seed", "3"], "--seed: the model comes from --artifacts"),
])
def test_artifacts_refuse_what_export_fixed(tiny, args, message):
    refused(run_art(tiny, *args), message)


def test_artifacts_accept_the_exported_values(tiny):
    got = run_art(tiny, "--modalities", "rgb", "--frames", "2", "--task", "concat")
    assert got.returncode == 0 and "answer:" in got.stdout, got.stderr


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--precision", "int8"], "--precision: an ONNX Runtime option, only with --artifacts"),
    (["--preset", "tiny", "--threads", "2"], "--threads: an ONNX Runtime option, only with --artifacts"),
    (["--preset", "demo", "--seed", "3"], "--seed: only with a preset's random weights"),
    (["--preset", "tiny", "--crema-ckpt", "x.pth"], "--crema-ckpt: only with --blip2-dir"),
    ([], "give exactly one of --preset, --checkpoint, --blip2-dir"),
])
def test_reference_refuses_options_it_would_ignore(tiny, args, message):
    refused(crema("run", *args, "--video", str(tiny / "clip.mp4"), "--question", "What?", check=False), message)


# --- item 11: errors, not tracebacks -----------------------------------------------------------

@pytest.mark.parametrize("source", ["artifacts", "reference", "ask"])
def test_invalid_utf8_in_the_question(tiny, source):
    """argv carries the undecodable byte as a surrogate escape: refused, naming its byte offset."""
    question = b"What\xff is it?"
    args = {"artifacts": ["run", "--artifacts", str(tiny / "art")], "reference": ["run", "--preset", "tiny"],
            "ask": ["ask", "--url", "127.0.0.1:1"]}[source]
    refused(crema(*args, "--video", str(tiny / "clip.mp4"), "--question", question, check=False),
            "question: not valid UTF-8 at byte 4")


def _truncate(path, keep=1000):
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_checkpoint_names_the_file(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (ckpt / name).write_bytes((tiny / "ckpt" / name).read_bytes())
    _truncate(ckpt / "model.safetensors")
    proc = crema("run", "--checkpoint", str(ckpt), "--video", str(tiny / "clip.mp4"), "--question", "What?",
                 check=False)
    refused(proc, f"{ckpt / 'model.safetensors'}: not a readable safetensors file, truncated or corrupt")


def test_truncated_blip2_weights_name_the_file(tiny, tmp_path):
    """A HF BLIP-2 directory (tiny shapes) whose safetensors shard was cut short."""
    from reference.config import preset
    cfg = preset("tiny")
    v, q, t = cfg.vision, cfg.qformer, cfg.t5
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({
        "num_query_tokens": cfg.num_query_token,
        "vision_config": {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "intermediate_size": v.mlp_dim,
                          "image_size": v.image_size, "patch_size": v.patch_size},
        "qformer_config": {"hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
                           "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size},
        "text_config": {"d_model": t.d_model, "d_kv": t.d_kv, "d_ff": t.d_ff, "num_layers": t.num_layers,
                        "num_heads": t.num_heads, "vocab_size": t.vocab_size}}))
    (blip2 / "tokenizer.json").write_bytes((tiny / "ckpt" / "tokenizer.json").read_bytes())
    shard = blip2 / "model-00001-of-00001.safetensors"
    shard.write_bytes((tiny / "ckpt" / "model.safetensors").read_bytes())
    _truncate(shard, keep=len(shard.read_bytes()) - 10)
    proc = crema("run", "--blip2-dir", str(blip2), "--video", str(tiny / "clip.mp4"), "--question", "What?",
                 check=False)
    refused(proc, f"{shard}: not a readable safetensors file, truncated or corrupt")


def test_ask_checks_its_files_before_sending(tiny, tmp_path):
    """No server is needed: the files are refused before any connection."""
    np.savez(tmp_path / "wrong.npz", points=np.zeros((4, 3)))
    ask = ("ask", "--url", "127.0.0.1:1", "--question", "What?")
    clip = str(tiny / "clip.mp4")
    refused(crema(*ask, "--video", clip, "--pc", str(tmp_path / "wrong.npz"), check=False),
            "wrong.npz: no 'feat' or 'coords' array")
    refused(crema(*ask, "--video", str(tmp_path), check=False), f"video: {tmp_path}: a folder, expected a file")
    refused(crema(*ask, "--video", str(tmp_path / "nope.mp4"), check=False), "video: ", "nope.mp4: no such file")
    refused(crema(*ask, "--audio", str(tmp_path), "--video", clip, check=False), "audio: ", "a folder")


@pytest.mark.parametrize("command", [["run", "--preset", "tiny"], ["ask"]])
def test_visual_needs_modality_equals_file(tiny, command):
    proc = crema(*command, "--visual", "frames.npy", "--video", str(tiny / "clip.mp4"), "--question", "What?",
                 check=False)
    refused(proc, "argument --visual: expected MODALITY=FILE", "'frames.npy'")


def test_ask_loads_no_heavy_package(tiny, tmp_path):
    """`crema ask` (here refused for a missing file) imports neither torch, ONNX Runtime nor OpenCV."""
    code = ("import sys; from crema.cli import main; "
            f"rc = main(['ask', '--video', {str(tmp_path / 'nope.mp4')!r}, '--question', 'What?']); "
            "heavy = [m for m in ('torch', 'onnxruntime', 'cv2', 'transformers') if m in sys.modules]; "
            "assert rc == 2 and not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- item 12: the question as the model reads it -----------------------------------------------

def test_clean_question():
    from runtime.text import QuestionError, clean_question
    assert clean_question("What color\nis the\tmoving  shape? \n") == "What color is the moving shape?"
    assert clean_question("Qu'est-ce que c'est ?".encode()) == "Qu'est-ce que c'est ?"
    assert clean_question("caf\u00e9".encode()) == "café"
    for raw, message in ((b"What\xff?", "question: not valid UTF-8 at byte 4"),
                         ("caf\u00e9\udcff?", "question: not valid UTF-8 at byte 5"),  # argv's surrogate escape
                         ("a\ud800b", "question: not valid UTF-8 at character 1"),
                         (b"\xc3", "question: not valid UTF-8 at byte 0"),
                         (" \n\t", "question: empty"), (b"", "question: empty")):
        with pytest.raises(QuestionError, match=message):
            clean_question(raw)


def test_both_tokenizers_collapse_whitespace(tmp_path):
    """Runtime and reference read a question with line breaks, tabs and runs of spaces as the one-line
    question (the frame prefixes stay verbatim)."""
    from reference.tokenizer import TextTokenizer
    from runtime.text import QuestionTokenizer
    reference = TextTokenizer.preset()
    runtime = QuestionTokenizer(reference.save(tmp_path), 32)
    one_line, ragged = "What color is the moving shape?", "  What color\nis the\r\n\tmoving   shape?\n"
    ref_ids, _ = reference.encode([one_line, ragged], 32)
    ort_ids, _ = runtime.encode([one_line, ragged])
    assert (ref_ids[0] == ref_ids[1]).all() and (ort_ids == ref_ids).all()

"""bench/bench_gpu.py runs where no GPU is: it says why it skips, and its CPU mode measures the same
paths (PyTorch eager fp32/bf16, ONNX Runtime FP32/FP16 with the device-resident decoder) on the tiny
preset, so the script the GPU machine runs is known to work."""
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def test_without_a_gpu_it_says_why_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        return  # a GPU machine runs the real benchmark instead
    out = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "t.md")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "skipped: no CUDA GPU" in out.stdout and not (tmp_path / "t.md").exists()


def test_cpu_mode_measures_every_path(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--cpu", "--repeat", "1", "--tokens", "3", "--out",
                          str(tmp_path / "t.md")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "t.md").read_text()
    for row in ("PyTorch eager fp32", "PyTorch eager bf16", "ONNX Runtime cpu fp32", "ONNX Runtime cpu fp16"):
        assert f"| {row} |" in table, table
    assert "Machine: " in table and "Floor: copy bandwidth" in table and (tmp_path / "t.json").is_file()

"""The machine a benchmark ran on, detected at run time, for its table.

Machines of one kind differ (AVX2-only vs AVX-512 VNNI/BF16: INT8 gains differ several-fold), so
every table records what it was measured on instead of a fixed text.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "sha_ni", "avx_vnni")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
        model = m.group(1).strip()
    if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
        flags = set(m.group(1).split())
    return model, flags


def _gpu() -> str:
    """'GPU <name>, driver <version>, CUDA <version>' per visible GPU, or 'no GPU'."""
    try:
        import torch  # lazily: the serving side runs without torch
    except ImportError:
        return "GPU unknown (no torch)"
    if not torch.cuda.is_available():
        return "no GPU"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"GPU {' + '.join(names)}, driver {_driver()}, CUDA {torch.version.cuda}"


def _driver() -> str:
    """The NVIDIA driver version, or '?'."""
    try:
        if m := re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text()):
            return m.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            pass
    return "?"


def describe(gpu: bool = True) -> str:
    """One line: CPU model, usable cores, which of FLAGS are present/absent, and the GPU (when torch
    sees one). gpu=False leaves the GPU out (no torch import)."""
    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    present = [f for f in FLAGS if f in flags]
    absent = [f for f in FLAGS if f not in flags]
    line = f"{model}, {cores} cores; {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"
    if present and absent:
        line += f" (no {' '.join(absent)})"
    return line + (f"; {_gpu()}" if gpu else "")


if __name__ == "__main__":
    print(describe())

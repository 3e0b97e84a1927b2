"""`crema serve`: start a Triton server on a generated repository, wait until it is ready, stop it cleanly.

The server binary is the Triton 2.51 bundled in the `nvidia-pytriton` wheel (../shared notes:
triton-on-cpu.md) unless a `tritonserver` binary is given. The wheel's python backend needs a
backend folder holding the backend and the stub for this Python, the wheel's libraries on
LD_LIBRARY_PATH, and this environment's `python3` first on PATH (the stub imports numpy, onnxruntime
and our packages from it). Every endpoint binds loopback unless told otherwise.

Supervision: Triton 2.51's python backend does not restart a model's stub process that died (the
model stays READY and answers every request with "Stub process ... is not healthy"). The server
runs in explicit model-control mode, and a watchdog thread reloads (unload + load) any model whose
python process is gone; the ensemble is reloaded with it. Linux only (reads /proc).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .layout import MODEL_INFO


class ServerError(RuntimeError):
    """The server could not be found, started, or did not become ready; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bundled_server() -> Path:
    """The nvidia-pytriton wheel's tritonserver folder (bin/, backends/, caches/, python_backend_stubs/)."""
    try:
        import pytriton
    except ImportError as e:
        raise ServerError("no Triton server: install the `triton` extra (nvidia-pytriton) or pass "
                          "--tritonserver PATH") from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"{root}: the nvidia-pytriton wheel has no tritonserver binary")
    return root


def backend_dir(root: Path, folder: Path) -> Path:
    """A backend folder for the wheel's server: python/ = its python backend + the stub for this Python."""
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"{stub}: the wheel has no python backend stub for this Python")
    target = folder / "python"
    shutil.copytree(root / "backends" / "python", target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, target / stub.name)
    return folder


@dataclass
class Endpoints:
    host: str
    http: int
    grpc: int
    metrics: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"


def python_stubs(server_pid: int) -> dict[int, str]:
    """pid -> model name of every python-backend stub process the server started."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == server_pid and cmd[0].endswith(b"triton_python_backend_stub") and len(cmd) > 1:
            out[int(proc.name)] = Path(cmd[1].decode()).parent.parent.name  # REPO/<model>/1/model.py
    return out


class Watchdog(threading.Thread):
    """Reloads a model whose python stub process died; `restarts` lists (model, seconds to reload)."""

    def __init__(self, server: "TritonServer", interval: float = 0.5, log=print):
        super().__init__(daemon=True, name="crema-triton-watchdog")
        self.server, self.interval, self.log = server, interval, log
        self.restarts: list[tuple[str, float]] = []
        self.halt = threading.Event()
        self.expected = self.counts()

    def counts(self) -> Counter:
        return Counter(python_stubs(self.server.process.pid).values())

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            now = self.counts()
            for model, n in self.expected.items():
                if now.get(model, 0) < n and not self.halt.is_set():
                    start = time.monotonic()
                    try:
                        self.server.reload(model)
                    except OSError as e:
                        self.log(f"watchdog: reloading {model} failed: {e}")
                        continue
                    self.restarts.append((model, time.monotonic() - start))
                    self.log(f"watchdog: {model}'s python process died; reloaded in {self.restarts[-1][1]:.1f} s")


class TritonServer:
    """with TritonServer(repo) as server: ... (server.endpoints.http_url); ports 0 = free ports."""

    def __init__(self, repo: str | Path, binary: str | Path | None = None, host: str = "127.0.0.1",
                 http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0, cache_mb: int = 256,
                 log: str | Path | None = None, supervise: bool = True):
        self.repo = Path(repo).resolve()
        if not (self.repo / "crema" / "config.pbtxt").is_file():
            raise ServerError(f"{self.repo}: not a model repository (write one with `crema triton-repo`)")
        self.binary = Path(binary) if binary else None
        info = self.repo / MODEL_INFO
        self.info = json.loads(info.read_text()) if info.is_file() else {}
        if binary is None and self.info.get("flavour") == "native":
            raise ServerError(f"{self.repo}: a native-flavour repository (onnxruntime_onnx/tensorrt_plan models); "
                              "the pip server has no such backends: serve it with NVIDIA's Triton container "
                              "(docs/triton.md) or pass --tritonserver")
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host),
                                   metrics_port or free_port(host))
        self.cache_mb = cache_mb
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self.supervise = supervise
        self.watchdog: Watchdog | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def command(self, backends: Path | None) -> list[str]:
        e = self.endpoints
        cmd = [str(self.binary), "--model-repository", str(self.repo),
               "--http-address", e.host, "--http-port", str(e.http),
               "--grpc-address", e.host, "--grpc-port", str(e.grpc),
               "--metrics-address", e.host, "--metrics-port", str(e.metrics),
               "--cache-config", f"local,size={self.cache_mb << 20}",
               "--model-control-mode", "explicit", "--load-model", "*",  # explicit: the watchdog reloads
               "--exit-on-error", "true", "--strict-readiness", "true",
               "--exit-timeout-secs", "10"]  # on SIGTERM: in-flight requests finish; idle keep-alive connections do not hold it
        if self.info.get("rate_limit_cores"):  # resources default to the largest any instance asks for
            cmd += ["--rate-limit", "execution_count"]
        if backends is not None:
            cmd += ["--backend-directory", str(backends), "--cache-directory", str(self.binary.parent.parent / "caches")]
        return cmd

    def start(self, timeout: float = 180.0) -> "TritonServer":
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's python3
        backends = None
        if self.binary is None:
            root = bundled_server()
            self.binary = root / "bin" / "tritonserver"
            self._tmp = tempfile.TemporaryDirectory(prefix="crema-triton-")
            backends = backend_dir(root, Path(self._tmp.name))
            libs = root.parent.parent / "nvidia_pytriton.libs"
            env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        if self.log_path is None:
            self.log_path = Path(self._tmp.name if self._tmp else tempfile.mkdtemp(prefix="crema-triton-")) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # Ctrl-C reaches us; we stop it
        self.wait_ready(timeout)
        if self.supervise:
            self.watchdog = Watchdog(self)
            self.watchdog.start()
        return self

    def _post(self, path: str) -> None:
        request = urllib.request.Request(f"http://{self.endpoints.http_url}{path}", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=120):
            pass

    def reload(self, model: str) -> None:
        """Unload and load `model` (new instances, new python processes); ensembles using it follow."""
        self._post(f"/v2/repository/models/{model}/unload")
        self._post(f"/v2/repository/models/{model}/load")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"tritonserver exited with code {self.process.returncode}")
            if self.ready():
                return
            time.sleep(0.5)
        self._fail(f"tritonserver was not ready after {timeout:.0f} s")

    def _fail(self, why: str) -> None:
        tail = self.log_tail()  # before stop() removes a temporary log
        self.stop()
        raise ServerError(f"{why}:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests and unloads), SIGKILL after `timeout`."""
        if self.watchdog is not None:
            self.watchdog.halt.set()
            self.watchdog.join()
            self.watchdog = None
        p, self.process = self.process, None
        code = None if p is None else p.poll()
        if p is not None and code is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                code = p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                code = p.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

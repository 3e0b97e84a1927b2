"""The Triton process behind `crema serve`: started, stopped, asked and told what to load, on
internal ports no client is told about.

The server binary is the Triton 2.51 bundled in the `nvidia-pytriton` wheel (../shared notes:
triton-on-cpu.md) unless a `tritonserver` binary is given. The wheel's python backend needs a
backend folder holding the backend and the stub for this Python, the wheel's libraries on
LD_LIBRARY_PATH, and this environment's `python3` first on PATH (the stub imports numpy, onnxruntime
and our packages from it).

Triton's HTTP and gRPC listen on loopback ports picked at each start, and every API of both (health,
inference, model repository, ...) needs a random per-process key in a request header
(`--http-restricted-api`, `--grpc-restricted-protocol`): only the front (triton_models/front.py) and
the supervisor (triton_models/supervisor.py) hold it. Clients talk to the front. Model control is
explicit so the supervisor can reload a model; no client can. Linux only (reads /proc).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from .cancel import ENV as CANCEL_ENV
from .cancel import make_board_dir
from .layout import MODEL_INFO

KEY_HEADER = "crema-internal-key"
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_HEADER}"  # Triton's gRPC prefixes the restricted-protocol header
RESTRICTED = "health,metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
# what Triton prints on every start of the pip wheel without a GPU: not the reason a start failed
HARMLESS = ("NVML", "DCGM", "pinned memory", "CUDA driver", "cuda_memory_manager", "GPU metrics",
            "Collecting CPU metrics", "failed to load 'cuda'")


class ServerError(RuntimeError):
    """The server could not be found, started, or did not become ready; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, what: str) -> None:
    """A clear error now instead of a server that fails to start later."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"{what} port {port} on {host} is not free ({e.strerror}): another server is "
                              f"using it; choose another with --{what.lower()}-port") from e


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


class Stub(NamedTuple):
    model: str
    region: str  # its shared-memory region in /dev/shm


def python_stubs(server_pid: int) -> dict[int, Stub]:
    """pid -> (model, shared-memory region) of every python-backend stub process the server started."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == server_pid and cmd[0].endswith(b"triton_python_backend_stub") and len(cmd) > 2:
            # argv: stub REPO/<model>/1/model.py <shm region> ...
            out[int(proc.name)] = Stub(Path(cmd[1].decode()).parent.parent.name, cmd[2].decode())
    return out


def remove_regions(regions) -> None:
    """Unlink python-backend shared-memory regions a dead process left in /dev/shm (RAM)."""
    for region in regions:
        if region.startswith("triton_python_backend_shm_region_") and "/" not in region:
            try:
                os.unlink(f"/dev/shm/{region}")
            except FileNotFoundError:
                pass


def exit_reason(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class TritonServer:
    """One Triton process over a repository: start() (internal ports picked anew), stop(), and the
    key-carrying calls the supervisor needs (ready, index, load, unload)."""

    def __init__(self, repo: str | Path, binary: str | Path | None = None, metrics_host: str = "127.0.0.1",
                 metrics_port: int = 0, log: str | Path | None = None):
        self.repo = Path(repo).resolve()
        if not (self.repo / "crema" / "config.pbtxt").is_file():
            raise ServerError(f"{self.repo}: not a model repository (write one with `crema triton-repo`)")
        info = self.repo / MODEL_INFO
        self.info = json.loads(info.read_text()) if info.is_file() else {}
        if binary is None and self.info.get("flavour") == "native":
            raise ServerError(f"{self.repo}: a native-flavour repository (onnxruntime_onnx/tensorrt_plan models); "
                              "the pip server has no such backends: serve it with NVIDIA's Triton container "
                              "(docs/triton.md) or pass --tritonserver")
        self.binary = Path(binary) if binary else None
        self.key = secrets.token_urlsafe(24)
        self.metrics_host, self.metrics_port = metrics_host, metrics_port or free_port(metrics_host)
        self.http_port = self.grpc_port = 0
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._env: dict | None = None
        self._backends: Path | None = None
        self.cancel_dir: Path | None = None  # the cancellation board's (triton_models/cancel.py)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        cmd = [str(self.binary), "--model-repository", str(self.repo),
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--metrics-address", self.metrics_host, "--metrics-port", str(self.metrics_port),
               f"--http-restricted-api={RESTRICTED}:{KEY_HEADER}={self.key}",
               f"--grpc-restricted-protocol={RESTRICTED}:{KEY_HEADER}={self.key}",
               "--model-control-mode", "explicit", "--load-model", "*",  # explicit: the supervisor reloads
               "--exit-on-error", "true", "--strict-readiness", "true",
               "--exit-timeout-secs", "10"]  # on SIGTERM: in-flight requests finish; idle keep-alive connections do not hold it
        if self.info.get("rate_limit_cores"):  # resources default to the largest any instance asks for
            cmd += ["--rate-limit", "execution_count"]
        if self._backends is not None:
            cmd += ["--backend-directory", str(self._backends)]
        return cmd

    def _prepare(self) -> None:
        """Once: the binary, its environment, a backend folder, the log file."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's python3
        if self.binary is None:
            root = bundled_server()
            self.binary = root / "bin" / "tritonserver"
            self._tmp = tempfile.TemporaryDirectory(prefix="crema-triton-")
            self._backends = backend_dir(root, Path(self._tmp.name))
            libs = root.parent.parent / "nvidia_pytriton.libs"
            env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        if self.log_path is None:
            folder = self._tmp.name if self._tmp else tempfile.mkdtemp(prefix="crema-triton-")
            self.log_path = Path(folder) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cancel_dir = make_board_dir()
        env[CANCEL_ENV] = str(self.cancel_dir)
        self._env = env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Start (or restart) the process on fresh internal ports and wait until it is ready."""
        if self._env is None:
            self._prepare()
        self.http_port, self.grpc_port = free_port(), free_port()
        with open(self.log_path, "ab") as log:  # a restart appends: the log keeps why the last one died
            # umask 077: the python backend's shared-memory regions (request tensors) readable by this user only
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                            start_new_session=True, umask=0o077)  # Ctrl-C reaches us; we stop it
        self.wait_ready(timeout)
        return self

    def call(self, method: str, path: str, timeout: float = 120.0) -> tuple[int, bytes]:
        """(status, body) of a key-carrying HTTP call to the internal endpoint."""
        request = urllib.request.Request(f"http://{self.http_url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None, headers={KEY_HEADER: self.key})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _post(self, path: str) -> None:
        status, body = self.call("POST", path)
        if status != 200:
            raise OSError(f"{path}: HTTP {status} {body[:300].decode(errors='replace')}")

    def load(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/load")

    def reload(self, model: str) -> None:
        """Unload and load `model` (new instances, new python processes); ensembles using it follow."""
        self._post(f"/v2/repository/models/{model}/unload")
        self.load(model)

    def index(self) -> dict[str, str]:
        """model -> state (READY, UNAVAILABLE, LOADING, UNLOADING) of every model in the repository."""
        status, body = self.call("POST", "/v2/repository/index", timeout=10)
        if status != 200:
            raise OSError(f"repository index: HTTP {status}")
        return {m["name"]: m.get("state", "UNAVAILABLE") for m in json.loads(body)}

    def ready(self) -> bool:
        try:
            return self.call("GET", "/v2/health/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"tritonserver stopped during start-up ({exit_reason(self.process.returncode)})")
            if self.ready():
                return
            time.sleep(0.5)
        self._fail(f"tritonserver was not ready after {timeout:.0f} s")

    def _fail(self, why: str) -> None:
        tail = self.log_tail()  # before stop() removes a temporary log
        self.stop()
        raise ServerError(f"{why}; the server log says:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines without the warnings every GPU-less start prints, errors first."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = [line for line in self.log_path.read_text(errors="replace").splitlines()[-200:]
                if not any(h in line for h in HARMLESS)]
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return "\n".join((errors or text)[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests and unloads), SIGKILL after `timeout`; the
        process's exit code (None if it never ran)."""
        p, self.process = self.process, None
        code = None if p is None else p.poll()
        if p is not None and code is not None:  # it died: its python processes may outlive it
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p is not None and code is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                code = p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                code = p.wait()
        return code

    def close(self) -> int | None:
        """stop(), then remove the temporary backend folder (and a temporary log with it)."""
        code = self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self.cancel_dir is not None:
            shutil.rmtree(self.cancel_dir, ignore_errors=True)
            self.cancel_dir = None
        return code

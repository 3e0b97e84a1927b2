"""`crema serve` as one object: Triton on internal ports, its supervisor, and the front clients reach.

    with Service("repo/", http_port=0, grpc_port=0) as service:   # 0: free ports
        CremaClient(service.endpoints.http_url).ask(...)

Public listeners (HTTP, gRPC, metrics) bind `host`, loopback by default. Security and limits:
docs/security.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .contract import Contract
from .front import Front, Limits
from .layout import ENSEMBLE, PREPROCESS
from .repository import validate
from .server import ServerError, TritonServer, check_port_free, free_port
from .supervisor import Supervisor

HEADER_ALLOWANCE = 1 << 20  # JSON header and framing on top of the inputs' bytes


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


def repository_limits(configs: dict, **overrides) -> Limits:
    """Limits whose request size follows the repository's `--max-input-mb` (preprocess's parameter)."""
    param = configs[PREPROCESS].parameters.get("max_input_bytes")
    inputs = int(param.string_value) if param is not None else 64 << 20
    return Limits(**{"max_request_bytes": inputs + HEADER_ALLOWANCE, **overrides})


class Service:
    def __init__(self, repo: str | Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, binary: str | Path | None = None, log_file: str | Path | None = None,
                 limits: dict | None = None, log=print):
        configs = validate(repo)
        self.stubs = {name: sum(g.count for g in cfg.instance_group) for name, cfg in configs.items()
                      if cfg.backend == "python"}  # one python process per instance
        self.limits = repository_limits(configs, **(limits or {}))
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host),
                                   metrics_port or free_port(host))
        self.server = TritonServer(repo, binary=binary, metrics_host=host, metrics_port=self.endpoints.metrics,
                                   log=log_file)
        self.contract = Contract(configs[ENSEMBLE], self.limits.max_request_bytes)
        self.log = log
        self.supervisor: Supervisor | None = None
        self.front: Front | None = None
        self.front_counts: dict[str, int] = {}

    @property
    def log_path(self) -> Path | None:
        return self.server.log_path

    def start(self, timeout: float = 300.0) -> "Service":
        e = self.endpoints
        for what, port in (("HTTP", e.http), ("gRPC", e.grpc), ("metrics", e.metrics)):
            check_port_free(e.host, port, what)
        self.server.start(timeout)
        try:
            self.supervisor = Supervisor(self.server, self.stubs, on_failure=self._failure, log=self.log)
            self.front = Front(self.server, self.contract, self.limits, e.host, e.http, e.grpc,
                               ready=lambda: (self.supervisor.ready, self.supervisor.not_ready_reason)).start()
            self.supervisor.start()
        except OSError as e:  # a port taken between the check and the bind
            self.stop()
            raise ServerError(f"cannot listen on {e.host}: {e}" if hasattr(e, "host") else str(e)) from e
        except BaseException:
            self.stop()
            raise
        return self

    def _failure(self, reason: str) -> None:
        if self.front is not None:
            self.front.abort_in_flight(reason)

    def stop(self) -> int | None:
        """Stop the supervisor (so nothing restarts), the front, then Triton; Triton's exit code."""
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.front is not None:
            self.front.stop()
            self.front_counts = dict(self.front.counts)
            self.front = None
        return self.server.close()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["Service", "ServerError", "Endpoints"]

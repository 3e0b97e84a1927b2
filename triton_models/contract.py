"""What the `crema` ensemble accepts, read from its config.pbtxt, and the checks the front makes
before Triton sees a request (KServe v2, either protocol).

A request is described as TensorClaims: each input's name, datatype and shape as the client
declared them, and what it actually carries (JSON values counted, or binary bytes). Triton 2.51
allocates an HTTP JSON input's declared shape before comparing it with the data (`[1e9, 64]` and one
value aborted the server with std::bad_alloc), so the front compares them first, and bounds every
declared size by the request limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
            "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": None}


class RequestRejected(ValueError):
    """A request the front refuses; `status` is the HTTP status (gRPC maps it)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorDecl:
    name: str
    datatype: str  # KServe v2 name: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]  # -1: any size

    def shape_ok(self, shape: list[int]) -> bool:
        return len(shape) == len(self.dims) and all(d in (-1, s) for d, s in zip(self.dims, shape))


@dataclass
class TensorClaim:
    name: str
    datatype: str
    shape: list
    values: int | None = None  # JSON/typed values carried
    raw: bytes | memoryview | None = None  # binary content carried


def _datatype(code: int) -> str:
    name = mc.DataType.Name(code)[len("TYPE_"):]
    return "BYTES" if name == "STRING" else name


def bytes_elements(raw: bytes | memoryview) -> int | None:
    """How many length-prefixed elements a BYTES tensor's binary content holds (None: malformed)."""
    i, n, size = 0, 0, len(raw)
    while i < size:
        if i + 4 > size:
            return None
        i += 4 + int.from_bytes(raw[i:i + 4], "little")
        n += 1
    return n if i == size else None


class Contract:
    """The ensemble's inputs and outputs, and `check` for one request's tensors."""

    def __init__(self, config: mc.ModelConfig, max_bytes: int):
        self.model = config.name
        self.inputs = {t.name: TensorDecl(t.name, _datatype(t.data_type), tuple(t.dims)) for t in config.input}
        self.outputs = [t.name for t in config.output]
        self.max_bytes = max_bytes

    def check(self, tensors: list[TensorClaim], outputs: list[str]) -> None:
        if not tensors:
            raise RequestRejected("inputs: none given")
        seen, total = set(), 0
        for t in tensors:
            if t.name in seen:
                raise RequestRejected(f"input {t.name!r}: given twice")
            seen.add(t.name)
            total += self._check_declared(t)
            if total > self.max_bytes:
                raise RequestRejected(f"inputs: {total} bytes declared by their shapes, over this server's limit "
                                      f"of {self.max_bytes}", 413)
            self._check_carried(t)
        for name in outputs:
            if name not in self.outputs:
                raise RequestRejected(f"output {name!r}: the {self.model} model has no such output "
                                      f"(outputs: {', '.join(self.outputs)})")

    def _check_declared(self, t: TensorClaim) -> int:
        """Name, datatype and shape against the config; returns the declared size in bytes."""
        decl = self.inputs.get(t.name) if isinstance(t.name, str) else None
        if decl is None:
            raise RequestRejected(f"input {t.name!r}: the {self.model} model has no such input "
                                  f"(inputs: {', '.join(self.inputs)})")
        if t.datatype != decl.datatype:
            raise RequestRejected(f"input {t.name!r}: datatype {t.datatype!r}, the model takes {decl.datatype}")
        if not isinstance(t.shape, list) or not all(type(d) is int and d >= 0 for d in t.shape):
            raise RequestRejected(f"input {t.name!r}: shape {t.shape!r} is not a list of non-negative integers")
        if not decl.shape_ok(t.shape):
            raise RequestRejected(f"input {t.name!r}: shape {t.shape}, the model takes {list(decl.dims)} (-1: any)")
        n = math.prod(t.shape)
        size = ITEMSIZE[decl.datatype]
        return n * size if size else (len(t.raw) if t.raw is not None else n)

    def _check_carried(self, t: TensorClaim) -> None:
        """What the request carries must be exactly what its shape says."""
        n = math.prod(t.shape)
        if (t.values is None) == (t.raw is None):
            raise RequestRejected(f"input {t.name!r}: give its values either as data or as binary content, once")
        if t.values is not None and t.values != n:
            raise RequestRejected(f"input {t.name!r}: shape {t.shape} holds {n} values, the request carries {t.values}")
        if t.raw is None:
            return
        size = ITEMSIZE[t.datatype]
        if size and len(t.raw) != n * size:
            raise RequestRejected(f"input {t.name!r}: shape {t.shape} of {t.datatype} is {n * size} bytes, the "
                                  f"request carries {len(t.raw)}")
        if not size and bytes_elements(t.raw) != n:
            raise RequestRejected(f"input {t.name!r}: shape {t.shape} holds {n} BYTES elements, the binary content "
                                  "is not that many 4-byte-length-prefixed elements")


def count_json_values(data, datatype: str, limit: int) -> int:
    """Leaves of a (nested) JSON list, each of the right JSON type; stops past `limit` leaves."""
    want = str if datatype == "BYTES" else (bool, int) if datatype == "BOOL" else (int, float)
    n, stack = 0, [data]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
            continue
        if not isinstance(x, want) or (datatype not in ("BOOL", "BYTES") and isinstance(x, bool)):
            raise RequestRejected(f"data: {type(x).__name__} value where {datatype} values are expected")
        n += 1
        if n > limit:
            break
    return n

"""The response cache of the python models: successful outputs of one model process, by inputs.

Triton's own response cache (2.51) stores error responses too: an undecodable video sent twice got
"expected 1 inputs but got 0 inputs for model 'vision'" the second time, and the errors of requests
caught in a killed model process were served again for the same inputs 60 s later. This cache is
given outputs only after they were computed, so a failure is never kept, and it lives in the model's
process, so a killed process takes its cache with it. Bounded by bytes, least recently used first out.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def _nbytes(outputs: dict[str, np.ndarray]) -> int:
    return sum(x.nbytes if x.dtype != object else sum(len(v) for v in x.reshape(-1)) for x in outputs.values())


class ResponseCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()

    @staticmethod
    def key(inputs: dict[str, np.ndarray | None]) -> bytes:
        """sha256 over every input's name, dtype, shape and bytes (BYTES tensors element by element)."""
        h = hashlib.sha256()
        for name in sorted(inputs):
            x = inputs[name]
            if x is None:
                continue
            h.update(f"{name}|{x.dtype.str}|{x.shape}|".encode())
            if x.dtype == object:
                for v in x.reshape(-1):
                    v = bytes(v)
                    h.update(len(v).to_bytes(8, "little") + v)
            else:
                h.update(np.ascontiguousarray(x).data)
        return h.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: bytes, outputs: dict[str, np.ndarray]) -> None:
        size = _nbytes(outputs)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = ({k: np.array(v, copy=True) for k, v in outputs.items()}, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

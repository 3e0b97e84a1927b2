"""Load for the serving tests, from its own process (the server under test must not share a GIL with
its clients): `--threads` clients ask the `crema` ensemble until `--seconds` pass, a `--bad-share` of
their requests malformed, every fourth client over gRPC. One JSON line per request on stdout:
{"kind": "good"|"bad", "start": t, "end": t, "ok": bool, "error": str}, times from CLOCK_MONOTONIC
(comparable across processes). ok: a good request got its right answer; a bad one got its error.

    python tests/load_client.py --http H:P --grpc H:P --clips DIR --seconds 30 --threads 16 --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic.generator import clip_files, read_questions  # noqa: E402
from triton_models.client import AskError, CremaClient, tensors_from_files  # noqa: E402


def requests(clips: Path) -> tuple[list, list]:
    """(good, bad): (tensors, the answer or a phrase of the error)."""
    goods = [(tensors_from_files(q.question, **clip_files(clips / q.clip)), q.answer) for q in read_questions(clips)[:6]]
    tensors = goods[0][0]
    bads = [({**tensors, "video": np.array([b"garbage"], dtype=object)}, "video bytes: not a video"),
            ({**tensors, "num_beams": np.array([0], np.int32)}, "num_beams 0"),
            ({k: v for k, v in tensors.items() if k != "question"}, "question: missing")]
    return goods, bads


def client(i: int, args, goods: list, bads: list, out: list, lock: threading.Lock) -> None:
    protocol = "grpc" if i % 4 == 0 else "http"
    rng = np.random.default_rng(args.seed * 1000 + i)
    stop_at = time.monotonic() + args.seconds
    with CremaClient(args.grpc if protocol == "grpc" else args.http, protocol) as c:
        while time.monotonic() < stop_at:
            bad = rng.random() < args.bad_share
            tensors, expect = bads[rng.integers(len(bads))] if bad else goods[rng.integers(len(goods))]
            start, error = time.monotonic(), ""
            try:
                answer = c.infer(tensors).answer
                ok = not bad and answer == expect
            except AskError as e:
                error = str(e)
                ok = bad and expect in error
            line = json.dumps({"kind": "bad" if bad else "good", "start": start, "end": time.monotonic(),
                               "ok": ok, "error": error[:2000]})
            with lock:
                out.append(line)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http", required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--clips", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-share", type=float, default=0.3)
    args = p.parse_args()
    goods, bads = requests(args.clips)
    out, lock = [], threading.Lock()
    threads = [threading.Thread(target=client, args=(i, args, goods, bads, out, lock)) for i in range(args.threads)]
    print("started", flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()

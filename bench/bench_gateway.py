"""Benchmark: what `crema gateway` (OpenAI chat completions) adds over tritonclient gRPC to `crema serve`.

    .venv/bin/python bench/bench_gateway.py [--n 20] [--out docs/gateway-benchmark.md]

One run, one machine, the trained demo model (python flavour, pip Triton 2.51, loopback). Batch 1, one
request at a time, three ways of asking interleaved per round:
  openai   the official openai client -> gateway -> crema serve (gRPC)
  http     one keep-alive HTTP connection, the JSON body encoded once -> gateway (no client cost)
  grpc     tritonclient gRPC straight to crema serve (CremaClient): the baseline
two kinds of request:
  fresh    a video no server cache has seen (every encoder runs): what a user's first question costs
  cached   the same video again (encoders answered from the response cache): the LLM alone, the case
           where a fixed per-request cost weighs most
Medians over n rounds after one warm-up; the overhead is (variant - grpc) / grpc, medians of one run.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from bench.bench_pipeline import exported  # noqa: E402
from bench.machine import describe  # noqa: E402
from gateway.app import Gateway, Settings  # noqa: E402
from reference.weights import DEMO_SOURCE, demo_model  # noqa: E402
from synthetic.generator import clip_files, read_questions  # noqa: E402
from training.demo import demo_data  # noqa: E402
from triton_models.client import CremaClient, tensors_from_files  # noqa: E402
from triton_models.repository import generate_repository  # noqa: E402
from triton_models.service import Service  # noqa: E402

WAYS = ("openai", "http", "grpc")


def chat_body(question: str, files: dict) -> dict:
    b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
    content = [{"type": "text", "text": question},
               {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(files["video"])}}]
    return {"model": "crema", "messages": [{"role": "user", "content": content}],
            "crema": {"pc": b64(files["pc"]), "depth": b64(files["depth"])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="rounds (after one warm-up)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-gateway")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gateway-benchmark.md")
    args = p.parse_args()

    artifacts = exported(demo_model, args.work / "artifacts", DEMO_SOURCE)
    clips = (args.n + 1) * len(WAYS)  # every fresh request gets a video of its own
    data = args.work / f"clips-{clips}"
    if not (data / "questions.jsonl").is_file():
        demo_data(data, clips, 1, demo_model().cfg.to_dict())
    questions = {q.clip: q for q in read_questions(data)}  # one question per clip
    order = sorted(questions)
    repo = generate_repository(artifacts, args.work / "repo")
    times = {(k, w): [] for k in ("fresh", "cached") for w in WAYS}
    with Service(repo, http_port=0, grpc_port=0, metrics_port=0) as service, \
            Gateway(Settings(urls=[service.endpoints.grpc_url], port=0)) as gateway, \
            openai.OpenAI(base_url=gateway.base_url, api_key="-", max_retries=0, timeout=300) as client, \
            CremaClient(service.endpoints.grpc_url, "grpc") as grpc:
        plain = http.client.HTTPConnection("127.0.0.1", gateway.port)

        def ask(way: str, clip: str) -> tuple[float, str]:
            q, files = questions[clip], clip_files(data / clip)
            body = chat_body(q.question, files)
            tensors = tensors_from_files(q.question, video=files["video"], pc=files["pc"], depth=files["depth"])
            encoded = json.dumps(body).encode()
            start = time.perf_counter()
            if way == "openai":
                answer = client.chat.completions.create(model="crema", messages=body["messages"],
                                                        extra_body={"crema": body["crema"]}).choices[0].message.content
            elif way == "http":
                plain.request("POST", "/v1/chat/completions", encoded, {"Content-Type": "application/json"})
                answer = json.loads(plain.getresponse().read())["choices"][0]["message"]["content"]
            else:
                answer = grpc.infer(tensors).answer
            return time.perf_counter() - start, answer

        for r in range(args.n + 1):
            for i, way in enumerate(WAYS):
                clip = order[r * len(WAYS) + i]
                fresh, a = ask(way, clip)
                cached, b = ask(way, clip)
                assert a == b, (clip, a, b)
                if r:
                    times[("fresh", way)].append(fresh)
                    times[("cached", way)].append(cached)
            print(f"round {r}/{args.n}", file=sys.stderr)
        plain.close()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    rows = []
    for kind in ("fresh", "cached"):
        base = med[(kind, "grpc")]
        for way in WAYS:
            rows.append({"request": kind, "way": way, "median_ms": round(med[(kind, way)], 1),
                         "overhead_ms": round(med[(kind, way)] - base, 1),
                         "overhead_pct": round(100 * (med[(kind, way)] / base - 1), 1)})
    machine = describe(gpu=False)
    lines = ["# Gateway overhead (bench/bench_gateway.py)", "",
             f"Machine: {machine}. Demo model, python flavour, pip Triton 2.51, loopback; batch 1, one request at "
             f"a time; medians of {args.n} interleaved rounds after one warm-up. Command: "
             f"`.venv/bin/python bench/bench_gateway.py --n {args.n}`.", "",
             "| request | way | median (ms) | over gRPC (ms) | over gRPC |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['request']} | {r['way']} | {r['median_ms']} | {r['overhead_ms']} | {r['overhead_pct']}% |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

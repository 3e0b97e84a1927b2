"""`crema gateway`: the OpenAI-compatible endpoint in front of `crema serve` (parser and command, in the
style of crema/cli.py: `add_gateway(sub)` beside `cmd_gateway(args)`)."""
from __future__ import annotations

import time
from pathlib import Path


def add_gateway(sub) -> None:
    p = sub.add_parser("gateway", help="an OpenAI-compatible HTTP endpoint (/v1/chat/completions) in front of "
                                       "`crema serve` (loopback); Ctrl-C stops it")
    p.add_argument("--url", action="append", dest="urls", metavar="HOST:PORT",
                   help="gRPC address of `crema serve` (default 127.0.0.1:8001); repeat for several servers: "
                        "round-robin, and a request whose server is unavailable is retried once on another")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-dir", action="append", default=[], type=Path, dest="allow_dirs", metavar="DIR",
                   help="file:// URLs may name files under DIR (resolved; repeatable). Default: none allowed")
    p.add_argument("--timeout", type=float, default=300, help="seconds one request may take, a retry included "
                                                              "(its deadline, passed on to Triton)")
    p.add_argument("--model-name", default="crema", help="the model name clients send and responses carry")
    p.add_argument("--tokenizer", type=Path, help="the model's tokenizer.json (its artifact directory's): usage "
                                                  "in its tokens (default: words)")
    p.add_argument("--max-body-mb", type=float, default=96, help="request body limit (base64 media inside)")
    p.add_argument("--max-media-mb", type=float, default=64, help="decoded media of one request, all fields")
    p.add_argument("--max-concurrent", type=int, default=16, help="requests handled at once; more get 429")
    p.set_defaults(func=cmd_gateway)


def settings_from(args):
    from .app import Settings

    for d in args.allow_dirs:
        if not d.is_dir():
            raise ValueError(f"--allow-dir {d}: not a directory")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file")
    for flag, value in (("--timeout", args.timeout), ("--max-body-mb", args.max_body_mb),
                        ("--max-media-mb", args.max_media_mb), ("--max-concurrent", args.max_concurrent)):
        if value <= 0:
            raise ValueError(f"{flag} {value}: must be positive")
    return Settings(urls=args.urls or ["127.0.0.1:8001"], host=args.host, port=args.port, model_name=args.model_name,
                    allow_dirs=list(args.allow_dirs), timeout_s=args.timeout, tokenizer=args.tokenizer,
                    max_body_bytes=int(args.max_body_mb * 2**20), max_media_bytes=int(args.max_media_mb * 2**20),
                    max_concurrent=args.max_concurrent)


def cmd_gateway(args) -> None:
    import signal

    from .app import Gateway

    gateway = Gateway(settings_from(args))
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    gateway.start()
    print(f"ready: {gateway.base_url} (model {args.model_name!r}) -> crema serve gRPC "
          f"{', '.join(gateway.settings.urls)}  (Ctrl-C stops it)", flush=True)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        gateway.stop()
        c = gateway.counts
        print(f"stopped; requests: {c['answered']} answered, {c['refused']} refused or failed, {c['cancelled']} "
              f"cancelled by their client, {c['busy']} turned away busy, {c['retried']} retried on another server", flush=True)

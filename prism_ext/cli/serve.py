"""``prism serve``: the HTTP server's command line (the server is
:mod:`prism_ext.serve`, which needs the ``serve`` extra: FastAPI, uvicorn,
prometheus-client, python-multipart, Pillow)."""

from __future__ import annotations

import argparse
import os
import sys

from .args import MAX_SECONDS, Bounded, cr, names, one_line_errors, positive, seconds, threads


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import ServeOptions, run_server
    except ImportError as exc:
        print(f"prism serve: needs the serve extra (pip install 'prism-ext[serve]'): {exc}", file=sys.stderr)
        return 2
    if args.master is not None and args.world is None:
        print("prism serve: --world: required with --master (the number of devices, rank 0 included)", file=sys.stderr)
        return 2
    if args.master is None and args.world is not None:
        print("prism serve: --world: only with --master (a cluster across machines)", file=sys.stderr)
        return 2
    options = dict(model=args.model, weight_dtype=args.weight_dtype, devices=None if args.master else args.devices, master=args.master,
                   world=args.world, token=args.token, timeout=args.timeout, threads=args.threads, ifname=args.ifname,
                   host=args.host, port=args.port, api_key=args.api_key or os.environ.get("PRISM_API_KEY"),
                   cr=args.cr, mode=args.mode, max_cr=args.max_cr, max_batch=args.max_batch,
                   batch_wait=args.batch_wait_ms / 1000, max_tokens=args.max_tokens, max_inputs=args.max_inputs,
                   max_body=args.max_body, body_timeout=args.body_timeout, max_queue=args.max_queue,
                   drain_timeout=args.drain_timeout,
                   quiet=args.quiet)
    if args.modes is not None:
        options["modes"] = args.modes
    if args.knobs is not None:
        options["knobs"] = args.knobs
    try:
        return run_server(ServeOptions(**options))
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"prism serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism serve: interrupted; every device stopped", file=sys.stderr)
        return 130


def register(sub) -> None:
    from ..models.quant import WEIGHT_DTYPES

    """Add ``serve`` to the ``prism`` subparsers."""
    p = one_line_errors(sub.add_parser(
        "serve", help="an HTTP inference server (OpenAI-style completions, embeddings, classification) over a "
                      "live cluster",
        description="Start a PRISM cluster (P processes on this machine, or rank 0 of a cluster across machines) "
                    "and serve it over HTTP: /v1/completions (streaming), /v1/embeddings, /v1/classify, "
                    "/v1/models, /health, /metrics. See docs/serve.md."), "serve")
    p.add_argument("--model", required=True, help="a checkpoint directory or a bundled name")
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                   help="how every device holds the weights: fp32 (default), bf16, int8, int4")
    p.add_argument("--devices", "-P", type=positive, default=2,
                   help="devices: processes on this machine over loopback (default 2)")
    p.add_argument("--master", metavar="HOST:PORT",
                   help="this server is rank 0 of a cluster across machines; start `prism worker --master HOST:PORT "
                        "--rank R --world P` on each other device")
    p.add_argument("--world", type=positive, help="with --master: number of devices, rank 0 included")
    p.add_argument("--token", help="the cluster's shared secret (default: $PRISM_TOKEN; random for local processes)")
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds any exchange may take (default 60)")
    p.add_argument("--threads", type=threads, help="compute threads of this process (rank 0)")
    p.add_argument("--ifname", help="network interface for gloo (e.g. eth0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=Bounded(0, 65535), default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every endpoint but /health "
                                     "(default: $PRISM_API_KEY; none: no auth). Not the cluster's --token")
    p.add_argument("--cr", type=cr, default=4, help="default compression rate (or one per layer; default 4)")
    p.add_argument("--mode", choices=("prism", "voltage", "tp", "single"), default="prism", help="default mode")
    p.add_argument("--max-cr", type=positive, default=128, help="largest cr a request may ask for (default 128)")
    p.add_argument("--modes", type=names, help="modes requests may choose, comma-separated (default: all)")
    p.add_argument("--knobs", type=names,
                   help="knobs requests may set, comma-separated, or 'none' (default: all the engine has)")
    p.add_argument("--max-batch", type=positive, default=8,
                   help="most sequences batched into one cluster call (default 8; 1: no batching)")
    p.add_argument("--batch-wait-ms", type=Bounded(0, 10000, real=True), default=5.0,
                   help="how long a batch waits for more requests, ms (default 5)")
    p.add_argument("--max-tokens", type=positive, default=256, help="largest max_tokens of a completion (default 256)")
    p.add_argument("--max-inputs", type=positive, default=32, help="most texts or images in one request (default 32)")
    p.add_argument("--max-body", type=positive, default=1 << 20, help="largest request body, bytes (default 1 MiB)")
    p.add_argument("--body-timeout", type=Bounded(0.1, 3600, real=True), default=30.0,
                   help="seconds a request body may take to arrive; slower ones get 408 (default 30)")
    p.add_argument("--max-queue", type=positive, default=64, help="most requests waiting; more get 429 (default 64)")
    p.add_argument("--drain-timeout", type=Bounded(0, MAX_SECONDS, real=True), default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests may take to finish (default 30)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or access lines on stderr")
    p.set_defaults(func=_serve)

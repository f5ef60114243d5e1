"""``prism worker``: one device (rank >= 1) of a cluster, and the torchrun
ranks >= 1 of ``prism run``."""

from __future__ import annotations

import argparse
import sys

from .args import USER_ERRORS, one_line_errors, positive, seconds, threads


def serve_rank(command: str, master: str, rank: int, world: int, **options) -> int:
    """Serve as rank ``rank`` of the cluster at ``master`` until rank 0 closes
    it, then end this process: ``prism worker``, and ``prism run`` under
    torchrun on every rank but 0 (``options`` go to
    :func:`prism_ext.runtime.worker_main`)."""
    from ..runtime import worker_exit, worker_main

    try:
        code = worker_main(master, rank, world, **options)
    except USER_ERRORS as exc:
        print(f"prism {command}: {exc}", file=sys.stderr)
        code = 2
    worker_exit(rank, code, None)  # no interpreter teardown: gloo threads may be blocked on dead peers
    return code


def _worker(args: argparse.Namespace) -> int:
    if args.serve:
        return _keep_serving(args)
    return serve_rank("worker", args.master, args.rank, args.world, token=args.token, timeout=args.timeout,
                      join_timeout=args.join_timeout, threads=args.threads, ifname=args.ifname, model=args.model,
                      quiet=args.quiet)


def _keep_serving(args: argparse.Namespace) -> int:
    """--serve: this command line without --serve, run again after each cluster."""
    import os

    from ..runtime import check_world, keep_serving, parse_master, token_bytes

    try:  # what would fail every join fails once, here
        parse_master(args.master)
        check_world(args.world, args.rank)
        token_bytes(args.token)
    except USER_ERRORS as exc:
        print(f"prism worker: {exc}", file=sys.stderr)
        return 2
    if args.token is not None:
        os.environ["PRISM_TOKEN"] = args.token  # to each cluster's process through its environment, not its argv
    argv = [sys.executable, "-m", "prism_ext", "worker", "--master", args.master, "--rank", str(args.rank),
            "--world", str(args.world), "--timeout", str(args.timeout), "--join-timeout", str(args.join_timeout)]
    for flag, value in (("--threads", args.threads), ("--ifname", args.ifname), ("--model", args.model)):
        if value is not None:
            argv += [flag, str(value)]
    return keep_serving(argv + (["--quiet"] if args.quiet else []), args.rank, args.master, args.quiet)


def register(sub) -> None:
    worker = one_line_errors(sub.add_parser(
        "worker", help="serve as one device (rank >= 1) of a cluster whose rank 0 runs `prism run --master`",
        description="Join a PRISM cluster as device RANK of WORLD and serve its requests until rank 0 closes it "
                    "(with --serve: then join the next one, until stopped). "
                    "Rank 0 (`prism run ... --master HOST:PORT --world P`) announces the model; this device loads "
                    "it from its own disk (--model if the path differs here). Every device must hold the same "
                    "token (--token or PRISM_TOKEN)."), "worker")
    worker.add_argument("--master", required=True, metavar="HOST:PORT", help="rank 0's address and port")
    worker.add_argument("--rank", type=positive, required=True, help="this device's rank (1 .. world-1)")
    worker.add_argument("--world", type=positive, required=True, help="number of devices, rank 0 included")
    worker.add_argument("--token", help="the cluster's shared secret (default: $PRISM_TOKEN)")
    worker.add_argument("--timeout", type=seconds, default=60.0,
                        help="seconds any exchange may take, and the longest rank 0 may stay silent (default 60)")
    worker.add_argument("--join-timeout", type=seconds, default=300.0,
                        help="seconds to keep trying to join rank 0 before giving up (default 300)")
    worker.add_argument("--threads", type=threads, help="compute threads on this device (default: torch's)")
    worker.add_argument("--ifname", help="network interface for gloo (e.g. eth0; default: by hostname)")
    worker.add_argument("--model", help="this device's path to the model, if not the path rank 0 announces")
    worker.add_argument("--serve", action="store_true",
                        help="stay up: after each cluster ends (closed, failed, or rank 0 lost) join the next one at "
                             "the same --master; stop with SIGINT or SIGTERM")
    worker.add_argument("--quiet", "-q", action="store_true", help="no ready or join lines on stderr (errors still)")
    worker.set_defaults(func=_worker)

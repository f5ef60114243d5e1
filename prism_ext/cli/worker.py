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
    return serve_rank("worker", args.master, args.rank, args.world, token=args.token, timeout=args.timeout,
                      join_timeout=args.join_timeout, threads=args.threads, ifname=args.ifname, model=args.model)


def register(sub) -> None:
    worker = one_line_errors(sub.add_parser(
        "worker", help="serve as one device (rank >= 1) of a cluster whose rank 0 runs `prism run --master`",
        description="Join a PRISM cluster as device RANK of WORLD and serve its requests until rank 0 closes it. "
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
    worker.set_defaults(func=_worker)

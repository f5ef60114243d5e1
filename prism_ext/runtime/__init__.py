"""The multi-process runtime: devices as processes talking over TCP
(torch.distributed, gloo), on this machine or across boards.

Rank 0 is the coordinator (it also computes); ranks 1..P-1 are workers
(``prism worker``, or processes :class:`Cluster` starts on this machine).

- Formation: rank 0 opens a TCPStore (the rendezvous) on the address it was
  given (loopback for a local cluster), fresh for every formation; workers
  say which world they were started for, and gloo's ranks find each other
  through it. Then every rank proves it holds the shared token (HMAC over
  every rank's fresh nonce; the token never travels) and rank 0 closes the
  store: its listening socket goes, and what was written to it is freed.
  While it is up, its life is bounded by the start-up timeout and its size
  by a cap on rank 0's memory growth.
- After that, everything travels over gloo's connections between the ranks
  that formed the group. The control plane (the session, each request, the
  heartbeats both ways, error reports, close and abort) is frames on a tag
  of its own, each ``op | seq | payload`` tagged with an HMAC of the session
  key; a frame with a wrong tag or out of sequence (replayed) is refused
  and ends the link. The data plane (the per-layer exchanges, the results,
  the all-reduces) is :class:`prism_ext.comm.dist.DistTransport`.
- Liveness: rank 0 pings every worker and every worker sends rank 0 a
  heartbeat, every half second; a side that hears nothing for the exchange
  timeout calls the other lost (a worker then exits; rank 0 names the rank).

Before any activation moves every rank shows its package version, model
(config and weight digests) and pinned settings; any mismatch stops every
rank with one line naming the rank and the field. Nothing is pickled;
everything received is parsed with bounds checks. Threat model: README.md
("Threat model") and docs/design.md.
"""

from .coordinator import Cluster, cluster, speed_weights
from .session import (DEFAULT_START_TIMEOUT, DEFAULT_TIMEOUT, ClusterError, HandshakeError, check_world, first_line,
                      parse_master, set_threads, token_bytes)
from .worker import keep_serving, worker_exit, worker_main

__all__ = ["Cluster", "ClusterError", "HandshakeError", "cluster", "worker_main", "worker_exit", "keep_serving",
           "speed_weights", "set_threads", "parse_master", "check_world", "token_bytes", "first_line",
           "DEFAULT_TIMEOUT", "DEFAULT_START_TIMEOUT"]

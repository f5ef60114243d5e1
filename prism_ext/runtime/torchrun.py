"""What torchrun gives a rank: the master, the world, this rank, and, when
every rank runs on this one host and no token was given, a token they share
through a file only this user can read.

torchrun starts every rank with the same command line and the environment
variables MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and LOCAL_WORLD_SIZE.
Across hosts the ranks must be given a token (``--token`` / PRISM_TOKEN), as
any cluster across machines. On one host the ranks are children of one
torchrun agent; rank 0 writes a random token to
``<tmp>/prism-<uid>/torchrun-<agent pid>-<port>`` (a directory of mode 0700
that must belong to this user), the others read it, and rank 0 removes it
once the cluster has formed: the same trust as local processes that
:class:`~prism_ext.runtime.Cluster` starts itself (a token in their
environment), never a token an attacker on the machine could read."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .session import parse_master

_POLL = 0.05  # seconds between looks for rank 0's token file (there is no event to wait on across processes)


@dataclass(frozen=True)
class Launch:
    """A rank's place in a torchrun launch."""

    master: str  # HOST:PORT
    world: int
    rank: int
    all_local: bool  # every rank on this host (LOCAL_WORLD_SIZE == WORLD_SIZE)


def from_environment(env=None) -> Launch | None:
    """The torchrun launch this process belongs to, or None outside torchrun."""
    env = os.environ if env is None else env
    if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        return None
    master = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    parse_master(master)
    numbers = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        text = env.get(name, "")
        if text and not text.isdigit():
            raise ValueError(f"{name}: expected a non-negative integer in the environment, got {text[:20]!r}")
        numbers[name] = int(text) if text else None
    world = numbers["WORLD_SIZE"]
    if world is None:
        raise ValueError("WORLD_SIZE: torchrun's MASTER_ADDR/MASTER_PORT are set but WORLD_SIZE is not")
    return Launch(master, world, numbers["RANK"] or 0, numbers["LOCAL_WORLD_SIZE"] == world)


def _token_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"prism-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"token: {path} must be a directory of this user with mode 0700 (it is not: "
                              f"someone else may have made it); remove it, or give --token / PRISM_TOKEN")
    return path


def token_file(launch: Launch) -> Path:
    """Where the ranks of this launch share their token: one agent (the
    parent of every rank) and one port."""
    return _token_dir() / f"torchrun-{os.getppid()}-{launch.master.rpartition(':')[2]}"


def share_token(launch: Launch, timeout: float) -> str:
    """Rank 0: a fresh token, written where the other ranks of this launch
    look. Ranks >= 1: that token, once rank 0 has written it (waiting up to
    ``timeout`` seconds)."""
    path = token_file(launch)
    if launch.rank == 0:
        token = secrets.token_hex(16)
        scratch = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(scratch, path)  # whole or absent: a reader never sees half a token
        return token
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"token: rank 0 of this torchrun launch wrote no token to {path} within {timeout:g} s "
                               f"(is rank 0 running on this host?)")
        time.sleep(_POLL)
    return path.read_text().strip()


def forget_token(launch: Launch) -> None:
    """Rank 0, once every rank has authenticated (or the start failed)."""
    token_file(launch).unlink(missing_ok=True)

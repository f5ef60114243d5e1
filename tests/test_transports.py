"""The transport interface: both transports implement the Protocol the engine
relies on, and the in-process one carries point-to-point frames, so a
streamed generation runs on simulated devices exactly as on processes."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from prism_ext.comm import LocalGroup, LocalTransport, Transport
from prism_ext.comm.dist import DistTransport

from process_helpers import free_port

METHODS = ("all_gather", "all_gather_start", "gather", "all_reduce", "send", "recv")


@pytest.mark.parametrize("cls", [LocalTransport, DistTransport])
def test_both_transports_implement_the_protocol(cls):
    for name in METHODS:
        ours, spec = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Transport, name))
        assert list(ours.parameters) == list(spec.parameters), (cls.__name__, name)
    assert isinstance(LocalTransport(LocalGroup(2), 1), Transport)


def test_local_frames_arrive_in_order_and_name_a_silent_sender():
    def sender(t):
        for i in range(3):
            t.send({"x": torch.full((2,), float(i))}, {"i": i}, 0)
        return "sent"

    def receiver(t):
        return [(meta["i"], tensors["x"].tolist(), n > 0) for meta, tensors, n in (t.recv(1) for _ in range(3))]

    got, sent = LocalGroup(2).run([receiver, sender])
    assert sent == "sent" and got == [(i, [float(i)] * 2, True) for i in range(3)]
    with pytest.raises(RuntimeError, match="rank 1 returned without sending"):
        LocalGroup(2).run([lambda t: t.recv(1), lambda t: None])


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_simulated_streaming_gives_every_token_in_order(gpt, devices):
    ids = gpt.tokenizer("The for statement is used to iterate over the elements of a sequence",
                        return_tensors="pt").input_ids
    streamed = []
    out = gpt.generate(ids, devices=devices, cr=2, max_new_tokens=6, on_token=lambda t: streamed.append(t.clone()))
    assert torch.equal(out, gpt.generate(ids, devices=devices, cr=2, max_new_tokens=6))
    assert torch.equal(torch.stack(streamed, dim=1), out[:, ids.shape[1]:])


# Both ranks of a 2-process gloo group formed with a 60 s limit; rank 1 then
# stays silent and rank 0 waits for its frame with the transport's limit.
SILENT_PEER = r"""
import datetime, sys, time
import torch.distributed as dist
from prism_ext.comm.dist import DistTransport

rank, port, limit = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
t = DistTransport(rank, 2, timeout=60)
t.exchange_meta({"rank": rank})  # formed
if rank == 1:
    time.sleep(60)
    sys.exit()
t.timeout = limit
t0 = time.monotonic()
try:
    t.recv(1)
    print("received")
except RuntimeError as exc:
    print(f"{time.monotonic() - t0:.2f} {str(exc).splitlines()[0]}")
"""


def test_a_wait_ends_at_the_transports_limit_not_the_groups(reaper, tmp_path):
    """gloo's waits default to the limit the group was formed with (the
    start-up timeout); every wait of the transport passes its own."""
    port = str(free_port())
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    argv = [sys.executable, "-c", SILENT_PEER]
    # cwd: not the source tree, whose prism_ext has no built _C
    silent = reaper.popen(argv + ["1", port, "2"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
    waiting = reaper.popen(argv + ["0", port, "2"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    out, _ = waiting.communicate(timeout=50)
    silent.kill()
    seconds, _, message = out.strip().partition(" ")
    assert "timed out" in message.lower(), out
    assert 2 <= float(seconds) < 10, out  # its own 2 s, far from the group's 60

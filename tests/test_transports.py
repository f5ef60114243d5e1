"""The transport interface: both transports implement the Protocol the engine
relies on, and the in-process one carries point-to-point frames, so a
streamed generation runs on simulated devices exactly as on processes."""

from __future__ import annotations

import inspect

import pytest
import torch

from prism_ext.comm import LocalGroup, LocalTransport, Transport
from prism_ext.comm.dist import DistTransport

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

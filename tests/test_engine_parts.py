"""Partitioning, the wire format and the in-process transport."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_ext.comm import LocalGroup, decode, encode
from prism_ext.method.partition import cr_schedule, partition, segment_ends, segment_sizes


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data())
def test_partition_is_contiguous_weighted_and_covers_everything(n, data):
    devices = data.draw(st.integers(1, min(n, 12)))
    weights = data.draw(st.one_of(st.none(), st.lists(st.floats(0.1, 10), min_size=devices, max_size=devices)))
    part = partition(n, devices, weights)
    assert part.ranges[0][0] == 0 and part.ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(part.ranges, part.ranges[1:]))
    sizes = part.sizes()
    assert min(sizes) >= 1 and sum(sizes) == n
    w = weights or [1.0] * devices
    ideal = [1 + (n - devices) * x / sum(w) for x in w]
    assert all(abs(s - i) < 1 + 1e-9 for s, i in zip(sizes, ideal))  # largest remainder: off by < 1


@given(st.integers(0, 50), st.integers(1, 60), st.integers(1, 20))
def test_segments_tile_the_range(start, n, cr):
    ends = segment_ends(start, start + n, cr)
    sizes = segment_sizes(start, start + n, cr)
    assert len(ends) == len(sizes) == -(-n // cr)
    assert sum(sizes) == n and ends[-1] == start + n - 1
    assert all(1 <= s <= cr for s in sizes) and all(s == cr for s in sizes[:-1])


def test_partition_and_schedule_errors():
    with pytest.raises(ValueError, match="devices"):
        partition(3, 4)
    with pytest.raises(ValueError, match="devices"):
        partition(3, 0)
    with pytest.raises(ValueError, match="device_weights"):
        partition(10, 2, [1, 0])
    with pytest.raises(ValueError, match="device_weights"):
        partition(10, 2, [1])
    with pytest.raises(ValueError, match="cr"):
        cr_schedule([1, 2], 3)
    with pytest.raises(ValueError, match="cr"):
        cr_schedule(0, 3)
    with pytest.raises(TypeError, match="cr"):
        cr_schedule(2.0, 3)
    assert cr_schedule(4, 2) == [4, 4] and cr_schedule((1, 2), 2) == [1, 2]


@pytest.mark.parametrize("wire,rel", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1 / 127)])
def test_wire_roundtrip(wire, rel):
    x = torch.randn(2, 5, 16) * torch.logspace(-3, 3, 5)[None, :, None]  # rows of very different scale
    x[0, 2] = 0  # an all-zero row (int8 scale 0)
    counts = torch.tensor([[3, 0, 2, 1, 4]], dtype=torch.int32)
    blob, sizes = encode({"rows": x, "counts": counts}, wire)
    got = decode(blob)
    assert got["counts"].dtype == torch.int32 and torch.equal(got["counts"], counts)
    assert got["rows"].dtype == torch.float32 and got["rows"].shape == x.shape
    row_scale = x.abs().amax(-1, keepdim=True)
    assert ((got["rows"] - x).abs() <= rel * row_scale + 1e-30).all()
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[wire]
    assert sizes["rows"] == x.numel() * itemsize + (10 * 4 if wire == "int8" else 0)
    assert len(blob) > sum(sizes.values())


def test_wire_errors():
    with pytest.raises(ValueError, match="wire_dtype"):
        encode({"x": torch.zeros(1)}, "fp8")
    with pytest.raises(TypeError, match="x"):
        encode({"x": [1.0]}, "fp32")
    blob, _ = encode({"x": torch.zeros(3)}, "fp32")
    with pytest.raises(ValueError, match="trailing"):
        decode(blob + b"\0")


def test_local_all_gather_orders_by_rank_and_counts_bytes():
    group = LocalGroup(3)

    def device(tr):
        seen = []
        for step in range(4):
            got = tr.all_gather({"v": torch.full((2,), float(10 * tr.rank + step))})
            seen.append([item["v"][0].item() for item in got.items])
            assert got.bytes_sent == len(encode({"v": torch.zeros(2)}, "fp32")[0])
        return seen

    results = group.run([device] * 3)
    for seen in results:
        assert seen == [[float(step), 10.0 + step, 20.0 + step] for step in range(4)]


def test_local_group_propagates_a_device_failure():
    def ok(tr):
        for _ in range(3):
            tr.all_gather({"v": torch.zeros(1)})

    def bad(tr):
        tr.all_gather({"v": torch.zeros(1)})
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        LocalGroup(3).run([ok, bad, ok])


def test_local_group_detects_a_device_that_skips_a_round():
    def ok(tr):
        tr.all_gather({"v": torch.zeros(1)})
        tr.all_gather({"v": torch.zeros(1)})

    def short(tr):
        tr.all_gather({"v": torch.zeros(1)})

    with pytest.raises(RuntimeError, match="round 1"):
        LocalGroup(2).run([ok, short])

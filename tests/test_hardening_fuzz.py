"""Fuzzing the public surface with hypothesis. Invariants: no crash, no hang
(subprocesses under a timeout), and either a TypeError/ValueError whose
message names an argument or a result equal to the reference."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from engine_helpers import hf_gpt2, save

import prism_ext
from prism_ext import kernels

NAMED = re.compile(r"^[A-Za-z_][\w.\-]*: ")  # "seg: ...", "config.json: ...", "--cr: ..."
# Large but finite values stay far from float32 overflow (q.k of two 1e30s
# is inf in float32, finite in the float64 reference: not a kernel bug).
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e4, -1e4])


def expect_named(exc: BaseException) -> None:
    assert isinstance(exc, (TypeError, ValueError, FileNotFoundError)), repr(exc)
    msg = str(exc)
    assert NAMED.match(msg) and "\n" not in msg, msg


def same(got, want) -> None:
    got = torch.as_tensor(got).double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs"
    torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-5, equal_nan=True)


@st.composite
def arrays(draw, shape):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(*shape, generator=gen)
    for _ in range(draw(st.integers(0, 2))):
        idx = tuple(draw(st.integers(0, s - 1)) for s in shape)
        t[idx] = draw(SPECIAL)
    if draw(st.booleans()) and len(shape) >= 2:  # a strided (non-contiguous) view
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@settings(max_examples=25)
@given(data=st.data(), nq=st.integers(1, 40), nk=st.integers(1, 70), dh=st.integers(1, 20),
       masks=st.sampled_from([None, "counts", "causal"]))
def test_fuzz_compressed_attention(isa, data, nq, nk, dh, masks):
    q = data.draw(arrays((1, 2, nq, dh)))
    k = data.draw(arrays((1, 2, nk, dh)))
    v = data.draw(arrays((1, 2, nk, dh)))
    extra = {}
    if masks == "counts":
        extra["counts"] = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=nk, max_size=nk))).float()
    elif masks == "causal":
        extra["q_pos"] = torch.arange(nq) + data.draw(st.integers(-2, nk))
        extra["k_pos"] = torch.arange(nk)
    same(kernels.compressed_attention(q, k, v, **extra), reference.compressed_attention(q, k, v, **extra))


@settings(max_examples=25)
@given(data=st.data(), lead=st.integers(1, 3), nq=st.integers(1, 6), nk=st.integers(1, 70),
       in_place=st.booleans())
def test_fuzz_masked_softmax(isa, data, lead, nq, nk, in_place):
    s = data.draw(arrays((lead, nq, nk))).contiguous()
    mask = data.draw(arrays((nq, nk))) if data.draw(st.booleans()) else None
    want = reference.masked_softmax(s, additive_mask=mask)
    got = kernels.masked_softmax(s, additive_mask=mask, out=s if in_place else None)
    same(got, want)


@settings(max_examples=25)
@given(data=st.data(), n=st.integers(1, 40), d=st.integers(1, 40),
       seg=st.one_of(st.integers(-3, 50), st.sampled_from([2**31, 2**63 - 1, 2**64, -(2**63)])))
def test_fuzz_segment_means(isa, data, n, d, seg):
    x = data.draw(arrays((2, n, d)))
    try:
        got, counts = kernels.segment_means(x, seg)
    except (TypeError, ValueError) as exc:
        expect_named(exc)
        assert seg < 1
        return
    want, want_counts = reference.segment_means(x, seg)
    same(got, want)
    assert torch.equal(counts, want_counts)


@settings(max_examples=20)
@given(shift=st.integers(1, 7), rows=st.integers(2, 6))
def test_fuzz_softmax_aliasing(shift, rows):
    base = torch.randn(rows + 8, 8)
    s, out = base[:rows], base[shift:shift + rows]
    if shift >= rows:  # disjoint views of one buffer: fine, and correct
        want = reference.masked_softmax(s)
        kernels.masked_softmax(s, out=out)
        same(out, want)
        return
    with pytest.raises(ValueError) as info:
        kernels.masked_softmax(s, out=out)
    expect_named(info.value)


@settings(max_examples=15)
@given(n=st.one_of(st.integers(-5, 5), st.integers(2**31, 2**70), st.floats(allow_nan=True), st.booleans(),
                   st.text(max_size=3)))
def test_fuzz_set_num_threads(restore_threads, n):
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(n)
    except (TypeError, ValueError) as exc:
        expect_named(exc)
        assert kernels.get_num_threads() == before
    else:
        assert kernels.get_num_threads() == n


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save(hf_gpt2(), tmp_path_factory.mktemp("gpt2"))


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                          st.text(max_size=4), st.lists(st.integers(), max_size=2))


@settings(max_examples=30)
@given(data=st.data(), how=st.sampled_from(["config", "truncate", "random", "shape"]))
def test_fuzz_load_corrupted_checkpoint(gpt2_dir, tmp_path_factory, data, how):
    d = shutil.copytree(gpt2_dir, tmp_path_factory.mktemp("m") / "m")
    weights = next(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))
    cfg = json.loads((d / "config.json").read_text())
    if how == "config":
        key = data.draw(st.sampled_from(["n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "n_inner",
                                         "layer_norm_epsilon", "activation_function", "model_type"]))
        cfg[key] = data.draw(CONFIG_VALUES)
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "truncate":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "random":
        weights.write_bytes(data.draw(st.binary(min_size=0, max_size=200)))
    else:
        cfg["n_embd"] = data.draw(st.sampled_from([16, 64, 36]))
        (d / "config.json").write_text(json.dumps(cfg))
    try:
        model = prism_ext.load(d)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        expect_named(exc)
        return
    out = model(torch.tensor([[1, 2, 3, 4]]), devices=2, cr=2)  # loaded: it must also run
    assert torch.isfinite(out.logits).all()


@settings(max_examples=30)
@given(data=st.data())
def test_fuzz_model_call(gpt2_dir, data):
    model = prism_ext.load(gpt2_dir)
    dtype = data.draw(st.sampled_from([torch.long, torch.int32, torch.bool, torch.float32, torch.uint8]))
    shape = data.draw(st.sampled_from([(1, 5), (2, 3), (0, 3), (1, 0), (5,), (1, 1, 2), (1, 70)]))
    lo, hi = data.draw(st.sampled_from([(0, 64), (-5, 0), (64, 2**31), (0, 2)]))
    ids = torch.randint(lo, hi, shape).to(dtype) if math.prod(shape) else torch.zeros(shape, dtype=dtype)
    kw = {"devices": data.draw(st.integers(-1, 6)), "cr": data.draw(st.one_of(st.integers(-1, 9),
                                                                           st.just(2**63)))}
    try:
        out = model(ids, **kw)
    except (TypeError, ValueError) as exc:
        expect_named(exc)
        return
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------- prism run


ARGS = st.lists(st.sampled_from([
    ["--cr", "0"], ["--cr", "2"], ["--cr", str(2**64)], ["--cr", "1,2"], ["--devices", "3"], ["--devices", "-1"],
    ["--devices", str(10**20)], ["--max-new-tokens", "0"], ["--max-new-tokens", "500"], ["--mode", "voltage"],
    ["--wire-dtype", "int8"], ["--device-weights", "1,nan"], ["--device-weights", "1e308,1e308"],
    ["--text", ""], ["--text", "\udcff"], ["--model", ""], ["--model", "/no/such"], ["--json"],
]), max_size=3)


@settings(max_examples=4)  # each example starts a Python with torch (~5 s)
@given(extra=ARGS)
def test_fuzz_prism_run_subprocess(extra):
    argv = ["--model", "gpt2-tiny", "--text", "def f(x):", "--max-new-tokens", "2", "--no-compare", "-q"]
    for a in extra:
        argv += a
    try:
        # cwd outside the source tree, so -m finds the installed package
        p = subprocess.run([sys.executable, "-m", "prism_ext.cli", "run", *argv], capture_output=True, timeout=120,
                           cwd=tempfile.gettempdir(),
                           errors="surrogateescape")
    except subprocess.TimeoutExpired:
        pytest.fail(f"prism run {argv} hung")
    assert p.returncode in (0, 2), p.stderr
    assert "Traceback" not in p.stderr
    if p.returncode == 2:
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("prism run: "), p.stderr

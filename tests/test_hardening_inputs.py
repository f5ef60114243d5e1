"""Hostile inputs through the API and `prism run`: one line naming the
argument (TypeError/ValueError, or exit status 2), never a traceback, a
misleading hint or a silently ignored option; and the accuracy warning."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

from cli_helpers import prism
from engine_helpers import hf_gpt2, save

import prism_ext
from prism_ext.method.partition import AccuracyWarning, coarse_warning, partition


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save(hf_gpt2(), tmp_path_factory.mktemp("gpt2"))


def one_line(exc_info, name: str) -> None:
    msg = str(exc_info.value)
    assert msg.startswith(name), msg
    assert "\n" not in msg, msg


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("key, value", [
    ("n_layer", -1), ("n_layer", 0), ("n_layer", 2**40), ("n_layer", 2.5), ("n_layer", True), ("n_layer", "2"),
    ("n_head", 0), ("n_embd", -32), ("vocab_size", 10**12), ("n_positions", None), ("layer_norm_epsilon", math.inf),
    ("layer_norm_epsilon", -1.0),
])
def test_hostile_config_values(gpt2_dir, tmp_path, key, value):
    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "config.json:")
    assert key in str(info.value)


def test_corrupt_pytorch_bin_gives_one_safe_line(gpt2_dir, tmp_path):
    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors").unlink(missing_ok=True)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02\x95" + b"\x00" * 40)  # a truncated pickle
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "weights:")
    assert "weights_only=False" not in str(info.value)


def test_pickle_with_objects_never_suggests_weights_only_false(gpt2_dir, tmp_path):
    import collections

    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors").unlink(missing_ok=True)
    torch.save({"w": torch.zeros(2), "obj": collections.Counter("ab")}, d / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "weights:")
    assert "weights_only" not in str(info.value)


def test_missing_local_path_does_not_suggest_a_download(tmp_path):
    for path in (str(tmp_path / "nope"), "./nope/model", "~/no/such/dir"):
        with pytest.raises(FileNotFoundError) as info:
            prism_ext.load(path)
        one_line(info, "path:")
        assert "does not exist" in str(info.value) and "download" not in str(info.value)


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_model_path(path):
    with pytest.raises(ValueError) as info:
        prism_ext.load(path)
    one_line(info, "path:")
    assert "empty" in str(info.value)


# ---------------------------------------------------------------- model inputs


def test_bool_and_meta_input_ids(gpt):
    with pytest.raises(TypeError) as info:
        gpt(torch.tensor([[True, False, True]]))
    one_line(info, "input_ids:")
    with pytest.raises(TypeError) as info:
        gpt(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    one_line(info, "input_ids:")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_pixel_values_rejected(vit, value):
    px = torch.zeros(2, vit.net.channels, vit.net.image, vit.net.image)
    px[1, 0, 3, 4] = value
    with pytest.raises(ValueError) as info:
        vit(px, devices=2)
    one_line(info, "pixel_values:")


def test_meta_pixel_values_rejected(vit):
    with pytest.raises(TypeError) as info:
        vit(torch.zeros(1, vit.net.channels, vit.net.image, vit.net.image, device="meta"))
    one_line(info, "pixel_values:")


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=math.nan), "temperature:"), (dict(temperature=math.inf), "temperature:"),
    (dict(temperature=1.0, seed=2**64), "seed:"), (dict(temperature=1.0, seed=1.5), "seed:"),
])
def test_generate_bad_sampling_args(gpt, kw, name):
    with pytest.raises((TypeError, ValueError)) as info:
        gpt.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **kw)
    one_line(info, name)


def test_overflowing_device_weights(gpt):
    ids = torch.tensor([list(b"abcdefgh")])
    out = gpt(ids, devices=2, device_weights=[1e308, 1e308])
    assert out.stats.partition.sizes() == [4, 4]
    assert partition(8, 2, [1e308, 5e307]).sizes() == [5, 3]


@pytest.mark.parametrize("call", [
    lambda gpt: gpt(torch.tensor([[1, 2, 3]]), devices=2**70),
    lambda gpt: gpt(torch.tensor([[1, 2, 3]]), cr=2**70),
    lambda gpt: gpt(torch.tensor([[1, 2, 3]]), cr=[1, 2**63]),
])
def test_huge_integer_arguments(gpt, call):
    with pytest.raises(ValueError) as info:
        call(gpt)
    assert str(info.value).split(":")[0] in ("devices", "cr")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- accuracy warning


def test_coarse_partition_warns(gpt):
    ids = torch.tensor([list(b"twelve bytes")])
    with pytest.warns(AccuracyWarning, match="^cr: at cr 4 a device holding 3 of the 12 positions"):
        gpt(ids, devices=4, cr=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)
        gpt(ids, devices=4, cr=1)  # exact: nothing to warn about
        gpt(ids, devices=2, cr=2)  # 6 positions per device: 3 segments
        gpt(ids, devices=4, cr=4, mode="voltage")


def test_coarse_warning_threshold():
    part = partition(40, 4)  # 10 positions each
    assert coarse_warning(part, [5]) is None
    assert coarse_warning(part, [6]) is not None
    assert coarse_warning(part, [1, 1, 8]) is not None
    assert coarse_warning(part, [1]) is None


# ---------------------------------------------------------------- prism run


@pytest.mark.parametrize("argv, needle", [
    (["--text", "hi", "--cr", str(2**63)], "--cr"),
    (["--text", "hi", "--cr", f"1,{10**30}"], "--cr"),
    (["--text", "hi", "--devices", str(10**30)], "--devices"),
    (["--text", "hi", "--max-new-tokens", str(10**30)], "--max-new-tokens"),
    (["--text", "x" * 100], "at most 28 new tokens"),
    (["--text", "\udcff\udcfe"], "text: is not valid UTF-8"),
])
def test_run_one_line(capsys, argv, needle):
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "-q", *argv)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_run_empty_model(capsys):
    code, out, err = prism(capsys, "run", "--model", "", "--text", "hi", "-q")
    assert code == 2 and "empty" in err and "'.'" not in err and len(err.strip().splitlines()) == 1


def test_run_max_new_tokens_refused_for_vit(capsys, tmp_path):
    code, out, err = prism(capsys, "run", "--model", "vit-tiny-digits", "--image", "/etc/hostname",
                           "--max-new-tokens", "3", "-q")
    assert code == 2 and "--max-new-tokens" in err and "vit" in err


def test_run_without_tokenizer_json(capsys, gpt2_dir):
    code, out, err = prism(capsys, "run", "--model", str(gpt2_dir), "--text", "hi", "-q")
    assert code == 2 and "tokenizer.json" in err and "give token ids" not in err


def test_run_voltage_mode_not_labelled_prism(capsys):
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "for x in range(3):", "--mode",
                           "voltage", "--max-new-tokens", "0", "-q", "--devices", "2")
    assert code == 0, err
    assert "(PRISM)" not in out and "(this run, voltage)" in out


def test_run_warns_once_on_one_line(capsys):
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "twelve bytes", "--max-new-tokens", "0",
                           "-q")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and lines[0].startswith("prism: warning: cr: at cr 4"), err

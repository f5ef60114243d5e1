"""Hostile inputs through the API and `prism run`: one line naming the
argument (TypeError/ValueError, or exit status 2), never a traceback, a
misleading hint or a silently ignored option; and the accuracy warning."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from cli_helpers import prism
from engine_helpers import hf_gpt2, save

import prism_ext
from prism_ext import cli
from prism_ext.cli import args as cli_args
from prism_ext.method.partition import AccuracyWarning, coarse_warning, cr_schedule, partition


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


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_config_is_one_line_naming_the_file(gpt2_dir, tmp_path, capsys, depth):
    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg)[:-1] + f', "deep": {nested(depth)}}}')
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "config.json:")
    assert str(d / "config.json") in str(info.value) and "nests deeper than" in str(info.value)
    code, _, err = prism(capsys, "run", "--model", str(d), "--text", "hi", "-q")
    assert code == 2 and err.count("\n") == 1 and str(d / "config.json") in err, err
    code, _, err = prism(capsys, "account", "--config", str(d), "--seq", "8")
    assert code == 2 and err.count("\n") == 1 and "nests deeper than" in err, err


def test_deeply_nested_shard_index_is_one_line(gpt2_dir, tmp_path):
    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + nested(100_000) + "}")
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "weights:")
    assert "model.safetensors.index.json" in str(info.value)


def sharded(gpt2_dir, tmp_path, shard: str):
    """A copy of the checkpoint whose shard index names ``shard`` for every tensor."""
    d = shutil.copytree(gpt2_dir, tmp_path / "m")
    from safetensors.torch import load_file

    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    return d


def test_shard_index_inside_the_folder_loads(gpt2_dir, tmp_path):
    d = sharded(gpt2_dir, tmp_path, "sub/part-1.safetensors")
    (d / "sub").mkdir()
    (d / "model.safetensors").rename(d / "sub" / "part-1.safetensors")
    ref = prism_ext.load(gpt2_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(prism_ext.load(d)(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_shard_index_may_not_leave_the_folder(gpt2_dir, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(gpt2_dir / "model.safetensors", outside)  # a readable shard: only the path is wrong
    shard = {"absolute": str(outside), "dotdot": "../outside.safetensors", "symlink": "link.safetensors"}[where]
    d = sharded(gpt2_dir, tmp_path, shard)
    if where == "symlink":
        (d / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError) as info:
        prism_ext.load(d)
    one_line(info, "weights:")
    assert repr(shard) in str(info.value) and "outside the checkpoint folder" in str(info.value)


def test_hub_cache_snapshot_links_into_blobs_load(gpt2_dir, tmp_path):
    """The Hugging Face cache layout: snapshots/REV/* are links into ../../blobs."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in gpt2_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    from safetensors.torch import load_file

    names = list(load_file(str(gpt2_dir / "model.safetensors")))
    (blobs / "index").write_text(json.dumps({"weight_map": dict.fromkeys(names, "model.safetensors")}))
    (snap / "model.safetensors.index.json").symlink_to(os.path.relpath(blobs / "index", snap))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(prism_ext.load(snap)(ids).logits, prism_ext.load(gpt2_dir)(ids).logits)


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


INDEX_INTS = [np.int64, np.int32, np.uint8, torch.tensor]


@pytest.mark.parametrize("make", INDEX_INTS, ids=["int64", "int32", "uint8", "tensor"])
def test_devices_and_cr_take_any_integer_operator_index_takes(gpt, make):
    ids = torch.tensor([list(b"sixteen bytes!!!")])
    want = gpt(ids, devices=2, cr=2)
    got = gpt(ids, devices=make(2), cr=make(2))
    assert torch.equal(got.logits, want.logits)
    got = gpt(ids, devices=make(2), cr=[make(2)] * len(gpt.net.blocks))
    assert torch.equal(got.logits, want.logits)
    want = gpt.generate(ids, devices=2, cr=2, max_new_tokens=2)
    assert torch.equal(gpt.generate(ids, devices=make(2), cr=make(2), max_new_tokens=2), want)
    assert partition(make(16), make(2)).sizes() == [8, 8]
    assert cr_schedule(make(4), 2) == [4, 4] and all(type(c) is int for c in cr_schedule(make(4), 2))
    from prism_ext.runtime.session import check_world  # a cluster's world and a worker's rank too

    world, rank = check_world(make(4), make(3))
    assert (world, rank) == (4, 3) and type(world) is int and type(rank) is int
    with pytest.raises(ValueError, match="^rank: must be <= 3"):
        check_world(make(4), make(4))
    with pytest.raises(TypeError, match="^world: expected an int"):
        check_world(True)


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 2.0, np.float32(2), "2", None])
def test_devices_refuses_bool_and_non_integers(gpt, value):
    if value is not None:  # devices=None is the executor's default (one simulated device)
        with pytest.raises(TypeError) as info:
            gpt(torch.tensor([[1, 2, 3]]), devices=value)
        one_line(info, "devices:")
    with pytest.raises(TypeError) as info:
        gpt(torch.tensor([[1, 2, 3]]), cr=value)
    one_line(info, "cr:")


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


def test_run_simulate_refuses_out_of_range_timeout_and_threads(capsys):
    for option, value in [("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "-1"), ("--timeout", "1e9"),
                          ("--threads", "100000"), ("--threads", "0")]:
        code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "hello there world", "--simulate",
                               "--devices", "2", "--max-new-tokens", "1", "--no-compare", "-q", option, value)
        assert code == 2 and out == "", (option, value, out)
        assert len(err.strip().splitlines()) == 1 and option in err, err


def test_run_simulate_sets_threads(capsys):
    before = torch.get_num_threads()
    try:
        code, _, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "hello there world", "--simulate",
                             "--devices", "2", "--max-new-tokens", "1", "--no-compare", "-q", "--threads", "3")
        assert code == 0, err
        assert torch.get_num_threads() == 3 and prism_ext.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
        prism_ext.set_num_threads(before)


def test_huge_threads_refused_before_torch_sees_them(tmp_path):
    """torch.set_num_threads(100000) succeeds, and the process then dies at
    exit (SIGSEGV): the bound is checked first, and the process exits cleanly."""
    code = ("import torch\n"
            "from prism_ext.runtime import set_threads\n"
            "before = torch.get_num_threads()\n"
            "for bad in (100000, 2**40, 0, -1, True, 2.0):\n"
            "    try:\n"
            "        set_threads(bad)\n"
            "    except (TypeError, ValueError) as exc:\n"
            "        assert str(exc).startswith('threads: '), exc\n"
            "    else:\n"
            "        raise SystemExit(f'accepted {bad!r}')\n"
            "assert torch.get_num_threads() == before\n"
            "print('refused')\n")
    # cwd: not the source tree, whose prism_ext has no built _C
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.returncode, r.stdout, r.stderr)


def test_run_with_huge_threads_exits_2_on_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prism_ext", "run", "--model", "gpt2-tiny", "--text", "hello world",
                        "--devices", "2", "-q", "--threads", "100000"], capture_output=True, text=True, timeout=120, check=False,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "--threads" in r.stderr, r.stderr


def numeric_options():
    """(command words, option, argparse type) of every option of every command
    that takes a number."""
    found = []

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + [name])
            elif action.option_strings and action.nargs != 0:
                found.append((words, action.option_strings[0], action.type))

    walk(cli.build_parser(), [])
    return found


def test_every_numeric_option_goes_through_the_shared_check():
    options = numeric_options()
    assert len(options) > 40
    raw = [(" ".join(w), o) for w, o, t in options if t in (int, float)]
    assert raw == [], f"numeric options parsed without the shared check: {raw}"
    assert sum(isinstance(t, cli_args.Bounded) for _, _, t in options) >= 35


def bad_values(t: cli_args.Bounded) -> list[str]:
    lo, hi = t.minimum, t.maximum
    out = ["nan", "inf", "-inf", "1e999", "9" * 5000, str(hi * 10 + 1), str(lo - 1) if not t.real else repr(lo - 1.5)]
    if t.positive:
        out.append("0")
    return [f"1,{v}" if t.many else v for v in out]


@pytest.mark.parametrize("words, option, kind", [o for o in numeric_options() if isinstance(o[2], cli_args.Bounded)],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v if isinstance(v, str) else "")
def test_numeric_option_refuses_nan_inf_negative_and_huge(capsys, words, option, kind):
    """Each value is refused while parsing, before any model or process: exit
    status 2 and one line naming the option."""
    for value in bad_values(kind):
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args([*words, f"{option}={value}"])
        err = capsys.readouterr().err
        assert info.value.code == 2, (option, value)
        assert len(err.strip().splitlines()) == 1 and option in err and len(err) < 400, (value[:20], err)

"""Bad checkpoints and bad arguments give clear errors naming the argument."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_helpers import hf_bert, hf_gpt2, save

import prism_ext


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save(hf_gpt2(), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return prism_ext.load(gpt2_dir)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(gpt2_dir, tmp_path):
    d = copy(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'mixtral' is not supported"):
        prism_ext.load(d)


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights(gpt2_dir, tmp_path, fmt):
    d = copy(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / fmt).write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        prism_ext.load(d)


def test_mismatched_shapes(gpt2_dir, tmp_path):
    d = copy(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights: tensor '.*' .* has shape .*the config needs"):
        prism_ext.load(d)


def test_missing_tensor(tmp_path):
    hf = hf_bert()
    sd = {k: v for k, v in hf.state_dict().items() if "layer.1.output.dense.weight" not in k}
    hf.save_pretrained(str(tmp_path), state_dict=sd)
    with pytest.raises(ValueError, match="no tensor 'encoder.layer.1.output.dense.weight'"):
        prism_ext.load(tmp_path)


def test_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="never downloads.*huggingface-cli download openai-community/gpt2"):
        prism_ext.load("openai-community/gpt2")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prism_ext.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        prism_ext.load(tmp_path)


def test_hub_name_in_local_cache_resolves(gpt2_dir, tmp_path, monkeypatch):
    snap = tmp_path / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(gpt2_dir, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert prism_ext.load("someone/tiny").directory == snap


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"cr": 0}, ValueError, "cr: must be >= 1"),
        ({"cr": -3}, ValueError, "cr: must be >= 1"),
        ({"cr": 1.5}, TypeError, "cr: expected an int"),
        ({"cr": [1, 2, 3]}, ValueError, "cr: a per-layer schedule needs 2"),
        ({"devices": 0}, ValueError, "devices: must be >= 1"),
        ({"devices": 12}, ValueError, "devices: 12 devices need at least 12 positions, the input has 11"),
        ({"devices": 2.0}, TypeError, "devices: expected an int"),
        ({"mode": "megatron"}, ValueError, "mode: expected one of single, prism, voltage, tp"),
        ({"wire_dtype": "fp8"}, ValueError, "wire_dtype"),
        ({"compression_point": "output"}, ValueError, "compression_point"),
        ({"mean_weighting": "sqrt"}, ValueError, "mean_weighting"),
        ({"device_weights": [1, -1]}, ValueError, "device_weights"),
        ({"pixel_values": torch.zeros(1)}, TypeError, "pixel_values: unexpected keyword argument .gpt2 takes input_ids"),
        ({"bogus": 1}, TypeError, "bogus: unexpected keyword argument"),
    ],
)
def test_bad_call_arguments(gpt2, kwargs, exc, match):
    kwargs = {"devices": 2, **kwargs}
    with pytest.raises(exc, match=match):
        gpt2(torch.zeros(1, 11, dtype=torch.long), **kwargs)


def test_bad_inputs(gpt2):
    with pytest.raises(ValueError, match=r"input_ids: values must be in \[0, 64\)"):
        gpt2(torch.full((1, 4), 64))
    with pytest.raises(TypeError, match="input_ids: expected an integer dtype"):
        gpt2(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="input_ids: expected shape"):
        gpt2(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids: 65 positions exceed n_positions=64"):
        gpt2(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        gpt2(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gpt2.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="top_k"):
        gpt2.generate(torch.zeros(1, 4, dtype=torch.long), top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        gpt2.generate(torch.zeros(1, 4, dtype=torch.long), temperature=-1)


def test_generate_needs_a_language_model(tmp_path):
    m = prism_ext.load(save(hf_bert(), tmp_path))
    with pytest.raises(ValueError, match="generate: needs a language model head"):
        m.generate(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="pixel_values: unexpected keyword argument"):
        m(pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="inputs: input_ids is required"):
        m({"attention_mask": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="inputs: bert takes .* got unexpected labels"):
        m({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1)})

"""The training script's PRISM-aware attention is the engine's PRISM: a model
trained with it is trained for exactly what prism_ext runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prism_ext
from prism_ext import zoo
from prism_ext.zoo import train as T


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = T.GPT2(256, 64, 32, 2, 2)
    with torch.no_grad():  # larger weights than the init, so attention matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path_factory.mktemp("gpt2")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg = dict(T.GPT2_CFG, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    (out / "config.json").write_text(json.dumps(T._gpt2_config(cfg)))
    return model.eval(), prism_ext.load(out)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    cfg = dict(T.VIT_CFG, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2)
    model = T.ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path_factory.mktemp("vit")
    save_file(T._vit_state(model), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(T._vit_config(cfg)))
    return model.eval(), prism_ext.load(out)


@pytest.mark.parametrize("devices,cr", [(1, 1), (4, 1), (4, 4), (3, 2), (2, 8), (4, 16)])
def test_gpt2_training_layout_is_the_engine(tiny_gpt2, devices, cr):
    model, loaded = tiny_gpt2
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(devices * 100 + cr))
    with torch.no_grad():
        ours = model(ids, T.prism_layout(50, devices, cr, causal=True))
        torch.testing.assert_close(ours, loaded(ids, devices=devices, cr=cr).logits, rtol=1e-4, atol=1e-4)
        if devices > 1 and cr > 1:  # the layout really changes the result
            assert (ours - model(ids)).abs().max() > 1e-2


@pytest.mark.parametrize("devices,cr", [(1, 1), (4, 1), (4, 4), (3, 2), (2, 8)])
def test_vit_training_layout_is_the_engine(tiny_vit, devices, cr):
    model, loaded = tiny_vit
    px = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(devices * 100 + cr))
    with torch.no_grad():
        ours = model(px, T.prism_layout(65, devices, cr, causal=False))
        torch.testing.assert_close(ours, loaded(px, devices=devices, cr=cr).logits, rtol=1e-4, atol=1e-4)
        if devices > 1 and cr > 1:
            assert (ours - model(px)).abs().max() > 1e-3


def _prism_cli(*argv) -> int:
    from prism_ext.cli import main

    return main(list(argv))


def test_zoo_train_gpt2_end_to_end(tmp_path, monkeypatch, capsys):
    """`prism zoo train gpt2-tiny` with a toy-sized recipe: checkpoint, tokenizer and metrics come out loadable."""
    cfg = dict(T.GPT2_CFG, n_embd=16, n_layer=1, n_head=2, steps=3, warmup=1, batch=2,
               prism_finetune=dict(T.GPT2_CFG["prism_finetune"], steps=2))
    monkeypatch.setattr(T, "GPT2_CFG", cfg)
    monkeypatch.chdir(tmp_path)  # no --out: ./gpt2-tiny, never the installed package's copy
    bundled = {p.name: p.read_bytes() for p in zoo.model_dir("gpt2-tiny").iterdir() if p.is_file()}
    assert _prism_cli("zoo", "train", "gpt2-tiny", "--threads", "1") == 0
    out = tmp_path / "gpt2-tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics["reload_max_abs_logit_diff"] < 1e-4
    assert set(metrics["greedy_samples"]) == set(T.GPT2_PROMPTS)
    assert set(metrics["prism_held_out_perplexity_4_devices"]) == {"1", "2", "4", "8", "16"}
    assert prism_ext.load(out).net.d == 16
    assert {p.name: p.read_bytes() for p in zoo.model_dir("gpt2-tiny").iterdir() if p.is_file()} == bundled


def test_zoo_train_vit_end_to_end(tmp_path, monkeypatch, capsys):
    cfg = dict(T.VIT_CFG, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, epochs=1)
    monkeypatch.setattr(T, "VIT_CFG", cfg)
    assert _prism_cli("zoo", "train", "vit-tiny-digits", "--out", str(tmp_path), "--threads", "1") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["reload_held_out_accuracy"] == metrics["held_out_accuracy"]
    held = np.load(tmp_path / "heldout_digits.npz")
    assert len(held["labels"]) == metrics["data"]["held_out_images"] == 359
    assert prism_ext.load(tmp_path).net.head == "classification"

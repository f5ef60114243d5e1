"""`prism zoo train` end to end on toy-sized recipes: exact training through
the twin, then `prism finetune`'s PRISM-aware phase, and a checkpoint that
prism_ext and transformers both load (the twin itself: tests/test_twin.py)."""

from __future__ import annotations

import json

import numpy as np

import prism_ext
from prism_ext import zoo
from prism_ext.training import bundled as T


def _prism_cli(*argv) -> int:
    from prism_ext.cli import main

    return main(list(argv))


def test_zoo_train_gpt2_end_to_end(tmp_path, monkeypatch, capsys):
    """`prism zoo train gpt2-tiny` with a toy-sized recipe: checkpoint, tokenizer and metrics come out loadable."""
    cfg = dict(T.GPT2_CFG, n_embd=16, n_layer=1, n_head=2, steps=3, warmup=1, batch=2,
               prism_finetune=dict(T.GPT2_CFG["prism_finetune"], steps=2, batch=2))
    monkeypatch.setattr(T, "GPT2_CFG", cfg)
    monkeypatch.chdir(tmp_path)  # no --out: ./gpt2-tiny, never the installed package's copy
    bundled = {p.name: p.read_bytes() for p in zoo.model_dir("gpt2-tiny").iterdir() if p.is_file()}
    assert _prism_cli("zoo", "train", "gpt2-tiny", "--threads", "1") == 0
    out = tmp_path / "gpt2-tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics["transformers_max_abs_logit_diff"] < 1e-4
    report = json.loads((out / "prism_finetune.json").read_text())
    assert report["recipe"]["task"] == "lm" and report["recipe"]["steps"] == 2
    assert set(metrics["greedy_samples"]) == set(T.GPT2_PROMPTS)
    assert set(metrics["prism_held_out_perplexity_4_devices"]) == {"1", "2", "4", "8", "16"}
    assert prism_ext.load(out).net.d == 16
    assert {p.name: p.read_bytes() for p in zoo.model_dir("gpt2-tiny").iterdir() if p.is_file()} == bundled


def test_zoo_train_vit_end_to_end(tmp_path, monkeypatch, capsys):
    cfg = dict(T.VIT_CFG, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, epochs=1,
               prism_finetune=dict(T.VIT_CFG["prism_finetune"], steps=2))
    monkeypatch.setattr(T, "VIT_CFG", cfg)
    assert _prism_cli("zoo", "train", "vit-tiny-digits", "--out", str(tmp_path), "--threads", "1") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["train_seconds"]) == {"pretrain", "prism_finetune"}
    report = json.loads((tmp_path / "prism_finetune.json").read_text())
    assert report["data"]["labels"] and report["data"]["held_out_examples"] == 359
    assert round(report["metrics"]["after"][0]["accuracy"], 4) == metrics["held_out_accuracy"]
    held = np.load(tmp_path / "heldout_digits.npz")
    assert len(held["labels"]) == metrics["data"]["held_out_images"] == 359
    assert prism_ext.load(tmp_path).net.head == "classification"


def test_zoo_train_llama_end_to_end(tmp_path, capsys, monkeypatch):
    """`prism zoo train llama-tiny` with a toy-sized recipe: a Llama checkpoint (GQA, RoPE, RMSNorm, SwiGLU) that
    transformers loads, the BPE tokenizer trained on the training topics alone, its chat template, and the
    held-out grid before and after the PRISM-aware phase."""
    import transformers

    cfg = dict(T.LLAMA_CFG, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=24, n_positions=64, vocab_size=300, steps=2, warmup=1, batch=2,
               prism_finetune=dict(T.LLAMA_CFG["prism_finetune"], steps=2, batch=2))
    monkeypatch.setattr(T, "LLAMA_CFG", cfg)
    assert _prism_cli("zoo", "train", "llama-tiny", "--out", str(tmp_path), "--threads", "1", "-q") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["transformers_max_abs_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 < config["num_attention_heads"]
    model = prism_ext.load(tmp_path)
    assert model.model_type == "llama" and model.net.vocab == 300 and model.net.blocks[0].kv_heads == 2
    grid = metrics["held_out_perplexity_grid"]
    assert grid["default_exact_rows"] == "first"
    assert {"exact", "P4 CR8", "P4 CR8 first", "P4 CR8 none", "P2 CR8"} <= set(grid["after"]) == \
        set(grid["before_prism_phase"])
    assert abs(grid["after"]["exact"]["perplexity"] - metrics["held_out_perplexity"]) < 1e-3
    report = json.loads((tmp_path / "prism_finetune.json").read_text())
    assert report["recipe"]["exact_rows"] == ["first"] and report["recipe"]["steps"] == 2
    # the tokenizer: 300 BPE tokens with ChatML's special tokens first, no held-out text in its training
    tok = model.tokenizer
    assert len(tok) == 300 and [tok.convert_ids_to_tokens(i) for i in range(3)] == list(T.LLAMA_SPECIAL)
    assert tok.eos_token == "<|im_end|>" and config["eos_token_id"] == [2, 0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = [{"role": "user", "content": "The \"raise\" statement"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        list(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert set(metrics["greedy_samples"]) == set(T.GPT2_PROMPTS) | set(T.LLAMA_CHATS)

"""`prism account` agrees with what the engine really sends and computes."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import hf_gpt2, save

import prism_ext
from prism_ext.cli import main


def account(capsys, *argv) -> dict:
    assert main(["account", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_account_matches_engine_runs(tmp_path, capsys):
    path = save(hf_gpt2(), tmp_path)
    m = prism_ext.load(path)
    rows = account(capsys, "--config", str(path), "-P", "2", "3", "-N", "24", "30", "--cr", "2", "5")["models"][0]["rows"]
    assert len(rows) == 8
    for r in rows:
        ids = torch.randint(0, 64, (1, r["positions"]))
        pri = m(ids, devices=r["devices"], cr=r["cr"]).stats
        volt = m(ids, devices=r["devices"], mode="voltage").stats
        assert r["comm_reduction"] == pytest.approx(1 - pri.activation_bytes / volt.activation_bytes, rel=1e-12)
        busiest = 1 - max(d.flops for d in pri.devices) / max(d.flops for d in volt.devices)
        mean = sum(1 - p.flops / v.flops for p, v in zip(pri.devices, volt.devices)) / len(pri.devices)
        assert r["compute_reduction_busiest"] == pytest.approx(busiest, rel=1e-12)
        assert r["compute_reduction_mean"] == pytest.approx(mean, rel=1e-12)


def test_account_standard_configs_and_headline(capsys):
    out = account(capsys, "-P", "4", "-N", "512", "--cr", "128")
    assert [e["model"] for e in out["models"]] == ["bert-base", "vit-b16", "gpt2"]
    assert out["models"][0]["rows"][0]["comm_reduction"] == pytest.approx(1 - 1 / 128)
    assert main(["account", "--model", "bert-base"]) == 0
    text = capsys.readouterr().out
    assert "51.24%" in text and "99.2%" in text


def test_account_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--cr"):
        main(["account", "--cr", "0"])
    with pytest.raises(SystemExit, match="--config: cannot read nowhere.json"):
        main(["account", "--config", "nowhere.json", "-N", "8"])
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8, "n_layer": 1}')
    with pytest.raises(SystemExit, match="--seq is required"):
        main(["account", "--config", str(tmp_path)])

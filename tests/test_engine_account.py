"""`prism account` agrees with what the engine really sends and computes:
its printed reductions against bytes counted by the transport and FLOPs
counted by torch's FLOP counter in real runs (not by prism_ext.method.accounting,
which produced them)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from engine_helpers import attention_flops, counted_flops, hf_gpt2, save

import prism_ext
from prism_ext.cli import main
from prism_ext.comm import LocalGroup
from prism_ext.method.engine import RunConfig, run_device
from prism_ext.method.partition import partition

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(-?[\d.]+)%\s+(-?[\d.]+)%\s+(-?[\d.]+)%\s*$")


def printed_table(capsys, *argv) -> dict:
    """`prism account ARGV` as the user reads it: (P, N, CR) -> the printed
    (comm, compute busiest, compute mean) reductions, as fractions."""
    assert main(["account", *argv]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        m = ROW.match(line)
        if m:
            P, N, cr, *pct = m.groups()
            rows[int(P), int(N), int(cr)] = tuple(-float(p) / 100 for p in pct)  # printed as -x.xx%
    return rows


def measured(net, ids, devices: int, cr: int, mode: str) -> tuple[int, list[int]]:
    """One run of every layer on in-process devices: (activation bytes the
    transport encoded, all devices; per device the FLOPs torch's counter sees
    in its layer loop plus its attention at the shapes it ran)."""
    part = partition(ids.shape[1], devices)
    cfg = RunConfig.make(len(net.blocks), mode=mode, cr=cr)
    full = {"input_ids": ids}

    def device(r):
        def program(transport):
            local = net.local_inputs(full, *part.ranges[r])
            box = {}
            flops = counted_flops(lambda: box.setdefault("res", run_device(net, local, part, r, transport, cfg)))
            stats = box["res"].stats
            n = stats.stop - stats.start
            for blk, s in zip(net.blocks, stats.layers):
                flops += attention_flops(ids.shape[0], blk.heads, n, n + s.rows_received, blk.d // blk.heads)
            return stats.activation_bytes, flops
        return program

    results = LocalGroup(devices).run([device(r) for r in range(devices)])
    return sum(b for b, _ in results), [f for _, f in results]


def reductions(net, ids, devices: int, cr: int) -> tuple[float, float, float]:
    """(comm, compute of the busiest device, mean of per-device compute) of PRISM vs Voltage, measured."""
    pri_bytes, pri = measured(net, ids, devices, cr, "prism")
    volt_bytes, volt = measured(net, ids, devices, cr, "voltage")
    return (1 - pri_bytes / volt_bytes, 1 - max(pri) / max(volt),
            sum(1 - p / v for p, v in zip(pri, volt)) / devices)


def test_account_matches_engine_runs(tmp_path, capsys):
    path = save(hf_gpt2(), tmp_path)
    net = prism_ext.load(path).net
    table = printed_table(capsys, "--config", str(path), "-P", "2,3", "-N", "24,30", "--cr", "2,5")
    assert len(table) == 8
    for (P, N, cr), printed in table.items():
        got = reductions(net, torch.randint(0, 64, (1, N)), P, cr)
        assert printed == pytest.approx(got, abs=5e-5)  # printed to 0.01%
    # --json gives the same numbers unrounded
    assert main(["account", "--json", "--config", str(path), "-P", "3", "-N", "30", "--cr", "5"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"][0]["rows"]
    got = reductions(net, torch.randint(0, 64, (1, 30)), 3, 5)
    assert (row["comm_reduction"], row["compute_reduction_busiest"], row["compute_reduction_mean"]) == \
        pytest.approx(got, rel=1e-12)


def test_account_bert_base_headline_setting(tmp_path, capsys):
    """The standard bert-base rows (per layer) against one real layer of
    bert-base's width: d = 768, d_ff = 3072, 12 heads, N = 512, P = 4 at the
    paper's CR = 128 and at CR = 16."""
    table = printed_table(capsys, "--model", "bert-base", "-P", "4", "-N", "512", "--cr", "16,128")
    assert set(table) == {(4, 512, 16), (4, 512, 128)}
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=64, max_position_embeddings=512)
    net = prism_ext.load(save(transformers.BertModel(cfg).eval(), tmp_path)).net
    ids = torch.randint(0, 64, (1, 512))
    for (P, N, cr), printed in table.items():
        assert printed == pytest.approx(reductions(net, ids, P, cr), abs=5e-5)
    assert table[4, 512, 128][0] == pytest.approx(1 - 1 / 128, abs=5e-5)  # 128 divides every device's 128 rows


def test_account_takes_lists_and_bundled_names_as_every_command_does(capsys):
    """Comma-separated lists (as eval and finetune take them) and a bundled
    name for --config (as --model takes one everywhere)."""
    from prism_ext import zoo

    table = printed_table(capsys, "--config", "gpt2-tiny", "-P", "2,4", "-N", "64", "--cr", "4")
    assert set(table) == {(2, 64, 4), (4, 64, 4)}
    assert table == printed_table(capsys, "--config", str(zoo.model_dir("gpt2-tiny")), "-P", "2,4", "-N", "64",
                                  "--cr", "4")
    with pytest.raises(SystemExit) as info:  # the old space-separated form is refused, not half-read
        main(["account", "-P", "2", "4"])
    assert info.value.code == 2


def test_prism_version(capsys):
    from prism_ext._version import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"prism-ext {__version__}"


def test_account_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse: one line, exit status 2
        main(["account", "--cr", "0"])
    assert info.value.code == 2 and "--cr" in capsys.readouterr().err
    assert main(["account", "--config", "nowhere.json", "-N", "8"]) == 2
    assert "--config: cannot read nowhere.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8, "n_layer": 1}')
    assert main(["account", "--config", str(tmp_path)]) == 2
    assert "--seq: required with --config" in capsys.readouterr().err


def test_account_reads_grouped_query_configs_and_the_kv_point(tmp_path, capsys):
    """A Qwen2-shaped config: the table uses its GQA widths and gated MLP, at
    the family's default point (kv) unless --point says otherwise."""
    from prism_ext.method.accounting import BlockShape, reduction_table

    cfg = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = BlockShape(896, 4864, 896, 128, gated=True)
    for extra, point in (([], "kv"), (["--point", "attn_input"], "attn_input")):
        assert main(["account", "--json", "--config", str(tmp_path), "-P", "2,4", "-N", "512", "--cr", "8",
                     *extra]) == 0
        (entry,) = json.loads(capsys.readouterr().out)["models"]
        assert entry["point"] == point and (entry["q_width"], entry["kv_width"], entry["gated"]) == (896, 128, True)
        want = reduction_table(shape, None, [2, 4], [512], [8], point=point)
        got = [tuple(r.values()) for r in entry["rows"]]
        assert got == [tuple(w) for w in want]
    # kv sends 2 x 128 values a mean instead of 896: the communication saving grows accordingly
    assert reduction_table(shape, None, [2], [512], [8], point="kv")[0][3] == pytest.approx(1 - (256 / 896) / 8)

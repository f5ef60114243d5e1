"""The bundled models through the public API, and the job's CLI: `prism demo`,
`prism run --json`, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import prism

import prism_ext
from prism_ext import zoo
from prism_ext.inputs.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def held_out():
    data = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    return data["images"], data["labels"]


def test_bundled_models_load_by_name_and_folder(gpt, vit):
    assert gpt.model_type == "gpt2" and gpt.net.head == "lm"
    assert vit.model_type == "vit" and vit.net.head == "classification"
    by_folder = prism_ext.load(zoo.model_dir("gpt2-tiny"))
    ids = torch.tensor([load_tokenizer(zoo.model_dir("gpt2-tiny")).encode("def f(x):")])
    torch.testing.assert_close(by_folder(ids).logits, gpt(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        prism_ext.load("gpt2-tinyy")


def test_bundle_size():
    total = sum(p.stat().st_size for name in zoo.NAMES for p in zoo.model_dir(name).rglob("*") if p.is_file())
    assert total <= 8 * 2**20


def held_out_text() -> bytes:
    """The text gpt2-tiny was not trained on, re-derived from the split
    prism_ext/training/bundled.py documents: Python's pydoc_data.topics sorted by
    name, every 8th topic held out (training used the others)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[::8]).encode("utf-8")


@pytest.mark.parametrize("devices,cr", [(1, 1), (4, 4)])
def test_gpt2_tiny_perplexity_on_held_out_text(gpt, devices, cr):
    """Next-byte perplexity over the first 8 windows of held-out text, run
    through prism_ext. Measured (2026-12-01, the model remade by prism zoo train
    with prism finetune's phase): 4.00 on one device, 4.12 at P = 4, CR = 4; the
    held-out bytes' own unigram perplexity (the best any byte-frequency model
    does on them) is 25.7."""
    test = held_out_text()
    ctx = gpt.net.n_positions
    ids = torch.tensor(list(test[: 8 * ctx])).reshape(8, ctx)
    logits = gpt(ids, devices=devices, cr=cr).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert math.exp(nll.item()) <= 4.5
    freq = np.bincount(np.frombuffer(test, np.uint8), minlength=256) / len(test)
    unigram = math.exp(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    assert math.exp(nll.item()) <= unigram / 5


def test_llama_tiny_perplexity_on_held_out_text(llama):
    """Next-token perplexity over the first 8 windows of 256 held-out tokens (the same held-out topics as
    gpt2-tiny's, through llama-tiny's own BPE tokenizer), run through prism_ext. Measured (2026-12-04, after
    the PRISM-aware phase): 23.54 on one device, 23.99 at P = 4, CR = 8 (1.019x; position 0 exact, the
    family's default), 23.67 at P = 2, CR = 8; the issue's bar is 1.05x at P = 4, CR = 8."""
    ids = llama.tokenizer.encode(held_out_text().decode("utf-8"))
    windows = torch.tensor(ids[: 8 * 257]).reshape(8, 257)

    def perplexity(devices, cr):
        logits = llama(windows[:, :-1], devices=devices, cr=cr).logits
        return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())

    exact = perplexity(1, 1)
    assert exact <= 26
    assert perplexity(4, 8) <= 1.05 * exact and perplexity(2, 8) <= 1.02 * exact


def test_llama_tiny_is_a_llama_with_gqa_and_a_chat_template(llama):
    net = llama.net
    assert llama.model_type == "llama" and net.head == "lm" and len(net.blocks) == 4
    assert net.blocks[0].heads == 4 and net.blocks[0].kv_heads == 2 and net.vocab == 1024
    assert net.defaults["exact_rows"] == "first" and sorted(llama.eos_ids) == [0, 2]
    tok = llama.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("devices", [1, 4])
def test_llama_tiny_equals_transformers_at_cr1(llama, devices):
    """The bundled folder is a LlamaForCausalLM checkpoint: transformers' logits and greedy generation
    equal prism_ext's at CR = 1 (one device, and four devices sending every row)."""
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(zoo.model_dir("llama-tiny")).eval()
    ids = torch.tensor([llama.tokenizer.encode(held_out_text().decode()[:600])[:100]])
    with torch.no_grad():
        torch.testing.assert_close(llama(ids, devices=devices, cr=1).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
        expect = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert llama.generate(ids, devices=devices, cr=1, max_new_tokens=20, eos_token_id=[]).tolist() == expect.tolist()


def test_llama_tiny_tokenizer_equals_transformers(llama):
    """The bundled tokenizer.json + tokenizer_config.json read by prism_ext and by transformers' AutoTokenizer:
    the same ids, the same text back, the same special tokens and the same rendered chat."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(zoo.model_dir("llama-tiny"))
    tok = llama.tokenizer
    texts = [held_out_text().decode()[:3000], "  def f(x):\n\treturn x ** 2  # é, 名前, 🙂",
             "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids) == text
    assert (tok.eos_token, tok.bos_token, tok.pad_token, len(tok)) == (hf.eos_token, hf.bos_token, hf.pad_token,
                                                                       len(hf))
    chat = [{"role": "user", "content": "The \"if\" statement"}, {"role": "assistant", "content": "It runs."},
            {"role": "user", "content": "And else?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_held_out_digits_are_the_split_train_py_holds_out(held_out):
    """heldout_digits.npz is the test part of the split documented in
    prism_ext/training/bundled.py (re-derived here): scikit-learn's digits in a fixed
    shuffle (numpy seed 0), the first 20% held out (training used the rest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    test = order[: round(0.2 * len(order))]
    images, labels = held_out
    assert np.array_equal(images, digits.images[test].astype(np.uint8))
    assert np.array_equal(labels, digits.target[test]) and len(labels) == 359


@pytest.mark.parametrize("devices,cr,most_wrong", [(1, 1, 5), (4, 4, 5), (4, 8, 7)])
def test_vit_tiny_digits_classifies_held_out_digits(vit, held_out, devices, cr, most_wrong):
    """Predicted class against the label for all 359 held-out digits, through
    prism_ext. Measured (2026-12-05, after 6000 steps of prism finetune's PRISM-aware phase): 3 wrong
    on one device, 3 at P = 4, CR = 4, 5 at P = 4, CR = 8; the bounds leave 2 for other CPUs' rounding."""
    images, labels = held_out
    predicted = vit(vit.image_processor.digits_to_pixels(images), devices=devices, cr=cr).logits.argmax(-1).numpy()
    assert (predicted != labels).sum() <= most_wrong


DEVICE_FIELDS = {"rank", "positions", "bytes_sent", "activation_bytes", "flops", "seconds"}
STATS_FIELDS = {"mode", "crs", "wire_dtype", "partition", "bytes_sent", "activation_bytes", "flops", "devices"}


def _check_stats(stats, devices):
    assert STATS_FIELDS <= set(stats) and len(stats["devices"]) == devices
    assert all(DEVICE_FIELDS <= set(d) for d in stats["devices"])
    assert sum(d["bytes_sent"] for d in stats["devices"]) == stats["bytes_sent"] > 0


def test_demo_quick_json(capsys, tmp_path, vit, held_out):
    code, out, err = prism(capsys, "demo", "--quick", "--json", "-q", "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    r = json.loads(out)
    g, v = r["gpt2"], r["vit"]
    assert r["devices"] == 4 and r["figure"].endswith("d.png") and (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert len(g["output"]["token_ids"]) == len(g["reference"]["token_ids"]) == 16
    assert {"tokens_identical", "first_divergence", "prefill_top1_agreement", "text"} <= set(g["reference"])
    assert g["decode"]["bytes_sent"] == 0
    _check_stats(g["stats"], 4)
    c = r["llama"]  # llama-tiny answers a chat rendered with its own template, on the same devices
    assert c["model_type"] == "llama" and c["messages"][-1] == {"role": "user", "content": "The \"break\" statement"}
    assert c["input"]["text"].startswith('<|im_start|>user\nThe "for" statement<|im_end|>\n<|im_start|>assistant\n')
    assert c["input"]["text"].endswith('<|im_start|>user\nThe "break" statement<|im_end|>\n<|im_start|>assistant\n')
    assert 1 <= len(c["output"]["token_ids"]) <= 16 and c["decode"]["bytes_sent"] == 0
    _check_stats(c["stats"], 4)
    assert c["stats"]["bytes_sent"] < c["voltage"]["bytes_sent"]
    _check_stats(v["stats"], 4)
    for part in (g, v):  # PRISM sends less than Voltage and its busiest device computes less
        assert part["stats"]["bytes_sent"] < part["voltage"]["bytes_sent"]
        assert 0 < part["voltage"]["bytes_reduction"] < 1 and part["voltage"]["busiest_device_flops_reduction"] > 0
    assert len(v["outputs"]) == len(v["reference"]) == len(v["labels"]) == 4
    assert all({"class_id", "label", "probability"} <= set(o) for o in v["outputs"])
    # the exact reference gets the demo's digits (the first of each class) right; PRISM's classes are
    # what the API gives for them (its accuracy over all 359: test_vit_tiny_digits_classifies_held_out_digits)
    assert [o["class_id"] for o in v["reference"]] == v["labels"]
    images, labels = held_out
    pick = [int(np.flatnonzero(labels == k)[0]) for k in range(4)]
    expect = vit(vit.image_processor.digits_to_pixels(images[pick]), devices=4, cr=v["cr"]).logits.argmax(-1)
    assert [o["class_id"] for o in v["outputs"]] == expect.tolist()


def test_demo_at_cr1_equals_one_device(capsys, tmp_path):
    code, out, err = prism(capsys, "demo", "--quick", "--json", "-q", "--cr", "1", "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    r = json.loads(out)
    g = r["gpt2"]
    for lm in (g, r["llama"]):
        assert lm["output"]["token_ids"] == lm["reference"]["token_ids"]
        assert lm["reference"]["prefill_top1_agreement"] == 1.0
    assert [o["class_id"] for o in r["vit"]["outputs"]] == [x["class_id"] for x in r["vit"]["reference"]]


def test_demo_text_output(capsys, tmp_path):
    code, out, err = prism(capsys, "demo", "--quick", "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    assert "bytes exchanged" in out and "figure:" in out and "PRISM" in out
    assert "== llama-tiny" in out and "<|im_start|>assistant" in out
    assert "prism: loading gpt2-tiny" in err  # progress goes to stderr


def test_run_json_text(capsys, gpt):
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "The import statement", "--devices", "3",
                           "--cr", "2", "--max-new-tokens", "5", "--json", "-q")
    assert code == 0, err
    r = json.loads(out)
    assert r["model"] == "gpt2-tiny" and r["devices"] == 3 and r["cr"] == 2 and r["mode"] == "prism"
    assert len(r["output"]["token_ids"]) == 5 and r["input"]["tokens"] == len("The import statement")
    _check_stats(r["stats"], 3)
    ids = torch.tensor([list(b"The import statement")])
    expect = gpt.generate(ids, devices=3, cr=2, max_new_tokens=5)[0, ids.shape[1]:].tolist()
    assert r["output"]["token_ids"] == expect


def test_run_json_voltage_forward(capsys):
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text", "for x in", "--mode", "voltage",
                           "--max-new-tokens", "0", "--json", "-q", "--devices", "2")
    assert code == 0, err
    r = json.loads(out)
    assert r["stats"]["mode"] == "voltage" and r["reference"]["top1_agreement"] == 1.0


def test_run_json_image_file(capsys, tmp_path, vit, held_out):
    images, labels = held_out
    # a held-out digit as an ordinary image file: dark ink on white, 10x larger, with a margin
    big = np.kron(images[0].astype(np.float32) / 16, np.ones((10, 10)))
    page = np.ones((100, 100))
    page[10:90, 10:90] = 1 - big
    path = tmp_path / "digit.png"
    Image.fromarray(np.repeat((page * 255).astype(np.uint8)[..., None], 3, axis=2)).save(path)
    code, out, err = prism(capsys, "run", "--model", "vit-tiny-digits", "--image", str(path), "--json", "-q")
    assert code == 0, err
    r = json.loads(out)
    assert r["input"] == {"image": str(path), "positions": 65} and r["index"] == 0
    o = r["output"]
    assert o["class_id"] == r["reference"]["class_id"] == labels[0] and 0 < o["probability"] <= 1
    _check_stats(r["stats"], 4)


@pytest.mark.parametrize("argv,needle", [
    (["run", "--model", "no-such-model", "--text", "hi"], "no-such-model"),
    (["run", "--model", "gpt2-tiny", "--text", "hi", "--cr", "0"], "--cr"),
    (["run", "--model", "gpt2-tiny", "--text", "hi", "--devices", "0"], "--devices"),
    (["run", "--model", "gpt2-tiny", "--text", "hi", "--devices", "5"], "devices"),
    (["run", "--model", "vit-tiny-digits", "--image", "/no/such/file.png"], "/no/such/file.png"),
    (["run", "--model", "gpt2-tiny", "--text", "x" * 200], "positions"),
    (["run", "--model", "gpt2-tiny", "--text", "x" * 100, "--max-new-tokens", "40"], "positions"),
    (["run", "--model", "gpt2-tiny", "--image", "a.png"], "a.png"),
    (["run", "--model", "vit-tiny-digits", "--text", "hi"], "--image"),
    (["run", "--model", "gpt2-tiny", "--text", "hi", "--mode", "voltage"], "mode"),
    (["run", "--model", "gpt2-tiny", "--text", "hi", "--weights", "1,1"], "--weights"),
    (["run", "--model", "gpt2-tiny"], "--text"),
    (["demo", "--cr", "0"], "--cr"),
    (["zoo", "train", "bert-huge"], "bert-huge"),
])
def test_bad_arguments_one_line(capsys, argv, needle):
    code, out, err = prism(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert err.startswith("prism ")


def test_zoo_list(capsys):
    code, out, _ = prism(capsys, "zoo", "list")
    assert code == 0 and all(name in out for name in zoo.NAMES)


def test_bundled_checkpoints_are_hugging_face_checkpoints(gpt, vit, held_out):
    """transformers reads the folders as GPT2LMHeadModel / ViTForImageClassification and agrees with prism_ext."""
    import transformers  # the `test` extra

    hf = transformers.GPT2LMHeadModel.from_pretrained(zoo.model_dir("gpt2-tiny")).eval()
    ids = torch.tensor([list(b"The with statement")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt(ids).logits, rtol=1e-4, atol=1e-4)
    hf_vit = transformers.ViTForImageClassification.from_pretrained(zoo.model_dir("vit-tiny-digits")).eval()
    px = vit.image_processor.digits_to_pixels(held_out[0][:8])
    with torch.no_grad():
        torch.testing.assert_close(hf_vit(pixel_values=px).logits, vit(px).logits, rtol=1e-4, atol=1e-4)

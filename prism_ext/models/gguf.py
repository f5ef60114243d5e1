"""GGUF checkpoints (llama.cpp's format) of the Llama and Qwen2
architectures, read directly through the ``gguf`` package: the metadata
becomes the config dict a Hugging Face config.json gives, the tensors are
dequantized to float32 (``gguf.quants.dequantize``) under their Hugging Face
names, so :mod:`prism_ext.models.llama` runs them unchanged. The tokenizer
and the chat template are read by
:func:`prism_ext.inputs.tokenizer.gguf_tokenizer`.

llama.cpp's converter permutes the rows of a Llama Q and K projection for
its RoPE layout (pairs (2i, 2i+1) of a head instead of (i, i + dh/2)); it is
undone here as transformers' GGUF loader undoes it. Qwen2 is converted
without that permutation. A Llama 3.1/3.2 file carries its ``llama3`` RoPE
scaling as ``rope_freqs.weight``, the divisors of each frequency, which
:func:`load` applies to the network's RoPE as llama.cpp does.

Anything else is refused by name: another architecture, another RoPE
scaling, experts, a tensor a Llama/Qwen2 model has no place for, a tensor
whose shape the metadata contradicts, a quantization type the ``gguf``
package cannot dequantize."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..inputs.gguf import metadata, open_gguf

# general.architecture -> (model_type, the transformers architecture it stands for)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
_PERMUTED = {"llama"}  # llama.cpp permutes Q/K rows of these for its RoPE layout

# metadata key (after "ARCH.") -> (config key, required, largest accepted); a header
# value is checked before anything uses it
_INTS = (
    ("block_count", "num_hidden_layers", True, 4096),
    ("embedding_length", "hidden_size", True, 1 << 18),
    ("feed_forward_length", "intermediate_size", True, 1 << 20),
    ("attention.head_count", "num_attention_heads", True, 1 << 12),
    ("attention.head_count_kv", "num_key_value_heads", False, 1 << 12),
    ("context_length", "max_position_embeddings", True, 1 << 26),
    ("vocab_size", "vocab_size", False, 1 << 22),
)
_TOKEN_IDS = (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"),
              ("unk_token_id", "unknown"))

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
# GGUF tensor name (in a block) -> Hugging Face name (in model.layers.N)
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"


def _int(meta: dict, key: str, path, required: bool, largest: int) -> int | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise ValueError(f"gguf: {path}: metadata {key!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
        raise ValueError(f"gguf: {path}: metadata {key!r} must be an integer in [1, {largest}], got {value!r}")
    return value


def _float(meta: dict, key: str, path, default: float | None, low: float, high: float) -> float:
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"gguf: {path}: metadata {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"gguf: {path}: metadata {key!r} must be a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def read_config(meta: dict, path, has_output: bool) -> dict:
    """The Hugging Face config dict the metadata describes (config.json's keys)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"gguf: {path}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    model_type, architecture = ARCHITECTURES[arch]
    config = {"model_type": model_type, "architectures": [architecture], "hidden_act": "silu",
              "tie_word_embeddings": not has_output}
    for key, name, required, largest in _INTS:
        value = _int(meta, f"{arch}.{key}", path, required, largest)
        if value is not None:
            config[name] = value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    if "vocab_size" not in config:  # older files state it only through the token list
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"gguf: {path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary")
        config["vocab_size"] = len(tokens)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = _int(meta, f"{arch}.attention.key_length", path, False, 1 << 12)
    if head_dim is None and d % heads:
        raise ValueError(f"gguf: {path}: {arch}.embedding_length={d} is not a multiple of "
                         f"{arch}.attention.head_count={heads}")
    head_dim = head_dim or d // heads
    if head_dim != d // heads:
        config["head_dim"] = head_dim
    for key in ("attention.value_length", "rope.dimension_count"):  # the family rotates and values whole heads
        value = _int(meta, f"{arch}.{key}", path, False, 1 << 12)
        if value is not None and value != head_dim:
            raise ValueError(f"gguf: {path}: metadata {arch}.{key}={value} is not the head width {head_dim} "
                             f"(partial rotary or unequal key/value widths are not supported)")
    config["rms_norm_eps"] = _float(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, None, 0, 1)
    config["rope_theta"] = _float(meta, f"{arch}.rope.freq_base", path, 10000.0, 1, 1e12)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", 1.0)
    if scaling not in ("none", "linear") or (scaling == "linear" and factor != 1.0):
        raise ValueError(f"gguf: {path}: metadata {arch}.rope.scaling.type={scaling!r} "
                         f"(factor {factor!r}) is not supported (supported: none)")
    for key in ("expert_count", "expert_used_count"):
        if meta.get(f"{arch}.{key}"):
            raise ValueError(f"gguf: {path}: metadata {arch}.{key}={meta[f'{arch}.{key}']!r}: "
                             f"mixture-of-experts models are not supported")
    if meta.get(f"{arch}.attention.sliding_window"):
        raise ValueError(f"gguf: {path}: metadata {arch}.attention.sliding_window is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    for name, key in _TOKEN_IDS:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < config["vocab_size"]:
            config[name] = value
    eot = meta.get("tokenizer.ggml.eot_token_id")  # llama.cpp also stops at end-of-turn (Llama 3's <|eot_id|>)
    if isinstance(eot, int) and 0 <= eot < config["vocab_size"] and eot != config.get("eos_token_id"):
        config["eos_token_id"] = [i for i in (config.get("eos_token_id"), eot) if i is not None]
    if isinstance(tokens, list) and len(tokens) != config["vocab_size"]:
        raise ValueError(f"gguf: {path}: tokenizer.ggml.tokens holds {len(tokens)} tokens, "
                         f"{arch}.vocab_size is {config['vocab_size']}")
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> its shape (rows, columns as numpy and torch order them) per the metadata."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim", d // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"token_embd.weight": (vocab, d), "output.weight": (vocab, d), "output_norm.weight": (d,),
              ROPE_FREQS: (hd // 2,)}
    block = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_q.weight": (q, d), "attn_k.weight": (kv, d),
             "attn_v.weight": (kv, d), "attn_output.weight": (d, q), "attn_q.bias": (q,), "attn_k.bias": (kv,),
             "attn_v.bias": (kv,), "ffn_gate.weight": (ff, d), "ffn_up.weight": (ff, d), "ffn_down.weight": (d, ff)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": v for k, v in block.items()})
    return shapes


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}"
    raise KeyError(name)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' _reverse_permute_weights)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise ValueError(f"gguf: {path}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                         f"which the gguf package cannot dequantize") from None
    except (ValueError, TypeError) as exc:  # data that does not match its type's block layout
        raise ValueError(f"gguf: {path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) is corrupt "
                         f"({str(exc)[:200]})") from None


def header(path) -> tuple[dict, Path, bool]:
    """What :func:`read_config` takes: (metadata, path, whether the file has its own LM head)."""
    path = Path(path)
    reader = open_gguf(path)
    return metadata(reader, path), path, any(t.name == "output.weight" for t in reader.tensors)


def read(path) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    """(config, tensors under their Hugging Face names as float32, RoPE
    frequency divisors or None) of a GGUF file."""
    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader, path)
    names = [t.name for t in reader.tensors]
    config = read_config(meta, path, has_output="output.weight" in names)
    arch = meta["general.architecture"]
    shapes = _expected_shapes(config)
    tensors, rope_factors = {}, None
    for t in reader.tensors:  # every name and shape before any dequantization
        if t.name not in shapes:
            raise ValueError(f"gguf: {path}: tensor {t.name!r} has no place in a {arch} model of "
                             f"{config['num_hidden_layers']} blocks (experts, extra norms and other "
                             f"architectures are not supported)")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        if shape != shapes[t.name]:
            raise ValueError(f"gguf: {path}: tensor {t.name!r} is {list(shape)}, but the metadata "
                             f"(hidden_size, heads, feed_forward_length, vocab) gives {list(shapes[t.name])}")
    for t in reader.tensors:
        w = _dequantize(t, path).reshape(shapes[t.name])
        if arch in _PERMUTED and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        w = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the reader's arrays map the file
        if t.name == ROPE_FREQS:
            if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
                raise ValueError(f"gguf: {path}: tensor {ROPE_FREQS!r} must hold positive finite divisors")
            rope_factors = w
        else:
            tensors[_hf_name(t.name)] = w
    return config, tensors, rope_factors


def load(path):
    """The network of a GGUF file (:func:`prism_ext.models.build_network` on
    what :func:`read` gives), with the file's RoPE frequency divisors applied."""
    from . import build_network

    config, tensors, rope_factors = read(path)
    net = build_network(config, tensors, str(path))
    if rope_factors is not None:
        # llama.cpp rotates pair i by position x inv_freq[i] / rope_freqs[i]: a Llama 3.1/3.2 file's
        # llama3 scaling, written as divisors rather than as config fields
        net.rope.inv_freq = net.rope.inv_freq / rope_factors
    return net

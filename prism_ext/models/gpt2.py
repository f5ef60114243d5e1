"""GPT-2: token + position embeddings, pre-LN blocks, final LN, tied LM head.
HF stores its projections as Conv1D ([in, out]); they are transposed once here.
``attention_mask`` masks keys (right padding); positions are not shifted."""

from __future__ import annotations

import torch

from .quant import embedding, linear
from .common import (Block, LayerNorm, Network, Weights, activation, cfg, cfg_eps, cfg_int, check_heads, check_ids,
                     layer_norm_tensors, linear_tensors)

MODEL_TYPE = "gpt2"
BASE_PREFIX = "transformer"  # what a checkpoint with a head puts before the base model's keys


class GPT2(Network):
    model_type = MODEL_TYPE
    causal = True
    input_names = ("input_ids", "attention_mask")
    quantized_tables = ("wte", "lm_head")

    def __init__(self, config: dict, w: Weights):
        self.config = config
        d = cfg_int(config, "n_embd", required=True)
        heads = cfg_int(config, "n_head", required=True)
        layers = cfg_int(config, "n_layer", required=True)
        self.vocab = cfg_int(config, "vocab_size", required=True)
        self.n_positions = cfg_int(config, "n_positions", required=True)
        d_ff = cfg_int(config, "n_inner") or 4 * d
        eps = cfg_eps(config, "layer_norm_epsilon", 1e-5)
        check_heads(d, heads)
        if cfg(config, "scale_attn_by_inverse_layer_idx", False) or not cfg(config, "scale_attn_weights", True):
            raise ValueError("config.json: only scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False is supported")
        act = activation(cfg(config, "activation_function", "gelu_new"), "activation_function")

        def ln(name):
            return LayerNorm(w.get(name + ".weight", shape=(d,)), w.get(name + ".bias", shape=(d,)), eps)

        def conv(name, n_in, n_out):  # Conv1D [in, out] -> Linear [out, in]
            return w.get(name + ".weight", shape=(n_in, n_out)).t().contiguous(), w.get(name + ".bias", shape=(n_out,))

        self.blocks = []
        for i in range(layers):
            p = f"h.{i}"
            wqkv, bqkv = conv(p + ".attn.c_attn", d, 3 * d)
            wo, bo = conv(p + ".attn.c_proj", d, d)
            w1, b1 = conv(p + ".mlp.c_fc", d, d_ff)
            w2, b2 = conv(p + ".mlp.c_proj", d_ff, d)
            self.blocks.append(Block(True, heads, ln(p + ".ln_1"), ln(p + ".ln_2"), wqkv, bqkv, wo, bo, w1, b1, w2, b2, act))
        self.wte = w.get("wte.weight", shape=(self.vocab, d))
        self.wpe = w.get("wpe.weight", shape=(self.n_positions, d))
        self.ln_f = ln("ln_f")
        tied = cfg(config, "tie_word_embeddings", True)
        self.lm_head = self.wte if tied or not w.has("lm_head.weight") else w.get("lm_head.weight", shape=(self.vocab, d))
        self.head = "lm"

    def check_inputs(self, inputs: dict) -> tuple[int, int]:
        ids = check_ids(inputs, "input_ids", upper=self.vocab)
        if inputs.get("attention_mask") is not None:
            check_ids(inputs, "attention_mask", tuple(ids.shape), upper=2)
        if ids.shape[1] > self.n_positions:
            raise ValueError(f"input_ids: {ids.shape[1]} positions exceed n_positions={self.n_positions}")
        return ids.shape[0], ids.shape[1]

    def embed(self, local: dict, start: int, stop: int) -> torch.Tensor:
        return embedding(local["input_ids"].long(), self.wte) + self.wpe[start:stop]

    def row_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.ln_f(x)
        return {"last_hidden_state": h, "logits": linear(h, self.lm_head)}

    def checkpoint_tensors(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        out = []
        for i, blk in enumerate(self.blocks):
            p = f"h.{i}"
            for name, weight, bias in (("attn.c_attn", blk.wqkv, blk.bqkv), ("attn.c_proj", blk.wo, blk.bo),
                                       ("mlp.c_fc", blk.w1, blk.b1), ("mlp.c_proj", blk.w2, blk.b2)):
                out += linear_tensors((weight.t(), bias), f"{p}.{name}")  # back to Conv1D [in, out]
            out += layer_norm_tensors(blk.ln1, p + ".ln_1") + layer_norm_tensors(blk.ln2, p + ".ln_2")
        out += [(("wte.weight",), self.wte), (("wpe.weight",), self.wpe)] + layer_norm_tensors(self.ln_f, "ln_f")
        if self.lm_head is not self.wte:
            out.append((("lm_head.weight",), self.lm_head))
        return out


def build(config: dict, tensors: dict, source: str) -> Network:
    return GPT2(config, Weights(tensors, source, (BASE_PREFIX,)))

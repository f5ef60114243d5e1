"""BERT: word + position + token-type embeddings and LN, post-LN blocks,
pooler (tanh of a dense layer on [CLS]) and an optional classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import embedding
from .common import (Block, LayerNorm, Network, Weights, activation, block_linears, block_tensors, cfg, cfg_eps, cfg_int, check_heads,
                     check_ids, layer_norm_tensors, linear_tensors)

MODEL_TYPE = "bert"
BASE_PREFIX = "bert"  # what a checkpoint with a head puts before the base model's keys

# Each Block tensor's module in a layer ``encoder.layer.{i}``: read by the
# loader, written by checkpoint_tensors.
_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
          "fc2": "output.dense", "ln2": "output.LayerNorm"}


class BERT(Network):
    model_type = MODEL_TYPE
    causal = False
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    quantized_tables = ("word",)

    def __init__(self, config: dict, w: Weights):
        self.config = config
        d = cfg_int(config, "hidden_size", required=True)
        heads = cfg_int(config, "num_attention_heads", required=True)
        layers = cfg_int(config, "num_hidden_layers", required=True)
        d_ff = cfg_int(config, "intermediate_size", required=True)
        self.vocab = cfg_int(config, "vocab_size", required=True)
        self.max_positions = self.n_positions = cfg_int(config, "max_position_embeddings", required=True)
        self.type_vocab = cfg_int(config, "type_vocab_size", 2)
        eps = cfg_eps(config, "layer_norm_eps", 1e-12)
        check_heads(d, heads)
        if cfg(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json: only position_embedding_type='absolute' is supported")
        if cfg(config, "is_decoder", False) or cfg(config, "add_cross_attention", False):
            raise ValueError("config.json: BERT as a decoder (is_decoder, add_cross_attention) is not supported")
        act = activation(cfg(config, "hidden_act", "gelu"), "hidden_act")

        def ln(name):
            return LayerNorm(w.get(name + ".weight", shape=(d,)), w.get(name + ".bias", shape=(d,)), eps)

        def lin(name, n_in, n_out):
            return w.get(name + ".weight", shape=(n_out, n_in)), w.get(name + ".bias", shape=(n_out,))

        self.blocks = []
        for i in range(layers):
            m = {key: f"encoder.layer.{i}.{name}" for key, name in _LAYER.items()}
            (q, bq), (k, bk), (v, bv), (wo, bo), (w1, b1), (w2, b2) = block_linears(lin, m, d, d_ff)
            self.blocks.append(
                Block(False, heads, ln(m["ln1"]), ln(m["ln2"]),
                      torch.cat([q, k, v]), torch.cat([bq, bk, bv]), wo, bo, w1, b1, w2, b2, act)
            )
        self.word = w.get("embeddings.word_embeddings.weight", shape=(self.vocab, d))
        self.position = w.get("embeddings.position_embeddings.weight", shape=(self.max_positions, d))
        self.token_type = w.get("embeddings.token_type_embeddings.weight", shape=(self.type_vocab, d))
        self.ln_emb = ln("embeddings.LayerNorm")
        self.pooler = lin("pooler.dense", d, d) if w.has("pooler.dense.weight") else None
        self.classifier = None
        if w.has("classifier.weight"):
            labels = w.tensors[w.find("classifier.weight")].shape[0]
            if self.pooler is None:
                raise ValueError(f"weights: {w.source} has a classifier but no pooler")
            self.classifier = lin("classifier", d, labels)
        self.head = "classification" if self.classifier is not None else "base"

    def check_inputs(self, inputs: dict) -> tuple[int, int]:
        ids = check_ids(inputs, "input_ids", upper=self.vocab)
        for name, upper in (("attention_mask", 2), ("token_type_ids", self.type_vocab)):
            if inputs.get(name) is not None:
                check_ids(inputs, name, tuple(ids.shape), upper=upper)
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"input_ids: {ids.shape[1]} positions exceed max_position_embeddings={self.max_positions}")
        return ids.shape[0], ids.shape[1]

    def embed(self, local: dict, start: int, stop: int) -> torch.Tensor:
        types = local.get("token_type_ids")
        tt = self.token_type[0] if types is None else F.embedding(types.long(), self.token_type)
        return self.ln_emb(embedding(local["input_ids"].long(), self.word) + self.position[start:stop] + tt)

    def row_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": x}

    def cls_outputs(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pooler is None:
            return {}
        pooled = torch.tanh(F.linear(rows["last_hidden_state"][:, 0], *self.pooler))
        out = {"pooler_output": pooled}
        if self.classifier is not None:
            out["logits"] = F.linear(pooled, *self.classifier)
        return out

    def checkpoint_tensors(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        out = []
        for i, blk in enumerate(self.blocks):
            m = {key: f"encoder.layer.{i}.{name}" for key, name in _LAYER.items()}
            out += block_tensors(blk, m)
        out += [(("embeddings.word_embeddings.weight",), self.word),
                (("embeddings.position_embeddings.weight",), self.position),
                (("embeddings.token_type_embeddings.weight",), self.token_type)]
        out += layer_norm_tensors(self.ln_emb, "embeddings.LayerNorm")
        out += linear_tensors(self.pooler, "pooler.dense") + linear_tensors(self.classifier, "classifier")
        return out


def build(config: dict, tensors: dict, source: str) -> Network:
    return BERT(config, Weights(tensors, source, (BASE_PREFIX,)))

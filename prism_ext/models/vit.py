"""ViT: [CLS] + linear patch embeddings + position embeddings, pre-LN blocks,
final LN, optional pooler and classifier on [CLS]. Accepts the classic key
layout (``encoder.layer.i.attention.attention.query``) and the transformers-5
one (``layers.i.attention.q_proj``, ``mlp.fc1``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (Block, LayerNorm, Network, Weights, activation, block_linears, block_tensors, cfg, cfg_eps, cfg_int, check_device,
                     check_heads, layer_norm_tensors, linear_tensors)

MODEL_TYPE = "vit"
BASE_PREFIX = "vit"  # what a checkpoint with a head puts before the base model's keys


def _layer_modules(i: int) -> dict[str, tuple[str, str]]:
    """Each Block tensor's module in layer ``i``: (classic name, transformers-5 name)."""
    old, new = f"encoder.layer.{i}", f"layers.{i}"
    names = {"q": ("attention.attention.query", "attention.q_proj"), "k": ("attention.attention.key", "attention.k_proj"),
             "v": ("attention.attention.value", "attention.v_proj"), "o": ("attention.output.dense", "attention.o_proj"),
             "fc1": ("intermediate.dense", "mlp.fc1"), "fc2": ("output.dense", "mlp.fc2"),
             "ln1": ("layernorm_before", "layernorm_before"), "ln2": ("layernorm_after", "layernorm_after")}
    return {key: (f"{old}.{a}", f"{new}.{b}") for key, (a, b) in names.items()}


class ViT(Network):
    model_type = MODEL_TYPE
    causal = False
    input_names = ("pixel_values",)

    def __init__(self, config: dict, w: Weights):
        self.config = config
        d = cfg_int(config, "hidden_size", required=True)
        heads = cfg_int(config, "num_attention_heads", required=True)
        layers = cfg_int(config, "num_hidden_layers", required=True)
        d_ff = cfg_int(config, "intermediate_size", required=True)
        self.image = cfg_int(config, "image_size", required=True)
        self.patch = cfg_int(config, "patch_size", required=True)
        self.channels = cfg_int(config, "num_channels", 3)
        eps = cfg_eps(config, "layer_norm_eps", 1e-12)
        check_heads(d, heads)
        if self.image % self.patch:
            raise ValueError(f"config.json: image_size {self.image} is not a multiple of patch_size {self.patch}")
        self.grid = self.image // self.patch
        self.n_positions = self.grid * self.grid + 1
        if cfg(config, "pooler_act", "tanh") != "tanh":
            raise ValueError(f"config.json: pooler_act={config['pooler_act']!r} is not supported (only 'tanh')")
        act = activation(cfg(config, "hidden_act", "gelu"), "hidden_act")

        def ln(*names):
            return LayerNorm(w.get(*[n + ".weight" for n in names], shape=(d,)),
                             w.get(*[n + ".bias" for n in names], shape=(d,)), eps)

        def lin(names, n_in, n_out):
            weight = w.get(*[n + ".weight" for n in names], shape=(n_out, n_in))
            return weight, w.optional(*[n + ".bias" for n in names], shape=(n_out,))

        self.blocks = []
        for i in range(layers):
            m = _layer_modules(i)
            (q, bq), (k, bk), (v, bv), (wo, bo), (w1, b1), (w2, b2) = block_linears(lin, m, d, d_ff)
            if (bq is None) != (bk is None) or (bk is None) != (bv is None):
                raise ValueError(f"weights: layer {i} of {w.source} has biases for only some of query/key/value")
            bqkv = None if bq is None else torch.cat([bq, bk, bv])
            self.blocks.append(Block(True, heads, ln(*m["ln1"]), ln(*m["ln2"]), torch.cat([q, k, v]), bqkv,
                                     wo, bo, w1, b1, w2, b2, act))
        n_pos = self.grid * self.grid + 1
        self.cls = w.get("embeddings.cls_token", shape=(1, 1, d)).reshape(d)
        self.position = w.get("embeddings.position_embeddings", shape=(1, n_pos, d)).reshape(n_pos, d)
        patch_in = self.channels * self.patch * self.patch
        conv = w.get("embeddings.patch_embeddings.projection.weight", shape=(d, self.channels, self.patch, self.patch))
        self.patch_w = conv.reshape(d, patch_in)
        self.patch_b = w.get("embeddings.patch_embeddings.projection.bias", shape=(d,))
        self.ln_f = ln("layernorm")
        self.pooler = lin(["pooler.dense"], d, d) if w.has("pooler.dense.weight") else None
        self.classifier = None
        if w.has("classifier.weight"):
            labels = w.tensors[w.find("classifier.weight")].shape[0]
            self.classifier = lin(["classifier"], d, labels)
        self.head = "classification" if self.classifier is not None else "base"

    def check_inputs(self, inputs: dict) -> tuple[int, int]:
        px = inputs.get("pixel_values")
        if not isinstance(px, torch.Tensor):
            raise TypeError(f"pixel_values: expected a torch.Tensor, got {type(px).__name__}")
        check_device(px, "pixel_values")
        if not px.dtype.is_floating_point:
            raise TypeError(f"pixel_values: expected a floating dtype, got {px.dtype}")
        want = (self.channels, self.image, self.image)
        if px.dim() != 4 or tuple(px.shape[1:]) != want or px.shape[0] < 1:
            raise ValueError(f"pixel_values: expected shape [batch, {', '.join(map(str, want))}], got {tuple(px.shape)}")
        # One NaN pixel would make every output NaN (or, before every ISA
        # agreed on NaN, a confident wrong label): refuse it up front.
        if not bool(torch.isfinite(px).all()):
            bad = int((~torch.isfinite(px)).sum())
            raise ValueError(f"pixel_values: {bad} value(s) are NaN or infinite; every pixel must be finite")
        return px.shape[0], self.grid * self.grid + 1

    def valid(self, inputs: dict) -> torch.Tensor | None:
        return None

    def local_inputs(self, inputs: dict, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The own patches only, flattened [B, patches, C·p·p] (row-major over
        the grid, like the HF conv); position 0 is [CLS], which needs none."""
        px = inputs["pixel_values"].to(torch.float32)
        B, g, p = px.shape[0], self.grid, self.patch
        first = max(start, 1) - 1  # patch index of the first own non-[CLS] position
        patches = px.reshape(B, self.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
        return {"patches": patches[:, first : stop - 1].contiguous()}

    def check_local(self, local: dict, batch: int, start: int, stop: int) -> None:
        patches = local.get("patches")
        want = (batch, stop - 1 - (max(start, 1) - 1), self.channels * self.patch * self.patch)
        if set(local) != {"patches"} or not isinstance(patches, torch.Tensor) or tuple(patches.shape) != want:
            shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else None
            raise ValueError(f"patches: expected shape {list(want)} for positions [{start}, {stop}), got {shape}")
        if not patches.dtype.is_floating_point or not bool(torch.isfinite(patches).all()):
            raise ValueError("patches: expected finite floating-point values")

    def embed(self, local: dict, start: int, stop: int) -> torch.Tensor:
        patches = local["patches"]
        x = F.linear(patches.to(torch.float32), self.patch_w, self.patch_b)
        if start == 0:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position[start:stop]

    def row_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.ln_f(x)}

    def cls_outputs(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cls = rows["last_hidden_state"][:, 0]
        out = {}
        if self.pooler is not None:
            out["pooler_output"] = torch.tanh(F.linear(cls, *self.pooler))
        if self.classifier is not None:
            out["logits"] = F.linear(cls, *self.classifier)
        return out

    def checkpoint_tensors(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        out = []
        for i, blk in enumerate(self.blocks):
            out += block_tensors(blk, _layer_modules(i))
        d, n_pos = self.d, self.grid * self.grid + 1
        out += [(("embeddings.cls_token",), self.cls.reshape(1, 1, d)),
                (("embeddings.position_embeddings",), self.position.reshape(1, n_pos, d)),
                (("embeddings.patch_embeddings.projection.weight",),
                 self.patch_w.reshape(d, self.channels, self.patch, self.patch)),
                (("embeddings.patch_embeddings.projection.bias",), self.patch_b)]
        out += layer_norm_tensors(self.ln_f, "layernorm")
        out += linear_tensors(self.pooler, "pooler.dense") + linear_tensors(self.classifier, "classifier")
        return out


def build(config: dict, tensors: dict, source: str) -> Network:
    return ViT(config, Weights(tensors, source, (BASE_PREFIX,)))

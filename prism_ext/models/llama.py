"""The Llama family: LlamaForCausalLM (Llama 2/3/3.1/3.2, SmolLM2),
Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head q/k RMSNorm) and
MistralForCausalLM (sliding window), one module with options read from
config.json: token embeddings, pre-norm blocks with RMSNorm, rotary position
embeddings (RoPE, with the ``llama3`` frequency scaling), grouped-query
attention (kv_heads <= heads; K/V are never expanded to all heads) and a
SwiGLU MLP, a final RMSNorm and a tied or untied LM head.

Position enters only through the rotation of Q and K, so :meth:`LlamaBlock.qkv`
and :meth:`LlamaBlock.kv` take positions (docs/design.md, "RoPE and GQA").
Anything this module does not run exactly (another RoPE scaling, a mixture of
experts, another activation, biases the family has none of, a sliding window
shorter than the input) is refused by name, never run approximately.
``attention_mask`` masks keys (right padding); positions are not shifted."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant import embedding, linear
from .common import Block, Network, RMSNorm, Weights, activation, cfg, cfg_eps, cfg_int, check_ids, linear_tensors

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
MODEL_TYPE = "llama"
BASE_PREFIX = "model"  # what LlamaForCausalLM puts before the base model's keys

# The architecture each model type may declare (config.json "architectures").
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM"}
_QKV_BIAS = {"qwen2"}  # families whose q/k/v projections always have biases
_QK_NORM = {"qwen3"}  # families with a per-head RMSNorm of q and k before RoPE
_ROPE_TYPES = ("default", "llama3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@dataclass
class Rope:
    """Rotary position embedding of one head width: the pair (i, i + dh/2) of
    a head is rotated by the angle position x inv_freq[i] (transformers'
    ``rotate_half`` layout). Positions may be fractional: a mean row of the
    ``attn_input`` and ``hidden`` compression points is rotated at the mean
    of the positions it covers."""

    inv_freq: torch.Tensor  # [head_dim / 2] float32

    def __call__(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``t`` [..., n, heads, dh] at ``pos`` [n] or [B, n] (int or float)."""
        # on t's device: the twin may train on a GPU while the table and the positions were made on the CPU
        freqs = pos.to(t.device, torch.float32)[..., None] * self.inv_freq.to(t.device)  # as transformers rounds it
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(-2)  # [.., n, 1, dh]
        return t * emb.cos() + _rotate_half(t) * emb.sin()


def rope_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """inv_freq of the config's RoPE: ``default`` or ``llama3``; any other
    type (or a partial rotary factor) is refused by name."""
    params = cfg(config, "rope_parameters", {})
    scaling = cfg(config, "rope_scaling", None)
    if not isinstance(params, dict) or (scaling is not None and not isinstance(scaling, dict)):
        raise ValueError("config.json: rope_parameters and rope_scaling must be objects")
    merged = {**params, **(scaling or {})}
    kinds = [src.get("rope_type", src.get("type", "default")) for src in (params, scaling or {}) if src]
    for kind in kinds:  # both spellings (transformers 5's rope_parameters, older rope_scaling) are checked
        if kind not in _ROPE_TYPES:
            raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported "
                             f"(supported: {', '.join(_ROPE_TYPES)})")
    if len(set(kinds)) > 1 and "default" in kinds:  # transformers 5 writes a default beside an old scaling
        kinds = [k for k in kinds if k != "default"]
    if len(set(kinds)) > 1:
        raise ValueError(f"config.json: rope_parameters and rope_scaling disagree ({' and '.join(kinds)})")
    kind = kinds[0] if kinds else "default"
    partial = merged.get("partial_rotary_factor", cfg(config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    theta = merged.get("rope_theta", cfg(config, "rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1 < theta < 1e12:
        raise ValueError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if kind == "llama3":  # transformers' _compute_llama3_parameters, step for step
        try:
            factor, low, high = (float(merged[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
            old = float(merged["original_max_position_embeddings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json: rope_scaling llama3 needs factor, low_freq_factor, high_freq_factor "
                             f"and original_max_position_embeddings ({exc})") from None
        if not (factor > 0 and old > 0 and high > low > 0):
            raise ValueError("config.json: rope_scaling llama3 needs factor > 0, high_freq_factor > low_freq_factor > 0")
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(torch.float32)


@dataclass
class LlamaBlock(Block):
    """A pre-norm block with RoPE, grouped-query attention and a SwiGLU MLP
    (``w1`` = [gate; up]); Qwen3's ``q_norm``/``k_norm`` act per head before
    the rotation."""

    rope: Rope | None = None
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None

    positional = True
    gated = True

    def _rotated(self, t: torch.Tensor, heads: int, norm: RMSNorm | None, pos) -> torch.Tensor:
        h = t.unflatten(-1, (heads, self.head_dim))
        if norm is not None:
            h = norm(h)
        return self.rope(h, pos).flatten(-2)

    def qkv(self, a: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_qkv(linear(a, self.wqkv, self.bqkv))
        return torch.cat([self._rotated(q, self.heads, self.q_norm, pos),
                          self._rotated(k, self.kv_heads, self.k_norm, pos), v], dim=-1)

    def kv(self, a: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        kv = linear(a, self.wkv, self.bkv)
        w = self.kv_width
        return torch.cat([self._rotated(kv[..., :w], self.kv_heads, self.k_norm, pos), kv[..., w:]], dim=-1)


class Llama(Network):
    causal = True
    input_names = ("input_ids", "attention_mask")
    head = "lm"
    quantized_tables = ("embed_tokens", "lm_head")
    # The first position is an attention sink a mean destroys (bench/EVAL.md);
    # the mean of rotated keys is what a repetition of the segment gives.
    defaults = {"exact_rows": "first", "compression_point": "kv", "eos": True}

    def __init__(self, config: dict, w: Weights):
        self.config = config
        self.model_type = config["model_type"]
        architectures = cfg(config, "architectures", None)
        wanted = _ARCHITECTURES[self.model_type]
        if architectures is not None and architectures != [wanted]:
            raise ValueError(f"config.json: architectures {architectures!r} is not supported for model_type "
                             f"{self.model_type!r} (supported: [{wanted!r}])")
        for key in _MOE_KEYS:
            if cfg(config, key, 0):
                raise ValueError(f"config.json: {key}={config[key]!r}: mixture-of-experts models are not supported")
        d = cfg_int(config, "hidden_size", required=True)
        heads = cfg_int(config, "num_attention_heads", required=True)
        kv_heads = cfg_int(config, "num_key_value_heads", heads)
        layers = cfg_int(config, "num_hidden_layers", required=True)
        d_ff = cfg_int(config, "intermediate_size", required=True)
        self.vocab = cfg_int(config, "vocab_size", required=True)
        self.max_position_embeddings = cfg_int(config, "max_position_embeddings", required=True)
        head_dim = cfg_int(config, "head_dim", None) or d // heads
        if cfg(config, "head_dim", None) is None and d % heads:
            raise ValueError(f"config.json: hidden size {d} is not divisible by the number of heads {heads}")
        if heads % kv_heads:
            raise ValueError(f"config.json: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        if head_dim % 2:
            raise ValueError(f"config.json: head_dim={head_dim} must be even for rotary embeddings")
        eps = cfg_eps(config, "rms_norm_eps", 1e-6)
        act = activation(cfg(config, "hidden_act", "silu"), "hidden_act")
        if cfg(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={config['hidden_act']!r} is not supported (supported: silu)")
        if cfg(config, "mlp_bias", False):
            raise ValueError("config.json: mlp_bias=True is not supported (the family has no MLP biases)")
        if cfg(config, "attention_bias", False):
            raise ValueError(f"config.json: attention_bias=True is not supported for {self.model_type} "
                             f"(the family has no attention biases)")
        self.window = self._sliding_window(config, layers)
        # the most positions a sequence may have, generated tokens included
        self.n_positions = min(self.max_position_embeddings, self.window or self.max_position_embeddings)
        self.rope = Rope(rope_frequencies(config, head_dim))
        qkv_bias = self.model_type in _QKV_BIAS
        qw, kw = heads * head_dim, kv_heads * head_dim

        def norm(name, width=d):
            return RMSNorm(w.get(name + ".weight", shape=(width,)), eps)

        def weight(name, n_in, n_out):
            return w.get(name + ".weight", shape=(n_out, n_in))

        self.blocks = []
        for i in range(layers):
            p = f"layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj") if not qkv_bias else ("o_proj",):
                if w.has(f"{p}.self_attn.{proj}.bias"):
                    raise ValueError(f"weights: {w.source} has {p}.self_attn.{proj}.bias, but {self.model_type} "
                                     f"has no attention biases")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if w.has(f"{p}.mlp.{proj}.bias"):
                    raise ValueError(f"weights: {w.source} has {p}.mlp.{proj}.bias, but the family has no MLP biases")
            a = p + ".self_attn"
            wqkv = torch.cat([weight(a + ".q_proj", d, qw), weight(a + ".k_proj", d, kw), weight(a + ".v_proj", d, kw)])
            bqkv = None
            if qkv_bias:
                bqkv = torch.cat([w.get(f"{a}.{n}.bias", shape=(s,)) for n, s in
                                  (("q_proj", qw), ("k_proj", kw), ("v_proj", kw))])
            w1 = torch.cat([weight(p + ".mlp.gate_proj", d, d_ff), weight(p + ".mlp.up_proj", d, d_ff)])
            qk = self.model_type in _QK_NORM
            self.blocks.append(LlamaBlock(
                True, heads, norm(p + ".input_layernorm"), norm(p + ".post_attention_layernorm"), wqkv, bqkv,
                weight(a + ".o_proj", qw, d), None, w1, None, weight(p + ".mlp.down_proj", d_ff, d), None, act,
                self.rope, norm(a + ".q_norm", head_dim) if qk else None,
                norm(a + ".k_norm", head_dim) if qk else None))
        self.embed_tokens = w.get("embed_tokens.weight", shape=(self.vocab, d))
        self.norm = norm("norm")
        tied = cfg(config, "tie_word_embeddings", False)
        if not tied and not w.has("lm_head.weight"):
            raise ValueError(f"weights: {w.source} has no 'lm_head.weight' and config.json says "
                             f"tie_word_embeddings is false")
        self.lm_head = self.embed_tokens if tied else w.get("lm_head.weight", shape=(self.vocab, d))

    @staticmethod
    def _sliding_window(config: dict, layers: int) -> int | None:
        """The window of sliding-window attention when any layer uses it (Mistral;
        Qwen with use_sliding_window), else None. Inputs longer than it are
        refused (:meth:`check_inputs`): within it, the window masks nothing."""
        types = cfg(config, "layer_types", None)
        if types is not None:
            if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention",
                                                                                        "sliding_attention"}:
                raise ValueError(f"config.json: layer_types must be {layers} of full_attention, sliding_attention")
            sliding = "sliding_attention" in types
        elif config["model_type"] == "mistral":
            sliding = True
        else:
            sliding = bool(cfg(config, "use_sliding_window", False))
        return cfg_int(config, "sliding_window", None) if sliding else None

    def check_inputs(self, inputs: dict) -> tuple[int, int]:
        ids = check_ids(inputs, "input_ids", upper=self.vocab)
        if inputs.get("attention_mask") is not None:
            check_ids(inputs, "attention_mask", tuple(ids.shape), upper=2)
        n = ids.shape[1]
        if n > self.max_position_embeddings:
            raise ValueError(f"input_ids: {n} positions exceed max_position_embeddings={self.max_position_embeddings}")
        if self.window is not None and n > self.window:
            raise ValueError(f"input_ids: {n} positions exceed the sliding window (sliding_window={self.window}); "
                             f"prism_ext runs at most {self.window} positions of this model")
        return ids.shape[0], n

    def embed(self, local: dict, start: int, stop: int) -> torch.Tensor:
        return embedding(local["input_ids"].long(), self.embed_tokens)

    def row_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(x)
        return {"last_hidden_state": h, "logits": linear(h, self.lm_head)}

    def checkpoint_tensors(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        out = []
        for i, blk in enumerate(self.blocks):
            p, a = f"layers.{i}", f"layers.{i}.self_attn"
            qw, kw = blk.q_width, blk.kv_width
            for name, t in (("q_proj", blk.wqkv[:qw]), ("k_proj", blk.wqkv[qw:qw + kw]), ("v_proj", blk.wqkv[qw + kw:])):
                out.append(((f"{a}.{name}.weight",), t))
            if blk.bqkv is not None:
                for name, t in zip(("q_proj", "k_proj", "v_proj"), blk.split_qkv(blk.bqkv)):
                    out.append(((f"{a}.{name}.bias",), t))
            gate, up = blk.w1.chunk(2, dim=0)
            out += linear_tensors((blk.wo, None), a + ".o_proj") + linear_tensors((gate, None), p + ".mlp.gate_proj")
            out += linear_tensors((up, None), p + ".mlp.up_proj") + linear_tensors((blk.w2, None), p + ".mlp.down_proj")
            out += [((p + ".input_layernorm.weight",), blk.ln1.weight),
                    ((p + ".post_attention_layernorm.weight",), blk.ln2.weight)]
            if blk.q_norm is not None:
                out += [((a + ".q_norm.weight",), blk.q_norm.weight), ((a + ".k_norm.weight",), blk.k_norm.weight)]
        out += [(("embed_tokens.weight",), self.embed_tokens), (("norm.weight",), self.norm.weight)]
        if self.lm_head is not self.embed_tokens:
            out.append((("lm_head.weight",), self.lm_head))
        return out


def build(config: dict, tensors: dict, source: str) -> Network:
    return Llama(config, Weights(tensors, source, (BASE_PREFIX,)))

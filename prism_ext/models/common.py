"""What every model family shares: the Transformer block, weight lookup with
checks, activations. A family module (gpt2, bert, vit) maps its Hugging Face
checkpoint onto :class:`Block` and supplies embeddings and heads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .quant import (INT4_GROUP, InputRecorder, Quantized, check_weight_dtype, gptq_int4, linear, nbytes, quantize,
                    stored_bytes)

__all__ = [
    "Block",
    "LayerNorm",
    "Network",
    "RMSNorm",
    "Weights",
    "activation",
    "block_linears",
    "block_tensors",
    "layer_norm_tensors",
    "linear_tensors",
    "cfg",
    "cfg_eps",
    "cfg_int",
    "check_device",
    "check_ids",
    "check_heads",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.json: {key}={name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def cfg(config: dict, key: str, default=None, *, required: bool = False):
    if key not in config or config[key] is None:
        if required:
            raise ValueError(f"config.json: missing {key!r}")
        return default
    return config[key]


# Config integers are checked before any arithmetic or allocation: a hostile
# config.json (negative, huge, float, bool, string) gets one line, not an
# IndexError or a multi-GB allocation. 2**24 is far above any real model.
_CFG_INT_MAX = 2**24


def cfg_int(config: dict, key: str, default=None, *, required: bool = False, minimum: int = 1,
            maximum: int = _CFG_INT_MAX):
    value = cfg(config, key, default, required=required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json: {key} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"config.json: {key} must be in [{minimum}, {maximum}], got {value}")
    return value


def cfg_eps(config: dict, key: str, default: float) -> float:
    value = cfg(config, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
        raise ValueError(f"config.json: {key} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {t.device}")


@dataclass
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass
class RMSNorm:
    """Root-mean-square norm (Llama, Qwen, Mistral): x / rms(x) * weight, in
    float32 as transformers computes it."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@dataclass
class Block:
    """One Transformer block. Pre-LN (GPT-2, ViT): x + attn(ln1 x), then
    x + mlp(ln2 x). Post-LN (BERT): ln1(x + attn x), then ln2(x + mlp x).
    Weights are [out, in] (``F.linear``); Q, K, V are stacked in ``wqkv`` so
    own rows take one GEMM and received rows one GEMM on its K/V half.

    Widths come from the weights: Q is ``q_width`` = heads x head_dim wide
    (``wo`` is [d, q_width]), K and V ``kv_width`` = kv_heads x head_dim each
    (grouped-query attention when kv_heads < heads). A family whose keys
    depend on position (RoPE: :mod:`prism_ext.models.llama`) sets
    ``positional`` and uses the positions :meth:`qkv` and :meth:`kv` take;
    here they are ignored (position is in the embeddings)."""

    pre_ln: bool
    heads: int
    ln1: LayerNorm
    ln2: LayerNorm
    wqkv: torch.Tensor  # [3d, d]
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]

    positional = False  # keys and values depend on positions given to qkv/kv (RoPE)
    gated = False  # a gated MLP (SwiGLU): w1 holds [gate; up]

    @property
    def wkv(self) -> torch.Tensor:  # a view, so training wqkv trains it too
        return self.wqkv[self.q_width:]

    @property
    def bkv(self) -> torch.Tensor | None:
        return None if self.bqkv is None else self.bqkv[self.q_width:]

    @property
    def d(self) -> int:
        return self.wo.shape[0]

    @property
    def q_width(self) -> int:
        return self.wo.shape[1]

    @property
    def kv_width(self) -> int:
        return (self.wqkv.shape[0] - self.q_width) // 2

    @property
    def head_dim(self) -> int:
        return self.q_width // self.heads

    @property
    def kv_heads(self) -> int:
        return self.kv_width // self.head_dim

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0] // 2 if self.gated else self.w1.shape[0]

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """What attention reads: LN1(x) before the block (pre-LN), x itself (post-LN)."""
        return self.ln1(x) if self.pre_ln else x

    def qkv(self, a: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """[..., q_width + 2 kv_width]: Q, K, V of attention inputs ``a`` at positions ``pos``."""
        return linear(a, self.wqkv, self.bqkv)

    def kv(self, a: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """[..., 2 kv_width]: K, V only (rows received from another device)."""
        return linear(a, self.wkv, self.bkv)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of Q, K, V in the output of :meth:`qkv`."""
        q, k = self.q_width, self.kv_width
        return qkv[..., :q], qkv[..., q:q + k], qkv[..., q + k:]

    def received_attn_input(self, rows: torch.Tensor, hidden: bool) -> torch.Tensor:
        """The attention input of rows received from another device: LN1 of
        them when they are hidden states and the block is pre-LN (the
        receiver normalises what the sender did not), else the rows."""
        return self.ln1(rows) if hidden and self.pre_ln else rows

    def finish_attention(self, x: torch.Tensor, attn: torch.Tensor, drop=None) -> torch.Tensor:
        """``drop``: dropout on the branch before the residual add (training only)."""
        return self.add_attention(x, linear(attn, self.wo, self.bo), drop)

    def add_attention(self, x: torch.Tensor, branch: torch.Tensor, drop=None) -> torch.Tensor:
        """The residual add of the attention branch (its output projection
        done, bias included), then LN1 for a post-LN block."""
        h = x + (branch if drop is None else drop(branch))
        return h if self.pre_ln else self.ln1(h)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP reads: LN2(x) before the MLP (pre-LN), x itself (post-LN)."""
        return self.ln2(x) if self.pre_ln else x

    def mlp(self, x: torch.Tensor, drop=None) -> torch.Tensor:
        return self.add_mlp(x, self.mlp_branch(self.mlp_input(x)), drop)

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP on its input ``h``, output bias included: act(h W1) W2, or
        act(h Wgate) * (h Wup) W2 for a gated block."""
        inner = linear(h, self.w1, self.b1)
        if self.gated:
            gate, up = inner.chunk(2, dim=-1)
            return linear(self.act(gate) * up, self.w2, self.b2)
        return linear(self.act(inner), self.w2, self.b2)

    def add_mlp(self, x: torch.Tensor, branch: torch.Tensor, drop=None) -> torch.Tensor:
        """The residual add of the MLP branch (bias included), then LN2 for a post-LN block."""
        h = x + (branch if drop is None else drop(branch))
        return h if self.pre_ln else self.ln2(h)


DEFAULT = "default"  # a run option left to the family (Network.defaults); options.RunOptions' default


BLOCK_MATRICES = ("wqkv", "wo", "w1", "w2")  # what weight_dtype quantizes in every block


class Weights:
    """A checkpoint's tensors, looked up under old or new key layouts, with or
    without the base-model prefix a head checkpoint adds (``bert.``, ...)."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, prefixes: tuple[str, ...] = ()):
        self.tensors = tensors
        self.source = source
        self.prefixes = ("",) + tuple(p + "." for p in prefixes)

    def find(self, *names: str) -> str | None:
        for name in names:
            for prefix in self.prefixes:
                if prefix + name in self.tensors:
                    return prefix + name
        return None

    def has(self, *names: str) -> bool:
        return self.find(*names) is not None

    def get(self, *names: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = self.find(*names)
        if key is None:
            raise ValueError(f"weights: {self.source} has no tensor {' or '.join(repr(n) for n in names)}")
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"weights: tensor {key!r} in {self.source} has shape {tuple(t.shape)}, the config needs {tuple(shape)}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"weights: tensor {key!r} in {self.source} has dtype {t.dtype}, expected floating point")
        return t.detach().to(torch.float32).contiguous()

    def optional(self, *names: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(*names, shape=shape) if self.has(*names) else None


class Network:
    """A loaded model, as the engine sees it.

    ``blocks`` and ``causal`` drive the layer loop; ``embed`` gives a device's
    own rows of the first layer input; ``row_outputs`` turns a device's final
    rows into per-row outputs (concatenated over devices) and ``cls_outputs``
    turns device 0's row outputs into per-sequence outputs ([CLS] heads).
    """

    model_type: str
    head: str  # "base", "lm", "classification"
    causal: bool
    # Run options whose default depends on the family (RunOptions' "default"): see resolve.
    defaults = {"exact_rows": "none", "compression_point": "attn_input"}
    blocks: list[Block]
    config: dict
    input_names: tuple[str, ...]
    n_positions: int  # the most positions the model takes
    # The family's token tables that weight_dtype stores in fewer bits (a tied
    # LM head is the embedding: one table); the blocks' matrices always are.
    quantized_tables: tuple[str, ...] = ()
    weight_dtype = "fp32"

    def resolve(self, option: str, value):
        """``value`` of the run option ``option`` (a key of :attr:`defaults`),
        or this family's own when it is ``"default"`` (:data:`DEFAULT`)."""
        return self.defaults[option] if value == DEFAULT else value

    @property
    def d(self) -> int:
        return self.blocks[0].d

    @property
    def heads(self) -> int:
        return self.blocks[0].heads

    def check_inputs(self, inputs: dict) -> tuple[int, int]:
        """Validate model inputs; returns (batch, positions N)."""
        raise NotImplementedError

    def valid(self, inputs: dict) -> torch.Tensor | None:
        """[B, n] bool, False at padding; None when there is none (full or local inputs)."""
        mask = inputs.get("attention_mask")
        if mask is None or bool(mask.all()):
            return None
        return mask.bool()

    def local_inputs(self, inputs: dict, start: int, stop: int) -> dict[str, torch.Tensor]:
        """What the device owning positions ``[start, stop)`` needs of the
        (checked) model inputs, and nothing more: the only input bytes that
        travel to it. Token models: each [B, N] tensor sliced to own positions."""
        return {name: t[:, start:stop] for name, t in inputs.items() if t is not None}

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the engine runs, once each (a tied LM head is the
        embedding), by attribute path (``blocks.0.wqkv``): what the
        differentiable twin trains and :meth:`weights_digest` hashes."""
        found: dict[str, torch.Tensor] = {}
        seen: set[int] = set()

        def walk(name: str, value) -> None:
            if isinstance(value, torch.Tensor):
                if id(value) not in seen:
                    seen.add(id(value))
                    found[name] = value
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(f"{name}.{i}", v)
            elif isinstance(value, Quantized):
                if id(value) not in seen:
                    seen.add(id(value))
                    found.update({f"{name}.{k}": t for k, t in value.stored.items()})
            elif isinstance(value, (Block, LayerNorm, RMSNorm)):
                for k in sorted(vars(value)):
                    walk(f"{name}.{k}", getattr(value, k))

        for key in sorted(vars(self)):
            if not key.startswith("_"):
                walk(key, getattr(self, key))
        return found

    def quantize(self, weight_dtype: str, group: int = INT4_GROUP, hessians: dict | None = None) -> None:
        """Store every block's matrices and the family's token tables as
        ``weight_dtype`` (:mod:`prism_ext.models.quant`), in place; once, on
        a float32 network (deterministic: every device that quantizes the
        same checkpoint holds the same bits, which the handshake checks).
        ``hessians`` (from :meth:`record_inputs`, int4 only): the block
        matrices' codes are chosen by GPTQ against them instead of rounded
        to nearest (a one-off step: its result is written with
        ``write_quantized`` and loaded as it is)."""
        check_weight_dtype(weight_dtype)
        if self.weight_dtype != "fp32":
            raise ValueError(f"weight_dtype: this network is already {self.weight_dtype}")
        if hessians is not None and weight_dtype != "int4":
            raise ValueError(f"weight_dtype: calibration chooses int4 codes; {weight_dtype} has none to choose")
        if weight_dtype == "fp32":
            return
        done: dict[int, object] = {}  # a tied LM head is the embedding: quantized once, still one object

        def convert(w):
            if id(w) not in done:
                h = None if hessians is None else hessians.get(id(w))
                done[id(w)] = quantize(w, weight_dtype, group) if h is None or w.shape[1] % group \
                    else gptq_int4(w, h, group)
            return done[id(w)]

        for blk in self.blocks:
            for name in BLOCK_MATRICES:
                setattr(blk, name, convert(getattr(blk, name)))
        for name in self.quantized_tables:
            setattr(self, name, convert(getattr(self, name)))
        self.weight_dtype = weight_dtype
        self._digest = None

    def record_inputs(self, run: Callable[[], object]) -> tuple[dict[int, torch.Tensor], int]:
        """Run ``run()`` (which runs this float32 network on calibration
        inputs) while every block matrix records ``X^T X`` of its inputs;
        returns those Hessians keyed by the matrix's id (what
        :meth:`quantize` takes) and the number of input rows seen."""
        if self.weight_dtype != "fp32":
            raise ValueError(f"weight_dtype: calibration needs the float32 network, this one is {self.weight_dtype}")
        hessians: dict[int, torch.Tensor] = {}
        counted = [0]
        kept = []
        for blk in self.blocks:
            for name in BLOCK_MATRICES:
                w = getattr(blk, name)
                h = hessians.setdefault(id(w), torch.zeros(w.shape[1], w.shape[1]))
                kept.append((blk, name, w))
                setattr(blk, name, InputRecorder(w, h, counted))
        try:
            run()
        finally:
            for blk, name, w in kept:
                setattr(blk, name, w)
            self._digest = self._weight_bytes = None  # a run may have cached them over the recorders
        rows = counted[0] // len(kept) if kept else 0
        return hessians, rows

    def weight_bytes(self) -> int:
        """Resident bytes of every tensor the engine runs (a tied head once);
        cached like the digest (the twin's training changes values, not sizes)."""
        if getattr(self, "_weight_bytes", None) is None or self._weight_bytes[0] != self.weight_dtype:
            self._weight_bytes = (self.weight_dtype, sum(nbytes(t) for t in self.named_tensors().values()))
        return self._weight_bytes[1]

    def weight_bytes_as(self, weight_dtype: str, group: int = INT4_GROUP) -> int:
        """What :meth:`weight_bytes` would be after ``quantize(weight_dtype)``
        (from shapes alone: works on a :func:`~prism_ext.models.skeleton_network`)."""
        check_weight_dtype(weight_dtype)
        if self.weight_dtype != "fp32":
            raise ValueError(f"weight_dtype: this network is already {self.weight_dtype}")
        matrices = {id(getattr(blk, name)): getattr(blk, name) for blk in self.blocks for name in BLOCK_MATRICES}
        matrices.update({id(getattr(self, name)): getattr(self, name) for name in self.quantized_tables})
        rest = sum(t.numel() * 4 for t in self.named_tensors().values() if id(t) not in matrices)
        return rest + sum(stored_bytes(tuple(w.shape), weight_dtype, group) for w in matrices.values())

    def weights_digest(self) -> str:
        """SHA-256 over every tensor the engine runs (names, shapes, float32
        bytes), independent of the checkpoint's file format; cached."""
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha256()
            for name, value in self.named_tensors().items():
                h.update(f"{name}:{tuple(value.shape)};".encode())
                h.update(value.detach().to(torch.float32).contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def checkpoint_tensors(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """The inverse of the family's loader: every tensor in the Hugging Face
        layout, each with the key names it may have in a checkpoint (without
        the base-model prefix), so a trained network can be written back
        (:func:`prism_ext.models.write_checkpoint`)."""
        raise NotImplementedError

    def check_local(self, local: dict, batch: int, start: int, stop: int) -> None:
        """Check a device's own inputs as they arrived from rank 0 (untrusted
        bytes): the names this model takes, [batch, stop - start] shapes, values
        in range. Token models: the full-input checks on the slice."""
        unknown = set(local) - set(self.input_names)
        if unknown or self.input_names[0] not in local:
            raise ValueError(f"inputs: expected {', '.join(self.input_names)}, got {', '.join(sorted(local))}")
        got_batch, n = self.check_inputs(local)
        if (got_batch, n) != (batch, stop - start):
            raise ValueError(f"inputs: expected [{batch}, {stop - start}] for positions [{start}, {stop}), "
                             f"got [{got_batch}, {n}]")

    def embed(self, local: dict, start: int, stop: int) -> torch.Tensor:
        """First layer input [B, stop - start, d] of own positions, from :meth:`local_inputs`."""
        raise NotImplementedError

    def row_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def cls_outputs(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}


def linear_tensors(layer: tuple | None, name: str) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """A (weight, bias) pair under ``name.weight`` / ``name.bias`` (nothing for None)."""
    if layer is None:
        return []
    weight, bias = layer
    return [((name + ".weight",), weight)] + ([] if bias is None else [((name + ".bias",), bias)])


def layer_norm_tensors(ln: LayerNorm, *names: str) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    return [(tuple(n + ".weight" for n in names), ln.weight), (tuple(n + ".bias" for n in names), ln.bias)]


_BLOCK_LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


def block_linears(lin, modules: dict, d: int, d_ff: int) -> list:
    """The six projections of a Linear-layout block, each ``lin(module, n_in,
    n_out)`` = (weight, bias), in the order q, k, v, o, fc1, fc2 (the loader's
    side of :func:`block_tensors`)."""
    shapes = {"fc1": (d, d_ff), "fc2": (d_ff, d)}
    return [lin(modules[key], *shapes.get(key, (d, d))) for key in _BLOCK_LINEARS]


def block_tensors(blk: Block, modules: dict[str, str | tuple[str, ...]]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """A Linear-layout (``[out, in]``) block in the Hugging Face layout: Q, K, V
    split out of ``wqkv``; ``modules`` names the module of each part (q, k, v,
    o, ln1, fc1, fc2, ln2), a tuple when a checkpoint may use either name."""
    def names(key: str) -> tuple[str, ...]:
        m = modules[key]
        return (m,) if isinstance(m, str) else m

    d = blk.d
    out = []
    for j, key in enumerate("qkv"):
        out.append((tuple(n + ".weight" for n in names(key)), blk.wqkv[j * d:(j + 1) * d]))
        if blk.bqkv is not None:
            out.append((tuple(n + ".bias" for n in names(key)), blk.bqkv[j * d:(j + 1) * d]))
    for key, weight, bias in (("o", blk.wo, blk.bo), ("fc1", blk.w1, blk.b1), ("fc2", blk.w2, blk.b2)):
        out.append((tuple(n + ".weight" for n in names(key)), weight))
        if bias is not None:
            out.append((tuple(n + ".bias" for n in names(key)), bias))
    out += layer_norm_tensors(blk.ln1, *names("ln1")) + layer_norm_tensors(blk.ln2, *names("ln2"))
    return out


def check_ids(inputs: dict, name: str, batch_n: tuple[int, int] | None = None, upper: int | None = None) -> torch.Tensor:
    """An integer [B, N] tensor, values in [0, upper)."""
    t = inputs.get(name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    check_device(t, name)
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [batch, positions] with both >= 1, got {tuple(t.shape)}")
    if batch_n is not None and tuple(t.shape) != batch_n:
        raise ValueError(f"{name}: expected shape {batch_n} like input_ids, got {tuple(t.shape)}")
    if upper is not None and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f"{name}: values must be in [0, {upper}), got [{int(t.min())}, {int(t.max())}]")
    return t


def check_heads(d: int, heads: int) -> int:
    if heads < 1 or d % heads:
        raise ValueError(f"config.json: hidden size {d} is not divisible by the number of heads {heads}")
    return d // heads



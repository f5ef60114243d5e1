"""The differentiable twin of the engine: PRISM's forward for every device at
once, in plain torch ops that autograd follows, over the same
:class:`~prism_ext.models.Network` (the same blocks, the same tensors) the
engine runs. It is what ``prism finetune`` and ``prism zoo train`` train
through; the engine stays the one implementation that runs on devices, and
tests/test_twin.py holds the two equal.

One layer, for all P devices in one batched computation (docs/design.md,
steps 2-7):

* what each device sends (its rows' segment means, or its exact rows alone
  and the means of the groups :func:`~prism_ext.method.partition.exact_slots`
  gives) is ``A @ src``, with ``A`` [B, M, N] averaging each sent row's own
  positions; M is every device's sent rows together;
* the keys/values are the K/V projection of those M rows followed by every
  position's own K/V; a query sees its own device's positions at full
  resolution and the other devices' sent rows with the bias log(count) on
  the logit, which is attention over the sequence rebuilt by repeating each
  mean count times; everything else is masked with -inf: other devices' own
  rows, padding, and under the partition-aware causal rule every key whose
  last covered position lies after the query's;
* scaled-dot-product attention with that bias, then the block's own output
  projection and MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import count_bias, mean_weights
from .engine import RunConfig
from ..models.common import Network
from .partition import Partition, exact_slots, segment_ends, slot_ends

__all__ = ["forward", "layer_layout"]


def layer_layout(part: Partition, cr: int, valid: torch.Tensor, exact: torch.Tensor | None = None,
                 src: torch.Tensor | None = None):
    """Which sent row carries each position at one layer, for every device.

    ``valid`` [B, N]; ``exact`` [B, N] the rows that travel alone (None: plain
    CR-row segments); ``src`` [B, N, d] the rows, for adaptive groups. Returns
    (slot [B, N] int64 into the M sent rows, -1 at padding; counts [B, M]
    float32; ends [B, M] int64, the last position each covers; owner [M], the
    rank that sends it), as :func:`prism_ext.method.engine.run_device` forms them."""
    B, N = valid.shape
    slots, counts, ends, owner = [], [], [], []
    base = 0
    for rank, (start, stop) in enumerate(part.ranges):
        n = stop - start
        own_valid = valid[:, start:stop]
        pos = torch.arange(start, stop)
        if exact is None or cr == 1:  # at CR 1 every row travels alone anyway
            end = torch.tensor(segment_ends(start, stop, cr))
            m = len(end)
            slot = ((pos - start) // cr).expand(B, n)
            end = end.expand(B, m)
        else:
            rows = None if src is None else src[:, start:stop].detach()
            slot, m = exact_slots(exact[:, start:stop], own_valid, cr, rows)
            end = slot_ends(slot, m, pos)
        slot = torch.where(own_valid, slot, -1)
        count = torch.zeros(B, m + 1).scatter_add_(1, torch.where(slot < 0, m, slot), own_valid.float())[:, :m]
        slots.append(torch.where(slot < 0, -1, slot + base))
        counts.append(count)
        ends.append(end)
        owner += [rank] * m
        base += m
    return torch.cat(slots, 1), torch.cat(counts, 1), torch.cat(ends, 1), torch.tensor(owner)


def _attention_bias(part: Partition, valid: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor,
                    owner: torch.Tensor, causal: bool, weighting: str) -> torch.Tensor:
    """[B, N, M + N] logit bias of every query over [sent rows ; own rows]."""
    B, N = valid.shape
    dev = valid.device
    pos = torch.arange(N, device=dev)
    rank = torch.cat([torch.full((stop - start,), r, device=dev) for r, (start, stop) in enumerate(part.ranges)])
    sent = count_bias(mean_weights(counts, weighting), pos if causal else None, ends if causal else None)
    sent = torch.where(owner[None, None, :] != rank[None, :, None], sent, -math.inf).expand(B, N, -1)
    own = (rank[:, None] == rank[None, :])[None] & valid[:, None, :]
    if causal:
        own &= pos[None, :] <= pos[:, None]
    own |= torch.eye(N, dtype=torch.bool, device=dev)  # a padding query sees itself: finite, and read by nobody
    return torch.cat([sent, torch.where(own, 0.0, -math.inf)], dim=2)


def forward(net: Network, inputs: dict, part: Partition, cfg: RunConfig, *, dropout: float = 0.0,
            hidden_states: bool = False) -> dict:
    """PRISM over ``part`` (devices) with ``cfg`` (per-layer CR, compression
    point, mean weighting, exact rows), differentiable in every tensor of
    ``net``. ``inputs`` as the model takes them (checked). Returns the fields
    the engine returns for ``outputs=("rows", "cls")``: the per-row outputs
    (``last_hidden_state``, ``logits`` of an LM) and the [CLS] heads
    (``pooler_output``, ``logits`` of a classifier). ``dropout`` (training):
    on the embeddings, the attention weights and both residual branches.
    ``hidden_states``: also ``hidden_states``, every block's output rows
    [B, N, d] (first block first), what per-layer distillation matches.
    The twin runs on the device of ``net``'s tensors (``inputs`` stay on the
    CPU, where they are checked); its outputs are on that device."""
    if net.weight_dtype != "fp32":
        raise ValueError(f"weight_dtype: the twin trains fp32 weights; this model's are {net.weight_dtype} "
                         f"(fine-tune the fp32 checkpoint, then quantize the result)")
    if cfg.mode != "prism":
        raise ValueError(f"mode: the twin runs PRISM (mode 'prism'; Voltage equals it at CR 1), got {cfg.mode!r}")
    if cfg.wire_dtype != "fp32":
        raise ValueError(f"wire_dtype: the twin sends fp32 rows, got {cfg.wire_dtype!r}")
    if len(cfg.crs) != len(net.blocks):
        raise ValueError(f"cr: {len(cfg.crs)} per-layer values for {len(net.blocks)} layers")
    batch, N = net.check_inputs(inputs)
    if part.length != N:
        raise ValueError(f"part: covers {part.length} positions, the input has {N}")
    drop = (lambda t: F.dropout(t, dropout, training=True)) if dropout else None
    dev = net.blocks[0].wqkv.device
    # which rows are exact and how rows are grouped is bookkeeping on the CPU; the rows themselves live on dev
    static = cfg.exact_rows.static_mask(inputs, 0, batch, N) if cfg.exact_rows else None
    valid_cpu = net.valid(inputs)
    valid_cpu = torch.ones(batch, N, dtype=torch.bool) if valid_cpu is None else valid_cpu
    valid = valid_cpu.to(dev)
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    x = net.embed(net.local_inputs(inputs, 0, N), 0, N)
    x = x if drop is None else drop(x)
    pos = torch.arange(N, device=dev)
    layers = []
    for blk, cr in zip(net.blocks, cfg.crs):
        heads, kv_heads, dh = blk.heads, blk.kv_heads, blk.head_dim
        a = blk.attn_input(x)
        qkv = blk.qkv(a, pos)
        q, k, v = blk.split_qkv(qkv)
        bias = None
        if part.devices > 1:
            src = {"attn_input": a, "hidden": x, "kv": qkv[..., blk.q_width:]}[cfg.compression_point]
            exact = None
            if static is not None:  # top-k rows are chosen per device, as each device does
                rows_cpu = x.detach().cpu()
                exact = torch.cat([cfg.exact_rows.mask(static[:, s:e], rows_cpu[:, s:e], valid_cpu[:, s:e])
                                   for s, e in part.ranges], dim=1)
            layout = layer_layout(part, cr, valid_cpu, exact,
                                  src.detach().cpu() if cfg.exact_rows.adaptive else None)
            slot, counts, ends, owner = (t.to(dev) for t in layout)
            M = counts.shape[1]
            average = torch.zeros(batch, M + 1, N, device=dev).scatter_(
                1, torch.where(slot < 0, M, slot)[:, None, :], 1.0)
            average = average[:, :M] / counts.clamp(min=1)[..., None]
            rows = average @ src
            if cfg.sends_kv:  # the means of own keys and values are the keys and values
                kv = rows
            else:  # RoPE: rotated at the mean of the positions each row covers
                kv = blk.kv(blk.received_attn_input(rows, cfg.sends_hidden),
                            (average.double() @ pos.double()).float() if blk.positional else None)
            w = blk.kv_width
            k, v = torch.cat([kv[..., :w], k], dim=1), torch.cat([kv[..., w:], v], dim=1)
            bias = _attention_bias(part, valid, counts, ends, owner, net.causal, cfg.mean_weighting)
        elif net.causal or not bool(valid.all()):
            bias = _attention_bias(part, valid, torch.zeros(batch, 0, device=dev),
                                   torch.zeros(batch, 0, dtype=torch.long, device=dev),
                                   torch.zeros(0, dtype=torch.long, device=dev), net.causal, cfg.mean_weighting)

        def split(t, h):
            return t.reshape(batch, t.shape[1], h, dh).transpose(1, 2)

        # enable_gqa: each key head serves its group of query heads (transformers' layout)
        attn = F.scaled_dot_product_attention(split(q, heads), split(k, kv_heads), split(v, kv_heads),
                                              attn_mask=None if bias is None else bias[:, None],
                                              dropout_p=dropout if drop is not None else 0.0,
                                              enable_gqa=kv_heads != heads)
        x = blk.finish_attention(x, attn.transpose(1, 2).reshape(batch, N, blk.q_width), drop)
        x = blk.mlp(x, drop)
        layers.append(x)
    rows = net.row_outputs(x)
    out = {**rows, **net.cls_outputs(rows)}
    if hidden_states:
        out["hidden_states"] = tuple(layers)
    return out

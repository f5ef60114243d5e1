"""Pure-torch reference of every kernel in :mod:`prism_ext.kernels`.

Used by the tests only (kernel == reference == naive repetition) and as the plain
formulation to read when in doubt. Shapes and conventions are those of
:mod:`prism_ext.kernels`: ``counts`` is ``(nk,)`` or ``(B, nk)`` and the
positions ``(n,)`` or ``(B, n)``, indexed by the first (batch) dimension.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "segment_means",
    "key_bias",
    "visibility",
    "masked_softmax",
    "compressed_attention",
    "repeated_attention",
    "int8_dequantize",
    "int4_dequantize",
    "quantized_linear",
]


def segment_means(x: torch.Tensor, seg: int, valid: torch.Tensor | None = None):
    """Means of consecutive ``seg``-row segments of ``x[..., n, d]``.

    Returns ``(means[..., m, d], counts[..., m])`` with ``m = ceil(n / seg)``;
    rows where ``valid`` is False are left out, and a segment with no valid row
    has count 0 and a zero mean.
    """
    n, d = x.shape[-2], x.shape[-1]
    seg = min(seg, n)  # a longer segment holds all n rows
    m = -(-n // seg)
    w = torch.ones(x.shape[:-1], dtype=x.dtype) if valid is None else valid.to(x.dtype)
    pad = m * seg - n
    xw = torch.nn.functional.pad(x * w.unsqueeze(-1), (0, 0, 0, pad))
    w = torch.nn.functional.pad(w, (0, pad))
    sums = xw.reshape(*x.shape[:-2], m, seg, d).sum(-2)
    counts = w.reshape(*w.shape[:-1], m, seg).sum(-1)
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return means, counts


def key_bias(counts: torch.Tensor) -> torch.Tensor:
    """log(counts) as an additive logit bias, -inf where a count is 0."""
    counts = counts.to(torch.float64)
    return torch.where(counts > 0, counts.clamp(min=1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean ``[nq, nk]``: key j visible to query i iff k_pos[j] <= q_pos[i]."""
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def _keys(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Key-indexed (nk,) or (B, nk) -> broadcastable to [B, ..., nq, nk]."""
    return t if t.dim() == 1 else t.reshape(t.shape[0], *([1] * (ndim - 2)), t.shape[-1])


def _queries(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Query-indexed (nq,) or (B, nq) -> broadcastable to [B, ..., nq, nk]."""
    t = t.unsqueeze(-1)
    return t if t.dim() == 2 else t.reshape(t.shape[0], *([1] * (ndim - 3)), t.shape[1], 1)


def _logit_bias(shape, counts, q_pos, k_pos, additive_mask):
    """(bias added to the logits in float64, hidden keys as a bool mask), both
    broadcast to ``shape``. Hidden: count 0 or a key in the query's future."""
    ndim = len(shape)
    bias = torch.zeros(shape, dtype=torch.float64)
    hidden = torch.zeros(shape, dtype=torch.bool)
    if counts is not None:
        bias = bias + _keys(key_bias(counts), ndim)
        hidden = hidden | _keys(counts == 0, ndim)
    if q_pos is not None:
        visible = _keys(k_pos, ndim) <= _queries(q_pos, ndim)
        hidden = hidden | ~visible
    if additive_mask is not None:
        bias = bias + additive_mask.to(torch.float64)
    return bias, hidden


def masked_softmax(scores, counts=None, q_pos=None, k_pos=None, additive_mask=None, dtype=torch.float64):
    """Row softmax of ``scores + log(counts) + additive_mask`` with the causal
    position rule; rows with nothing visible are zero. Computed in ``dtype``.

    Non-finite values (docs/errors.md): a hidden key (count 0, future
    position) is -inf whatever its score; a visible logit that is NaN or +inf
    makes the whole row NaN, as torch.softmax does."""
    bias, hidden = _logit_bias(scores.shape, counts, q_pos, k_pos, additive_mask)
    z = (scores.to(dtype) + bias.to(dtype)).masked_fill(hidden, -math.inf)
    p = torch.softmax(z, dim=-1)
    dead = torch.isneginf(z).all(dim=-1, keepdim=True)
    bad = (torch.isnan(z) | torch.isposinf(z)).any(dim=-1, keepdim=True)
    p = torch.where(dead, torch.zeros((), dtype=dtype), p)
    return torch.where(bad, torch.full((), math.nan, dtype=dtype), p)


def compressed_attention(q, k, v, counts=None, q_pos=None, k_pos=None, scale=None, dtype=torch.float64):
    """softmax(scale q k^T + log counts, causal rule) v over ``[B, H, n, dh]``.

    A key of weight 0 for a query (hidden, or logit -inf) is not read, so an
    inf/NaN in its value does not reach that query's row (0 * inf would)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    p = masked_softmax(scores, counts, q_pos, k_pos, dtype=dtype)
    v = v.to(dtype)
    if bool(torch.isfinite(v).all()):
        return torch.matmul(p, v)  # weight-0 keys add 0 * finite = 0
    terms = torch.where((p > 0).unsqueeze(-1), p.unsqueeze(-1) * v.unsqueeze(-3), torch.zeros((), dtype=dtype))
    out = terms.sum(-2)
    return torch.where(torch.isnan(p).any(-1, keepdim=True), torch.full((), math.nan, dtype=dtype), out)


def repeated_attention(q, k, v, counts, q_pos=None, k_pos=None, scale=None, dtype=torch.float64):
    """The naive formulation: every key/value row j (and its position) is
    repeated ``counts[j]`` times, then plain (causal) attention runs over the
    rebuilt sequence. ``counts`` must hold whole numbers. Loops over the batch
    because each batch element may rebuild a sequence of different length."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B = q.shape[0]
    outs = []
    for b in range(B):
        c = (counts if counts.dim() == 1 else counts[b]).round().long()
        kb = torch.repeat_interleave(k[b].to(dtype), c, dim=-2)
        vb = torch.repeat_interleave(v[b].to(dtype), c, dim=-2)
        scores = torch.matmul(q[b].to(dtype), kb.transpose(-1, -2)) * scale
        if q_pos is not None:
            qp = q_pos if q_pos.dim() == 1 else q_pos[b]
            kp = torch.repeat_interleave(k_pos if k_pos.dim() == 1 else k_pos[b], c)
            scores = scores.masked_fill(~visibility(qp, kp), -math.inf)
        if kb.shape[-2] == 0:
            outs.append(torch.zeros(q[b].shape, dtype=dtype))
            continue
        p = torch.softmax(scores, dim=-1)
        p = torch.where(torch.isneginf(scores).all(-1, keepdim=True), torch.zeros((), dtype=dtype), p)
        outs.append(torch.matmul(p, vb))
    return torch.stack(outs)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 ``q * scale[:, None]`` (exact: a 7-bit integer times a float32)."""
    return q.to(torch.float64) * scale.to(torch.float64)[:, None]


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    """float64 ``q * scale + offset`` of packed 4-bit weights (weight k of a
    row: byte k // 2, low nibble for even k, high nibble for odd k)."""
    q = torch.as_tensor(q)
    nib = torch.stack(((q & 0x0F), (q >> 4)), dim=-1).reshape(q.shape[0], -1).to(torch.float64)
    s = torch.as_tensor(scale).to(torch.float64).repeat_interleave(group, dim=1)
    o = torch.as_tensor(offset).to(torch.float64).repeat_interleave(group, dim=1)
    return nib * s + o


def quantized_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """(``x @ w.T + bias`` in float64, the error scale ``|x| @ |w|.T + |bias|``)
    for float64 dequantized weights ``w``: the kernels' tolerance is stated
    relative to the scale (prism_ext.kernels.int8_linear)."""
    x = torch.as_tensor(x).to(torch.float64)
    y = x @ w.T
    mag = x.abs() @ w.abs().T
    if bias is not None:
        b = torch.as_tensor(bias).to(torch.float64)
        y, mag = y + b, mag + b.abs()
    return y, mag

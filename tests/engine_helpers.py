"""Shared by the engine tests: tiny random HF models saved to disk, and the
naive reference engine (every device rebuilds the full sequence by repeating
each received mean count times and computes K/V for all of it)."""

from __future__ import annotations

import math

import torch
import transformers  # a test dependency (the `test` extra): missing, the engine tests fail, never skip
from torch.utils.flop_counter import FlopCounterMode

from prism_ext.method.partition import exact_slots, partition

D, HEADS, LAYERS, FF = 32, 4, 2, 64
INIT = 0.2  # 10x the HF default: peaked attention, so compression visibly matters


def hf_gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=64, n_positions=64,
                                  bos_token_id=None, eos_token_id=None, initializer_range=INIT, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_bert(seed=0, head=True):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FF, vocab_size=64, max_position_embeddings=64, num_labels=3,
                                  initializer_range=INIT)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return cls(cfg).eval()


def hf_vit(seed=0, head=True):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 intermediate_size=FF, image_size=16, patch_size=4, num_labels=3, initializer_range=INIT)
    return (transformers.ViTForImageClassification if head else transformers.ViTModel)(cfg).eval()


LLAMA_FAMILIES = {  # model_type -> (config class, model class, config options of the tiny model)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q width 64 != d 32, as Qwen3 has
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
}


def hf_llama(family="llama", seed=0, kv_heads=2, vocab_size=64, max_position_embeddings=64, **kw):
    """A tiny random model of a Llama-family type (GQA: 4 query heads, ``kv_heads`` key heads)."""
    config_cls, model_cls, options = LLAMA_FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
        intermediate_size=FF, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
        initializer_range=INIT, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, **{**options, **kw})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # RMSNorm gains start at 1 and Qwen2's biases at 0: make every tensor matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def tiny_models(tmp_path_factory, seed: int) -> dict:
    """family -> (HF model, the same checkpoint loaded by prism_ext), seeds seed, seed + 1, seed + 2."""
    import prism_ext

    hfs = {"gpt2": hf_gpt2(seed=seed), "bert": hf_bert(seed=seed + 1), "vit": hf_vit(seed=seed + 2)}
    return {k: (hf, prism_ext.load(save(hf, tmp_path_factory.mktemp(k)))) for k, hf in hfs.items()}


def family_inputs(family: str, n: int, seed: int = 0) -> dict:
    """Inputs for the tiny models: 2 x n ids (gpt2, the Llama family), 3 x n padded (bert), 2 images (vit)."""
    g = torch.Generator().manual_seed(seed)
    if family == "gpt2" or family in LLAMA_FAMILIES:
        return {"input_ids": torch.randint(0, 64, (2, n), generator=g)}
    if family == "bert":
        return bert_inputs(batch=3, n=n, seed=seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def bert_inputs(batch=3, n=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    for b in range(1, batch):  # right padding of different lengths
        mask[b, n - 3 * b :] = 0
    types = torch.randint(0, 2, (batch, n), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _exact_groups(net, inputs, exact, x, a_or_x, valid_b, s, e, cr, b):
    """Reference of one device's sent rows for sequence b with exact rows:
    (rows [r, d], counts [r], end positions [r], mean positions [r]). Exact rows are position 0
    (``first``), the ``ids`` and the ``topk`` largest-norm valid rows of x;
    the others are grouped as :func:`prism_ext.method.partition.exact_slots` says
    (the layout under test there) and each group is one mean row at its last
    position."""
    n = e - s
    mask = torch.zeros(n, dtype=torch.bool)
    if exact.first and s == 0:
        mask[0] = True
    if "input_ids" in inputs:
        for j in range(n):
            mask[j] |= int(inputs["input_ids"][b, s + j]) in exact.ids
    mask &= valid_b
    if exact.topk:
        norms = [(float(x[b, j].norm()), j) for j in range(n) if valid_b[j] and not mask[j]]
        for _, j in sorted(norms, reverse=True)[:exact.topk]:
            mask[j] = True
    slot, _ = exact_slots(mask[None], valid_b[None], cr, a_or_x[b][None] if exact.adaptive else None)
    rows, counts, pos, mean_pos = [], [], [], []
    for j in range(n):
        if mask[j]:
            rows.append(a_or_x[b, j]), counts.append(1), pos.append(s + j), mean_pos.append(float(s + j))
    for g in sorted(set(slot[0][~mask & valid_b].tolist())):
        members = [j for j in range(n) if slot[0, j] == g]
        rows.append(a_or_x[b, members].mean(0)), counts.append(len(members)), pos.append(s + max(members))
        mean_pos.append(s + sum(members) / len(members))
    if not rows:
        return (a_or_x.new_zeros(0, a_or_x.shape[-1]), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                torch.zeros(0))
    return torch.stack(rows), torch.tensor(counts, dtype=torch.float32), torch.tensor(pos), torch.tensor(mean_pos)


def _segment_groups(src, valid_b, s, e, cr):
    """Plain CR-row segments of one sequence's own rows ``src`` [n, w]: (mean
    rows, counts, end positions, mean positions of the valid rows)."""
    rows, counts, ends, mean_pos = [], [], [], []
    for lo in range(0, e - s, cr):
        members = [j for j in range(lo, min(lo + cr, e - s)) if valid_b[j]]
        rows.append(src[members].mean(0) if members else src.new_zeros(src.shape[-1]))
        counts.append(len(members))
        ends.append(s + min(lo + cr, e - s) - 1)
        mean_pos.append(s + sum(members) / len(members) if members else float(ends[-1]))
    return torch.stack(rows), torch.tensor(counts, dtype=torch.float32), torch.tensor(ends), torch.tensor(mean_pos)


def naive_forward(net, inputs: dict, devices: int, cr: int, point: str = "attn_input", weighting: str = "count",
                  exact=None):
    """Reference engine: per layer, device p rebuilds the whole sequence (own
    rows + every other device's segment means, each repeated count times,
    with the segment's last position as its position for the causal rule),
    computes K/V for all of it and runs plain masked softmax attention (every
    key head repeated for its query heads under grouped-query attention).

    What a mean is: ``attn_input``: the mean attention input, projected to
    K/V (RoPE models: rotated at the mean of the positions it covers);
    ``hidden``: the mean raw layer input, LN1 then projected; ``kv``: the
    mean of the keys (rotated at their own positions) and values. Either
    way its key and value are repeated count times, so ``kv`` is exact
    against this repetition. ``weighting="none"`` repeats every mean once."""
    batch, n = net.check_inputs(inputs)
    part = partition(n, devices)
    valid = net.valid(inputs)
    valid = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    xs = [net.embed(net.local_inputs(inputs, s, e), s, e) for s, e in part.ranges]
    for blk in net.blocks:
        H, Hkv, dh, qw, kw = blk.heads, blk.kv_heads, blk.head_dim, blk.q_width, blk.kv_width
        acts = [blk.attn_input(x) for x in xs]
        qkvs = [blk.qkv(a, torch.arange(s, e)) for (s, e), a in zip(part.ranges, acts)]
        sent = []
        for (s, e), a, x, qkv in zip(part.ranges, acts, xs, qkvs):
            src = {"attn_input": a, "hidden": x, "kv": qkv[..., qw:]}[point]
            if exact:  # per sequence: [(rows, counts, ends, mean positions)] for b in the batch
                groups = [_exact_groups(net, inputs, exact, x, src, valid[b, s:e], s, e, cr, b) for b in range(batch)]
            else:
                groups = [_segment_groups(src[b], valid[b, s:e], s, e, cr) for b in range(batch)]
            if point != "kv":  # K/V of each mean, at its mean position
                groups = [(blk.kv(blk.received_attn_input(r, point == "hidden"), mp), c, q, mp)
                          for r, c, q, mp in groups]
            if weighting == "none":
                groups = [(r, (c > 0).to(c.dtype), q, mp) for r, c, q, mp in groups]
            sent.append(groups)
        new = []
        for p, ((s, e), x, qkv) in enumerate(zip(part.ranges, xs, qkvs)):
            outs = []
            for b in range(batch):
                rows, reps, pos = [], [], []
                for q, groups in enumerate(sent):
                    if q == p:
                        rows.append(qkv[b, :, qw:]), reps.append(valid[b, s:e].long()), pos.append(torch.arange(s, e))
                    else:
                        kv, counts, ends, _ = groups[b]
                        rows.append(kv), reps.append(counts.round().long()), pos.append(ends)
                reps = torch.cat(reps)
                seq = torch.repeat_interleave(torch.cat(rows), reps, dim=0)  # the rebuilt sequence's K/V
                kpos = torch.repeat_interleave(torch.cat(pos), reps)
                q_ = qkv[b, :, :qw].reshape(-1, H, dh).transpose(0, 1)
                k_ = seq[:, :kw].reshape(-1, Hkv, dh).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
                v_ = seq[:, kw:].reshape(-1, Hkv, dh).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
                scores = q_ @ k_.transpose(-1, -2) / math.sqrt(dh)
                if net.causal:
                    scores = scores.masked_fill(kpos[None, None, :] > torch.arange(s, e)[None, :, None], -math.inf)
                outs.append((torch.softmax(scores, -1) @ v_).transpose(0, 1).reshape(-1, qw))
            attn = torch.stack(outs)
            new.append(blk.mlp(blk.finish_attention(x, attn)))
        xs = new
    rows = [net.row_outputs(x) for x in xs]
    fields = {k: torch.cat([r[k] for r in rows], dim=1) for k in rows[0]}
    fields.update(net.cls_outputs(rows[0]))
    return fields


def counted_flops(fn) -> int:
    """FLOPs torch's own counter (``torch.utils.flop_counter``) sees while ``fn()`` runs on this thread."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attention_flops(batch: int, heads: int, nq: int, nk: int, dh: int) -> int:
    """The counter's FLOPs of dense attention of ``nq`` queries over ``nk`` keys.
    The C++ kernel is invisible to the counter (and it has no formula for CPU
    sdpa kernels), so attention is spelled out at the shapes it ran."""
    q, kv = torch.randn(batch, heads, nq, dh), torch.randn(batch, heads, nk, dh)
    return counted_flops(lambda: torch.softmax(q @ kv.transpose(-1, -2), -1) @ kv)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def prefill_devices(net, ids, part, cfg, decode_room: int = 0):
    """Every device's result of a prefill of ``ids`` over ``part`` (in-process devices)."""
    from prism_ext.comm.local import LocalGroup
    from prism_ext.method.engine import run_device

    full = {"input_ids": ids}
    return LocalGroup(part.devices).run(
        [lambda tr, r=r: run_device(net, net.local_inputs(full, *part.ranges[r]), part, r, tr, cfg,
                                    decode_room=decode_room if r == part.devices - 1 else 0)
         for r in range(part.devices)])

"""`prism zoo train NAME`: make a bundled model from data every machine has.

* ``gpt2-tiny``: a GPT-2 over UTF-8 bytes trained on Python's own
  ``pydoc_data.topics`` (every 8th topic, sorted by name, is held out).
* ``vit-tiny-digits``: a ViT trained on scikit-learn's handwritten digits
  (8x8, upsampled to 32x32, 4x4 patches: 64 patches + [CLS] to split over
  devices); a fixed 20% test split is held out and shipped for the demo.

Both train plain torch modules laid out like the Hugging Face models, save a
Hugging Face checkpoint (config.json + model.safetensors + tokenizer or
processor config) and a metrics.json, then reload the checkpoint through
``prism_ext.load`` to check it. Fixed seeds; scikit-learn is needed only here.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..progress import progress, write

SEED = 0

# ------------------------------------------------- PRISM-aware training

def prism_layout(n: int, devices: int, cr: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What one PRISM layer does to attention, as dense matrices for training:
    ``S`` [M, n] averages the positions of each segment (M segments over all
    devices), and ``bias`` [n, n + M] is added to the logits of the keys
    [own-resolution keys ; segment-mean keys]: a query sees its own device's
    keys at full resolution (causally for causal models) and the other
    devices' segment means weighted by their counts (only earlier devices'
    means for causal models), as in docs/design.md, steps 5-7. Because K
    and V are affine, ``S @ K`` are the keys of the means."""
    from ..partition import partition

    ranges = partition(n, devices).ranges
    owner = torch.empty(n, dtype=torch.long)
    rows, seg_owner, counts = [], [], []
    for rank, (start, stop) in enumerate(ranges):
        owner[start:stop] = rank
        for a in range(start, stop, cr):
            b = min(a + cr, stop)
            row = torch.zeros(n)
            row[a:b] = 1.0 / (b - a)
            rows.append(row)
            seg_owner.append(rank)
            counts.append(b - a)
    S = torch.stack(rows)
    seg_owner = torch.tensor(seg_owner)
    own = owner[:, None] == owner[None, :]
    if causal:
        own &= torch.ones(n, n, dtype=torch.bool).tril()
        other = seg_owner[None, :] < owner[:, None]
    else:
        other = seg_owner[None, :] != owner[:, None]
    bias = torch.cat([torch.where(own, 0.0, float("-inf")),
                      torch.where(other, torch.log(torch.tensor(counts, dtype=torch.float32))[None, :],
                                  float("-inf"))], dim=1)
    return S, bias


def prism_attention(q, k, v, layout) -> torch.Tensor:
    """Attention of [B, H, n, dh] tensors under a :func:`prism_layout` (None: exact)."""
    if layout is None:
        return F.scaled_dot_product_attention(q, k, v)
    S, bias = layout
    return F.scaled_dot_product_attention(q, torch.cat([k, S @ k], dim=2), torch.cat([v, S @ v], dim=2),
                                          attn_mask=bias)


def sample_layout(n: int, spec: dict, gen: torch.Generator, causal: bool):
    """Exact attention with probability 1 - spec["fraction"], else a random (devices, CR) layout."""
    if torch.rand(1, generator=gen).item() >= spec["fraction"]:
        return None
    devices = spec["devices"][int(torch.randint(len(spec["devices"]), (1,), generator=gen))]
    cr = spec["crs"][int(torch.randint(len(spec["crs"]), (1,), generator=gen))]
    return prism_layout(n, devices, cr, causal)


# ----------------------------------------------------------------- gpt2-tiny

GPT2_CFG = dict(n_positions=128, n_embd=128, n_layer=4, n_head=4, dropout=0.1,
                steps=3000, batch=16, lr=2e-3, warmup=100, weight_decay=0.1,
                # then a short phase in which half the batches see PRISM attention at a
                # random (devices, CR), so that the model tolerates compressed attention
                prism_finetune={"steps": 300, "lr": 5e-4, "fraction": 0.5, "devices": [2, 3, 4], "crs": [2, 4, 8]})
HELD_OUT_EVERY = 8


def text_split() -> tuple[bytes, bytes, list[str]]:
    """(train bytes, held-out bytes, held-out topic names) from pydoc_data.topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = keys[::HELD_OUT_EVERY]
    train = "\n\n".join(topics[k] for k in keys if k not in held).encode("utf-8")
    test = "\n\n".join(topics[k] for k in held).encode("utf-8")
    return train, test, held


class _Conv1D(nn.Module):
    """HF GPT-2's Conv1D: weight [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class _GPTAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.c_attn, self.c_proj, self.heads, self.dropout = _Conv1D(d, 3 * d), _Conv1D(d, d), heads, dropout

    def forward(self, x, layout=None):
        B, N, d = x.shape
        q, k, v = (t.reshape(B, N, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(d, dim=-1))
        p = self.dropout if self.training else 0.0
        if layout is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            S, bias = layout
            y = F.scaled_dot_product_attention(q, torch.cat([k, S @ k], dim=2), torch.cat([v, S @ v], dim=2),
                                               attn_mask=bias, dropout_p=p)
        return F.dropout(self.c_proj(y.transpose(1, 2).reshape(B, N, d)), self.dropout, self.training)


class _GPTMLP(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = _Conv1D(d, 4 * d), _Conv1D(4 * d, d), dropout

    def forward(self, x):
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.dropout, self.training)


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d, eps=1e-5), _GPTAttention(d, heads, dropout)
        self.ln_2, self.mlp = nn.LayerNorm(d, eps=1e-5), _GPTMLP(d, dropout)

    def forward(self, x, layout=None):
        x = x + self.attn(self.ln_1(x), layout)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 with Hugging Face's parameter names (``wte``, ``h.0.attn.c_attn``, ...), tied LM head."""

    def __init__(self, vocab: int, n_positions: int, d: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_positions, d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.h = nn.ModuleList(_GPTBlock(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.dropout = dropout
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, ids, layout=None):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        x = F.dropout(x, self.dropout, self.training)
        for blk in self.h:
            x = blk(x, layout)
        return self.ln_f(x) @ self.wte.weight.t()


def _gpt2_config(c: dict) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 256,
        "n_positions": c["n_positions"], "n_ctx": c["n_positions"], "n_embd": c["n_embd"], "n_layer": c["n_layer"],
        "n_head": c["n_head"], "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c["dropout"], "embd_pdrop": c["dropout"], "attn_pdrop": c["dropout"],
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
    }


def _lr(step: int, c: dict) -> float:
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    frac = (step - c["warmup"]) / max(1, c["steps"] - c["warmup"])
    return c["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n and "wpe" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def _held_out_nll(model: GPT2, data: torch.Tensor, ctx: int) -> float:
    """Mean negative log-likelihood (nats/byte) over non-overlapping windows."""
    model.eval()
    total, count = 0.0, 0
    windows = data[: (len(data) - 1) // ctx * ctx + 1]
    starts = list(range(0, len(windows) - 1, ctx))
    for i in range(0, len(starts), 32):
        idx = torch.tensor(starts[i:i + 32])[:, None] + torch.arange(ctx + 1)
        chunk = windows[idx]
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def _unigram_nll(train: bytes, test: bytes) -> float:
    """Held-out nats/byte of the train split's byte frequencies (add-one smoothed)."""
    freq = np.bincount(np.frombuffer(train, np.uint8), minlength=256).astype(np.float64) + 1
    logp = np.log(freq / freq.sum())
    return float(-logp[np.frombuffer(test, np.uint8)].mean())


GPT2_PROMPTS = ["The \"if\" statement is used for", "A class definition defines", "Exceptions are raised when"]


def _gpt2_steps(model: GPT2, tr: torch.Tensor, c: dict, sched: dict, gen: torch.Generator, log,
                prism: dict | None = None, quiet: bool = False) -> float:
    """``sched["steps"]`` AdamW steps on random windows; returns the final smoothed train loss."""
    ctx = c["n_positions"]
    opt = _optimizer(model, sched["lr"], c["weight_decay"])
    t0 = time.perf_counter()
    loss_avg = None
    for step in progress(range(sched["steps"]), desc="gpt2-tiny " + ("prism fine-tune" if prism else "pretrain"),
                         quiet=quiet, unit="step", leave=False):
        model.train()
        for group in opt.param_groups:
            group["lr"] = _lr(step, sched)
        starts = torch.randint(0, len(tr) - ctx - 1, (c["batch"],), generator=gen)
        chunk = tr[starts[:, None] + torch.arange(ctx + 1)]
        layout = None if prism is None else sample_layout(ctx, prism, gen, causal=True)
        logits = model(chunk[:, :-1], layout)
        loss = F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == sched["steps"] - 1:
            log(f"  step {step:5d}  train loss {loss_avg:.3f}  ({time.perf_counter() - t0:.0f} s)")
    return loss_avg


def pretrain_gpt2(c: dict, tr: torch.Tensor, log, quiet: bool = False) -> tuple[GPT2, float, float]:
    """Phase 1, exact attention: (model, final train loss, seconds)."""
    torch.manual_seed(SEED)
    model = GPT2(256, c["n_positions"], c["n_embd"], c["n_layer"], c["n_head"], c["dropout"])
    log(f"gpt2-tiny: {sum(p.numel() for p in model.parameters())} parameters, {len(tr)} train bytes, "
        f"{c['steps']} steps of {c['batch']}x{c['n_positions']}")
    t0 = time.perf_counter()
    loss = _gpt2_steps(model, tr, c, c, torch.Generator().manual_seed(SEED), log, quiet=quiet)
    return model, loss, time.perf_counter() - t0


def finetune_gpt2(model: GPT2, c: dict, tr: torch.Tensor, log, quiet: bool = False) -> tuple[float, float]:
    """Phase 2, PRISM-aware (seeded afresh, so it can start from a saved phase 1): (final train loss, seconds)."""
    f = c["prism_finetune"]
    torch.manual_seed(SEED + 1)
    log(f"gpt2-tiny: {f['steps']} PRISM-aware steps ({f['fraction']:.0%} of batches at devices {f['devices']}, "
        f"CR {f['crs']})")
    t0 = time.perf_counter()
    sched = {"steps": f["steps"], "lr": f["lr"], "warmup": 0}
    loss = _gpt2_steps(model, tr, c, sched, torch.Generator().manual_seed(SEED + 1), log, prism=f, quiet=quiet)
    return loss, time.perf_counter() - t0


def train_gpt2(out: Path, log, quiet: bool = False) -> dict:
    c = GPT2_CFG
    train, _, _ = text_split()
    tr = torch.tensor(list(train), dtype=torch.long)
    model, loss1, seconds1 = pretrain_gpt2(c, tr, log, quiet)
    loss2, seconds2 = finetune_gpt2(model, c, tr, log, quiet)
    return finish_gpt2(model, out, log, {"pretrain": seconds1, "prism_finetune": seconds2},
                       {"pretrain": loss1, "prism_finetune": loss2})


def finish_gpt2(model: GPT2, out: Path, log, seconds: dict, losses: dict) -> dict:
    """Evaluate, save the checkpoint, reload it through prism_ext and sample; returns the metrics."""
    c = GPT2_CFG
    train, test, held = text_split()
    te = torch.tensor(list(test), dtype=torch.long)
    ctx = c["n_positions"]
    nll = _held_out_nll(model, te, ctx)
    uni = _unigram_nll(train, test)
    log(f"gpt2-tiny: held-out perplexity {math.exp(nll):.2f} (unigram {math.exp(uni):.2f}) after "
        f"{sum(seconds.values()):.0f} s")

    from safetensors.torch import save_file

    from ..tokenizer import byte_level_tokenizer_json

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_gpt2_config(c), indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json(), ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ctx, "clean_up_tokenization_spaces": False,
         "model_input_names": ["input_ids", "attention_mask"]}, indent=2) + "\n")

    # Reload through the public API: the checkpoint must reproduce the trained model.
    import prism_ext
    from ..tokenizer import load_tokenizer

    loaded = prism_ext.load(out)
    tok = load_tokenizer(out)
    model.eval()
    probe = te[:ctx][None]
    with torch.no_grad():
        diff = (loaded(probe).logits - model(probe)).abs().max().item()
    samples, prism_samples = {}, {}
    for prompt in GPT2_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        samples[prompt] = tok.decode(loaded.generate(ids, max_new_tokens=90)[0, ids.shape[1]:].tolist())
        prism_samples[prompt] = tok.decode(loaded.generate(ids, devices=4, cr=4, max_new_tokens=90)[0, ids.shape[1]:]
                                           .tolist())
    windows = te[: 8 * ctx].reshape(8, ctx)
    with torch.no_grad():
        prism_nll = {cr: F.cross_entropy(loaded(windows, devices=4, cr=cr).logits[:, :-1].reshape(-1, 256),
                                         windows[:, 1:].reshape(-1)).item() for cr in (1, 2, 4, 8, 16)}
    log(f"gpt2-tiny: held-out perplexity (first {8 * ctx} bytes) on 4 devices by CR: "
        f"{ {cr: round(math.exp(v), 2) for cr, v in prism_nll.items()} }")
    metrics = {
        "model": "gpt2-tiny", "seed": SEED, "config": c,
        "data": {"source": "pydoc_data.topics", "python": platform.python_version(),
                 "sha256": hashlib.sha256(train + test).hexdigest(), "train_bytes": len(train),
                 "held_out_bytes": len(test), "held_out_topics": held,
                 "split": f"every {HELD_OUT_EVERY}th topic (sorted by name) held out"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "final_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "held_out_nll": round(nll, 4), "held_out_perplexity": round(math.exp(nll), 3),
        "unigram_perplexity": round(math.exp(uni), 3),
        "perplexity_ratio": round(math.exp(nll) / math.exp(uni), 4),
        "reload_max_abs_logit_diff": diff, "greedy_samples": samples,
        "greedy_samples_prism_4_devices_cr4": prism_samples,
        "prism_held_out_perplexity_4_devices": {str(cr): round(math.exp(v), 3) for cr, v in prism_nll.items()},
    }
    for prompt, text in samples.items():
        log(f"  {prompt!r} -> {text!r}")
    return metrics


# ------------------------------------------------------------ vit-tiny-digits

VIT_CFG = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, epochs=60, batch=64, lr=2e-3, warmup_epochs=3, weight_decay=0.05,
               label_smoothing=0.1, test_fraction=0.2,
               # half the batches see PRISM attention at a random (devices, CR), so that the
               # model keeps its accuracy when its attention is compressed
               prism_training={"fraction": 0.5, "devices": [2, 3, 4], "crs": [2, 4, 8]})

DIGITS_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 16,
    "do_normalize": True, "image_mean": [0.5], "image_std": [0.5],
    "prism_digits": {"grid": 8, "levels": 16},
}


class ViT(nn.Module):
    """A ViT classifier; :func:`_vit_state` renames its weights to Hugging Face's layout."""

    def __init__(self, c: dict, labels: int = 10):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        n = (c["image_size"] // p) ** 2 + 1
        self.patch = nn.Conv2d(1, d, p, p)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.heads = c["num_attention_heads"]
        self.layers = nn.ModuleList()
        for _ in range(c["num_hidden_layers"]):
            self.layers.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d, eps=1e-12), q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d),
                o=nn.Linear(d, d), ln2=nn.LayerNorm(d, eps=1e-12), fc1=nn.Linear(d, c["intermediate_size"]),
                fc2=nn.Linear(c["intermediate_size"], d))))
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.head = nn.Linear(d, labels)

    def forward(self, px, layout=None):
        x = self.patch(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        B, N, d = x.shape
        for L in self.layers:
            a = L["ln1"](x)
            q, k, v = (L[n](a).reshape(B, N, self.heads, -1).transpose(1, 2) for n in "qkv")
            x = x + L["o"](prism_attention(q, k, v, layout).transpose(1, 2).reshape(B, N, d))
            x = x + L["fc2"](F.gelu(L["fc1"](L["ln2"](x))))
        return self.head(self.ln(x[:, 0]))


def _vit_state(model: ViT) -> dict[str, torch.Tensor]:
    """Weights under ViTForImageClassification's (classic) key names."""
    s = {"vit.embeddings.cls_token": model.cls, "vit.embeddings.position_embeddings": model.pos,
         "vit.embeddings.patch_embeddings.projection.weight": model.patch.weight,
         "vit.embeddings.patch_embeddings.projection.bias": model.patch.bias,
         "vit.layernorm.weight": model.ln.weight, "vit.layernorm.bias": model.ln.bias,
         "classifier.weight": model.head.weight, "classifier.bias": model.head.bias}
    names = {"ln1": "layernorm_before", "q": "attention.attention.query", "k": "attention.attention.key",
             "v": "attention.attention.value", "o": "attention.output.dense", "ln2": "layernorm_after",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
    for i, L in enumerate(model.layers):
        for ours, theirs in names.items():
            s[f"vit.encoder.layer.{i}.{theirs}.weight"] = L[ours].weight
            s[f"vit.encoder.layer.{i}.{theirs}.bias"] = L[ours].bias
    return {k: v.detach().contiguous() for k, v in s.items()}


def _vit_config(c: dict) -> dict:
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "image_size": c["image_size"], "patch_size": c["patch_size"], "num_channels": 1,
        "hidden_size": c["hidden_size"], "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"], "intermediate_size": c["intermediate_size"],
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "encoder_stride": c["patch_size"],
        "id2label": {str(i): str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)},
        "torch_dtype": "float32",
    }


def digits_split(test_fraction: float):
    """(train images, train labels, test images, test labels): sklearn digits, fixed stratified-free shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.uint8)
    order = np.random.default_rng(SEED).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _augment(px: torch.Tensor, background: float, gen: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts (the digits were scanned by hand)."""
    B = px.shape[0]
    angle = (torch.rand(B, generator=gen) - 0.5) * math.radians(24)
    scale = 0.9 + 0.2 * torch.rand(B, generator=gen)
    shift = (torch.rand(B, 2, generator=gen) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(px.shape), align_corners=False)
    return F.grid_sample(px - background, grid, align_corners=False) + background


def train_vit(out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    from ..images import ImageProcessor

    c = dict(VIT_CFG, prism_training={**VIT_CFG["prism_training"], "fraction": 0.0}) if exact_only else VIT_CFG
    torch.manual_seed(SEED)
    tr_x, tr_y, te_x, te_y = digits_split(c["test_fraction"])
    proc = ImageProcessor(DIGITS_PROCESSOR, 1, c["image_size"])
    tr_px, te_px = proc.digits_to_pixels(tr_x), proc.digits_to_pixels(te_x)
    background = float(proc.digits_to_pixels(np.zeros((8, 8)))[0, 0, 0, 0])
    tr_t = torch.tensor(tr_y, dtype=torch.long)
    model = ViT(c)
    opt = _optimizer(model, c["lr"], c["weight_decay"])
    gen = torch.Generator().manual_seed(SEED)
    per_epoch = math.ceil(len(tr_y) / c["batch"])
    sched = dict(lr=c["lr"], warmup=c["warmup_epochs"] * per_epoch, steps=c["epochs"] * per_epoch)
    log(f"vit-tiny-digits: {sum(p.numel() for p in model.parameters())} parameters, {len(tr_y)} train / "
        f"{len(te_y)} test images, {c['epochs']} epochs")
    t0 = time.perf_counter()
    step = 0
    for epoch in progress(range(c["epochs"]), desc="vit-tiny-digits", quiet=quiet, unit="epoch", leave=False):
        model.train()
        order = torch.randperm(len(tr_y), generator=gen)
        total = 0.0
        for i in range(0, len(order), c["batch"]):
            idx = order[i:i + c["batch"]]
            for group in opt.param_groups:
                group["lr"] = _lr(step, sched)
            layout = sample_layout(model.pos.shape[1], c["prism_training"], gen, causal=False)
            logits = model(_augment(tr_px[idx], background, gen), layout)
            loss = F.cross_entropy(logits, tr_t[idx], label_smoothing=c["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            step += 1
        if epoch % 10 == 0 or epoch == c["epochs"] - 1:
            log(f"  epoch {epoch:3d}  train loss {total / len(tr_y):.3f}  ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = model(te_px).argmax(-1).numpy()
        train_acc = float((model(tr_px).argmax(-1).numpy() == tr_y).mean())
    acc = float((pred == te_y).mean())
    log(f"vit-tiny-digits: held-out accuracy {acc:.4f} (train {train_acc:.4f}) in {seconds:.0f} s")

    from safetensors.torch import save_file

    import prism_ext

    out.mkdir(parents=True, exist_ok=True)
    save_file(_vit_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_vit_config(c), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(DIGITS_PROCESSOR, indent=2) + "\n")
    np.savez_compressed(out / "heldout_digits.npz", images=te_x, labels=te_y)

    loaded = prism_ext.load(out)
    with torch.no_grad():
        loaded_pred = loaded(te_px).logits.argmax(-1).numpy()
        prism_acc = {cr: float((loaded(te_px, devices=4, cr=cr).logits.argmax(-1).numpy() == te_y).mean())
                     for cr in (1, 2, 4, 8, 16)}
    log(f"vit-tiny-digits: held-out accuracy through prism_ext on 4 devices by CR: {prism_acc}")
    return {
        "model": "vit-tiny-digits", "seed": SEED, "config": c, "processor": DIGITS_PROCESSOR,
        "data": {"source": "sklearn.datasets.load_digits", "train_images": int(len(tr_y)),
                 "held_out_images": int(len(te_y)), "split": f"fixed shuffle (seed {SEED}), first "
                 f"{c['test_fraction']:.0%} held out and shipped as heldout_digits.npz"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_accuracy": round(train_acc, 4), "held_out_accuracy": round(acc, 4),
        "reload_held_out_accuracy": round(float((loaded_pred == te_y).mean()), 4),
        "prism_held_out_accuracy_4_devices": {str(cr): round(a, 4) for cr, a in prism_acc.items()},
    }


TRAINERS = {"gpt2-tiny": train_gpt2, "vit-tiny-digits": train_vit}


def train(name: str, out: Path, threads: int | None = None, log=None, quiet: bool = False,
          exact_only: bool = False) -> dict:
    """Train ``name`` into ``out`` and write ``out/metrics.json``; returns the metrics.
    Progress: ``log`` lines and a bar on stderr, neither with ``quiet``. ``exact_only``:
    vit-tiny-digits without PRISM-aware batches (the peer that shows what PRISM-aware
    training buys, bench/EVAL.md)."""
    if name not in TRAINERS:
        raise ValueError(f"name: unknown bundled model {name!r} (known: {', '.join(TRAINERS)})")
    if exact_only and name != "vit-tiny-digits":
        raise ValueError(f"--exact-only: only vit-tiny-digits has PRISM-aware batches to leave out, not {name}")
    if name == "vit-tiny-digits":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ImportError("training vit-tiny-digits needs scikit-learn: pip install 'prism-ext[train]'") from None
    if log is None:
        def log(msg):
            if not quiet:
                write(msg, file=sys.stderr)  # above a progress bar, not through it
    if threads is not None:
        torch.set_num_threads(threads)
    extra = {"exact_only": True} if exact_only else {}
    metrics = TRAINERS[name](Path(out), log, quiet, **extra)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics

"""`prism zoo train NAME`: make a bundled model from data every machine has.

* ``gpt2-tiny``: a GPT-2 over UTF-8 bytes trained on Python's own
  ``pydoc_data.topics`` (every 8th topic, sorted by name, is held out).
* ``vit-tiny-digits``: a ViT trained on scikit-learn's handwritten digits
  (8x8, upsampled to 32x32, 4x4 patches: 64 patches + [CLS] to split over
  devices); a fixed 20% test split is held out and shipped for the demo.

Both start from a Hugging Face model initialised by transformers, are
trained exactly (one device) through the differentiable twin
(:mod:`prism_ext.method.twin`) on the package's own model code, then made
PRISM-aware by :func:`prism_ext.training.finetune.finetune`, the code path of
``prism finetune``, which writes the checkpoint (config.json,
model.safetensors, prism_finetune.json) beside the tokenizer or processor
config; a metrics.json records the result through ``prism_ext.load``.
Fixed seeds; scikit-learn and transformers (the ``train`` extra) are needed
only here.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import zoo
from ..util.progress import progress, write

SEED = 0


def _fresh_network(config: dict, out: Path):
    """A freshly initialised checkpoint of ``config`` in ``out`` (transformers'
    own init), loaded with every tensor a trainable leaf."""
    import transformers

    from ..models import load_network

    transformers.utils.logging.disable_progress_bar()  # one write, no bar
    torch.manual_seed(SEED)
    hf_config = transformers.AutoConfig.for_model(**config)
    arch = getattr(transformers, config["architectures"][0])
    arch(hf_config).save_pretrained(str(out))
    (out / "generation_config.json").unlink(missing_ok=True)  # transformers' defaults; the bundle ships its own files
    net, _ = load_network(out)
    for p in net.named_tensors().values():
        p.requires_grad_(True)
    return net


def _exact(net, n: int):
    """(partition, config) of one device over ``n`` positions: the exact forward of the twin."""
    from ..method.engine import RunConfig
    from ..method.partition import partition

    return partition(n, 1), RunConfig.make(len(net.blocks))


def _lr(step: int, c: dict) -> float:
    from .finetune import warmup_cosine

    return warmup_cosine(step, c["steps"], c["warmup"], c["lr"])


def _optimizer(net, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases, norms and position embeddings."""
    params = net.named_tensors()
    decay = [p for n, p in params.items() if p.dim() >= 2 and "position" not in n and "wpe" not in n]
    rest = [p for n, p in params.items() if not (p.dim() >= 2 and "position" not in n and "wpe" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _prism_phase(teacher_dir: Path, out: Path, data, held, recipe, log, quiet: bool) -> dict:
    """The PRISM-aware phase: ``prism finetune``'s code path from the exactly trained checkpoint."""
    from ..api import load
    from .finetune import finetune

    log(f"{out.name}: PRISM-aware distillation, {recipe.steps} steps at devices {list(recipe.devices)}, "
        f"CR {list(recipe.crs)}")
    report = finetune(load(teacher_dir), data, recipe, out, held=held, quiet=quiet, log=log,
                      command="prism zoo train")
    report["model"] = "the exactly trained model (phase 1 of prism zoo train; a temporary folder)"
    (out / "prism_finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------- gpt2-tiny

GPT2_CFG = dict(n_positions=128, n_embd=128, n_layer=4, n_head=4, dropout=0.1,
                steps=3000, batch=16, lr=2e-3, warmup=100, weight_decay=0.1,
                # then `prism finetune`'s distillation at a random (devices, CR) per batch
                # (a quarter of the batches exact), so that the model tolerates compressed attention
                prism_finetune={"steps": 2000, "lr": 6e-4, "batch": 16, "exact_fraction": 0.25,
                                "devices": [2, 3, 4], "crs": [2, 4, 8, 16]})


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


@torch.no_grad()
def _held_out_nll(model, data: torch.Tensor, ctx: int, devices: int = 1, cr: int = 1) -> float:
    """Mean negative log-likelihood (nats/byte) over non-overlapping windows, through the engine."""
    total, count = 0.0, 0
    windows = data[: (len(data) - 1) // ctx * ctx + 1]
    starts = list(range(0, len(windows) - 1, ctx))
    for i in range(0, len(starts), 32):
        idx = torch.tensor(starts[i:i + 32])[:, None] + torch.arange(ctx + 1)
        chunk = windows[idx]
        logits = model(chunk[:, :-1], devices=devices, cr=cr).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def _unigram_nll(train: bytes, test: bytes) -> float:
    """Held-out nats/byte of the train split's byte frequencies (add-one smoothed)."""
    freq = np.bincount(np.frombuffer(train, np.uint8), minlength=256).astype(np.float64) + 1
    logp = np.log(freq / freq.sum())
    return float(-logp[np.frombuffer(test, np.uint8)].mean())


GPT2_PROMPTS = ["The \"if\" statement is used for", "A class definition defines", "Exceptions are raised when"]


def _gpt2_pretrain(net, tr: torch.Tensor, c: dict, log, quiet: bool) -> float:
    """Phase 1, exact attention through the twin: ``c["steps"]`` AdamW steps on
    random windows, with dropout; returns the final smoothed train loss."""
    from ..method import twin

    ctx = c["n_positions"]
    exact = _exact(net, ctx)
    opt = _optimizer(net, c["lr"], c["weight_decay"])
    params = list(net.named_tensors().values())
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    loss_avg = None
    for step in progress(range(c["steps"]), desc="gpt2-tiny pretrain", quiet=quiet, unit="step", leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        starts = torch.randint(0, len(tr) - ctx - 1, (c["batch"],), generator=gen)
        chunk = tr[starts[:, None] + torch.arange(ctx + 1)]
        logits = twin.forward(net, {"input_ids": chunk[:, :-1]}, *exact, dropout=c["dropout"])["logits"]
        loss = F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == c["steps"] - 1:
            log(f"  step {step:5d}  train loss {loss_avg:.3f}  ({time.perf_counter() - t0:.0f} s)")
    return loss_avg


def _gpt2_files(out: Path, c: dict) -> None:
    from ..inputs.tokenizer import byte_level_tokenizer_json

    (out / "config.json").write_text(json.dumps(_gpt2_config(c), indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json(), ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c["n_positions"],
         "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}, indent=2) + "\n")


def _windows(data: bytes, ctx: int, stride: int | None = None):
    from .finetune import Examples, text_windows

    return Examples("tokens", text_windows(list(data), ctx, stride), None, {"source": "pydoc_data.topics"})


def train_gpt2(out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    from .finetune import Recipe
    from ..models import write_checkpoint

    c = GPT2_CFG
    train, test, held = zoo.text_split()
    tr = torch.tensor(list(train), dtype=torch.long)
    ctx = c["n_positions"]
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        exact_dir = out if exact_only else Path(tmp) / "exact"
        net = _fresh_network(_gpt2_config(c), init)
        log(f"gpt2-tiny: {sum(p.numel() for p in net.named_tensors().values())} parameters, {len(tr)} train bytes, "
            f"{c['steps']} steps of {c['batch']}x{ctx}")
        t0 = time.perf_counter()
        loss = _gpt2_pretrain(net, tr, c, log, quiet)
        seconds = {"pretrain": time.perf_counter() - t0}
        write_checkpoint(net, init, exact_dir)
        _gpt2_files(exact_dir, c)
        losses = {"pretrain": loss}
        if not exact_only:
            f = c["prism_finetune"]
            recipe = Recipe(task="lm", devices=tuple(f["devices"]), crs=tuple(f["crs"]), steps=f["steps"],
                            batch_size=f["batch"], lr=f["lr"], exact_fraction=f["exact_fraction"], max_length=ctx,
                            seed=SEED)
            t0 = time.perf_counter()
            report = _prism_phase(exact_dir, out, _windows(train, ctx, ctx // 4), _windows(test, ctx), recipe, log,
                                  quiet)
            seconds["prism_finetune"] = time.perf_counter() - t0
            losses["prism_finetune"] = report["losses"]["last_25_mean"]
    return finish_gpt2(out, log, seconds, losses)


def finish_gpt2(out: Path, log, seconds: dict, losses: dict) -> dict:
    """Evaluate the written checkpoint through prism_ext (and transformers) and sample; returns the metrics."""
    import transformers

    from ..api import load
    from ..inputs.tokenizer import load_tokenizer

    c = GPT2_CFG
    train, test, held = zoo.text_split()
    te = torch.tensor(list(test), dtype=torch.long)
    ctx = c["n_positions"]
    loaded = load(out)
    nll = _held_out_nll(loaded, te, ctx)
    uni = _unigram_nll(train, test)
    log(f"gpt2-tiny: held-out perplexity {math.exp(nll):.2f} (unigram {math.exp(uni):.2f}) after "
        f"{sum(seconds.values()):.0f} s")
    tok = load_tokenizer(out)
    probe = te[:ctx][None]
    with torch.no_grad():
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
        diff = (loaded(probe).logits - hf(probe).logits).abs().max().item()
    samples, prism_samples = {}, {}
    for prompt in GPT2_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        samples[prompt] = tok.decode(loaded.generate(ids, max_new_tokens=90)[0, ids.shape[1]:].tolist())
        prism_samples[prompt] = tok.decode(loaded.generate(ids, devices=4, cr=4, max_new_tokens=90)[0, ids.shape[1]:]
                                           .tolist())
    prism_nll = {cr: _held_out_nll(loaded, te, ctx, devices=4, cr=cr) for cr in (1, 2, 4, 8, 16)}
    log(f"gpt2-tiny: held-out perplexity on 4 devices by CR: "
        f"{ {cr: round(math.exp(v), 3) for cr, v in prism_nll.items()} }")
    metrics = {
        "model": "gpt2-tiny", "seed": SEED, "config": c,
        "data": {"source": "pydoc_data.topics", "python": platform.python_version(),
                 "sha256": hashlib.sha256(train + test).hexdigest(), "train_bytes": len(train),
                 "held_out_bytes": len(test), "held_out_topics": held,
                 "split": f"every {zoo.HELD_OUT_EVERY}th topic (sorted by name) held out"},
        "parameters": sum(p.numel() for p in loaded.net.named_tensors().values()),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "exact_only": "prism_finetune" not in seconds,
        "final_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "held_out_nll": round(nll, 4), "held_out_perplexity": round(math.exp(nll), 3),
        "unigram_perplexity": round(math.exp(uni), 3),
        "perplexity_ratio": round(math.exp(nll) / math.exp(uni), 4),
        "transformers_max_abs_logit_diff": diff, "greedy_samples": samples,
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
               # then `prism finetune`'s distillation (with the labels) at a random (devices, CR)
               # per batch, so that the model keeps its accuracy when its attention is compressed
               prism_finetune={"steps": 3000, "lr": 5e-4, "batch": 64, "exact_fraction": 0.25, "label_weight": 1.0,
                               "devices": [2, 3, 4], "crs": [2, 4, 8, 16]})

DIGITS_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 16,
    "do_normalize": True, "image_mean": [0.5], "image_std": [0.5],
    "prism_digits": {"grid": 8, "levels": 16},
}


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


def _vit_pretrain(net, px: torch.Tensor, labels: torch.Tensor, background: float, c: dict, log, quiet: bool):
    """Phase 1, exact attention through the twin, on augmented digits; returns the seconds."""
    from ..method import twin

    exact = _exact(net, net.n_positions)
    opt = _optimizer(net, c["lr"], c["weight_decay"])
    gen = torch.Generator().manual_seed(SEED)
    per_epoch = math.ceil(len(labels) / c["batch"])
    sched = dict(lr=c["lr"], warmup=c["warmup_epochs"] * per_epoch, steps=c["epochs"] * per_epoch)
    t0 = time.perf_counter()
    step = 0
    for epoch in progress(range(c["epochs"]), desc="vit-tiny-digits", quiet=quiet, unit="epoch", leave=False):
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for i in range(0, len(order), c["batch"]):
            idx = order[i:i + c["batch"]]
            for group in opt.param_groups:
                group["lr"] = _lr(step, sched)
            batch = {"pixel_values": _augment(px[idx], background, gen)}
            logits = twin.forward(net, batch, *exact)["logits"]
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=c["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            step += 1
        if epoch % 10 == 0 or epoch == c["epochs"] - 1:
            log(f"  epoch {epoch:3d}  train loss {total / len(labels):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return time.perf_counter() - t0


@torch.no_grad()
def _accuracy(model, px: torch.Tensor, labels: np.ndarray, devices: int = 1, cr: int = 1) -> float:
    pred = torch.cat([model(px[i:i + 128], devices=devices, cr=cr).logits.argmax(-1) for i in range(0, len(px), 128)])
    return float((pred.numpy() == labels).mean())


def train_vit(out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    from ..api import load
    from .finetune import Examples, Recipe
    from ..inputs.images import ImageProcessor
    from ..models import write_checkpoint

    c = VIT_CFG
    tr_x, tr_y, te_x, te_y = digits_split(c["test_fraction"])
    proc = ImageProcessor(DIGITS_PROCESSOR, 1, c["image_size"])
    tr_px, te_px = proc.digits_to_pixels(tr_x), proc.digits_to_pixels(te_x)
    background = float(proc.digits_to_pixels(np.zeros((8, 8)))[0, 0, 0, 0])
    tr_t = torch.tensor(tr_y, dtype=torch.long)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        exact_dir = out if exact_only else Path(tmp) / "exact"
        net = _fresh_network(_vit_config(c), init)
        log(f"vit-tiny-digits: {sum(p.numel() for p in net.named_tensors().values())} parameters, {len(tr_y)} "
            f"train / {len(te_y)} test images, {c['epochs']} epochs")
        seconds["pretrain"] = _vit_pretrain(net, tr_px, tr_t, background, c, log, quiet)
        write_checkpoint(net, init, exact_dir)
        (exact_dir / "config.json").write_text(json.dumps(_vit_config(c), indent=2) + "\n")
        (exact_dir / "preprocessor_config.json").write_text(json.dumps(DIGITS_PROCESSOR, indent=2) + "\n")
        np.savez_compressed(out / "heldout_digits.npz", images=te_x, labels=te_y)  # the bundle's data, not a model file
        exact_acc = _accuracy(load(exact_dir), te_px, te_y)
        log(f"vit-tiny-digits: held-out accuracy {exact_acc:.4f} after exact training")
        if not exact_only:
            f = c["prism_finetune"]
            recipe = Recipe(task="classify", devices=tuple(f["devices"]), crs=tuple(f["crs"]), steps=f["steps"],
                            batch_size=f["batch"], lr=f["lr"], exact_fraction=f["exact_fraction"],
                            label_weight=f["label_weight"], weight_decay=c["weight_decay"], seed=SEED,
                            eval_batch_size=128)
            pixels = Examples("pixels", list(tr_px), tr_y, {"source": "sklearn digits"},
                              lambda inputs, gen: {"pixel_values": _augment(inputs["pixel_values"], background, gen)})
            t0 = time.perf_counter()
            _prism_phase(exact_dir, out, pixels, Examples("pixels", list(te_px), te_y), recipe, log, quiet)
            seconds["prism_finetune"] = time.perf_counter() - t0
    loaded = load(out)
    acc = _accuracy(loaded, te_px, te_y)
    train_acc = _accuracy(loaded, tr_px, tr_y)
    prism_acc = {cr: _accuracy(loaded, te_px, te_y, devices=4, cr=cr) for cr in (1, 2, 4, 8, 16)}
    log(f"vit-tiny-digits: held-out accuracy {acc:.4f} (train {train_acc:.4f}); on 4 devices by CR: {prism_acc}")
    return {
        "model": "vit-tiny-digits", "seed": SEED, "config": c, "processor": DIGITS_PROCESSOR,
        "data": {"source": "sklearn.datasets.load_digits", "train_images": int(len(tr_y)),
                 "held_out_images": int(len(te_y)), "split": f"fixed shuffle (seed {SEED}), first "
                 f"{c['test_fraction']:.0%} held out and shipped as heldout_digits.npz"},
        "parameters": sum(p.numel() for p in loaded.net.named_tensors().values()),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "exact_only": exact_only,
        "train_accuracy": round(train_acc, 4), "held_out_accuracy": round(acc, 4),
        "held_out_accuracy_after_exact_training": round(exact_acc, 4),
        "prism_held_out_accuracy_4_devices": {str(cr): round(a, 4) for cr, a in prism_acc.items()},
    }


TRAINERS = {"gpt2-tiny": train_gpt2, "vit-tiny-digits": train_vit}


def train(name: str, out: Path, threads: int | None = None, log=None, quiet: bool = False,
          exact_only: bool = False) -> dict:
    """Train ``name`` into ``out`` and write ``out/metrics.json``; returns the metrics.
    Progress: ``log`` lines and a bar on stderr, neither with ``quiet``. ``exact_only``:
    without the PRISM-aware phase (the peer that shows what that phase buys, bench/EVAL.md)."""
    if name not in TRAINERS:
        raise ValueError(f"name: unknown bundled model {name!r} (known: {', '.join(TRAINERS)})")
    try:
        import transformers  # noqa: F401  (the initial weights)
        if name == "vit-tiny-digits":
            import sklearn  # noqa: F401  (the digits)
    except ImportError as exc:
        raise ImportError(f"training {name} needs {exc.name}: pip install 'prism-ext[train]'") from None
    if log is None:
        def log(msg):
            if not quiet:
                write(msg, file=sys.stderr)  # above a progress bar, not through it
    if threads is not None:
        torch.set_num_threads(threads)
    metrics = TRAINERS[name](Path(out), log, quiet, exact_only)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics

"""`prism zoo train NAME`: make a bundled model from data every machine has.

* ``gpt2-tiny``: a GPT-2 over UTF-8 bytes trained on Python's own
  ``pydoc_data.topics`` (every 8th topic, sorted by name, is held out).
* ``llama-tiny``: a Llama (RoPE, grouped-query attention, RMSNorm, SwiGLU)
  on the same text, with a byte-level BPE tokenizer trained here by the
  ``tokenizers`` package on the training topics alone, and a ChatML chat
  template (it also sees one short chat per training topic).
* ``vit-tiny-digits``: a ViT trained on scikit-learn's handwritten digits
  (8x8, upsampled to 32x32, 4x4 patches: 64 patches + [CLS] to split over
  devices); a fixed 20% test split is held out and shipped for the demo.

Each starts from a Hugging Face model initialised by transformers, are
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
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


# ------------------------------------------------------ gpt2-tiny, llama-tiny
#
# The language models share one path: a tokenizer (gpt2-tiny: one token per
# UTF-8 byte; llama-tiny: a byte-level BPE trained here on the training split
# only), exact pretraining on random windows of the training stream, then the
# PRISM-aware phase and one evaluation. What differs is in ``_LM``.

GPT2_CFG = dict(n_positions=128, n_embd=128, n_layer=4, n_head=4, dropout=0.1,
                steps=3000, batch=16, lr=2e-3, warmup=100, weight_decay=0.1,
                # then `prism finetune`'s distillation at a random (devices, CR) per batch
                # (a quarter of the batches exact), so that the model tolerates compressed attention
                prism_finetune={"steps": 2000, "lr": 6e-4, "batch": 16, "exact_fraction": 0.25,
                                "devices": [2, 3, 4], "crs": [2, 4, 8, 16]})

# Fewer steps than gpt2-tiny, to train in about 15 minutes on two shared cores (docs/demo.md): 4 query
# heads sharing 2 key/value heads, SwiGLU, RoPE, a 1024-token BPE vocabulary (3 of them the special tokens).
LLAMA_CFG = dict(n_positions=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=344, rope_theta=10000.0, vocab_size=1024, dropout=0.1,
                 steps=1500, batch=8, lr=2e-3, warmup=100, weight_decay=0.1,
                 note="sized for about 15 minutes on two shared cores (1 thread): 1500 + 800 steps of 8 x 256 tokens (about"
                      " 20 epochs of the 152k training tokens), against gpt2-tiny's 3000 + 2000 steps of 16 x 128",
                 # the PRISM-aware phase with position 0 sent exact, the family's default at run time
                 prism_finetune={"steps": 800, "lr": 6e-4, "batch": 8, "exact_fraction": 0.25,
                                 "devices": [2, 3, 4], "crs": [4, 8, 16], "exact_rows": ["first"]})

LLAMA_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (SmolLM2's layout)
# ChatML, as SmolLM2's template writes it (without its default system message)
LLAMA_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                       "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                       "{{ '<|im_start|>assistant\\n' }}{% endif %}")


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


def _llama_config(c: dict) -> dict:
    eot, start, end = range(len(LLAMA_SPECIAL))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["hidden_size"] // c["num_attention_heads"],
        "hidden_act": "silu", "max_position_embeddings": c["n_positions"], "rms_norm_eps": 1e-5,
        "rope_theta": c["rope_theta"], "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02, "tie_word_embeddings": True,
        "use_cache": True, "bos_token_id": start, "eos_token_id": [end, eot], "pad_token_id": None,
        "torch_dtype": "float32",
    }


def _gpt2_tokenizer(c: dict, topics: dict) -> dict:
    from ..inputs.tokenizer import byte_level_tokenizer_json

    return {"tokenizer.json": byte_level_tokenizer_json(),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c["n_positions"],
                                      "clean_up_tokenization_spaces": False,
                                      "model_input_names": ["input_ids", "attention_mask"]}}


def _llama_tokenizer(c: dict, topics: dict) -> dict:
    """A byte-level BPE of ``c["vocab_size"]`` tokens (the special ones first) trained by the tokenizers
    package on the training topics alone, with GPT-2's split before it; ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=c["vocab_size"], special_tokens=list(LLAMA_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    if tok.get_vocab_size() != c["vocab_size"]:
        raise ValueError(f"vocab_size: the training text gives {tok.get_vocab_size()} BPE tokens, "
                         f"not {c['vocab_size']}")
    eot, start, end = LLAMA_SPECIAL
    return {"tokenizer.json": json.loads(tok.to_str()),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c["n_positions"],
                                      "bos_token": start, "eos_token": end, "unk_token": eot, "pad_token": end,
                                      "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                                      "model_input_names": ["input_ids", "attention_mask"],
                                      "chat_template": LLAMA_CHAT_TEMPLATE}}


def _gpt2_corpus(tok, topics: dict) -> list[int]:
    return list("\n\n".join(topics.values()).encode("utf-8"))


def chat_examples(topics: dict) -> list[list[dict]]:
    """A chat per topic: its title asked, its first paragraph answered (llama-tiny learns the template's turns)."""
    chats = []
    for text in topics.values():
        title, _, rest = text.partition("\n")
        body = rest.lstrip("*=\n").split("\n\n")[0].strip()
        if body:
            chats.append([{"role": "user", "content": title.strip()}, {"role": "assistant", "content": body}])
    return chats


def _llama_corpus(tok, topics: dict) -> list[int]:
    """Each topic followed by <|endoftext|>, then every chat of :func:`chat_examples` in the chat template."""
    ids = []
    for text in topics.values():
        ids += tok.encode(text, add_special_tokens=False) + [tok.unk_token_id]
    for chat in chat_examples(topics):
        ids += tok.apply_chat_template(chat)
    return ids


@dataclass(frozen=True)
class _LM:
    recipe: str  # the module-level recipe's name, read at call time (tests shrink it)
    config: Callable[[dict], dict]  # recipe -> config.json
    tokenizer: Callable[[dict, dict], dict]  # (recipe, train topics) -> {file name: JSON object}
    corpus: Callable[[object, dict], list]  # (tokenizer, train topics) -> the training token stream
    encode: Callable[[object, str], list]  # (tokenizer, held-out text) -> its ids
    chat: bool = False  # samples also in the chat template


_LMS = {
    "gpt2-tiny": _LM("GPT2_CFG", _gpt2_config, _gpt2_tokenizer, _gpt2_corpus, lambda tok, text: list(text.encode())),
    "llama-tiny": _LM("LLAMA_CFG", _llama_config, _llama_tokenizer, _llama_corpus,
                      lambda tok, text: tok.encode(text, add_special_tokens=False), chat=True),
}


def lm_recipe(name: str) -> dict:
    return globals()[_LMS[name].recipe]


@torch.no_grad()
def _held_out_nll(model, data: torch.Tensor, ctx: int, devices: int = 1, cr: int = 1, **options) -> float:
    """Mean negative log-likelihood (nats/token) over non-overlapping windows, through the engine."""
    total, count = 0.0, 0
    windows = data[: (len(data) - 1) // ctx * ctx + 1]
    starts = list(range(0, len(windows) - 1, ctx))
    for i in range(0, len(starts), 32):
        idx = torch.tensor(starts[i:i + 32])[:, None] + torch.arange(ctx + 1)
        chunk = windows[idx]
        logits = model(chunk[:, :-1], devices=devices, cr=cr, **options).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def _unigram_nll(train: list, test: list, vocab: int) -> float:
    """Held-out nats/token of the train stream's token frequencies (add-one smoothed)."""
    freq = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1
    logp = np.log(freq / freq.sum())
    return float(-logp[np.asarray(test)].mean())


GPT2_PROMPTS = ["The \"if\" statement is used for", "A class definition defines", "Exceptions are raised when"]
# chats: a training topic's title, and two held-out ones ("raise", "assert")
LLAMA_CHATS = ["The \"if\" statement", "The \"raise\" statement", "The \"assert\" statement"]

# (devices, CR, exact rows; None: the family's default) measured on held-out text beside the exact model
LM_GRID = [(4, 1, None), (4, 2, None), (4, 4, None), (4, 8, None), (4, 16, None), (4, 8, "first"), (4, 8, "none"),
           (2, 8, None), (2, 8, "none")]


def _lm_pretrain(name: str, net, tr: torch.Tensor, te: torch.Tensor, c: dict, log, quiet: bool) -> float:
    """Phase 1, exact attention through the twin: ``c["steps"]`` AdamW steps on
    random windows, with dropout; returns the final smoothed train loss. The
    held-out loss (``te``, no dropout) is logged every 500 steps."""
    from ..method import twin

    ctx = c["n_positions"]
    exact = _exact(net, ctx)
    opt = _optimizer(net, c["lr"], c["weight_decay"])
    params = list(net.named_tensors().values())
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    loss_avg = None
    for step in progress(range(c["steps"]), desc=f"{name} pretrain", quiet=quiet, unit="step", leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        starts = torch.randint(0, len(tr) - ctx - 1, (c["batch"],), generator=gen)
        chunk = tr[starts[:, None] + torch.arange(ctx + 1)]
        logits = twin.forward(net, {"input_ids": chunk[:, :-1]}, *exact, dropout=c["dropout"])["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == c["steps"] - 1:
            held = ""
            if step % 500 == 0 or step == c["steps"] - 1:
                with torch.no_grad():
                    windows = te[: len(te) // ctx * ctx].reshape(-1, ctx)[:32]
                    logits = twin.forward(net, {"input_ids": windows[:, :-1]}, *_exact(net, ctx - 1))["logits"]
                    held = f"  held-out loss {F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()):.3f}"
            log(f"  step {step:5d}  train loss {loss_avg:.3f}{held}  ({time.perf_counter() - t0:.0f} s)")
    return loss_avg


def _write_json_files(out: Path, files: dict) -> None:
    for file, content in files.items():
        (out / file).write_text(json.dumps(content, indent=None if file == "tokenizer.json" else 2,
                                           ensure_ascii=False) + "\n")


def _windows(ids: list, ctx: int, stride: int | None = None):
    from .finetune import Examples, text_windows

    return Examples("tokens", text_windows(ids, ctx, stride), None, {"source": "pydoc_data.topics"})


def _lm_data(name: str, tok_dir: Path):
    """(training stream, held-out ids, tokenizer) of ``name``, its tokenizer files written to ``tok_dir``."""
    from ..inputs.tokenizer import load_tokenizer

    spec, c = _LMS[name], lm_recipe(name)
    train_topics, _ = zoo.topic_split()
    tok_dir.mkdir(parents=True, exist_ok=True)
    _write_json_files(tok_dir, spec.tokenizer(c, train_topics))
    tok = load_tokenizer(tok_dir)
    test = zoo.text_split()[1].decode("utf-8")
    return spec.corpus(tok, train_topics), spec.encode(tok, test), tok


def train_lm(name: str, out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    from .finetune import Recipe
    from ..api import load
    from ..models import write_checkpoint

    spec, c = _LMS[name], lm_recipe(name)
    ctx = c["n_positions"]
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        exact_dir = out if exact_only else Path(tmp) / "exact"
        train_ids, test_ids, tok = _lm_data(name, Path(tmp) / "tokenizer")
        tr = torch.tensor(train_ids, dtype=torch.long)
        net = _fresh_network(spec.config(c), init)
        log(f"{name}: {sum(p.numel() for p in net.named_tensors().values())} parameters, {len(tr)} train tokens, "
            f"{c['steps']} steps of {c['batch']}x{ctx}")
        t0 = time.perf_counter()
        loss = _lm_pretrain(name, net, tr, torch.tensor(test_ids), c, log, quiet)
        seconds = {"pretrain": time.perf_counter() - t0}
        write_checkpoint(net, init, exact_dir)
        (exact_dir / "config.json").write_text(json.dumps(spec.config(c), indent=2) + "\n")
        for f in (Path(tmp) / "tokenizer").iterdir():
            shutil.copyfile(f, exact_dir / f.name)
        losses = {"pretrain": loss}
        before = None
        if not exact_only:
            before = _lm_perplexities(load(exact_dir), torch.tensor(test_ids), ctx)
            log(f"{name}: after exact training: {_grid_line(before)}")
            f = c["prism_finetune"]
            recipe = Recipe(task="lm", devices=tuple(f["devices"]), crs=tuple(f["crs"]), steps=f["steps"],
                            batch_size=f["batch"], lr=f["lr"], exact_fraction=f["exact_fraction"], max_length=ctx,
                            exact_rows=tuple(f["exact_rows"]) if "exact_rows" in f else None,
                            report_exact_rows=tuple(f["exact_rows"]) if "exact_rows" in f else None, seed=SEED)
            t0 = time.perf_counter()
            report = _prism_phase(exact_dir, out, _windows(train_ids, ctx, ctx // 4), _windows(test_ids, ctx), recipe,
                                  log, quiet)
            seconds["prism_finetune"] = time.perf_counter() - t0
            losses["prism_finetune"] = report["losses"]["last_25_mean"]
    return finish_lm(name, out, log, seconds, losses, before)


def train_gpt2(out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    return train_lm("gpt2-tiny", out, log, quiet, exact_only)


def train_llama(out: Path, log, quiet: bool = False, exact_only: bool = False) -> dict:
    return train_lm("llama-tiny", out, log, quiet, exact_only)


def _grid_key(devices: int, cr: int, rows) -> str:
    return f"P{devices} CR{cr}" + ("" if rows is None else f" {rows}")


def _lm_perplexities(model, te: torch.Tensor, ctx: int) -> dict:
    """Held-out perplexity exact and at every point of ``LM_GRID``, with each one's ratio to exact."""
    exact = math.exp(_held_out_nll(model, te, ctx))
    grid = {"exact": {"perplexity": round(exact, 4), "ratio": 1.0}}
    for devices, cr, rows in LM_GRID:
        ppl = math.exp(_held_out_nll(model, te, ctx, devices, cr, **({} if rows is None else {"exact_rows": rows})))
        grid[_grid_key(devices, cr, rows)] = {"perplexity": round(ppl, 4), "ratio": round(ppl / exact, 4)}
    return grid


def _grid_line(grid: dict) -> str:
    return ", ".join(f"{k} {v['perplexity']:.3f} ({v['ratio']:.3f}x)" for k, v in grid.items())


def finish_lm(name: str, out: Path, log, seconds: dict, losses: dict, before: dict | None = None) -> dict:
    """Evaluate the written checkpoint through prism_ext (and transformers) and sample; returns the metrics."""
    import transformers

    from ..api import load
    from ..inputs.tokenizer import load_tokenizer

    spec, c = _LMS[name], lm_recipe(name)
    train, test, held = zoo.text_split()
    tok = load_tokenizer(out)
    train_ids = spec.corpus(tok, zoo.topic_split()[0])
    test_ids = spec.encode(tok, test.decode("utf-8"))
    te = torch.tensor(test_ids, dtype=torch.long)
    ctx = c["n_positions"]
    loaded = load(out)
    nll = _held_out_nll(loaded, te, ctx)
    uni = _unigram_nll(train_ids, test_ids, loaded.net.vocab)
    log(f"{name}: held-out perplexity {math.exp(nll):.2f} (unigram {math.exp(uni):.2f}) after "
        f"{sum(seconds.values()):.0f} s")
    probe = te[:ctx][None]
    config = spec.config(c)
    with torch.no_grad():
        hf = getattr(transformers, config["architectures"][0]).from_pretrained(str(out), local_files_only=True).eval()
        diff = (loaded(probe).logits - hf(probe).logits).abs().max().item()
    samples, prism_samples = {}, {}
    prompts = [(p, tok.encode(p)) for p in GPT2_PROMPTS]
    if spec.chat:
        prompts += [(p, tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                    for p in LLAMA_CHATS]
    for prompt, ids in prompts:
        ids = torch.tensor([ids])
        new = min(90, ctx - ids.shape[1])  # a toy recipe's context is short
        samples[prompt] = tok.decode(loaded.generate(ids, max_new_tokens=new)[0, ids.shape[1]:].tolist())
        prism_samples[prompt] = tok.decode(loaded.generate(ids, devices=4, cr=4, max_new_tokens=new)[0, ids.shape[1]:]
                                           .tolist())
    prism_nll = {cr: _held_out_nll(loaded, te, ctx, devices=4, cr=cr) for cr in (1, 2, 4, 8, 16)}
    log(f"{name}: held-out perplexity on 4 devices by CR: "
        f"{ {cr: round(math.exp(v), 3) for cr, v in prism_nll.items()} }")
    metrics = {
        "model": name, "seed": SEED, "config": c,
        "data": {"source": "pydoc_data.topics", "python": platform.python_version(),
                 "sha256": hashlib.sha256(train + test).hexdigest(), "train_bytes": len(train),
                 "held_out_bytes": len(test), "train_tokens": len(train_ids), "held_out_tokens": len(test_ids),
                 "held_out_topics": held,
                 "split": f"every {zoo.HELD_OUT_EVERY}th topic (sorted by name) held out"},
        "parameters": sum(p.numel() for p in loaded.net.named_tensors().values()),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "exact_only": "prism_finetune" not in seconds,
        "final_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "held_out_nll": round(nll, 4), "held_out_perplexity": round(math.exp(nll), 3),
        "held_out_nats_per_byte": round(nll * len(test_ids) / len(test), 4),
        "unigram_perplexity": round(math.exp(uni), 3),
        "perplexity_ratio": round(math.exp(nll) / math.exp(uni), 4),
        "transformers_max_abs_logit_diff": diff, "greedy_samples": samples,
        "greedy_samples_prism_4_devices_cr4": prism_samples,
        "prism_held_out_perplexity_4_devices": {str(cr): round(math.exp(v), 3) for cr, v in prism_nll.items()},
    }
    if spec.chat or before is not None:  # the grid by exact rows (gpt2-tiny's bundled metrics predate it)
        after = _lm_perplexities(loaded, te, ctx)
        log(f"{name}: held-out perplexity: {_grid_line(after)}")
        metrics["held_out_perplexity_grid"] = {"default_exact_rows": loaded.net.defaults.get("exact_rows", "none"), "after": after,
                                               **({"before_prism_phase": before} if before is not None else {})}
    for prompt, text in samples.items():
        log(f"  {prompt!r} -> {text!r}")
    return metrics


# ------------------------------------------------------------ vit-tiny-digits

VIT_CFG = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, epochs=60, batch=64, lr=2e-3, warmup_epochs=3, weight_decay=0.05,
               label_smoothing=0.1, test_fraction=0.2,
               # then `prism finetune`'s distillation (with the labels) at a random (devices, CR)
               # per batch, so that the model keeps its accuracy when its attention is compressed
               prism_finetune={"steps": 6000, "lr": 5e-4, "batch": 64, "exact_fraction": 0.25, "label_weight": 1.0,
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


TRAINERS = {"gpt2-tiny": train_gpt2, "llama-tiny": train_llama, "vit-tiny-digits": train_vit}


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

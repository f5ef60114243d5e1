"""The main job: run a checkpoint over P simulated devices on a text or an
image and report outputs and costs (``prism run``), and the out-of-the-box
demo on the bundled models (``prism demo``).

Every result is a plain dict (what ``--json`` prints); :func:`format_run`
and :func:`format_demo` render them for people.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import zoo
from .api import PrismModel
from .method.engine import RunStats
from .options import RunOptions, run_options
from .outputs import class_output, stats_dict
from .executor.request import layout

__all__ = ["load_model", "check_job", "run_text", "run_text_batch", "run_texts", "run_images",
           "run_digits", "demo", "format_run", "format_demo", "DEMO_PROMPT", "DEMO_CHAT"]

DEMO_PROMPT = "The \"for\" statement is used to iterate over the elements of a sequence"
# llama-tiny's chat: one of its training chats (a pydoc topic's title, its first paragraph), then the title of a
# topic it was not trained on; two turns, so that each of 4 devices holds enough positions to send several means
DEMO_CHAT = [{"role": "user", "content": "The \"for\" statement"},
             {"role": "assistant", "content": "The \"for\" statement is used to iterate over the elements of a "
                                              "sequence\n(such as a string, tuple or list) or other iterable object:"},
             {"role": "user", "content": "The \"break\" statement"}]


def _job_options(options: RunOptions | None, kwargs: dict) -> RunOptions:
    """A job's options: CR 4 unless ``options`` or the keywords say otherwise."""
    if options is None and "cr" not in kwargs:
        kwargs = {"cr": 4, **kwargs}
    return run_options(options, **kwargs)


def _progress(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(f"prism: {msg}", file=sys.stderr, flush=True)
    return say


def load_model(path_or_name, weight_dtype: str = "fp32", calibration=None) -> PrismModel:
    """A bundled name (``gpt2-tiny``, ``vit-tiny-digits``), a checkpoint
    directory or a cached hub name, its weights held as ``weight_dtype``
    (int4 codes chosen for the ``calibration`` texts if given)."""
    from .api import load

    try:
        return load(path_or_name, weight_dtype=weight_dtype, calibration=calibration)
    except FileNotFoundError:
        if Path(path_or_name).expanduser().exists():
            raise
        raise FileNotFoundError(f"model: {str(path_or_name)!r} is not a bundled model ({', '.join(zoo.NAMES)}), "
                                f"a checkpoint directory, or a model in the local Hugging Face cache "
                                f"(prism_ext never downloads)") from None


def _validate(model: PrismModel, n: int, devices: int, options: RunOptions, generating: bool = False) -> None:
    """Check the run's settings before any progress line: a bad one ends the job with its error alone."""
    layout(model.net, n, devices, options, model.special_ids, generating=generating)


def _knobs(options: RunOptions) -> dict:
    """The settings of a result besides its mode and CR (the ``knobs`` of its JSON)."""
    return {k: v for k, v in options.to_meta().items() if k not in ("mode", "cr", "outputs")}


def _peers(run, inputs, devices: int, options: RunOptions) -> tuple:
    """The single-device output (exact) and the Voltage run over the same devices."""
    exact = run(inputs, devices=1)
    voltage = run(inputs, devices=devices, options=RunOptions(mode="voltage", device_weights=options.device_weights,
                                                              wire_dtype=options.wire_dtype))
    return exact, voltage


def _vs_voltage(stats: RunStats, voltage: RunStats) -> dict:
    return {"bytes_sent": voltage.bytes_sent, "activation_bytes": voltage.activation_bytes,
            "flops": sum(d.flops for d in voltage.devices),
            "devices": stats_dict(voltage)["devices"],
            "bytes_reduction": 1 - stats.bytes_sent / voltage.bytes_sent if voltage.bytes_sent else 0.0,
            "activation_bytes_reduction": (1 - stats.activation_bytes / voltage.activation_bytes
                                           if voltage.activation_bytes else 0.0),
            "busiest_device_flops_reduction": 1 - max(d.flops for d in stats.devices)
            / max(d.flops for d in voltage.devices)}


# ---------------------------------------------------------------------- text

def _encode(model: PrismModel, text: str, room: int, what: str = "text") -> list[int]:
    """The ids of one text (special tokens added, as transformers does), checked against the model's positions."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what}: must be a non-empty string")
    ids = model.tokenizer.encode(text)
    limit = int(model.net.config.get("n_positions") or model.net.config.get("max_position_embeddings") or 0)
    if limit and len(ids) + room > limit:
        extra = f" + {room} new tokens" if room else ""
        hint = f"; use at most {limit - len(ids)} new tokens (--max-new-tokens) or a shorter text" \
            if room and len(ids) < limit else ""
        raise ValueError(f"{what}: {len(ids)} tokens{extra} exceed the model's {limit} positions{hint}")
    if not ids:
        raise ValueError(f"{what}: encodes to no tokens")
    return ids


def check_job(model: PrismModel, *, text: str | None = None, texts: list[str] | None = None, devices: int = 4,
              options: RunOptions | None = None, max_new_tokens: int = 40, **kwargs) -> None:
    """Every check a job makes before it runs, so a bad one is refused before
    any device (process) is started. ``texts``: a batch job's texts (each
    checked). ``options`` and keywords: how it runs (:class:`RunOptions`)."""
    options = run_options(options, **kwargs)
    if text is None and texts is None:
        model.image_processor  # raises, naming what is missing, for a model that takes no images
        _validate(model, model.net.grid ** 2 + 1, devices, options)
        return
    _text_job(model, [text] if texts is None else texts, devices, options, max_new_tokens)


def _text_job(model: PrismModel, texts: list[str], devices, options: RunOptions, max_new_tokens: int):
    """A text job's checks; returns (token ids of each text, whether it generates)."""
    if model.model_type == "vit":
        raise ValueError("text: vit models take --image, not --text")
    generating = model.net.head == "lm" and max_new_tokens > 0  # GPT-2 and the Llama family
    if generating and options.mode not in ("prism", "single"):
        raise ValueError(f"mode: generation runs in prism or single mode; use --max-new-tokens 0 for a "
                         f"{options.mode} forward pass")
    if not texts:
        raise ValueError("text: no texts given")
    room = max_new_tokens if generating else 0
    ids = [_encode(model, t, room, "text" if len(texts) == 1 else f"text {i + 1}") for i, t in enumerate(texts)]
    for n in sorted({len(i) for i in ids})[:1]:  # the shortest text bounds the devices
        _validate(model, n, devices, options)
    return ids, generating


def _text_groups(ids: list[list[int]], generating: bool) -> list[list[int]]:
    """Indices of the texts that run together: a batch pads to its longest text
    (attention_mask marks the padding); generation takes unpadded ids, so
    there the texts of one length run together."""
    if not generating:
        return [list(range(len(ids)))]
    by_length = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    return list(by_length.values())


def run_text(model: PrismModel, text: str, *, devices: int = 4, options: RunOptions | None = None,
             max_new_tokens: int = 40, compare: bool = True, quiet: bool = True, **kwargs) -> dict:
    """GPT-2: generate ``max_new_tokens`` greedily after ``text`` (0: one forward
    pass, next-token prediction). BERT: sentence embedding (the checkpoint's
    sentence-transformers pooling; by default the mean over tokens), and the class when the checkpoint has a classifier. ``options`` and
    keywords: how it runs (:class:`RunOptions`; CR 4 unless given). The
    devices are ``model``'s executor's: simulated, or a live cluster's
    processes for a model :func:`prism_ext.cluster` returned."""
    return run_text_batch(model, [text], devices=devices, options=options, max_new_tokens=max_new_tokens,
                          compare=compare, quiet=quiet, **kwargs)[0]


def run_texts(model: PrismModel, texts: list[str], *, batch_size: int = 8, quiet: bool = True, **options):
    """:func:`run_text_batch` over ``texts`` in batches of ``batch_size``;
    yields one result per text, in order (a progress bar on stderr)."""
    from .util.progress import progress

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    with progress(total=len(texts), desc="texts", quiet=quiet, unit="text") as bar:
        for start in range(0, len(texts), batch_size):
            for k, result in enumerate(run_text_batch(model, texts[start:start + batch_size], quiet=True, **options)):
                bar.update(1)
                yield {"index": start + k, **result}


def run_text_batch(model: PrismModel, texts: list[str], *, devices: int = 4, options: RunOptions | None = None,
                   max_new_tokens: int = 40, compare: bool = True, quiet: bool = True, **kwargs) -> list[dict]:
    """:func:`run_text` on several texts at once: one result per text. The
    texts run as one padded batch (generation: one batch per token length);
    each result's ``stats``, ``voltage`` and ``seconds`` are its batch's."""
    say = _progress(quiet)
    run = model
    options = _job_options(options, kwargs)
    cr, mode = options.cr, options.mode
    ids, generating = _text_job(model, list(texts), devices, options, max_new_tokens)
    results = [None] * len(texts)
    for group in _text_groups(ids, generating):
        batch = [texts[i] for i in group]
        inputs = dict(model.tokenizer(batch, padding=True, return_tensors="pt"))
        base = {"model_type": model.model_type, "devices": devices, "cr": cr, "mode": mode, "knobs": _knobs(options),
                "batch": {"size": len(group), "positions": int(inputs["input_ids"].shape[1])}}
        peers = None
        if compare:  # first, so the measured run below finds everything warmed up
            say("single-device and Voltage peers")
            peers = _peers(run, inputs, devices, options)
        t0 = time.perf_counter()
        n = inputs["input_ids"].shape[1]
        if generating:
            say(f"prefill of {len(group)} x {n} tokens over {devices} devices (cr={cr}), then {max_new_tokens} "
                f"new tokens")
            x = inputs["input_ids"]
            out, stats, decode = run.generate(x, devices=devices, options=options, max_new_tokens=max_new_tokens,
                                              return_stats=True)
            outputs = [{"text": model.tokenizer.decode(row[n:]), "token_ids": row[n:].tolist()} for row in out]
            decoded = {"tokens": len(decode.flops), "bytes_sent": sum(decode.bytes_sent), "flops": sum(decode.flops)}
        else:
            say(f"forward pass of {len(group)} x {n} tokens over {devices} devices ({mode}, cr={cr})")
            out = run(inputs, devices=devices, options=options)
            stats = out.stats
            outputs = _text_outputs(model, out, inputs["attention_mask"])
        seconds = time.perf_counter() - t0
        references = voltage = None
        if peers is not None:
            exact, voltage_out = peers
            voltage = _vs_voltage(stats, voltage_out.stats)
            if generating:
                refs = run.generate(x, devices=1, max_new_tokens=max_new_tokens)[:, n:].tolist()
                prism_top1 = run(x, devices=devices, options=options).logits.argmax(-1)
                exact_top1 = exact.logits.argmax(-1)
                references = []
                for row, (o, ref) in enumerate(zip(outputs, refs)):
                    new = o["token_ids"]
                    references.append({
                        "text": model.tokenizer.decode(ref), "token_ids": ref,
                        "tokens_identical": sum(a == b for a, b in zip(new, ref)),
                        "first_divergence": next((i for i, (a, b) in enumerate(zip(new, ref)) if a != b), len(ref)),
                        "prefill_top1_agreement": float((prism_top1[row] == exact_top1[row]).float().mean())})
            else:
                references = [_agreement(r, g) for r, g in
                              zip(_text_outputs(model, exact, inputs["attention_mask"]), outputs)]
        shared = stats_dict(stats)  # one object per batch: printing tells batches apart by it
        for k, i in enumerate(group):
            r = {**base, "input": {"text": texts[i], "tokens": len(ids[i])}, "output": outputs[k],
                 "stats": shared, "seconds": seconds}
            if generating:
                r["decode"] = decoded
            if references is not None:
                r["voltage"], r["reference"] = voltage, references[k]
            results[i] = r
    return results


def _text_outputs(model: PrismModel, out, mask: torch.Tensor) -> list[dict]:
    """Per text of a (right-padded) batch: GPT-2's next-token predictions over
    its own tokens; BERT's embedding (the checkpoint's sentence-transformers
    pooling, :attr:`PrismModel.sentence_pooling`: by default the mean over
    its tokens) and class."""
    results = []
    for row, valid in enumerate(mask.bool()):
        n = int(valid.sum())
        if model.net.head == "lm":
            top1 = out.logits[row, :n].argmax(-1).tolist()  # the prediction after every position
            results.append({"next_token_id": top1[-1], "next_token": model.tokenizer.decode(top1[-1:]),
                            "top1_ids": top1})
            continue
        emb = model.sentence_pooling(out.last_hidden_state[row:row + 1], valid[None])[0]
        res = {"embedding_dim": int(emb.numel()), "embedding": emb.tolist()}
        if "logits" in out:
            res.update(class_output(model.config, out.logits[row]))
        results.append(res)
    return results


def _agreement(ref: dict, got: dict) -> dict:
    """How a single-output run compares with the exact one."""
    out = {}
    if "class_id" in ref:
        out["class_id"] = ref["class_id"]
        out["same_class"] = ref["class_id"] == got["class_id"]
    if "embedding" in ref:
        a, b = torch.tensor(ref["embedding"]), torch.tensor(got["embedding"])
        out["embedding_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    if "next_token_id" in ref:
        out["next_token_id"] = ref["next_token_id"]
        out["top1_agreement"] = float(np.mean(np.array(ref["top1_ids"]) == np.array(got["top1_ids"])))
    return out


# --------------------------------------------------------------------- image

def _run_pixels(model: PrismModel, px: torch.Tensor, devices, options: RunOptions, compare, say) -> dict:
    _validate(model, model.net.grid ** 2 + 1, devices, options)
    run = model
    peers = _peers(run, px, devices, options) if compare else None  # first: warms up the measured run
    say(f"{px.shape[0]} image(s), {model.net.grid ** 2 + 1} positions over {devices} devices ({options.mode}, "
        f"cr={options.cr})")
    t0 = time.perf_counter()
    out = run(px, devices=devices, options=options)
    result = {"model_type": model.model_type, "devices": devices, "cr": options.cr, "mode": options.mode,
              "knobs": _knobs(options),
              "stats": stats_dict(out.stats), "seconds": time.perf_counter() - t0}
    result["outputs"] = _image_outputs(model, out)
    if peers is not None:
        exact, voltage = peers
        result["voltage"] = _vs_voltage(out.stats, voltage.stats)
        result["reference"] = [_agreement(r, g) for r, g in zip(_image_outputs(model, exact), result["outputs"])]
    return result


def _image_outputs(model: PrismModel, out) -> list[dict]:
    """Per image: the class (classifier checkpoints) or the final [CLS] row."""
    if "logits" in out:
        return [class_output(model.config, logits) for logits in out.logits]
    return [{"embedding_dim": model.net.d, "embedding": row.tolist()} for row in out.last_hidden_state[:, 0]]


def run_images(model: PrismModel, images, *, batch_size: int = 8, devices: int = 4, options: RunOptions | None = None,
               compare: bool = True, quiet: bool = True, **kwargs):
    """ViT on images (paths, bytes or PIL images; see
    :func:`prism_ext.inputs.images.open_image`) in batches of ``batch_size``: yields
    one result per image, in order, with its batch's ``stats``, ``voltage``
    and ``seconds``. Every file's header is checked before the first batch runs."""
    from .inputs.images import check_image
    from .util.progress import progress

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    proc = model.image_processor
    images = [images] if isinstance(images, (str, Path)) else list(images)
    if not images:
        raise ValueError("image: no images given")
    for im in images:
        check_image(im, max_pixels=proc.max_pixels)
    options = _job_options(options, kwargs)
    _validate(model, model.net.grid ** 2 + 1, devices, options)
    with progress(total=len(images), desc="images", quiet=quiet, unit="image") as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            r = _run_pixels(model, proc.to_pixels(batch), devices, options, compare, _progress(True))
            outputs, references = r.pop("outputs"), r.pop("reference", None)
            r["batch"] = {"size": len(batch), "positions": model.net.grid ** 2 + 1}
            for k, im in enumerate(batch):
                one = {"index": start + k, **r, "output": outputs[k],
                       "input": {"image": str(im) if isinstance(im, (str, Path)) else f"image {start + k}",
                                 "positions": model.net.grid ** 2 + 1}}
                if references is not None:
                    one["reference"] = references[k]
                bar.update(1)
                yield one


def run_digits(model: PrismModel, digits: np.ndarray, *, devices: int = 4, options: RunOptions | None = None,
               compare: bool = True, quiet: bool = True, **kwargs) -> dict:
    """ViT on raw 8x8 digits ([B, 8, 8], values 0..16), through the same processor as files."""
    px = model.image_processor.digits_to_pixels(digits)
    result = _run_pixels(model, px, devices, _job_options(options, kwargs), compare, _progress(quiet))
    result["input"] = {"digits": int(px.shape[0]), "positions": model.net.grid ** 2 + 1}
    return result


# ---------------------------------------------------------------------- demo

def demo(*, devices: int = 4, gpt_cr: int = 4, vit_cr: int = 4, max_new_tokens: int = 56, digits: int = 10,
         figure: str | Path | None = "prism-demo.png", full_test_set: bool = True, quiet: bool = True,
         simulate: bool = False) -> dict:
    """gpt2-tiny generating over ``devices`` devices, llama-tiny answering a
    chat (its chat template) over them, then vit-tiny-digits on
    ``digits`` held-out digits (one per class); a figure of the latter. The
    devices are processes on this machine (a live cluster per model), or
    threads of this process with ``simulate``."""
    from .runtime import cluster

    say = _progress(quiet)
    t0 = time.perf_counter()
    simulate = simulate or devices == 1

    def devices_for(model):
        """``model`` run by simulated devices, or bound to a cluster of its own (closed on exit)."""
        if simulate:
            return contextlib.nullcontext(model)
        say(f"starting {devices} processes for {model.model_type}")
        return cluster(model, devices, quiet=quiet)

    say("loading gpt2-tiny")
    gpt = load_model("gpt2-tiny")
    with devices_for(gpt) as run:
        text = run_text(run, DEMO_PROMPT, devices=devices, cr=gpt_cr, max_new_tokens=max_new_tokens, quiet=quiet)
    say("loading llama-tiny")
    llama = load_model("llama-tiny")
    chat = llama.tokenizer.apply_chat_template(DEMO_CHAT, add_generation_prompt=True, tokenize=False)
    with devices_for(llama) as run:  # stops at the chat's end (<|im_end|>) or after max_new_tokens
        chat = run_text(run, chat, devices=devices, cr=gpt_cr, max_new_tokens=max_new_tokens, quiet=quiet)
        chat["messages"] = DEMO_CHAT
    say("loading vit-tiny-digits")
    vit = load_model("vit-tiny-digits")
    held = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    # the first held-out example of each class, in class order
    pick = [int(np.flatnonzero(held["labels"] == k)[0]) for k in np.unique(held["labels"])][:digits]
    images, labels = held["images"][pick], held["labels"][pick]
    with devices_for(vit) as run:
        image = run_digits(run, images, devices=devices, cr=vit_cr, quiet=quiet)
        image["labels"] = labels.tolist()
        result = {"devices": devices, "runtime": "simulated (threads of one process)" if simulate else
                  "processes on this machine over loopback (gloo)", "gpt2": text, "llama": chat, "vit": image}
        if full_test_set:
            say(f"all {len(held['labels'])} held-out digits, exact and PRISM")
            px = vit.image_processor.digits_to_pixels(held["images"])
            exact = run(px, devices=1).logits.argmax(-1).numpy()
            prism = run(px, devices=devices, cr=vit_cr, outputs=("cls",)).logits.argmax(-1).numpy()
            result["vit_held_out"] = {"images": int(len(exact)),
                                      "exact_accuracy": float((exact == held["labels"]).mean()),
                                      "prism_accuracy": float((prism == held["labels"]).mean()),
                                      "prediction_agreement": float((exact == prism).mean())}
    if figure is not None:
        from .util.plotting import PLOT_HINT, digits_figure

        try:
            say(f"writing {figure}")
            digits_figure(figure, images, image["stats"]["partition"], vit_cr, vit.net.grid,
                          [r["class_id"] for r in image["reference"]], [o["class_id"] for o in image["outputs"]],
                          labels.tolist())
            result["figure"] = str(Path(figure).resolve())
        except ImportError:  # matplotlib is the `plot` extra: the demo runs without it
            result["figure_skipped"] = PLOT_HINT
    result["seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- formatting

def _device_table(stats: dict, voltage: dict | None) -> list[str]:
    mib = 1 << 20
    lines = [f"  {'device':>6} {'positions':>11} {'sent (B)':>10} {'MFLOP':>9} {'ms':>8} {'weights MiB':>11} "
             f"{'peak RSS MiB':>12} {'KV cache MiB':>12}" + (f" {'Voltage sent':>13} {'Voltage MFLOP':>14}" if voltage else "")]
    for i, d in enumerate(stats["devices"]):
        row = (f"  {d['rank']:>6} {str(tuple(d['positions'])):>11} {d['bytes_sent']:>10} {d['flops'] / 1e6:>9.2f} "
               f"{d['seconds'] * 1e3:>8.1f} {d['weight_bytes'] / mib:>11.2f} {d['peak_rss'] / mib:>12.0f} "
               f"{d['kv_cache_bytes'] / mib:>12.3f}")
        if voltage:
            v = voltage["devices"][i]
            row += f" {v['bytes_sent']:>13} {v['flops'] / 1e6:>14.2f}"
        lines.append(row)
    return lines


def cost_lines(r: dict) -> list[str]:
    """A run's (or batch's) costs: partition, bytes and FLOPs against Voltage, per device."""
    s = r["stats"]
    lines = [f"partition {s['partition']}, cr {s['crs'][0] if len(set(s['crs'])) == 1 else s['crs']}, "
             f"wire {s['wire_dtype']}" + (f", batch of {r['batch']['size']}" if r.get("batch", {}).get("size", 1) > 1
                                          else "")]
    if "voltage" in r:
        v = r["voltage"]
        label = "PRISM" if r.get("mode", "prism") == "prism" else f"this run, {r['mode']}"
        lines.append(f"bytes exchanged: {s['bytes_sent']} B ({label}) vs {v['bytes_sent']} B (Voltage): "
                     f"-{100 * v['bytes_reduction']:.1f}% (activations alone -{100 * v['activation_bytes_reduction']:.1f}%)")
        lines.append(f"FLOPs of the busiest device: -{100 * v['busiest_device_flops_reduction']:.1f}% vs Voltage")
    busiest = max(s["devices"], key=lambda d: d["seconds"])  # the request takes as long as its slowest device
    lines.append(f"time: {busiest['seconds'] * 1e3:.1f} ms, the busiest device's (rank {busiest['rank']})")
    lines += _device_table(s, r.get("voltage"))
    return lines


def _image_line(name: str, o: dict, ref: dict) -> str:
    desc = f"class {o['label']} (p = {o['probability']:.3f})" if "label" in o else \
        f"[CLS] embedding ({o['embedding_dim']})"
    if "class_id" in ref:
        desc += f", one device: {ref['class_id']}"
    elif "embedding_cosine" in ref:
        desc += f", cosine to one device {ref['embedding_cosine']:.6f}"
    return f"{name}: {desc}"


def format_output(r: dict) -> str:
    """What one input gave (a result of run_text, run_texts or run_images), without the costs."""
    lines = []
    out = r.get("output")
    if "image" in r["input"]:
        lines.append(_image_line(r["input"]["image"], out, r.get("reference", {})))
    elif "decode" in r:
        lines.append(f"{r['input']['text']}\033[1m{out['text']}\033[0m" if sys.stdout.isatty()
                     else r["input"]["text"] + out["text"])
        lines.append(f"({r['input']['tokens']} prompt tokens + {len(out['token_ids'])} generated; decoding sent "
                     f"{r['decode']['bytes_sent']} B)")
        if "reference" in r:
            ref = r["reference"]
            lines.append(f"agreement with one device: {ref['tokens_identical']}/{len(ref['token_ids'])} generated "
                         f"tokens identical (first divergence at {ref['first_divergence']}), prefill next-token "
                         f"top-1 agreement {100 * ref['prefill_top1_agreement']:.1f}%")
    elif out is not None:
        if r.get("batch", {}).get("size", 1) > 1:
            lines.append(f"text: {r['input']['text']}")
        if "next_token" in out:
            lines.append(f"next token after the text: {out['next_token']!r} (id {out['next_token_id']})")
        if "label" in out:
            lines.append(f"class: {out['label']} (p = {out['probability']:.3f})")
        if "embedding" in out:
            e = out["embedding"]
            lines.append(f"embedding ({out['embedding_dim']}): [{', '.join(f'{v:.4f}' for v in e[:6])}, ...] "
                         f"norm {math.sqrt(sum(v * v for v in e)):.4f}")
        if "reference" in r:
            lines.append("vs one device: " + ", ".join(f"{k} {v}" for k, v in r["reference"].items()))
    else:  # a batch of digits (run_digits)
        for i, o in enumerate(r["outputs"]):
            lines.append(_image_line(f"digit {i}", o, r["reference"][i] if "reference" in r else {}))
    return "\n".join(lines)


def format_run(r: dict) -> str:
    return "\n".join([format_output(r)] + cost_lines(r))


def format_demo(r: dict) -> str:
    g, v = r["gpt2"], r["vit"]
    lines = [f"devices: {r['devices']} {r['runtime']}", "",
             f"== gpt2-tiny on {r['devices']} devices, CR {g['cr']} ==",
             f"prompt: {g['input']['text']}", "", format_run(g), ""]
    c = r["llama"]  # the prompt is the chat as the template renders it
    lines += [f"== llama-tiny (RoPE, GQA) on {r['devices']} devices, CR {c['cr']}, a chat in its template ==",
              format_run(c), ""]
    lines.append(f"== vit-tiny-digits on {len(v['outputs'])} held-out digits, {r['devices']} devices, CR {v['cr']} ==")
    exact = [x["class_id"] for x in v["reference"]]
    prism = [x["class_id"] for x in v["outputs"]]
    lines.append(f"  true label: {' '.join(map(str, v['labels']))}")
    lines.append(f"  exact     : {' '.join(map(str, exact))}")
    lines.append(f"  PRISM     : {' '.join(map(str, prism))}   ({sum(a == b for a, b in zip(exact, prism))}/"
                 f"{len(exact)} identical)")
    if "vit_held_out" in r:
        h = r["vit_held_out"]
        lines.append(f"  all {h['images']} held-out digits: accuracy {100 * h['exact_accuracy']:.1f}% exact, "
                     f"{100 * h['prism_accuracy']:.1f}% PRISM, predictions agree on {100 * h['prediction_agreement']:.1f}%")
    lines += cost_lines(v)
    if "figure" in r:
        lines.append(f"\nfigure: {r['figure']}")
    elif "figure_skipped" in r:
        lines.append(f"\nno figure: {r['figure_skipped']}")
    lines.append(f"({r['seconds']:.1f} s)")
    return "\n".join(lines)

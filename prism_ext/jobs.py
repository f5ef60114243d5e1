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
from .engine import RunStats

__all__ = ["load_model", "stats_dict", "check_job", "run_text", "run_image", "run_digits", "demo", "format_run", "format_demo",
           "DEMO_PROMPT"]

DEMO_PROMPT = "The \"for\" statement is used to iterate over the elements of a sequence"


def _progress(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(f"prism: {msg}", file=sys.stderr, flush=True)
    return say


def load_model(path_or_name) -> PrismModel:
    """A bundled name (``gpt2-tiny``, ``vit-tiny-digits``), a checkpoint directory or a cached hub name."""
    from . import load

    try:
        return load(path_or_name)
    except FileNotFoundError:
        if Path(path_or_name).expanduser().exists():
            raise
        raise FileNotFoundError(f"model: {str(path_or_name)!r} is not a bundled model ({', '.join(zoo.NAMES)}), "
                                f"a checkpoint directory, or a model in the local Hugging Face cache "
                                f"(prism_ext never downloads)") from None


def stats_dict(stats: RunStats) -> dict:
    """A run's costs, per device and in total (JSON-ready)."""
    return {
        "mode": stats.mode, "crs": list(stats.crs), "wire_dtype": stats.wire_dtype,
        "partition": [list(r) for r in stats.partition.ranges],
        "bytes_sent": stats.bytes_sent, "activation_bytes": stats.activation_bytes,
        "flops": sum(d.flops for d in stats.devices),
        "devices": [{"rank": d.rank, "positions": [d.start, d.stop], "bytes_sent": d.bytes_sent,
                     "activation_bytes": d.activation_bytes, "flops": d.flops, "seconds": d.seconds}
                    for d in stats.devices],
    }


def _knobs(wire_dtype="fp32", compression_point="attn_input", mean_weighting="count", device_weights=None,
           exact_rows="none") -> dict:
    return dict(wire_dtype=wire_dtype, compression_point=compression_point, mean_weighting=mean_weighting,
                device_weights=device_weights, exact_rows=exact_rows)


def _validate(model: PrismModel, n: int, devices: int, cr, mode: str, knobs: dict) -> None:
    """Check the run's settings before any progress line: a bad one ends the job with its error alone."""
    from .engine import RunConfig
    from .partition import partition

    from .program import MODES

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("prism", "voltage"):
        partition(n, devices, knobs["device_weights"])
    RunConfig.make(len(model.net.blocks), mode="voltage" if mode == "voltage" else "prism", cr=cr,
                   wire_dtype=knobs["wire_dtype"], compression_point=knobs["compression_point"],
                   mean_weighting=knobs["mean_weighting"], exact_rows=model.exact_rows(knobs["exact_rows"]))


def _peers(run, inputs, devices: int, knobs: dict) -> tuple:
    """The single-device output (exact) and the Voltage run over the same devices."""
    exact = run(inputs, devices=1)
    voltage = run(inputs, devices=devices, mode="voltage", device_weights=knobs["device_weights"],
                  wire_dtype=knobs["wire_dtype"])
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

def _encode(model: PrismModel, text: str, room: int) -> tuple[list[int], object]:
    if not isinstance(text, str) or not text:
        raise ValueError("text: must be a non-empty string")
    tok = model.tokenizer
    ids = tok.encode(text) if model.model_type == "gpt2" else tok.encode(text, special=True)
    limit = int(model.net.config.get("n_positions") or model.net.config.get("max_position_embeddings") or 0)
    if limit and len(ids) + room > limit:
        extra = f" + {room} new tokens" if room else ""
        hint = f"; use at most {limit - len(ids)} new tokens (--max-new-tokens) or a shorter text" \
            if room and len(ids) < limit else ""
        raise ValueError(f"text: {len(ids)} tokens{extra} exceed the model's {limit} positions{hint}")
    if not ids:
        raise ValueError("text: encodes to no tokens")
    return ids, tok


def check_job(model: PrismModel, *, text: str | None = None, devices: int = 4, cr=4, mode: str = "prism",
              max_new_tokens: int = 40, **knobs) -> None:
    """Every check a job makes before it runs, so a bad one is refused before
    any device (process) is started."""
    knobs = _knobs(**knobs)
    if text is None:
        _processor(model)
        _validate(model, model.net.grid ** 2 + 1, devices, cr, mode, knobs)
        return
    _text_job(model, text, devices, cr, mode, max_new_tokens, knobs)


def _text_job(model: PrismModel, text: str, devices, cr, mode: str, max_new_tokens: int, knobs: dict):
    """A text job's checks; returns (token ids, tokenizer, whether it generates)."""
    if model.model_type == "vit":
        raise ValueError("text: vit models take --image, not --text")
    generating = model.model_type == "gpt2" and max_new_tokens > 0
    if generating and mode not in ("prism", "single"):
        raise ValueError(f"mode: generation runs in prism or single mode; use --max-new-tokens 0 for a {mode} "
                         f"forward pass")
    ids, tok = _encode(model, text, max_new_tokens if generating else 0)
    _validate(model, len(ids), devices, cr, mode, knobs)
    return ids, tok, generating


def run_text(model: PrismModel, text: str, *, devices: int = 4, cr=4, mode: str = "prism",
             max_new_tokens: int = 40, compare: bool = True, quiet: bool = True, cluster=None, **knobs) -> dict:
    """GPT-2: generate ``max_new_tokens`` greedily after ``text`` (0: one forward
    pass, next-token prediction). BERT: sentence embedding (mean over tokens),
    and the class when the checkpoint has a classifier. ``cluster``: a live
    :class:`prism_ext.runtime.Cluster` of ``model`` to run on (default: simulated devices)."""
    say = _progress(quiet)
    run = model if cluster is None else cluster
    knobs = _knobs(**knobs)
    ids, tok, generating = _text_job(model, text, devices, cr, mode, max_new_tokens, knobs)
    x = torch.tensor([ids])
    result = {"model_type": model.model_type, "devices": devices, "cr": cr, "mode": mode, "knobs": knobs,
              "input": {"text": text, "tokens": len(ids)}}
    peers = None
    if compare:  # first, so the measured run below finds everything warmed up
        say("single-device and Voltage peers")
        peers = _peers(run, x, devices, knobs)
    t0 = time.perf_counter()
    if generating:
        say(f"prefill of {len(ids)} tokens over {devices} devices (cr={cr}), then {max_new_tokens} new tokens")
        out, stats, decode = run.generate(x, devices=devices, cr=cr, max_new_tokens=max_new_tokens, return_stats=True,
                                          **knobs)
        new = out[0, len(ids):].tolist()
        result["output"] = {"text": tok.decode(new), "token_ids": new}
        result["decode"] = {"tokens": len(decode.flops), "bytes_sent": sum(decode.bytes_sent),
                            "flops": sum(decode.flops)}
    else:
        say(f"forward pass of {len(ids)} tokens over {devices} devices ({mode}, cr={cr})")
        out = run(x, devices=devices, cr=cr, mode=mode, **knobs)
        stats = out.stats
        result["output"] = _text_output(model, out, tok)
    result["stats"] = stats_dict(stats)
    result["seconds"] = time.perf_counter() - t0
    if peers is not None:
        exact, voltage = peers
        result["voltage"] = _vs_voltage(stats, voltage.stats)
        if generating:
            ref = run.generate(x, devices=1, max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
            same = next((i for i, (a, b) in enumerate(zip(new, ref)) if a != b), len(ref))
            prism_fwd = run(x, devices=devices, cr=cr, **knobs).logits[0].argmax(-1)
            result["reference"] = {
                "text": tok.decode(ref), "token_ids": ref,
                "tokens_identical": sum(a == b for a, b in zip(new, ref)), "first_divergence": same,
                "prefill_top1_agreement": float((prism_fwd == exact.logits[0].argmax(-1)).float().mean()),
            }
        else:
            result["reference"] = _agreement(_text_output(model, exact, tok), result["output"])
    return result


def _text_output(model: PrismModel, out, tok) -> dict:
    if model.model_type == "gpt2":
        top1 = out.logits[0].argmax(-1).tolist()  # the prediction after every position
        return {"next_token_id": top1[-1], "next_token": tok.decode(top1[-1:]), "top1_ids": top1}
    emb = out.last_hidden_state[0].mean(0)
    res = {"embedding_dim": int(emb.numel()), "embedding": emb.tolist()}
    if "logits" in out:
        res.update(_class_output(model, out.logits[0]))
    return res


def _class_output(model: PrismModel, logits: torch.Tensor) -> dict:
    labels = model.config.get("id2label") or {}
    probs = torch.softmax(logits, -1)
    k = int(probs.argmax())
    return {"class_id": k, "label": labels.get(str(k), str(k)), "probability": float(probs[k]),
            "logits": logits.tolist()}


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

def _processor(model: PrismModel):
    from .images import ImageProcessor

    if model.model_type != "vit":
        raise ValueError(f"image: --image needs a vit model; this is {model.model_type} (use --text)")
    if model.image_processor_config is None:
        raise ValueError(f"image: {model.directory} has no preprocessor_config.json")
    c = model.net.config
    return ImageProcessor(model.image_processor_config, int(c.get("num_channels", 3)), int(c["image_size"]))


def _run_pixels(model: PrismModel, px: torch.Tensor, devices, cr, mode, compare, knobs, say, cluster=None) -> dict:
    _validate(model, model.net.grid ** 2 + 1, devices, cr, mode, knobs)
    run = model if cluster is None else cluster
    peers = _peers(run, px, devices, knobs) if compare else None  # first: warms up the measured run
    say(f"{px.shape[0]} image(s), {model.net.grid ** 2 + 1} positions over {devices} devices ({mode}, cr={cr})")
    t0 = time.perf_counter()
    out = run(px, devices=devices, cr=cr, mode=mode, **knobs)
    result = {"model_type": model.model_type, "devices": devices, "cr": cr, "mode": mode, "knobs": knobs,
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
        return [_class_output(model, logits) for logits in out.logits]
    return [{"embedding_dim": model.net.d, "embedding": row.tolist()} for row in out.last_hidden_state[:, 0]]


def run_image(model: PrismModel, paths, *, devices: int = 4, cr=4, mode: str = "prism", compare: bool = True,
              quiet: bool = True, cluster=None, **knobs) -> dict:
    """ViT on image files: the class (or [CLS] embedding) of each."""
    proc = _processor(model)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    px = proc.files_to_pixels(paths)
    result = _run_pixels(model, px, devices, cr, mode, compare, _knobs(**knobs), _progress(quiet), cluster)
    result["input"] = {"images": [str(p) for p in paths], "positions": model.net.grid ** 2 + 1}
    return result


def run_digits(model: PrismModel, digits: np.ndarray, *, devices: int = 4, cr=4, mode: str = "prism",
               compare: bool = True, quiet: bool = True, cluster=None, **knobs) -> dict:
    """ViT on raw 8x8 digits ([B, 8, 8], values 0..16), through the same processor as files."""
    px = _processor(model).digits_to_pixels(digits)
    result = _run_pixels(model, px, devices, cr, mode, compare, _knobs(**knobs), _progress(quiet), cluster)
    result["input"] = {"digits": int(px.shape[0]), "positions": model.net.grid ** 2 + 1}
    return result


# ---------------------------------------------------------------------- demo

def demo(*, devices: int = 4, gpt_cr: int = 4, vit_cr: int = 4, max_new_tokens: int = 56, digits: int = 10,
         figure: str | Path | None = "prism-demo.png", full_test_set: bool = True, quiet: bool = True,
         simulate: bool = False) -> dict:
    """gpt2-tiny generating over ``devices`` devices, then vit-tiny-digits on
    ``digits`` held-out digits (one per class); a figure of the latter. The
    devices are processes on this machine (a live cluster per model), or
    threads of this process with ``simulate``."""
    from .runtime import cluster

    say = _progress(quiet)
    t0 = time.perf_counter()
    simulate = simulate or devices == 1

    def devices_for(model):
        if simulate:
            return contextlib.nullcontext(None)
        say(f"starting {devices} processes for {model.model_type}")
        return cluster(model, devices, quiet=quiet)

    say("loading gpt2-tiny")
    gpt = load_model("gpt2-tiny")
    with devices_for(gpt) as c:
        text = run_text(gpt, DEMO_PROMPT, devices=devices, cr=gpt_cr, max_new_tokens=max_new_tokens, quiet=quiet,
                        cluster=c)
    say("loading vit-tiny-digits")
    vit = load_model("vit-tiny-digits")
    held = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    # the first held-out example of each class, in class order
    pick = [int(np.flatnonzero(held["labels"] == k)[0]) for k in np.unique(held["labels"])][:digits]
    images, labels = held["images"][pick], held["labels"][pick]
    with devices_for(vit) as c:
        run = vit if c is None else c
        image = run_digits(vit, images, devices=devices, cr=vit_cr, quiet=quiet, cluster=c)
        image["labels"] = labels.tolist()
        result = {"devices": devices, "runtime": "simulated (threads of one process)" if simulate else
                  "processes on this machine over loopback (gloo)", "gpt2": text, "vit": image}
        if full_test_set:
            say(f"all {len(held['labels'])} held-out digits, exact and PRISM")
            px = _processor(vit).digits_to_pixels(held["images"])
            exact = run(px, devices=1).logits.argmax(-1).numpy()
            prism = run(px, devices=devices, cr=vit_cr, outputs=("cls",)).logits.argmax(-1).numpy()
            result["vit_held_out"] = {"images": int(len(exact)),
                                      "exact_accuracy": float((exact == held["labels"]).mean()),
                                      "prism_accuracy": float((prism == held["labels"]).mean()),
                                      "prediction_agreement": float((exact == prism).mean())}
    if figure is not None:
        from .figure import digits_figure

        say(f"writing {figure}")
        digits_figure(figure, images, image["stats"]["partition"], vit_cr, vit.net.grid,
                      [r["class_id"] for r in image["reference"]], [o["class_id"] for o in image["outputs"]],
                      labels.tolist())
        result["figure"] = str(Path(figure).resolve())
    result["seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- formatting

def _device_table(stats: dict, voltage: dict | None) -> list[str]:
    lines = [f"  {'device':>6} {'positions':>11} {'sent (B)':>10} {'MFLOP':>9} {'ms':>8}"
             + (f" {'Voltage sent':>13} {'Voltage MFLOP':>14}" if voltage else "")]
    for i, d in enumerate(stats["devices"]):
        row = (f"  {d['rank']:>6} {str(tuple(d['positions'])):>11} {d['bytes_sent']:>10} {d['flops'] / 1e6:>9.2f} "
               f"{d['seconds'] * 1e3:>8.1f}")
        if voltage:
            v = voltage["devices"][i]
            row += f" {v['bytes_sent']:>13} {v['flops'] / 1e6:>14.2f}"
        lines.append(row)
    return lines


def _cost_lines(r: dict) -> list[str]:
    s = r["stats"]
    lines = [f"partition {s['partition']}, cr {s['crs'][0] if len(set(s['crs'])) == 1 else s['crs']}, "
             f"wire {s['wire_dtype']}"]
    if "voltage" in r:
        v = r["voltage"]
        label = "PRISM" if r.get("mode", "prism") == "prism" else f"this run, {r['mode']}"
        lines.append(f"bytes exchanged: {s['bytes_sent']} B ({label}) vs {v['bytes_sent']} B (Voltage): "
                     f"-{100 * v['bytes_reduction']:.1f}% (activations alone -{100 * v['activation_bytes_reduction']:.1f}%)")
        lines.append(f"FLOPs of the busiest device: -{100 * v['busiest_device_flops_reduction']:.1f}% vs Voltage")
    lines += _device_table(s, r.get("voltage"))
    return lines


def format_run(r: dict) -> str:
    lines = []
    out = r.get("output")
    if "decode" in r:
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
    else:
        for i, o in enumerate(r["outputs"]):
            name = r["input"]["images"][i] if "images" in r["input"] else f"digit {i}"
            ref = r["reference"][i] if "reference" in r else {}
            desc = f"class {o['label']} (p = {o['probability']:.3f})" if "label" in o else \
                f"[CLS] embedding ({o['embedding_dim']})"
            if "class_id" in ref:
                desc += f", one device: {ref['class_id']}"
            elif "embedding_cosine" in ref:
                desc += f", cosine to one device {ref['embedding_cosine']:.6f}"
            lines.append(f"{name}: {desc}")
    lines += _cost_lines(r)
    return "\n".join(lines)


def format_demo(r: dict) -> str:
    g, v = r["gpt2"], r["vit"]
    lines = [f"devices: {r['devices']} {r['runtime']}", "",
             f"== gpt2-tiny on {r['devices']} devices, CR {g['cr']} ==",
             f"prompt: {g['input']['text']}", "", format_run(g), "",
             f"== vit-tiny-digits on {len(v['outputs'])} held-out digits, {r['devices']} devices, CR {v['cr']} =="]
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
    lines += _cost_lines(v)
    if "figure" in r:
        lines.append(f"\nfigure: {r['figure']}")
    lines.append(f"({r['seconds']:.1f} s)")
    return "\n".join(lines)

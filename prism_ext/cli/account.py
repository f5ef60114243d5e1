"""``prism account``: communication and per-device computation against Voltage."""

from __future__ import annotations

import argparse

from .args import counts, one_line_errors, user_errors


# Standard configs (no weights needed): block shape, layers, token table rows, default sequence lengths.
# (d, d_ff, q_width, kv_width, gated) as prism_ext.method.accounting.BlockShape takes them.
ACCOUNT_MODELS = {
    "bert-base": ((768, 3072), 12, 30522, (128, 512)),
    "vit-b16": ((768, 3072), 12, 0, (197,)),  # 14 x 14 patches + [CLS] at 224 px
    "gpt2": ((768, 3072), 12, 50257, (512, 1024)),
    "qwen2.5-0.5b": ((896, 4864, 14 * 64, 2 * 64, True), 24, 151936, (512, 2048)),  # 14 query / 2 KV heads of 64
    "llama-3.2-1b": ((2048, 8192, 32 * 64, 8 * 64, True), 16, 128256, (512, 2048)),  # 32 query / 8 KV heads of 64
}
_ROPE_FAMILIES = ("llama-3.2-1b", "qwen2.5-0.5b")  # their default compression point is kv (RunOptions)


PAPER_HEADLINE = "paper (arXiv 2507.12145, BERT, CR = 128): communication -99.2%, per-device computation -51.24% (P, N not stated)"


def _config_shape(path: str):
    """(BlockShape, layers, token table rows, family) from a config.json, a checkpoint directory or a bundled name."""
    from pathlib import Path

    from .. import zoo
    from ..method.accounting import BlockShape
    from ..models import read_json

    p = Path(path)
    if not p.exists() and path in zoo.NAMES:
        p = zoo.model_dir(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = read_json(p, "--config")
    except OSError as exc:
        raise ValueError(f"--config: cannot read {p} ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config: {p} must hold a JSON object")
    family = cfg.get("model_type")
    try:
        if family == "gpt2":
            return (BlockShape(cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]), cfg["n_layer"],
                    cfg.get("vocab_size") or 0, family)
        d, d_ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        if family in ("llama", "qwen2", "qwen3", "mistral"):
            heads = cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or d // heads
            kv_heads = cfg.get("num_key_value_heads") or heads
            return (BlockShape(d, d_ff, heads * head_dim, kv_heads * head_dim, gated=True), layers,
                    cfg.get("vocab_size") or 0, family)
        return BlockShape(d, d_ff), layers, cfg.get("vocab_size") or 0, family
    except KeyError as exc:
        raise ValueError(f"--config: {p} has no {exc}") from None


@user_errors("account")
def _account(args: argparse.Namespace) -> int:
    import json

    from ..method.accounting import BlockShape, matrix_bytes, reduction_table
    from ..models.quant import WEIGHT_DTYPES

    models = []
    if args.config:
        shape, layers, vocab, family = _config_shape(args.config)
        if not args.seq:
            raise ValueError("--seq: required with --config")
        models.append((args.config, shape, layers, vocab, args.seq, family in ("llama", "qwen2", "qwen3", "mistral")))
    for name in args.model or ([] if args.config else list(ACCOUNT_MODELS)):
        dims, layers, vocab, seqs = ACCOUNT_MODELS[name]
        models.append((name, BlockShape(*dims), layers, vocab, args.seq or seqs, name in _ROPE_FAMILIES))
    report = []
    for name, shape, layers, vocab, seqs, rope in models:
        point = args.point or ("kv" if rope else "attn_input")
        rows = reduction_table(shape, None, args.devices, seqs, args.cr, point=point)
        report.append({"model": name, "d": shape.d, "d_ff": shape.d_ff, "q_width": shape.q, "kv_width": shape.kv,
                       "gated": shape.gated, "layers": layers, "point": point,
                       "weight_bytes": {dt: matrix_bytes(shape, layers, vocab, dt) for dt in WEIGHT_DTYPES}, "rows": [
            dict(zip(("devices", "positions", "cr", "comm_reduction", "compute_reduction_busiest",
                      "compute_reduction_mean"), r)) for r in rows]})
    if args.json:
        print(json.dumps({"paper": PAPER_HEADLINE, "models": report}, indent=1))
        return 0
    print("PRISM vs Voltage, per Transformer layer (the same in every layer; embeddings and heads left out).")
    print("comm: activation bytes sent, all devices; compute: matmul + attention FLOPs of one device")
    print("(busiest = the device with the most FLOPs in each mode; mean = mean of per-device reductions).")
    for entry in report:
        gqa = f" q={entry['q_width']} kv={entry['kv_width']}" if entry["kv_width"] != entry["d"] else ""
        print(f"\n{entry['model']}  d={entry['d']} d_ff={entry['d_ff']}{gqa}{' gated' if entry['gated'] else ''} "
              f"layers={entry['layers']}, compression point {entry['point']}")
        print("memory: every device holds all weights: " + ", ".join(
            f"{dt} {b / (1 << 20):.0f} MiB" for dt, b in entry["weight_bytes"].items())
            + " (block matrices and token table; --weight-dtype)")
        print(f"{'P':>4} {'N':>6} {'CR':>5} {'comm':>9} {'compute':>9} {'(mean)':>9}")
        for r in entry["rows"]:
            print(f"{r['devices']:>4} {r['positions']:>6} {r['cr']:>5} {-100 * r['comm_reduction']:>8.2f}% "
                  f"{-100 * r['compute_reduction_busiest']:>8.2f}% {-100 * r['compute_reduction_mean']:>8.2f}%")
    print("\n" + PAPER_HEADLINE)
    print("ours: communication -(1 - 1/CR) exactly when CR divides every device's share "
          f"(-{100 * (1 - 1 / 128):.2f}% at CR = 128), less when it does not (a share < CR still sends one mean);")
    print("      computation depends on P and N as in the table (no single figure without them).")
    return 0


def register(sub) -> None:
    from ..method.engine import POINTS

    account = one_line_errors(sub.add_parser(
        "account", help="communication and per-device computation reduction vs Voltage"), "account")
    account.add_argument("--model", action="append", choices=sorted(ACCOUNT_MODELS),
                         help="a standard config (repeatable; default: all)")
    account.add_argument("--config", help="a config.json, a checkpoint directory or a bundled name instead of a "
                                          "standard config")
    account.add_argument("--devices", "-P", type=counts, default=[2, 4, 8], help="device counts P (default 2,4,8)")
    account.add_argument("--seq", "-N", type=counts, help="sequence lengths N, comma-separated (default: per model)")
    account.add_argument("--cr", type=counts, default=[4, 16, 128], help="compression rates (default 4,16,128)")
    account.add_argument("--point", choices=POINTS,
                         help="compression point (default: the family's: kv for Llama/Qwen/Mistral shapes, else "
                              "attn_input)")
    account.add_argument("--json", action="store_true", help="print JSON instead of a table")
    account.set_defaults(func=_account)

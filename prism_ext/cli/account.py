"""``prism account``: communication and per-device computation against Voltage."""

from __future__ import annotations

import argparse

from .args import counts, one_line_errors, user_errors


# Standard configs (no weights needed): hidden size, MLP width, layers, default sequence lengths.
ACCOUNT_MODELS = {
    "bert-base": (768, 3072, 12, (128, 512)),
    "vit-b16": (768, 3072, 12, (197,)),  # 14 x 14 patches + [CLS] at 224 px
    "gpt2": (768, 3072, 12, (512, 1024)),
}


PAPER_HEADLINE = "paper (arXiv 2507.12145, BERT, CR = 128): communication -99.2%, per-device computation -51.24% (P, N not stated)"


def _config_dims(path: str) -> tuple[int, int, int]:
    """(d, d_ff, layers) from a config.json, a checkpoint directory or a bundled name."""
    from pathlib import Path

    from .. import zoo
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
    if cfg.get("model_type") == "gpt2":
        return cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"], cfg["n_layer"]
    try:
        return cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    except KeyError as exc:
        raise ValueError(f"--config: {p} has no {exc}") from None


@user_errors("account")
def _account(args: argparse.Namespace) -> int:
    import json

    from ..method.accounting import reduction_table

    models = []
    if args.config:
        d, d_ff, layers = _config_dims(args.config)
        if not args.seq:
            raise ValueError("--seq: required with --config")
        models.append((args.config, d, d_ff, layers, args.seq))
    for name in args.model or ([] if args.config else list(ACCOUNT_MODELS)):
        d, d_ff, layers, seqs = ACCOUNT_MODELS[name]
        models.append((name, d, d_ff, layers, args.seq or seqs))
    report = []
    for name, d, d_ff, layers, seqs in models:
        rows = reduction_table(d, d_ff, args.devices, seqs, args.cr)
        report.append({"model": name, "d": d, "d_ff": d_ff, "layers": layers, "rows": [
            dict(zip(("devices", "positions", "cr", "comm_reduction", "compute_reduction_busiest",
                      "compute_reduction_mean"), r)) for r in rows]})
    if args.json:
        print(json.dumps({"paper": PAPER_HEADLINE, "models": report}, indent=1))
        return 0
    print("PRISM vs Voltage, per Transformer layer (the same in every layer; embeddings and heads left out).")
    print("comm: activation bytes sent, all devices; compute: matmul + attention FLOPs of one device")
    print("(busiest = the device with the most FLOPs in each mode; mean = mean of per-device reductions).")
    for entry in report:
        print(f"\n{entry['model']}  d={entry['d']} d_ff={entry['d_ff']} layers={entry['layers']}")
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
    account = one_line_errors(sub.add_parser(
        "account", help="communication and per-device computation reduction vs Voltage"), "account")
    account.add_argument("--model", action="append", choices=sorted(ACCOUNT_MODELS),
                         help="a standard config (repeatable; default: all)")
    account.add_argument("--config", help="a config.json, a checkpoint directory or a bundled name instead of a "
                                          "standard config")
    account.add_argument("--devices", "-P", type=counts, default=[2, 4, 8], help="device counts P (default 2,4,8)")
    account.add_argument("--seq", "-N", type=counts, help="sequence lengths N, comma-separated (default: per model)")
    account.add_argument("--cr", type=counts, default=[4, 16, 128], help="compression rates (default 4,16,128)")
    account.add_argument("--json", action="store_true", help="print JSON instead of a table")
    account.set_defaults(func=_account)

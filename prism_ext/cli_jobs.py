"""``prism demo``, ``prism run`` and ``prism zoo``: the main job's commands.

Bad arguments end with one line ``prism <command>: <what is wrong>`` on
stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

__all__ = ["register"]

_USER_ERRORS = (ValueError, TypeError, ImportError, OSError)  # OSError covers FileNotFoundError
_MAX_INT = 2**31 - 1  # counts travel as int32; prism_ext.partition.MAX_COUNT


def _user_errors(command: str):
    """Report a bad argument or input as one line and exit status 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(args):
            try:
                return fn(args)
            except _USER_ERRORS as exc:
                print(f"prism {command}: {exc}", file=sys.stderr)
                return 2
        return run
    return wrap


def _one_line_errors(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """Usage errors as one line (argparse would print the usage first)."""
    def error(message: str):
        print(f"prism {command}: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def _cr(text: str):
    """--cr: one int, or one per layer separated by commas."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    if any(v > _MAX_INT for v in values):  # checked before any arithmetic
        raise argparse.ArgumentTypeError(f"must be <= {_MAX_INT}, got {text}")
    return values[0] if len(values) == 1 else values


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > _MAX_INT:  # checked before any arithmetic
            raise argparse.ArgumentTypeError(f"must be <= {_MAX_INT}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_nonnegative = _int_at_least(0)


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every weight must be > 0, got {text}")
    return values


def _emit(result: dict, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=1) if as_json else text)


@_user_errors("run")
def _run(args: argparse.Namespace) -> int:
    from . import jobs

    if args.device_weights is not None and len(args.device_weights) != args.devices:
        raise ValueError(f"--device-weights: {len(args.device_weights)} weights for {args.devices} devices")
    for path in args.image or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image: {path!r} does not exist or is not a file")
    model = jobs.load_model(args.model)
    # An option that does not fit the model is an error (docs/demo.md), not ignored.
    if args.max_new_tokens is not None and (args.text is None or model.model_type != "gpt2"):
        raise ValueError(f"--max-new-tokens: only GPT-2 text generation takes it; this is {model.model_type}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 40
    knobs = dict(wire_dtype=args.wire_dtype, compression_point=args.compression_point,
                 mean_weighting=args.mean_weighting, device_weights=args.device_weights)
    common = dict(devices=args.devices, cr=args.cr, mode=args.mode, compare=not args.no_compare, quiet=args.quiet)
    if args.text is not None:
        result = jobs.run_text(model, args.text, max_new_tokens=args.max_new_tokens, **common, **knobs)
    else:
        result = jobs.run_image(model, args.image, **common, **knobs)
    result = {"model": str(args.model), **result}
    _emit(result, args.json, jobs.format_run(result))
    return 0


@_user_errors("demo")
def _demo(args: argparse.Namespace) -> int:
    from . import jobs

    quick = dict(max_new_tokens=16, digits=4, full_test_set=False) if args.quick else {}
    result = jobs.demo(devices=args.devices, gpt_cr=args.cr, vit_cr=args.cr, figure=args.out, quiet=args.quiet,
                       **quick)
    _emit(result, args.json, jobs.format_demo(result))
    return 0


@_user_errors("zoo")
def _zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.zoo_command == "list":
        for name, what in zoo.NAMES.items():
            try:
                where = str(zoo.model_dir(name))
            except FileNotFoundError:
                where = "(missing: run `prism zoo train " + name + "`)"
            print(f"{name:<16} {what}\n{'':<16} {where}")
        return 0
    from .zoo.train import train

    out = Path(args.out) if args.out else Path(zoo.__file__).parent / args.name
    metrics = train(args.name, out, threads=args.threads)
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    return 0


def register(sub) -> None:
    """Add ``run``, ``demo`` and ``zoo`` to the ``prism`` subparsers."""
    from .zoo import NAMES

    run = _one_line_errors(sub.add_parser("run", help="run a checkpoint over P simulated devices on a text or an image",
                         description="Run a checkpoint (a bundled name, a checkpoint directory or a cached hub "
                                     "name) over P simulated devices. GPT-2 --text: greedy generation; BERT --text: "
                                     "embedding (and class); ViT --image: class."), "run")
    run.add_argument("--model", required=True, help=f"a checkpoint directory or a bundled name ({', '.join(NAMES)})")
    run.add_argument("--devices", "-P", type=_positive, default=4, help="simulated devices (default 4)")
    run.add_argument("--cr", type=_cr, default=4, help="compression rate, or one per layer: 4,4,8,8 (default 4)")
    run.add_argument("--mode", choices=("prism", "voltage"), default="prism")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="input text (GPT-2, BERT)")
    what.add_argument("--image", nargs="+", metavar="FILE", help="image file(s) (ViT); PNG, other formats via Pillow")
    run.add_argument("--max-new-tokens", type=_nonnegative, default=None,
                     help="GPT-2: tokens to generate (default 40; 0: one forward pass, next-token prediction)")
    run.add_argument("--wire-dtype", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    run.add_argument("--compression-point", choices=("attn_input", "hidden"), default="attn_input")
    run.add_argument("--mean-weighting", choices=("count", "none"), default="count")
    run.add_argument("--device-weights", type=_weights, help="relative device speeds, e.g. 2,1,1,1")
    run.add_argument("--no-compare", action="store_true", help="skip the single-device and Voltage peer runs")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    run.set_defaults(func=_run)

    demo = _one_line_errors(sub.add_parser("demo", help="the bundled models on 4 simulated devices (no network)"),
                            "demo")
    demo.add_argument("--devices", "-P", type=_positive, default=4, help="simulated devices (default 4)")
    demo.add_argument("--cr", type=_positive, default=4, help="compression rate (default 4)")
    demo.add_argument("--out", default="prism-demo.png", help="where to write the figure (default ./prism-demo.png)")
    demo.add_argument("--quick", action="store_true", help="fewer tokens and digits (for tests)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(func=_demo)

    zoo = _one_line_errors(sub.add_parser("zoo", help="the bundled models: list them, or train one again"), "zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    _one_line_errors(zsub.add_parser("list", help="bundled models and where they are"), "zoo list")
    train = _one_line_errors(zsub.add_parser("train", help="train a bundled model (needs the `train` extra: "
                                                           "scikit-learn)"), "zoo train")
    train.add_argument("name", choices=list(NAMES))
    train.add_argument("--out", help="output folder (default: the package's own copy)")
    train.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    zoo.set_defaults(func=_zoo)

"""``prism demo``, ``prism run`` and ``prism zoo``: the main job's commands.

Bad arguments end with one line ``prism <command>: <what is wrong>`` on
stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from .checks import MAX_COUNT, check_count, check_number
from .options import RunOptions

__all__ = ["register"]

_USER_ERRORS = (ValueError, TypeError, ImportError, OSError)  # OSError covers FileNotFoundError
_MAX_SECONDS = 86400.0  # --timeout and the like: a day (prism_ext.runtime refuses longer exchange timeouts)


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


def _max_threads() -> int:
    # The C++ pool's bound, which torch's thread count shares here.
    from .kernels import _C

    return _C.max_threads()


class Bounded:
    """The argparse type of every numeric option of every command: one number
    (or, ``many``, comma-separated numbers), each checked by
    :mod:`prism_ext.checks` (ints: ``check_count``; reals: ``check_number``,
    finite) against [minimum, maximum] before anything uses it. ``maximum``
    may be a function (read at parse time). ``positive``: reals must be > 0."""

    def __init__(self, minimum, maximum=MAX_COUNT, *, real: bool = False, many: bool = False, positive: bool = False):
        self.minimum, self._maximum, self.real, self.many, self.positive = minimum, maximum, real, many, positive

    @property
    def maximum(self):
        return self._maximum() if callable(self._maximum) else self._maximum

    def __call__(self, text: str):
        kind = "number" if self.real else "int"
        values = []
        for part in text.split(",") if self.many else [text]:
            try:
                value = float(part) if self.real else int(part)
            except ValueError:  # also int() of more than 4300 digits
                what = f"comma-separated {kind}s" if self.many else ("a number" if self.real else "an int")
                raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}") from None
            try:
                if self.real:
                    value = check_number(value, None, self.minimum, self.maximum)
                    if self.positive and not value > 0:
                        raise ValueError(f"must be > 0, got {value!r}")
                else:
                    value = check_count(value, None, self.minimum, self.maximum)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{exc}" if not self.many else f"{exc} (in {text[:40]!r})") from None
            values.append(value)
        return values if self.many else values[0]


_positive = Bounded(1)
_nonnegative = Bounded(0)
_threads = Bounded(1, _max_threads)  # before torch sees it: torch takes 100000, then the process dies at exit
_seconds = Bounded(1, _MAX_SECONDS, real=True)  # --timeout of the cluster commands (as prism_ext.runtime checks it)
_weights = Bounded(0, sys.float_info.max, real=True, many=True, positive=True)  # relative device speeds
_counts = Bounded(1, many=True)  # comma-separated counts: a grid of devices or CRs, a per-layer CR


def _cr(text: str):
    """--cr: one int, or one per layer separated by commas."""
    values = _counts(text)
    return values[0] if len(values) == 1 else values


def _emit(result: dict, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=1) if as_json else text)


def _launch(args: argparse.Namespace) -> tuple[str, dict]:
    """Where the devices of ``prism run`` live: ("simulate", {}), ("local",
    cluster options) for processes on this machine, or ("master", options)
    for a cluster across machines (``--master``, or torchrun's environment)."""
    import os

    from .runtime import parse_master

    env_master = os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")
    common = dict(token=args.token, timeout=args.timeout, threads=args.threads, ifname=args.ifname)
    if args.master or (env_master and not args.simulate):
        if args.simulate:
            raise ValueError("--simulate: cannot be combined with --master (a cluster of processes)")
        master = args.master or f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        parse_master(master)
        world = args.world or (int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else None)
        if world is None:
            raise ValueError("--world: required with --master (the number of devices, rank 0 included)")
        rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0") or 0)
        return "master", dict(common, master=master, world=world, rank=rank)
    if args.world is not None or args.rank is not None:
        raise ValueError("--world/--rank: only with --master (a cluster across machines)")
    if args.simulate or args.devices == 1:
        return "simulate", {}
    return "local", dict(common, devices=args.devices)


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The run settings this command line fixes; under torchrun every rank
    has its own, and the handshake checks they agree with rank 0's."""
    return RunOptions(**{name: getattr(args, "weights" if name == "device_weights" else name)
                         for name in RunOptions.fields() if name != "outputs"})


def _read_texts(path: str) -> list[str]:
    """--text-file: one text per line (UTF-8; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text-file: {path!r} does not exist or is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[:exc.start].count(b"\n") + 1
        raise ValueError(f"--text-file: {path} is not UTF-8 text (undecodable byte on line {line})") from None
    texts = [t for t in lines if t.strip()]
    if not texts:
        raise ValueError(f"--text-file: {path} holds no text (it is empty or blank)")
    return texts


def _image_paths(items: list[str]) -> list[str]:
    """--image: files, and folders standing for the images in them (by extension)."""
    from .inputs.images import image_files

    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise ValueError(f"--image: folder {item!r} holds no image files")
            paths += [str(f) for f in found]
        elif p.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"--image: {item!r} does not exist or is not a file")
    return paths


def _print_records(records, as_json: bool) -> None:
    """--json: one JSON object per input (JSON Lines), in input order.
    Otherwise each input's output, and a request's costs once the last input
    it ran (``batch.size`` of them) is printed."""
    from . import jobs
    from .util.progress import write

    seen = {}  # id of a request's stats -> inputs printed
    for r in records:
        if as_json:
            write(json.dumps(r))
            continue
        many = r["batch"]["size"] > 1 or r["index"] > 0
        write((f"[{r['index']}] " if many else "") + jobs.format_output(r))
        key = id(r["stats"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == r["batch"]["size"]:
            del seen[key]
            write("\n".join(jobs.cost_lines(r)) + "\n")


@_user_errors("run")
def _run(args: argparse.Namespace) -> int:
    from . import jobs
    from .runtime import ClusterError, cluster, set_threads, worker_exit, worker_main

    images = _image_paths(args.image) if args.image else None
    texts = _read_texts(args.text_file) if args.text_file else None
    where, launch = _launch(args)
    options = _run_options(args)
    if where == "simulate" and args.threads is not None:  # the simulated devices are this process's threads
        set_threads(args.threads)
    if where == "master" and launch["rank"] != 0:  # torchrun: this process is a worker
        code = worker_main(launch["master"], launch["rank"], launch["world"], token=args.token,
                           timeout=args.timeout, threads=args.threads, ifname=args.ifname, model=args.model,
                           pinned=options)
        worker_exit(launch["rank"], code, None)  # as `prism worker`: no teardown behind blocked gloo threads
    devices = launch.get("world") or launch.get("devices") or args.devices
    if args.weights is not None and len(args.weights) != devices:
        raise ValueError(f"--weights: {len(args.weights)} weights for {devices} devices")
    if args.auto_weights and args.weights is not None:
        raise ValueError("--auto-weights: cannot be combined with --weights")
    if args.auto_weights and where == "simulate":
        raise ValueError("--auto-weights: needs real devices (not --simulate, and more than one device)")
    model = jobs.load_model(args.model)
    if args.text is not None:
        texts = [args.text]
    # An option that does not fit the model is an error (docs/demo.md), not ignored.
    if args.max_new_tokens is not None and (texts is None or model.model_type != "gpt2"):
        raise ValueError(f"--max-new-tokens: only GPT-2 text generation takes it; this is {model.model_type}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 40
    common = dict(devices=devices, compare=not args.no_compare, quiet=args.quiet, batch_size=args.batch_size)
    jobs.check_job(model, texts=texts, devices=devices, options=options, max_new_tokens=args.max_new_tokens)
    if images is not None:
        from .inputs.images import check_image

        for path in images:  # every header, before any device starts
            try:
                check_image(path)
            except ValueError as exc:
                raise ValueError(f"--image: {str(exc).removeprefix('image: ')}") from None
    runtime = {"simulate": f"{devices} simulated device(s), threads of one process",
               "local": f"{devices} processes on this machine over loopback (gloo)",
               "master": f"{devices} processes, rank 0 at {launch.get('master')} (gloo)"}[where]
    try:
        if where != "simulate":  # the same model, its calls run by a cluster of processes
            launch.pop("rank", None)
            launch.pop("devices", None)
            model = cluster(model, devices if where == "local" else None, device_weights=args.weights,
                            auto_weights=args.auto_weights, pinned=options, quiet=args.quiet, **launch)
            options = options.replace(device_weights=model.executor.device_weights)
        if texts is not None:
            records = jobs.run_texts(model, texts, max_new_tokens=args.max_new_tokens, options=options, **common)
        else:
            records = jobs.run_images(model, images, options=options, **common)
        _print_records(({"model": str(args.model), "runtime": runtime, **r} for r in records), args.json)
    except BrokenPipeError:  # the reader (`| head`, `| jq ... | head`) has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except ClusterError as exc:
        print(f"prism run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prism run: interrupted; every device stopped", file=sys.stderr)
        return 130
    finally:
        model.close()  # a cluster's processes stop; simulated devices need nothing
    return 0


@_user_errors("demo")
def _demo(args: argparse.Namespace) -> int:
    from . import jobs

    quick = dict(max_new_tokens=16, digits=4, full_test_set=False) if args.quick else {}
    result = jobs.demo(devices=args.devices, gpt_cr=args.cr, vit_cr=args.cr, figure=args.out, quiet=args.quiet,
                       simulate=args.simulate, **quick)
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
    from .training.bundled import train

    out = Path(args.out) if args.out else Path.cwd() / args.name  # never into the installed package
    metrics = train(args.name, out, threads=args.threads, quiet=args.quiet, exact_only=args.exact_only)
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .runtime import worker_exit, worker_main

    try:
        code = worker_main(args.master, args.rank, args.world, token=args.token, timeout=args.timeout,
                           join_timeout=args.join_timeout, threads=args.threads, ifname=args.ifname,
                           model=args.model)
    except _USER_ERRORS as exc:
        print(f"prism worker: {exc}", file=sys.stderr)
        code = 2
    worker_exit(args.rank, code, None)  # no interpreter teardown: gloo threads may be blocked on dead peers
    return code


def register(sub) -> None:
    """Add ``run``, ``demo`` and ``zoo`` to the ``prism`` subparsers."""
    from .zoo import NAMES

    run = _one_line_errors(sub.add_parser("run", help="run a checkpoint over P devices (processes, or --simulate) on a text or an image",
                         description="Run a checkpoint (a bundled name, a checkpoint directory or a cached hub "
                                     "name) over P simulated devices. GPT-2 --text: greedy generation; BERT --text: "
                                     "embedding (and class); ViT --image: class."), "run")
    run.add_argument("--model", required=True, help=f"a checkpoint directory or a bundled name ({', '.join(NAMES)})")
    run.add_argument("--devices", "-P", type=_positive, default=4,
                     help="devices: processes on this machine over loopback (default 4; see --simulate, --master)")
    run.add_argument("--simulate", action="store_true",
                     help="run the devices as threads of this process instead of processes")
    run.add_argument("--master", metavar="HOST:PORT",
                     help="this process is rank 0 of a cluster across machines: start `prism worker --master "
                          "HOST:PORT --rank R --world P` on each other device (torchrun's MASTER_ADDR, "
                          "MASTER_PORT, RANK, WORLD_SIZE work too)")
    run.add_argument("--world", type=_positive, help="with --master: number of devices, rank 0 included")
    run.add_argument("--rank", type=_nonnegative, help="with --master: this process's rank (default $RANK or 0)")
    run.add_argument("--token", help="the cluster's shared secret (default: $PRISM_TOKEN; random for local processes)")
    run.add_argument("--timeout", type=_seconds, default=60.0, help="seconds any exchange may take (default 60)")
    run.add_argument("--threads", type=_threads, help="compute threads of this process (rank 0)")
    run.add_argument("--ifname", help="network interface for gloo (e.g. eth0)")
    run.add_argument("--cr", type=_cr, default=4, help="compression rate, or one per layer: 4,4,8,8 (default 4)")
    run.add_argument("--mode", choices=("prism", "voltage", "tp", "single"), default="prism",
                     help="prism (default), voltage (full rows exchanged), tp (tensor parallel), single (rank 0 alone)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="input text (GPT-2, BERT)")
    what.add_argument("--text-file", metavar="FILE", help="a file of texts, one per line (UTF-8; blank lines skipped)")
    what.add_argument("--image", nargs="+", action="extend", metavar="FILE",
                      help="image files or folders of them (ViT; any format Pillow reads); repeatable")
    run.add_argument("--batch-size", type=_positive, default=8,
                     help="inputs per request (default 8); texts of a batch are padded to its longest")
    run.add_argument("--max-new-tokens", type=_nonnegative, default=None,
                     help="GPT-2: tokens to generate (default 40; 0: one forward pass, next-token prediction)")
    run.add_argument("--wire-dtype", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    run.add_argument("--compression-point", choices=("attn_input", "hidden"), default="attn_input")
    run.add_argument("--mean-weighting", choices=("count", "none"), default="count")
    run.add_argument("--exact-rows", default="none", metavar="SPEC",
                     help="rows sent as their own rows instead of averaged: none, first, special (position 0 and "
                          "special tokens), top<K> (K largest-norm rows per device), adaptive (group the other rows at "
                          "their largest jumps), joined by '+' (default none; docs/eval.md)")
    run.add_argument("--weights", type=_weights, help="relative device speeds, e.g. 2,1,1,1: positions split in proportion")
    run.add_argument("--auto-weights", action="store_true",
                     help="time a short forward on every device, split positions by measured speed, print the plan")
    run.add_argument("--no-compare", action="store_true", help="skip the single-device and Voltage peer runs")
    run.add_argument("--json", action="store_true", help="print one JSON object per input (JSON Lines)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines or bar on stderr")
    run.set_defaults(func=_run)

    worker = _one_line_errors(sub.add_parser(
        "worker", help="serve as one device (rank >= 1) of a cluster whose rank 0 runs `prism run --master`",
        description="Join a PRISM cluster as device RANK of WORLD and serve its requests until rank 0 closes it. "
                    "Rank 0 (`prism run ... --master HOST:PORT --world P`) announces the model; this device loads "
                    "it from its own disk (--model if the path differs here). Every device must hold the same "
                    "token (--token or PRISM_TOKEN)."), "worker")
    worker.add_argument("--master", required=True, metavar="HOST:PORT", help="rank 0's address and port")
    worker.add_argument("--rank", type=_positive, required=True, help="this device's rank (1 .. world-1)")
    worker.add_argument("--world", type=_positive, required=True, help="number of devices, rank 0 included")
    worker.add_argument("--token", help="the cluster's shared secret (default: $PRISM_TOKEN)")
    worker.add_argument("--timeout", type=_seconds, default=60.0,
                        help="seconds any exchange may take, and the longest rank 0 may stay silent (default 60)")
    worker.add_argument("--join-timeout", type=_seconds, default=300.0,
                        help="seconds to keep trying to join rank 0 before giving up (default 300)")
    worker.add_argument("--threads", type=_threads, help="compute threads on this device (default: torch's)")
    worker.add_argument("--ifname", help="network interface for gloo (e.g. eth0; default: by hostname)")
    worker.add_argument("--model", help="this device's path to the model, if not the path rank 0 announces")
    worker.set_defaults(func=_worker)

    demo = _one_line_errors(sub.add_parser("demo", help="the bundled models on 4 devices (processes on this machine)"),
                            "demo")
    demo.add_argument("--devices", "-P", type=_positive, default=4,
                      help="devices: processes on this machine over loopback (default 4)")
    demo.add_argument("--simulate", action="store_true", help="run the devices as threads of this process")
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
    train.add_argument("--out", help="output folder (default: ./NAME in the current directory)")
    train.add_argument("--threads", type=_threads, help="torch threads (default: torch's choice)")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress lines or bar on stderr")
    train.add_argument("--exact-only", action="store_true",
                       help="stop after exact training, before the PRISM-aware phase (the exact-only peer; "
                            "use with --out)")
    zoo.set_defaults(func=_zoo)

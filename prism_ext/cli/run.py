"""``prism run``: a checkpoint over P devices (processes on this machine, a cluster
across machines, or threads of this process with ``--simulate``) on texts or images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import RunOptions
from .args import cr, nonnegative, one_line_errors, positive, seconds, threads, user_errors, weights
from .worker import serve_rank


def _launch(args: argparse.Namespace) -> tuple[str, dict]:
    """Where the devices of ``prism run`` live: ("simulate", {}), ("local",
    cluster options) for processes on this machine, or ("master", options)
    for a cluster across machines (``--master``, or torchrun's environment;
    ``options["shared_token"]``: the torchrun launch whose ranks share a
    token of their own, which rank 0 removes once the cluster has formed)."""
    import os

    from ..runtime import parse_master, torchrun

    env = None if args.master or args.simulate else torchrun.from_environment()
    common = dict(token=args.token, timeout=args.timeout, threads=args.threads, ifname=args.ifname)
    if args.master or env:
        if args.simulate:
            raise ValueError("--simulate: cannot be combined with --master (a cluster of processes)")
        master = args.master or env.master
        parse_master(master)
        world = args.world or (env.world if env else None)
        if world is None:
            raise ValueError("--world: required with --master (the number of devices, rank 0 included)")
        rank = args.rank if args.rank is not None else (env.rank if env else 0)
        shared = None
        if env and args.token is None and not os.environ.get("PRISM_TOKEN"):
            if not env.all_local:
                raise ValueError("--token: torchrun across hosts needs a shared token (--token or PRISM_TOKEN); "
                                 "on one host the ranks share one of their own")
            common["token"], shared = torchrun.share_token(env, args.timeout), env
        return "master", dict(common, master=master, world=world, rank=rank, shared_token=shared)
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
    from ..inputs.images import image_files

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


def _print_records(records, as_json: bool, indexed: bool) -> None:
    """--json: one JSON object per input (JSON Lines), in input order.
    Otherwise each input's output, and a request's costs once the last input
    it ran (``batch.size`` of them) is printed; each output carries its index
    when there may be several (``indexed``: inputs read from a file)."""
    from .. import jobs
    from ..util.progress import write

    seen = {}  # id of a request's stats -> inputs printed
    for r in records:
        if as_json:
            write(json.dumps(r))
            continue
        many = indexed or r["batch"]["size"] > 1 or r["index"] > 0
        write((f"[{r['index']}] " if many else "") + jobs.format_output(r))
        key = id(r["stats"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == r["batch"]["size"]:
            del seen[key]
            write("\n".join(jobs.cost_lines(r)) + "\n")


@user_errors("run")
def _run(args: argparse.Namespace) -> int:
    from .. import jobs
    from ..runtime import ClusterError, cluster, set_threads, torchrun

    images = _image_paths(args.image) if args.image else None
    texts = _read_texts(args.text_file) if args.text_file else None
    where, launch = _launch(args)
    options = _run_options(args)
    if where == "simulate" and args.threads is not None:  # the simulated devices are this process's threads
        set_threads(args.threads)
    if where == "master" and launch["rank"] != 0:  # torchrun: this process is a worker
        return serve_rank("run", launch["master"], launch["rank"], launch["world"], token=launch["token"],
                          timeout=args.timeout, threads=args.threads, ifname=args.ifname, model=args.model,
                          pinned=options, quiet=args.quiet)
    devices = launch.get("world") or launch.get("devices") or args.devices
    if args.weights is not None and len(args.weights) != devices:
        raise ValueError(f"--weights: {len(args.weights)} weights for {devices} devices")
    if args.auto_weights and args.weights is not None:
        raise ValueError("--auto-weights: cannot be combined with --weights")
    if args.auto_weights and where == "simulate":
        raise ValueError("--auto-weights: needs real devices (not --simulate, and more than one device)")
    model = jobs.load_model(args.model, args.weight_dtype)
    if args.text is not None:
        texts = [args.text]
    # An option that does not fit the model is an error (docs/demo.md), not ignored.
    if args.max_new_tokens is not None and (texts is None or model.net.head != "lm"):
        raise ValueError(f"--max-new-tokens: only a causal LM's text generation takes it; this is {model.model_type}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 40
    common = dict(devices=devices, compare=not args.no_compare, quiet=args.quiet, batch_size=args.batch_size)
    jobs.check_job(model, texts=texts, devices=devices, options=options, max_new_tokens=args.max_new_tokens)
    if images is not None:
        from ..inputs.images import check_image

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
            shared = launch.pop("shared_token", None)
            try:
                model = cluster(model, devices if where == "local" else None, device_weights=args.weights,
                                auto_weights=args.auto_weights, pinned=options, quiet=args.quiet, **launch)
            finally:
                if shared is not None:  # every rank has authenticated with it, or the start failed
                    torchrun.forget_token(shared)
            options = options.replace(device_weights=model.executor.device_weights)
        if texts is not None:
            records = jobs.run_texts(model, texts, max_new_tokens=args.max_new_tokens, options=options, **common)
        else:
            records = jobs.run_images(model, images, options=options, **common)
        _print_records(({"model": str(args.model), "runtime": runtime, **r} for r in records), args.json,
                       indexed=args.text_file is not None or args.image is not None)
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


def register(sub) -> None:
    from ..zoo import NAMES


    run = one_line_errors(sub.add_parser("run", help="run a checkpoint over P devices (processes, or --simulate) on a text or an image",
                         description="Run a checkpoint (a bundled name, a checkpoint directory or a cached hub "
                                     "name) over P devices: P processes on this machine (default), a cluster across "
                                     "machines (--master, or torchrun), or threads of this process (--simulate). "
                                     "GPT-2 --text: greedy generation; BERT --text: embedding (and class); ViT "
                                     "--image: class."), "run")
    run.add_argument("--model", required=True, help=f"a checkpoint directory, a .gguf file or a bundled name ({', '.join(NAMES)})")
    run.add_argument("--devices", "-P", type=positive, default=4,
                     help="devices: processes on this machine over loopback (default 4; see --simulate, --master)")
    run.add_argument("--simulate", action="store_true",
                     help="run the devices as threads of this process instead of processes")
    run.add_argument("--master", metavar="HOST:PORT",
                     help="this process is rank 0 of a cluster across machines: start `prism worker --master "
                          "HOST:PORT --rank R --world P` on each other device (torchrun's MASTER_ADDR, "
                          "MASTER_PORT, RANK, WORLD_SIZE work too)")
    run.add_argument("--world", type=positive, help="with --master: number of devices, rank 0 included")
    run.add_argument("--rank", type=nonnegative, help="with --master: this process's rank (default $RANK or 0)")
    run.add_argument("--token", help="the cluster's shared secret (default: $PRISM_TOKEN; random for local processes)")
    run.add_argument("--timeout", type=seconds, default=60.0, help="seconds any exchange may take (default 60)")
    run.add_argument("--threads", type=threads, help="compute threads of this process (rank 0)")
    run.add_argument("--ifname", help="network interface for gloo (e.g. eth0)")
    run.add_argument("--cr", type=cr, default=4, help="compression rate, or one per layer: 4,4,8,8 (default 4)")
    run.add_argument("--mode", choices=("prism", "voltage", "tp", "single"), default="prism",
                     help="prism (default), voltage (full rows exchanged), tp (tensor parallel), single (rank 0 alone)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="input text (GPT-2, BERT)")
    what.add_argument("--text-file", metavar="FILE", help="a file of texts, one per line (UTF-8; blank lines skipped)")
    what.add_argument("--image", nargs="+", action="extend", metavar="FILE",
                      help="image files or folders of them (ViT; any format Pillow reads); repeatable")
    run.add_argument("--batch-size", type=positive, default=8,
                     help="inputs per request (default 8); texts of a batch are padded to its longest")
    run.add_argument("--max-new-tokens", type=nonnegative, default=None,
                     help="GPT-2: tokens to generate (default 40; 0: one forward pass, next-token prediction)")
    from ..comm.wire import WIRE_DTYPES
    from ..method.engine import POINTS, WEIGHTINGS
    from ..models.quant import WEIGHT_DTYPES
    from ..options import DEFAULT

    defaults = RunOptions()  # the library's defaults, written once (prism_ext/options.py)
    run.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                     help="how every device holds the weights: fp32 (default), bf16, int8, int4 (docs/design.md, "
                          "weights); not --weights, the devices' speeds")
    run.add_argument("--wire-dtype", choices=WIRE_DTYPES, default=defaults.wire_dtype)
    run.add_argument("--compression-point", choices=(DEFAULT, *POINTS), default=defaults.compression_point,
                     help="what is averaged (default: the family's: attn_input; kv for Llama, Qwen, Mistral)")
    run.add_argument("--mean-weighting", choices=WEIGHTINGS, default=defaults.mean_weighting)
    run.add_argument("--exact-rows", default=defaults.exact_rows, metavar="SPEC",
                     help="rows sent as their own rows instead of averaged: none, first, special (position 0 and "
                          "special tokens), top<K> (K largest-norm rows per device), adaptive (group the other rows at "
                          "their largest jumps), joined by '+' (default: the family's: none; first for Llama, Qwen, "
                          "Mistral; docs/eval.md)")
    run.add_argument("--weights", type=weights, help="relative device speeds, e.g. 2,1,1,1: positions split in proportion")
    run.add_argument("--auto-weights", action="store_true",
                     help="time a short forward on every device, split positions by measured speed, print the plan")
    run.add_argument("--no-compare", action="store_true", help="skip the single-device and Voltage peer runs")
    run.add_argument("--json", action="store_true", help="print one JSON object per input (JSON Lines)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines or bar on stderr")
    run.set_defaults(func=_run)

"""``prism finetune``: PRISM-aware distillation (:mod:`prism_ext.training.finetune`)."""

from __future__ import annotations

import argparse
import sys

from .args import Bounded, counts, one_line_errors, positive, threads, user_errors, words

_FINITE = sys.float_info.max


@user_errors("finetune")
def _finetune(args: argparse.Namespace) -> int:
    import torch

    from ..training import finetune as ft
    from .. import jobs
    from ..inputs.corpus import TextCorpus

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = ft.resolve_device(args.device)  # --device cuda without CUDA: refused before the model loads
    model = jobs.load_model(args.model)
    task = args.task or ft.default_task(model.net)
    ft.check_task(model.net, task)
    given = {"exact_rows": args.exact_rows, "report_exact_rows": args.report_exact_rows,
             "exact_fraction": args.exact_fraction, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "distill_layers": args.distill_layers}  # None: the task's default (finetune.TASK_DEFAULTS)
    recipe = ft.Recipe(task=task, devices=tuple(args.devices), crs=tuple(args.cr),
                       **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()},
                       hidden_weight=args.hidden_weight, max_length=args.max_length, held_out=args.held_out,
                       seed=args.seed, held_out_max=args.held_out_max, shuffle_buffer=args.shuffle_buffer,
                       precision=args.precision)
    for spec in set(recipe.exact_rows) | set(recipe.report_exact_rows):  # every knob checked before any work
        model.exact_rows(spec)
    held = None
    if args.held_out_data:
        held = ft.read_data(model, task, args.held_out_data, glue_task=args.glue_task)
        if isinstance(held, TextCorpus):  # a held-out set of its own is read whole: it is reported on
            held = ft.corpus_examples(model, task, list(dict.fromkeys(held.lines())), args.max_length,
                                      held.source())
    exclude = held.items if held is not None and held.kind == "text" else ()
    data = ft.read_data(model, task, args.data, glue_task=args.glue_task,
                        held_out=0.0 if held is not None else args.held_out, seed=args.seed,
                        held_out_max=args.held_out_max, exclude=exclude)

    def log(msg: str) -> None:
        if not args.quiet:
            from ..util.progress import write

            write(msg, file=sys.stderr)

    command = "prism finetune " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["finetune"] else None
    report = ft.finetune(model, data, recipe, args.out, resume=args.resume, quiet=args.quiet, log=log, held=held,
                         save_every=args.save_every, command=command, device=device)
    print(ft.format_report(report))
    print(f"wrote {args.out} (a Hugging Face checkpoint with prism_finetune.json)")
    return 0


def register(sub) -> None:
    from ..training.finetune import DEVICES, DISTILL_LAYERS, PRECISIONS, TASKS

    p = one_line_errors(sub.add_parser(
        "finetune", help="PRISM-aware distillation: a checkpoint that holds its quality under compression",
        description="Distil a checkpoint into a student trained through PRISM's differentiable twin at random "
                    "(devices, CR); report held-out fidelity before and after, measured by the engine; write a "
                    "Hugging Face checkpoint with prism_finetune.json (needs no extra)."), "finetune")
    p.add_argument("--model", required=True, help="a checkpoint directory or a bundled name (the teacher)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="text: files, folders of .txt files or glob patterns (one example per line, streamed from "
                        "disk); a folder of images (class sub-folders give labels), a CIFAR python-batches folder, "
                        "or a GLUE TSV with --glue-task")
    p.add_argument("--task", choices=TASKS, help="default: lm for GPT-2, classify with a classifier head, else embed")
    p.add_argument("--glue-task", help="read --data as a GLUE TSV of this task (single sentences, e.g. sst2)")
    p.add_argument("--devices", "-P", type=counts, default=[2, 3, 4], help="device counts (default 2,3,4)")
    p.add_argument("--cr", type=counts, default=[4, 8, 16], help="compression rates (default 4,8,16)")
    p.add_argument("--exact-rows", type=words,
                   help="exact-rows specs drawn per batch (default: embed none,special+adaptive; else default, the "
                        "family's own: first for the Llama family, none for the others)")
    p.add_argument("--report-exact-rows", type=words,
                   help="exact-rows specs of the before/after report (default: as --exact-rows' default)")
    p.add_argument("--exact-fraction", type=Bounded(0, 1, real=True),
                   help="share of batches run exactly on one device, to keep the exact mode "
                        "(default: embed 0.5, else 0.25)")
    p.add_argument("--steps", type=positive, help="default: embed 2000, lm 400, classify 300")
    p.add_argument("--batch-size", type=positive, help="default: embed 32, else 8")
    p.add_argument("--lr", type=Bounded(0, _FINITE, real=True), help="default: embed and lm 1e-4, classify 5e-5")
    p.add_argument("--distill-layers", choices=DISTILL_LAYERS,
                   help="all: every layer's hidden state (relative MSE) beside the task loss; last: the task loss "
                        "(embed: with the last hidden state) (default: embed all, else last)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the twin and the teacher train: auto (CUDA when torch finds it), cpu, cuda "
                        "(the checkpoint is the same kind either way; the report runs the engine on the CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the student's forward and loss: fp32, or bf16 under torch.autocast (about half the "
                        "step time where the CPU or GPU multiplies bfloat16; weights, optimizer and the "
                        "teacher's targets stay float32) (default fp32)")
    p.add_argument("--hidden-weight", type=Bounded(0, _FINITE, real=True), default=1.0, help="embed: weight of the hidden-state MSE")
    p.add_argument("--max-length", type=positive, default=256, help="tokens per text (longer ones are cut)")
    p.add_argument("--held-out", type=Bounded(0, 0.9, real=True), default=0.1, help="share of distinct examples held out (default 0.1)")
    p.add_argument("--held-out-data", nargs="+", metavar="PATH",
                   help="a held-out set of its own (same formats as --data); then --data is all training data "
                        "(its texts that are held out never train)")
    p.add_argument("--held-out-max", type=positive, default=1000,
                   help="text corpora: at most this many held-out texts reported (default 1000)")
    p.add_argument("--shuffle-buffer", type=positive, default=4096,
                   help="text corpora: lines held in memory to shuffle the stream (default 4096)")
    p.add_argument("--seed", type=Bounded(-(2**63), 2**64 - 1), default=0)
    p.add_argument("--out", required=True, help="the output checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the state saved in --out")
    p.add_argument("--save-every", type=positive, default=50, help="steps between resumable states")
    p.add_argument("--threads", type=threads, help="torch threads (default: torch's)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=_finetune)

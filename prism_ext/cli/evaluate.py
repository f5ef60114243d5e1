"""``prism eval``: the accuracy-against-cost grid (:mod:`prism_ext.evaluation`)."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from .args import counts, one_line_errors, positive, user_errors, words


@user_errors("eval")
def _eval(args: argparse.Namespace) -> int:
    from .. import evaluation, jobs
    from ..options import RunOptions

    model = jobs.load_model(args.model, args.weight_dtype)
    out = Path(args.out)
    # Every knob is checked (RunOptions, exact rows against the model, the schedule) before the first point runs.
    variants = [evaluation.Variant(RunOptions(**dict(zip(evaluation.KNOBS, knobs))), schedule)
                for *knobs, schedule in itertools.product(args.exact_rows, args.wire_dtype, args.compression_point,
                                                          args.mean_weighting, args.schedule)]
    for v in variants:
        model.exact_rows(v.options.exact_rows)
        evaluation.cr_for_schedule(v.schedule, 2, len(model.net.blocks))
    task = evaluation.build_task(model, args.task, args.data, args.label_map, args.limit, out)
    result = evaluation.evaluate(model, task, args.devices, args.cr, variants, mode=args.mode, batch=args.batch_size,
                                 quiet=args.quiet)
    result["command"] = "prism eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None
    paths = evaluation.write_report(result, out, args.name or args.task)
    print(evaluation.markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def register(sub) -> None:
    from ..evaluation import SCHEDULES, TASKS

    ev = one_line_errors(sub.add_parser(
        "eval", help="accuracy and fidelity against bytes and FLOPs over devices x CR x knobs",
        description="Run a task through the engine (simulated devices) at every grid point and write JSON, "
                    "a markdown table and a PNG plot (needs the `eval` and `plot` extras)."), "eval")
    ev.add_argument("--model", required=True, help="a checkpoint directory, a .gguf file or a bundled name")
    ev.add_argument("--task", required=True, choices=TASKS)
    ev.add_argument("--data", help="the task's data (see docs/eval.md); some tasks have a built-in default")
    ev.add_argument("--label-map", help="image folder task: a synset mapping text or a JSON {folder: label}")
    ev.add_argument("--devices", "-P", type=counts, default=[2, 4], help="device counts (default 2,4)")
    ev.add_argument("--cr", type=counts, default=[1, 2, 4, 8, 16, 32, 64, 128],
                    help="compression rates (default 1,2,...,128)")
    ev.add_argument("--mode", choices=("prism", "voltage"), default="prism")
    from ..models.quant import WEIGHT_DTYPES
    from ..options import RunOptions

    defaults = RunOptions()  # the library's defaults, written once (prism_ext/options.py)
    ev.add_argument("--exact-rows", type=words, default=[defaults.exact_rows],
                    help="comma-separated exact-rows specs (default: the family's)")
    ev.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                    help="how the weights are held (default fp32; the exact reference is the same weights)")
    ev.add_argument("--wire-dtype", type=words, default=[defaults.wire_dtype], help="comma-separated wire dtypes")
    ev.add_argument("--compression-point", type=words, default=[defaults.compression_point])
    ev.add_argument("--mean-weighting", type=words, default=[defaults.mean_weighting])
    ev.add_argument("--schedule", type=words, default=["flat"], help=f"per-layer CR: {', '.join(SCHEDULES)}")
    ev.add_argument("--limit", type=positive, help="at most this many items")
    ev.add_argument("--batch-size", type=positive, default=16, help="sequences per engine call (same length only)")
    ev.add_argument("--out", default="eval-out", help="folder for the JSON, markdown and PNG")
    ev.add_argument("--name", help="file stem of the outputs (default: the task)")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)

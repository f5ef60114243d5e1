"""``prism quantize``: a checkpoint with its weights in fewer bits, written
once on a workstation so that a board loads the small file
(:func:`prism_ext.models.write_quantized`)."""

from __future__ import annotations

import argparse

from .args import one_line_errors, user_errors


@user_errors("quantize")
def _quantize(args: argparse.Namespace) -> int:
    from .. import jobs
    from ..models import skeleton_network, write_quantized

    calibration = None
    if args.calibration:
        from ..inputs.corpus import read_lines, text_files

        calibration = read_lines(text_files(args.calibration, "calibration"), "calibration")
    model = jobs.load_model(args.model, args.weight_dtype, calibration)
    out = write_quantized(model.net, model.directory, args.out)
    mib = 1 << 20
    fp32 = skeleton_network(args.model).weight_bytes_as("fp32")
    print(f"wrote {out} ({args.weight_dtype}: {model.net.weight_bytes() / mib:.1f} MiB of weights, fp32 "
          f"{fp32 / mib:.1f} MiB; weights digest {model.net.weights_digest()[:12]})")
    return 0


def register(sub) -> None:
    from ..models.quant import WEIGHT_DTYPES

    p = one_line_errors(sub.add_parser(
        "quantize", help="write a checkpoint whose weights are bf16, int8 or int4, for boards that load it directly",
        description="Load a checkpoint, store its weights as --weight-dtype (every block's matrices and the token "
                    "embedding / LM head; docs/design.md) and write it to --out: `prism run --model OUT` on a "
                    "board then loads the small weights without the float32 file."), "quantize")
    p.add_argument("--model", required=True, help="a checkpoint directory or a bundled name (fp32 or bf16 weights)")
    p.add_argument("--weight-dtype", required=True, choices=WEIGHT_DTYPES[1:])
    p.add_argument("--out", required=True, help="the output directory")
    p.add_argument("--calibration", nargs="+", metavar="TEXT",
                   help="int4 of a text model: text files, folders of .txt files or globs, one text per line, like "
                        "what the model will read; the codes are then chosen by GPTQ for them (reads at most "
                        "200,000 tokens; all-MiniLM-L6-v2: cosine to fp32 0.972 -> 0.992) instead of rounded "
                        "to nearest")
    p.set_defaults(func=_quantize)

"""``prism demo``: the bundled models on P devices."""

from __future__ import annotations

import argparse
import json

from .args import one_line_errors, positive, user_errors


@user_errors("demo")
def _demo(args: argparse.Namespace) -> int:
    from .. import jobs

    quick = dict(max_new_tokens=16, digits=4, full_test_set=False) if args.quick else {}
    result = jobs.demo(devices=args.devices, gpt_cr=args.cr, vit_cr=args.cr, figure=args.out, quiet=args.quiet,
                       simulate=args.simulate, **quick)
    print(json.dumps(result, indent=1) if args.json else jobs.format_demo(result))
    return 0


def register(sub) -> None:
    demo = one_line_errors(sub.add_parser("demo", help="the bundled models on 4 devices (processes on this machine)"),
                            "demo")
    demo.add_argument("--devices", "-P", type=positive, default=4,
                      help="devices: processes on this machine over loopback (default 4)")
    demo.add_argument("--simulate", action="store_true", help="run the devices as threads of this process")
    demo.add_argument("--cr", type=positive, default=4, help="compression rate (default 4)")
    demo.add_argument("--out", default="prism-demo.png", help="where to write the figure (default ./prism-demo.png)")
    demo.add_argument("--quick", action="store_true", help="fewer tokens and digits (for tests)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(func=_demo)

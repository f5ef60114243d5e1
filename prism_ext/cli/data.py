"""``prism data``: corpora for ``prism finetune`` from what the machine has (:mod:`prism_ext.inputs.docstrings`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import one_line_errors, positive, user_errors


@user_errors("data")
def _docstrings(args: argparse.Namespace) -> int:
    from ..inputs import corpus, docstrings

    if args.min_words > args.max_words:
        raise ValueError(f"--max-words: {args.max_words} is below --min-words {args.min_words}")
    roots = [Path(r) for r in args.root] if args.root else docstrings.default_roots(args.stdlib)
    for r in roots:
        if not r.is_dir():
            raise ValueError(f"--root: {r} is not a folder")
    exclude = list(corpus.read_lines(corpus.text_files(args.exclude))) if args.exclude else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:  # written as found: the corpus is never held whole
        for text in docstrings.paragraphs(roots, min_words=args.min_words, max_words=args.max_words,
                                          exclude=exclude):
            f.write(text + "\n")
            count += 1
    tmp.replace(out)
    print(f"wrote {count} paragraphs of docstrings from {', '.join(map(str, roots))} to {out} "
          f"({len(exclude)} excluded texts)")
    return 0


def register(sub) -> None:
    p = one_line_errors(sub.add_parser(
        "data", help="make an unlabelled text corpus for prism finetune from what this machine has",
        description="Corpora for `prism finetune --data` (one text per line)."), "data")
    kinds = p.add_subparsers(dest="kind", required=True)
    d = one_line_errors(kinds.add_parser(
        "docstrings", help="paragraphs of the docstrings of the installed packages",
        description="Walk site-packages (or --root), parse every .py file with ast (nothing is imported) and "
                    "write each distinct docstring paragraph of --min-words to --max-words words as one line; "
                    "texts of --exclude (e.g. a held-out file) are left out."), "data docstrings")
    d.add_argument("--out", required=True, help="the text file to write")
    d.add_argument("--root", action="append", help="a folder to walk instead of site-packages (repeatable)")
    d.add_argument("--stdlib", action="store_true", help="also the standard library's modules")
    d.add_argument("--exclude", nargs="+", default=[], metavar="FILE",
                   help="text files (or folders, globs) whose lines must not appear, e.g. the held-out texts")
    d.add_argument("--min-words", type=positive, default=20, help="shortest paragraph kept (default 20 words)")
    d.add_argument("--max-words", type=positive, default=300, help="longest paragraph kept (default 300 words)")
    d.set_defaults(func=_docstrings)

"""Write the paragraphs of Python's own pydoc_data.topics, one per line: the
text data of bench/FINETUNE.md's MiniLM run (``prism finetune --data``).

A paragraph is a run of non-blank lines, joined with spaces; only those of
at least ``--min-words`` words are kept (headings and code fragments are
shorter), each once, in the order of the sorted topic names.

    python bench/pydoc_paragraphs.py --out /tmp/pydoc_paragraphs.txt
"""

from __future__ import annotations

import argparse
import re


def paragraphs(min_words: int) -> list[str]:
    from pydoc_data.topics import topics

    seen, out = set(), []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            if len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-words", type=int, default=40)
    args = parser.parse_args()
    lines = paragraphs(args.min_words)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} paragraphs -> {args.out}")


if __name__ == "__main__":
    main()

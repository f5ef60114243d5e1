"""The `prism` command run in process, for the CLI tests."""

from __future__ import annotations

from prism_ext.cli import main


def prism(capsys, *argv):
    """Run `prism ARGV` in process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err

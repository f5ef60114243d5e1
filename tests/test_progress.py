"""prism_ext.util.progress: a bar on stderr only when it is a terminal and not quiet;
the demo without matplotlib still runs and says how to get its figure."""

from __future__ import annotations

import io
import sys

from PIL import Image

from prism_ext.cli import main
from prism_ext.util.progress import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal_and_not_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert "work" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    for quiet, stream in ((True, _Terminal()), (False, io.StringIO())):  # --quiet, or stderr not a terminal
        monkeypatch.setattr(sys, "stderr", stream)
        with progress(total=5, desc="work", quiet=quiet) as bar:
            bar.update(5)
        assert stream.getvalue() == ""


def _demo(capsys, *argv):
    code = main(["demo", "--quick", "--simulate", "-P", "2", "-q", *argv])
    return code, *capsys.readouterr()


def test_demo_figure_is_a_readable_png(capsys, tmp_path):
    code, out, err = _demo(capsys, "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    with Image.open(tmp_path / "d.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 250
        assert len(im.convert("RGB").getcolors(1 << 20)) > 50  # drawn, not blank


def test_demo_without_matplotlib_says_how_to_get_the_figure(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = _demo(capsys, "--out", str(tmp_path / "d.png"))
    assert code == 0, err
    assert "no figure: figures need matplotlib: pip install 'prism-ext[plot]'" in out
    assert not (tmp_path / "d.png").exists()

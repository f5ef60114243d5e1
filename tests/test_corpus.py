"""Unlabelled text at scale: prism_ext.inputs.corpus (files, folders and
globs read lazily, a bounded shuffle, a held-out split by a hash of the
text) and `prism data docstrings` (prism_ext.inputs.docstrings)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from cli_helpers import prism
from prism_ext.inputs import corpus, docstrings


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_files_folders_and_globs(tmp_path):
    a = _write(tmp_path / "a.txt", ["one", "", "two"])
    b = _write(tmp_path / "sub" / "b.txt", ["three"])
    _write(tmp_path / "sub" / "c.txt", ["four"])
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")  # not text: a folder's .txt files only
    assert corpus.text_files([str(a)]) == [a]
    assert corpus.text_files([str(a), str(b)]) == [a, b]
    assert corpus.text_files([str(tmp_path / "sub")]) == [b, tmp_path / "sub" / "c.txt"]
    assert corpus.text_files([str(tmp_path / "**" / "*.txt")]) == [a, b, tmp_path / "sub" / "c.txt"]
    assert list(corpus.read_lines([a, b])) == ["one", "two", "three"]
    with pytest.raises(FileNotFoundError, match="data: .*nothing.txt"):
        corpus.text_files([str(tmp_path / "nothing.txt")])
    with pytest.raises(ValueError, match=r"data: .*\*.md matches no file"):
        corpus.text_files([str(tmp_path / "*.md")])
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="data: .*bad.txt is not UTF-8"):
        list(corpus.read_lines([tmp_path / "bad.txt"]))


def test_the_shuffle_reads_lazily_with_a_bounded_buffer():
    consumed = itertools.count()

    def endless():  # a corpus far larger than memory: reading it all would never end
        for i in consumed:
            yield f"line {i}"

    stream = corpus.shuffled(endless(), buffer=64, rng=random.Random(0))
    first = [next(stream) for _ in range(10)]
    assert next(consumed) <= 64 + 10 + 1  # no more read than the buffer and what was taken
    assert first != [f"line {i}" for i in range(10)]  # shuffled
    assert sorted(corpus.shuffled(iter(range(100)), buffer=8, rng=random.Random(1))) == list(range(100))


def test_the_held_out_split_is_a_hash_of_the_text(tmp_path):
    texts = [f"paragraph number {i} of a corpus" for i in range(2000)]
    held = {t for t in texts if corpus.is_held_out(t, 0.1)}
    assert 150 < len(held) < 250  # about 10%
    assert held == {t for t in reversed(texts) if corpus.is_held_out(t, 0.1)}  # order and files do not matter
    assert {t for t in texts if corpus.is_held_out(t, 0.1, seed=1)} != held  # the seed chooses another split
    a = _write(tmp_path / "a.txt", texts[:1000] + texts[:50])  # duplicates land on the same side
    b = _write(tmp_path / "b.txt", texts[1000:])
    c = corpus.TextCorpus.from_specs([str(a), str(b)], held_out=0.1)
    assert sorted(c.held_out_texts()) == sorted(held)
    train = list(c.train_lines())
    assert len(train) == 2050 - len(held) - sum(t in held for t in texts[:50])
    assert not held & set(train)
    capped = corpus.TextCorpus.from_specs([str(a), str(b)], held_out=0.1, held_out_max=20).held_out_texts()
    assert len(capped) == 20 and set(capped) <= held and not set(capped) & set(c.train_lines())


def _package(root):
    """A fake installed package: importing it would fail loudly."""
    _write(root / "pkg" / "__init__.py", [
        '"""The package docstring has one long paragraph of prose about the things it does for you.',
        "",
        "Short.",
        "",
        ">>> print('a doctest is code, not prose, and is never taken as a paragraph here at all')",
        '"""',
        "raise SystemExit('imported!')",
        "def f():",
        '    """A function whose docstring explains in plain words what the function returns to you.',
        "",
        "    The package docstring has one long paragraph of prose about the things it does for you.",
        '    """',
        "class C:",
        '    """A held out paragraph that must never appear in the written corpus file at all."""',
        "class D:",  # the escape is the docstring's own: a NUL byte in the text, never written to a line
        '    """Files with a \\x00 byte between the letters are probably UTF16 text, this paragraph says."""',
    ])
    _write(root / "pkg" / "broken.py", ["def (:"])  # not Python 3 any more: skipped


def test_docstring_paragraphs_without_importing(tmp_path):
    _package(tmp_path / "site")
    got = list(docstrings.paragraphs([tmp_path / "site"], min_words=8, max_words=40))
    assert got == ["The package docstring has one long paragraph of prose about the things it does for you.",
                   "A function whose docstring explains in plain words what the function returns to you.",
                   "A held out paragraph that must never appear in the written corpus file at all."]
    assert list(docstrings.paragraphs([tmp_path / "site"], min_words=8, max_words=15)) == got[1:]


def test_prism_data_docstrings(tmp_path, capsys):
    _package(tmp_path / "site")
    held = _write(tmp_path / "held.txt", ["A held  out paragraph that must never appear in the written corpus file at all."])
    out = tmp_path / "corpus.txt"
    code, stdout, stderr = prism(capsys, "data", "docstrings", "--out", str(out), "--root", str(tmp_path / "site"),
                                 "--exclude", str(held), "--min-words", "8")
    assert code == 0, stderr
    assert out.read_text().splitlines() == [
        "The package docstring has one long paragraph of prose about the things it does for you.",
        "A function whose docstring explains in plain words what the function returns to you."]
    assert "2 paragraphs" in stdout
    code, _, stderr = prism(capsys, "data", "docstrings", "--out", str(out), "--min-words", "9",
                            "--max-words", "3")
    assert code == 2 and "max-words" in stderr and stderr.count("\n") == 1
    code, _, stderr = prism(capsys, "data", "docstrings", "--out", str(out), "--root", str(tmp_path / "none"))
    assert code == 2 and "root" in stderr and stderr.count("\n") == 1


def test_the_default_roots_are_this_pythons_site_packages():
    import sysconfig

    import torch

    roots = docstrings.default_roots()
    assert Path(sysconfig.get_paths()["purelib"]).resolve() in roots
    assert any(Path(torch.__file__).resolve().is_relative_to(r) for r in roots)  # wherever torch is installed
    assert Path(sysconfig.get_paths()["stdlib"]).resolve() == docstrings.default_roots(stdlib=True)[0]

"""The README's code runs as written: every ```python block, and every ```sh
block that needs neither root nor a second machine. A block that is not run
says why in a ``<!-- readme-test: not run: REASON -->`` line above it; a
``<!-- readme-test: background server on port N -->`` block starts its first
line as a server (on a free port instead of N), waits until ``/health``
answers, then runs the rest of its lines as the server's clients.

Needs the source tree's README.md (the wheel tests leave this module out, like
the bench/ ones)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from process_helpers import free_port, wait_gone

README = Path(__file__).resolve().parent.parent / "README.md"
if not README.is_file():
    pytest.skip(f"no README.md next to the tests ({README}): not a source tree", allow_module_level=True)

_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<note>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text()
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code"))  # 0-based line of the fence + 1: the code's first line
        yield pytest.param(m["lang"], m["code"], m["note"] or "", id=f"README.md:{line}-{m['lang']}")


BLOCKS = list(_blocks())


def _env() -> dict:
    # The `prism` of the interpreter running the tests, whatever PATH says.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONUNBUFFERED="1")


def test_every_block_is_run_or_says_why():
    assert BLOCKS, "no code blocks found in README.md"
    for p in BLOCKS:
        lang, _, note = p.values
        assert lang in ("python", "sh"), f"{p.id}: a block of unknown language {lang!r}"
        if note:
            assert note.startswith(("not run: ", "background server on port ")), f"{p.id}: unknown note {note!r}"
            if note.startswith("not run: "):
                assert len(note) > len("not run: ") + 5, f"{p.id}: a block not run must say why"


@pytest.mark.parametrize("lang, code, note", BLOCKS)
def test_readme_block_runs(lang, code, note, tmp_path):
    if note.startswith("not run: "):
        return  # the reason is checked above; nothing to run
    if lang == "python":
        # A process of its own: a block may start a cluster or set the thread count.
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"the block failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
        # An example shows the library used well: a warning there is a bad example (or a warning for nothing).
        assert "Warning" not in r.stderr, f"the block warns:\n{r.stderr[-3000:]}"
    elif note.startswith("background server on port "):
        _run_server_block(code, int(note.rsplit(" ", 1)[1]), tmp_path)
    else:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"the block failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def _run_server_block(code: str, port: int, tmp_path: Path) -> None:
    lines = [line for line in code.splitlines() if line.strip()]
    ours = free_port()
    serve, clients = lines[0].replace(str(port), str(ours)), [c.replace(str(port), str(ours)) for c in lines[1:]]
    server = subprocess.Popen(shlex.split(serve, comments=True), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"{serve!r} exited ({server.returncode}):\n{server.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{serve!r} did not answer /health within 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ours}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        for client in clients:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", client], cwd=tmp_path, env=_env(),
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{client!r} failed ({r.returncode}): {r.stderr[-2000:]}"
            assert r.stdout.strip(), f"{client!r} printed nothing"
            assert '"error"' not in r.stdout, f"{client!r} got an error: {r.stdout[:2000]}"
    finally:
        # Ctrl-C, as the README says: the server drains and stops its workers.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        assert not wait_gone([server.pid], 10)

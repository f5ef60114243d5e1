"""The `prism serve` test harness shared by test_serve and test_serve_openai: a real
server in a subprocess, the API key, what the tiny models are asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx  # a test extra, like the serve extra's packages

from process_helpers import descendants, free_port, wait_gone

PRISM = [sys.executable, "-m", "prism_ext"]
KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

PROMPT = "The for statement is used to iterate"
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "edge devices share the work", "short one!"]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


class Server:
    """`prism serve` in a subprocess, started away from the source tree."""

    def __init__(self, tmp: Path, *args: str, api_key: str | None = KEY, before_health=None):
        self.port = free_port()
        self.log = tmp / f"serve-{self.port}.log"
        argv = PRISM + ["serve", *args, "--port", str(self.port)] + (["--api-key", api_key] if api_key else [])
        self.proc = subprocess.Popen(argv, cwd=tmp, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, headers=AUTH if api_key else {}, timeout=90)
        if before_health is not None:
            before_health()
        self.wait_healthy(120)
        self.workers = children(self.proc.pid)

    def wait_healthy(self, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not healthy after {seconds} s: {self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM (the server stops its workers), then whatever is left of
        the server and everything below it is killed: a failed test leaves
        no process behind."""
        below = descendants(self.proc.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in wait_gone(below, 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.client.close()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def events(lines) -> list:
    """Server-sent events' data, parsed ([DONE] kept as is)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def ids_of(text: str) -> list[int]:
    return list(text.encode())  # the byte-level tokenizer: id = byte


def read_all(s) -> bytes:
    """Everything the server sends on socket ``s`` until it closes (a reset ends it too)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def chunked(body: bytes, size: int = 1024) -> list[bytes]:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return parts + [b"0\r\n\r\n"]


def client_of(server, **kw):
    """An OpenAI client of ``server`` (the openai package: a test extra), no retries."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0, **kw)

"""Fuzzing `prism serve` over raw sockets with hypothesis: random HTTP
framings (Content-Length right, short, long, doubled or absent; chunked,
with or without a Content-Length; malformed chunk sizes) around random
bodies (bytes, arbitrary JSON, completion requests with extreme values).
Invariants: no answer is a 500, every JSON error names its field, and after
each example the server still gives the reference completion, with the same
worker process, and rank 0's memory stays bounded."""

from __future__ import annotations

import json
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import KEY, PROMPT, Server, children, chunked, read_all

MAX_BODY = 65536
REFERENCE = {"prompt": PROMPT, "max_tokens": 4}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz"), "--model", "gpt2-tiny", "--devices", "2", "--cr", "2",
               "--max-tokens", "32", "--max-body", str(MAX_BODY), "--body-timeout", "2")
    reference = s.client.post("/v1/completions", json=REFERENCE)
    assert reference.status_code == 200, reference.text
    s.reference = reference.json()["choices"][0]["text"]
    s.workers = children(s.proc.pid)
    s.rss = rss_kib(s.proc.pid)
    yield s
    s.stop()


def exchange(port: int, data: list[bytes]) -> bytes:
    """Send ``data`` and end the request side (a client that sent less than
    it announced is then gone, not slow); what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            for part in data:
                s.sendall(part)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # broken pipe, reset, not connected: answered early (413) and closed
            pass
        return read_all(s)


def check_answer(raw: bytes) -> None:
    if not raw:
        return  # the server may close a connection whose request never completed
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status != 500 and 200 <= status < 600, raw[:500]
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length and len(body) < int(length.group(1)):
        return  # cut short: uvicorn stops writing once it sees the client's half-close (exchange's SHUT_WR)
    if status >= 400 and b"application/json" in head.lower():
        err = json.loads(body)["error"]
        assert err["message"] and (err["param"] is None or err["message"].startswith(err["param"])), err


def assert_still_serving(server) -> None:
    r = server.client.post("/v1/completions", json=REFERENCE)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == server.reference
    assert children(server.proc.pid) == server.workers  # no request took a worker down
    grown = rss_kib(server.proc.pid) - server.rss
    assert grown < 150 * 1024, f"rank 0 grew by {grown} KiB"


NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, -0.0, 1e-300, 1e-45, 5e-324, 1e300, 1.7e308, 2**62, 2**63, 2**64, -2**63]))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
COMPLETION = st.fixed_dictionaries({"prompt": st.sampled_from([PROMPT, "ab", "x", "", "\u00e9\u4e2d" * 3])}, optional={
    "max_tokens": NUMBERS, "temperature": NUMBERS, "top_k": NUMBERS, "seed": NUMBERS,
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5)),
    "stream": st.booleans(), "cr": st.one_of(NUMBERS, st.lists(st.integers(-2, 40), max_size=4)),
    "mode": st.sampled_from(["prism", "single", "tp", "x"]), "exact_rows": st.sampled_from(["special", "top2", "zz", 3]),
    "wire_dtype": st.sampled_from(["fp16", "int8", "int9"]),
})
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    COMPLETION.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda d, n: (b"[" * n) + b"1" + (b"]" * n), st.just(0), st.integers(500, 30000)),  # deep nesting
    st.builds(lambda n: json.dumps({"prompt": "a" * n}).encode(), st.sampled_from([MAX_BODY - 20, MAX_BODY + 1,
                                                                                   3 * MAX_BODY])),
)
FRAMINGS = st.sampled_from(["length", "short", "long", "double", "none", "chunked", "chunked+length",
                            "chunked-bad", "chunked-huge"])


def framed(framing: str, body: bytes, chunk: int) -> tuple[list[str], list[bytes]]:
    """Headers and body parts of one framing."""
    if framing == "length":
        return [f"Content-Length: {len(body)}"], [body]
    if framing == "short":  # fewer bytes announced than sent: the rest is a next (garbage) request
        return [f"Content-Length: {max(0, len(body) - 5)}"], [body]
    if framing == "long":  # more announced than sent, then the client ends
        return [f"Content-Length: {len(body) + 10}"], [body]
    if framing == "double":
        return [f"Content-Length: {len(body)}", "Content-Length: 3"], [body]
    if framing == "none":
        return [], [body]
    if framing == "chunked":
        return ["Transfer-Encoding: chunked"], chunked(body, chunk)
    if framing == "chunked+length":
        return ["Transfer-Encoding: chunked", "Content-Length: 4"], chunked(body, chunk)
    if framing == "chunked-bad":
        return ["Transfer-Encoding: chunked"], [b"zz\r\n", body, b"\r\n0\r\n\r\n"]
    return ["Transfer-Encoding: chunked"], [b"%x\r\n" % (1 << 40), body]  # announces a terabyte


@settings(max_examples=120, deadline=None)
@given(method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
       path=st.sampled_from(["/v1/completions", "/v1/completions", "/v1/embeddings", "/v1/classify", "/health",
                             "/v1/models", "/nothing"]),
       framing=FRAMINGS, body=BODIES, chunk=st.integers(1, 4096), auth=st.booleans(),
       ctype=st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain", None]))
def test_random_framings_and_bodies(server, method, path, framing, body, chunk, auth, ctype):
    headers, parts = framed(framing, body, chunk)
    headers = ["Host: fuzz", "Connection: close", *headers]
    if auth:
        headers.append(f"Authorization: Bearer {KEY}")
    if ctype:
        headers.append(f"Content-Type: {ctype}")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    check_answer(exchange(server.port, [head.encode(), *parts]))
    assert_still_serving(server)


def test_a_large_chunked_body_is_not_read_whole(server):
    """32 MiB sent chunked (the issue's OOM): refused at --max-body, rank 0 does not grow by it."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").encode()
    block = b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20))
    raw = exchange(server.port, [head, b"%x\r\n" % 12, b'{"prompt": "', b"\r\n", *([block] * 32)])
    assert raw.startswith(b"HTTP/1.1 413"), raw[:300]
    assert_still_serving(server)

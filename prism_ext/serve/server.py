"""``prism serve`` as a process: bind the port, load the model, form the
cluster, serve until SIGINT/SIGTERM, drain, stop every device."""

from __future__ import annotations

import socket
import sys

from ..runtime import ClusterError
from .app import create_app
from .backend import Backend
from .options import ServeOptions


def run_server(options: ServeOptions) -> int:
    """``prism serve``: form the cluster, serve HTTP until SIGINT/SIGTERM,
    then drain (in-flight requests finish, queued ones run) and stop every
    device. Returns the exit status."""
    import uvicorn

    from ..jobs import load_model

    options.check()
    sock = _listen(options.host, options.port)  # first: a taken port is one line, with nothing started yet
    try:
        model = load_model(options.model, options.weight_dtype)
        say = (lambda msg: None) if options.quiet else (lambda msg: print(f"prism serve: {msg}", file=sys.stderr,
                                                                          flush=True))
        say(f"starting {options.world or options.devices} devices for {model.model_type} ({options.model})")
        try:
            backend = Backend(model, options)
        except ClusterError as exc:
            print(f"prism serve: {exc}", file=sys.stderr)
            return 1
        app = create_app(backend)
        config = uvicorn.Config(app, log_level="warning" if options.quiet else "info",
                                timeout_graceful_shutdown=options.drain_timeout, lifespan="on")
        server = uvicorn.Server(config)
        say(f"serving {backend.name} on http://{options.host}:{options.port} ({backend.devices} devices)")
        try:
            server.run(sockets=[sock])  # on SIGINT/SIGTERM: drains, closes the backend, then ends by that signal
        finally:
            backend.close()
        return 0
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the cluster starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)  # SO_REUSEADDR, as uvicorn sets it
    except OSError as exc:
        raise OSError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None

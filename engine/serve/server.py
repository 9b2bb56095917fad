"""Run an app under uvicorn: bound before the URL is printed, stopped cleanly on SIGTERM.

Why bind the socket here: with ``serve.port=0`` the OS picks the port, and the printed URL
must be the real one; binding first also means a client that reads the URL can connect at
once. On SIGTERM or Ctrl-C uvicorn stops accepting, lets running responses finish for up to
``GRACE_S`` seconds, then ends the remaining streams; the caller closes the backend after.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable

GRACE_S = 10
"""Seconds running responses get to finish after SIGTERM before their streams are ended."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from engine.errors import UserError

        raise UserError(
            f"serve: cannot listen on {host}:{port} ({e.strerror}); pick another serve.port (0: any free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, *, log_level: str = "warning"):
    """A uvicorn server that stops on SIGTERM / SIGINT and then *returns*.

    uvicorn re-raises the signal after its graceful shutdown, which kills the process before
    the caller can close the model and record the run; being stopped is how a server ends,
    so here the signal is only remembered (``stopped_by``).
    """
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: str | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield  # signals reach the main thread only (tests run servers in threads)
                return
            old = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        def _stop(self, sig, frame) -> None:
            self.stopped_by = signal.Signals(sig).name
            self.handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACE_S, access_log=False)
    return Server(config)


def run(app, host: str, port: int, *, announce: Callable[[str], None] = print) -> tuple[str, str | None]:
    """Serve until SIGTERM / Ctrl-C; returns (the URL it served on, the signal that stopped it)."""
    sock = bind(host, port)
    url = url_of(sock)
    announce(url)
    server = uvicorn_server(app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return url, server.stopped_by

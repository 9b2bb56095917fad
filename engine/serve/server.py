"""The serve stage's work (``serve``), and an app under uvicorn: bound before the URL is printed,
stopped cleanly on SIGTERM.

Why bind the socket here: with ``serve.port=0`` the OS picks the port, and the printed URL
must be the real one; binding first also means a client that reads the URL can connect at
once. On SIGTERM or Ctrl-C uvicorn stops accepting, lets running responses finish for up to
``GRACE_S`` seconds, then ends the remaining streams; the caller closes the backend after.

Why our own HTTP protocol class (``openai_h11``): a request too malformed for the app to see
(a non-numeric or negative Content-Length, an invalid header name, a header block past
``MAX_HEADER_BYTES``, a garbage request line) is answered by uvicorn itself, as plain text.
The subclass answers it in OpenAI's error shape instead (400, or 431 for the header block),
and pins h11: uvicorn's "auto" would switch to httptools when that is installed, whose
answers differ.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable

from engine.errors import UserError
from engine.serve import ServeSpec
from engine.serve.backend import BackendSource
from engine.serve.backends import adapter_fence, open_backend

GRACE_S = 10
"""Seconds running responses get to finish after SIGTERM before their streams are ended."""


def serve(spec: ServeSpec, source: BackendSource) -> dict:
    """Open the preset's backend, serve it under OpenAI's API until SIGTERM / Ctrl-C, close it.

    Prints ``Serving on http://HOST:PORT (playground at .../, OpenAI API at .../v1)``. With an
    evaluated run its adapter is active for the base's id, and its dir is an adapter directory
    too (more of its files load through POST /lora-adapters). Returns the serve stage's metrics.
    """
    # FastAPI and pydantic-settings load when serving, not each time a config is validated.
    from engine.serve.app import build_app
    from engine.settings import settings

    opened = open_backend(spec, source)
    backend = opened.backend
    loaded = [a.name for a in backend.adapters()]
    key = settings().engine_api_key.get_secret_value() if spec.api_key else None
    fence = adapter_fence(spec, source.evaluated)
    app = build_app(backend, spec, api_key=key, adapter_dirs=fence, outputs_dir=spec.runs_dir)
    server = app.state.server
    server.active = opened.active
    try:
        url, stopped_by = run(app, spec.host, spec.port, announce=_announce)
    finally:
        server.close()
        backend.close()
    print(f"[engine] serve: stopped ({stopped_by or 'shutdown'}); {server.served} requests answered", flush=True)
    return {
        "url": url,
        "backend": spec.kind,
        "model": backend.model_id,
        "adapters": loaded,
        "active": {a.name: a.scale for a in opened.active},
        "stopped_by": stopped_by,
        "requests": server.served,
    }


def _announce(url: str) -> None:
    print(f"Serving on {url} (playground at {url}/, OpenAI API at {url}/v1)", flush=True)


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
        raise UserError(
            f"serve: cannot listen on {host}:{port} ({e.strerror}); pick another serve.port (0: any free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


MAX_HEADER_BYTES = 16 * 1024
"""Largest request line + header block (h11's incomplete-event limit); larger gets 431."""


def openai_h11():
    """uvicorn's h11 protocol, answering requests it cannot parse with OpenAI's error body."""
    import json

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from engine.serve.openai import ApiError

    class OpenAIH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.bad_request: h11.RemoteProtocolError | None = None
            conn = getattr(self, "conn", None)
            if not callable(getattr(conn, "next_event", None)):  # another uvicorn: plain answers, still served
                return
            parse = conn.next_event

            def next_event():  # remember why h11 refused the bytes: uvicorn only says that it did
                try:
                    return parse()
                except h11.RemoteProtocolError as e:
                    self.bad_request = e
                    raise

            self.conn.next_event = next_event

        def send_400_response(self, msg: str) -> None:
            try:
                self._send_openai_400()
            except Exception:  # uvicorn's internals moved: its own plain-text 400 rather than none
                super().send_400_response(msg)

        def _send_openai_400(self) -> None:
            e = self.bad_request
            status = getattr(e, "error_status_hint", 400) if e is not None else 400
            if status == 431:
                err = ApiError(
                    431,
                    f"The request line and headers are larger than this server accepts ({MAX_HEADER_BYTES} bytes); "
                    "send fewer or shorter headers.",
                    code="request_headers_too_large",
                )
            else:
                status = 400
                why = str(e)[:120] if e is not None and str(e) else "malformed"
                err = ApiError(
                    400,
                    f"The HTTP request could not be parsed ({why}). Send an HTTP/1.1 request with a valid request line, "
                    "header names of letters, digits and '-', and a non-negative integer Content-Length.",
                    code="invalid_http_request",
                )
            body = json.dumps(err.body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # a response had already started on this connection
                pass
            self.transport.close()

    return OpenAIH11Protocol


def _http_protocol():
    """``openai_h11()`` when this uvicorn has the hook it overrides; else uvicorn's plain h11, with one line.

    The subclass touches uvicorn internals (``H11Protocol.send_400_response``, ``self.conn``): a
    release that moves them costs the OpenAI shape of the malformed-HTTP answers, never the server."""
    try:
        protocol = openai_h11()
        if not callable(getattr(protocol, "send_400_response", None)):
            raise AttributeError("H11Protocol has no send_400_response")
        return protocol
    except Exception as e:  # an optional nicety may not stop the server
        print(f"[engine] serve: malformed HTTP gets uvicorn's plain-text 400 ({type(e).__name__}: {e})", flush=True)
        return "h11"


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

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=GRACE_S,
        access_log=False,
        http=_http_protocol(),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
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

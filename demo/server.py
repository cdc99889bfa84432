"""A loopback HTTP image server with deliberately broken endpoints, for ingestion tests.

Besides the files under ``root_dir`` it serves:

- ``/broken/missing.jpg``       404
- ``/broken/truncated.jpg``     200 image/jpeg, the first half of a valid JPEG
- ``/broken/not-an-image.jpg``  200 "image/jpeg" whose body is HTML
- ``/broken/never-answers.jpg`` accepts the request and never responds (until shutdown, 60 s max)

and, in ``HOSTILE_ENDPOINTS`` (kept apart so the demo corpus's broken rows stay as they are):

- ``/broken/server-error.jpg``  500
- ``/broken/empty.jpg``         200 image/jpeg with a zero-byte body
- ``/broken/bomb.png``          a valid 10000x10000 PNG (100 Mpx, ~12 KB compressed)
- ``/broken/loop.jpg``          302 to itself, forever
- ``/broken/slow-drip.jpg``     a valid JPEG sent one byte every 0.2 s (past any test deadline)
- ``/optout/<path>``            the file at ``<path>`` with ``X-Robots-Tag: noai, noimageai``
- ``/redirect/<n>/<path>``      ``n`` chained 302 redirects, then the file at ``<path>``
- ``/trickle/<path>``           the file at ``<path>``, one small chunk every 0.2 s
- ``/copy/<name>/<path>``       the file at ``<path>`` under another URL (a duplicate image)
"""

from __future__ import annotations

import io
import ipaddress
import mimetypes
import os
import posixpath
import struct
import sys
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

BROKEN_ENDPOINTS: dict[str, str] = {
    "missing": "/broken/missing.jpg",
    "truncated": "/broken/truncated.jpg",
    "not_an_image": "/broken/not-an-image.jpg",
    "never_answers": "/broken/never-answers.jpg",
}
HOSTILE_ENDPOINTS: dict[str, str] = {
    "server_error": "/broken/server-error.jpg",
    "empty": "/broken/empty.jpg",
    "bomb": "/broken/bomb.png",
    "redirect_loop": "/broken/loop.jpg",
    "slow_drip": "/broken/slow-drip.jpg",
}
_NEVER_ANSWERS_MAX_S = 60.0
_TRICKLE_CHUNK = 64
_TRICKLE_PERIOD_S = 0.2
_HTML = b"<!doctype html><html><body><h1>Not an image</h1></body></html>\n"


def _valid_jpeg() -> bytes:
    # Noise makes the entropy-coded data dominate, so half the file cuts into the scan.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


_bomb_lock = threading.Lock()
_bomb: bytes | None = None


def _bomb_png() -> bytes:
    """A valid 10000x10000 1-bit black PNG, built once per process: 100 Mpx (300 MB once
    decoded to RGB) from a body of about 12 KB. Written chunk by chunk, since Pillow takes
    seconds to encode it."""
    global _bomb
    with _bomb_lock:
        if _bomb is None:
            side = 10_000
            row = b"\x00" * (1 + side // 8)  # filter byte + 1-bit pixels

            def chunk(kind: bytes, data: bytes) -> bytes:
                return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

            ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
            _bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))
        return _bomb


def _check_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"ImageServer binds only loopback IPv4 addresses, got {host!r}") from None
    if addr.version != 4 or not addr.is_loopback:
        raise ValueError(f"ImageServer binds only loopback IPv4 addresses, got {host!r}")
    return host


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # http.server writes the headers and the body with separate sends; with Nagle on, the
    # body of every response on a kept-alive connection waited ~40 ms for the client's
    # delayed ACK of the headers. Web servers set TCP_NODELAY on keep-alive connections
    # (nginx's tcp_nodelay is on by default), so the test server does too.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass

    def do_HEAD(self):
        self._dispatch(head=True)

    def do_GET(self):
        self._dispatch(head=False)

    def _dispatch(self, head: bool):
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.hits += 1
            self.server.paths[path] = self.server.paths.get(path, 0) + 1
        if path == BROKEN_ENDPOINTS["missing"]:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head=head)
        elif path == BROKEN_ENDPOINTS["truncated"]:
            jpeg = self.server.jpeg
            self._send(HTTPStatus.OK, jpeg[: len(jpeg) // 2], "image/jpeg", head=head)
        elif path == BROKEN_ENDPOINTS["not_an_image"]:
            self._send(HTTPStatus.OK, _HTML, "image/jpeg", head=head)
        elif path == BROKEN_ENDPOINTS["never_answers"]:
            self.server.stopping.wait(_NEVER_ANSWERS_MAX_S)
            self.close_connection = True
        elif path == HOSTILE_ENDPOINTS["server_error"]:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"oops\n", "text/plain", head=head)
        elif path == HOSTILE_ENDPOINTS["empty"]:
            self._send(HTTPStatus.OK, b"", "image/jpeg", head=head)
        elif path == HOSTILE_ENDPOINTS["bomb"]:
            self._send(HTTPStatus.OK, _bomb_png(), "image/png", head=head)
        elif path == HOSTILE_ENDPOINTS["redirect_loop"]:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == HOSTILE_ENDPOINTS["slow_drip"]:
            self._send(HTTPStatus.OK, self.server.jpeg, "image/jpeg", head=head, trickle=True, chunk=1)
        elif path.startswith("/copy/"):
            self._send_file("/" + path[len("/copy/"):].partition("/")[2], head)
        elif path.startswith("/optout/"):
            self._send_file(path[len("/optout") :], head, {"X-Robots-Tag": "noai, noimageai"})
        elif path.startswith("/redirect/"):
            self._redirect(path, head)
        elif path.startswith("/trickle/"):
            self._send_file(path[len("/trickle") :], head, trickle=True)
        else:
            self._send_file(path, head)

    def _redirect(self, path: str, head: bool):
        _, _, rest = path.partition("/redirect/")
        hops, _, target = rest.partition("/")
        if not hops.isdigit():
            self._send(HTTPStatus.NOT_FOUND, b"bad redirect\n", "text/plain", head=head)
            return
        n = int(hops)
        location = f"/redirect/{n - 1}/{target}" if n > 1 else f"/{target}"
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_file(self, path: str, head: bool, extra=None, trickle: bool = False):
        rel = posixpath.normpath(path).lstrip("/")
        full = (self.server.root / rel).resolve()
        if rel.startswith("..") or not full.is_relative_to(self.server.root) or not full.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head=head)
            return
        ctype = mimetypes.guess_type(full.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, full.read_bytes(), ctype, head=head, extra=extra, trickle=trickle)

    def _send(self, status, body: bytes, ctype: str, *, head: bool, extra=None, trickle=False,
              chunk: int = _TRICKLE_CHUNK):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        try:
            if not trickle:
                self.wfile.write(body)
                return
            for start in range(0, len(body), chunk):
                if self.server.stopping.wait(_TRICKLE_PERIOD_S):
                    return
                self.wfile.write(body[start : start + chunk])
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up; that is what the tests provoke


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    jpeg: bytes
    stopping: threading.Event
    lock: threading.Lock
    hits: int = 0
    paths: dict[str, int]

    def handle_error(self, request, client_address):
        # Clients hanging up mid-request is what the tests provoke; stay quiet about it.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class ImageServer:
    """Serve ``root_dir`` (and the broken endpoints) on a loopback port in a daemon thread.

    Use as a context manager; ``port=0`` picks a free port, read it back from ``.url``.
    """

    def __init__(self, root_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root_dir).resolve()
        self.host = _check_loopback(host)
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ImageServer is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def request_count(self) -> int:
        """Requests received so far (lets tests prove that a refused fetch never connected)."""
        return self._server.hits if self._server is not None else 0

    def requests_for(self, path: str) -> int:
        """Requests received so far for one path."""
        if self._server is None:
            return 0
        with self._server.lock:
            return self._server.paths.get(path, 0)

    def broken_urls(self) -> dict[str, str]:
        return {hint: self.url + path for hint, path in BROKEN_ENDPOINTS.items()}

    def hostile_urls(self) -> dict[str, str]:
        return {hint: self.url + path for hint, path in HOSTILE_ENDPOINTS.items()}

    def start(self) -> ImageServer:
        server = _Server((self.host, self.port), _Handler)
        server.root = self.root
        server.jpeg = _valid_jpeg()
        server.stopping = threading.Event()
        server.lock = threading.Lock()
        server.paths = {}
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"image-server-{server.server_address[1]}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        # Release parked handlers first so nothing outlives the server.
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve a directory of images on loopback.")
    parser.add_argument("root_dir")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with ImageServer(args.root_dir, port=args.port) as srv:
        print(f"serving {args.root_dir} at {srv.url}; broken endpoints: {srv.broken_urls()}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass

"""The HTTP transport of fetch: per-thread keep-alive connections to checked addresses,
one request with a hard deadline (a watchdog thread cuts late sockets), the body read
within ``max_bytes``, and the ``X-Robots-Tag`` opt-out check before the body is read."""

from __future__ import annotations

import heapq
import http.client
import socket
import ssl
import threading
import time

from data_pipeline.config import FetchConfig
from data_pipeline.ingest.guard import FetchFailure, Target

_CHUNK = 64 * 1024
_OPTOUT_TOKENS = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class _Watchdog:
    """One thread per process that runs callbacks at their deadlines: a deadline per
    request without a timer thread per request. Nearly every deadline is cancelled long
    before it comes (the response arrived), so the thread is woken only for a deadline
    earlier than all it knows, and drops cancelled ones without waiting for them: it wakes
    about once per deadline period, not once per request."""

    def __init__(self):
        self._heap: list[tuple[float, int, list]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, callback) -> "_Handle":
        entry = [callback]
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, entry))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="fetch-watchdog")
                self._thread.start()
            if self._heap[0][2] is entry:  # wake the thread only if it must wake sooner
                self._cond.notify()
        return _Handle(entry)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2][0] is None:  # cancelled: drop unwaited
                        heapq.heappop(self._heap)
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, entry = heapq.heappop(self._heap)
            callback = entry[0]
            if callback is not None:
                try:
                    callback()
                except Exception:  # a failing cut must not stop the watchdog
                    pass


class _Handle:
    def __init__(self, entry: list):
        self._entry = entry

    def cancel(self) -> None:
        self._entry[0] = None


_watchdog = _Watchdog()
_local = threading.local()
_MAX_IDLE_CONNECTIONS = 8  # per thread; a crawl meets many hosts, few of them twice in a row


class _HTTPSConnection(http.client.HTTPSConnection):
    """Connects to the checked address but speaks TLS to the named host (SNI and the
    certificate check use the name, not the address)."""

    def __init__(self, address: str, port: int, server_hostname: str, timeout: float):
        super().__init__(address, port, timeout=timeout, context=_ssl_context())
        self._server_hostname = server_hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_hostname)


_ssl_lock = threading.Lock()
_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """One verifying context per process (loading the CA store costs milliseconds)."""
    global _ssl
    with _ssl_lock:
        if _ssl is None:
            _ssl = ssl.create_default_context()
        return _ssl


def _idle() -> dict:
    """This thread's idle keep-alive connections, (scheme, address, port, host) -> connection."""
    idle = getattr(_local, "idle", None)
    if idle is None:
        idle = _local.idle = {}
    return idle


def _key(target: Target) -> tuple:
    return target.scheme, target.address, target.port, target.host


def open_connection(target: Target, connect_timeout: float) -> tuple[http.client.HTTPConnection, bool]:
    """(connection, reused): an idle keep-alive connection to the same checked address and
    name if this thread has one, else a new one (connected here, under ``connect_timeout``)."""
    conn = _idle().pop(_key(target), None)
    if conn is not None:
        return conn, True
    if target.scheme == "https":
        conn = _HTTPSConnection(target.address, target.port, target.host, connect_timeout)
    else:
        conn = http.client.HTTPConnection(target.address, target.port, timeout=connect_timeout)
    try:
        conn.connect()
    except TimeoutError as e:
        conn.close()
        raise FetchFailure("timeout", f"connect: {type(e).__name__}: {e}") from None
    except (OSError, http.client.HTTPException) as e:  # refused, unreachable, TLS failures
        conn.close()
        raise FetchFailure("connection_error", f"connect: {type(e).__name__}: {e}") from None
    return conn, False


def keep_connection(target: Target, conn: http.client.HTTPConnection) -> None:
    idle = _idle()
    key = _key(target)
    old = idle.pop(key, None)
    if old is not None:
        old.close()
    if len(idle) >= _MAX_IDLE_CONNECTIONS:
        idle.pop(next(iter(idle))).close()  # the oldest
    idle[key] = conn

def robots_optout(header_values: list[str], user_agent: str) -> bool:
    """True if an ``X-Robots-Tag`` value opts out for every agent or for ours.

    A ``name:`` prefix targets the directives after it (until the next prefix) at one
    crawler, as in ``"otherbot: noai, noimageai"``; unprefixed directives target all.
    """
    agent = user_agent.split("/")[0].strip().lower()
    for value in header_values:
        target = None
        for part in value.split(","):
            token = part.strip().lower()
            name, sep, rest = token.partition(":")
            if sep and name.strip() not in _VALUED_DIRECTIVES:
                target, token = name.strip(), rest.strip()
            if token in _OPTOUT_TOKENS and target in (None, "*", agent):
                return True
    return False


def _read_body(resp: http.client.HTTPResponse, cfg: FetchConfig, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchFailure("too_large", f"Content-Length {length} > {cfg.max_bytes}")
    chunks, total = [], 0
    while True:
        if time.monotonic() >= deadline:
            raise FetchFailure("deadline", "body not received before the deadline")
        chunk = resp.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > cfg.max_bytes:
            raise FetchFailure("too_large", f"body exceeds {cfg.max_bytes} bytes")
        chunks.append(chunk)
    if time.monotonic() >= deadline:  # the watchdog's cut ends the body like an EOF
        raise FetchFailure("deadline", "body not received before the deadline")
    if resp.length:  # http.client's read1 ends quietly at an early EOF; the bytes still owed
        raise FetchFailure("connection_error", f"connection closed {resp.length} bytes before the end of the body")
    resp.close()  # read to the end: marks the connection free for the next request
    return b"".join(chunks)


def exchange(conn: http.client.HTTPConnection, target: Target, headers: dict, cfg: FetchConfig,
              deadline: float) -> tuple[http.client.HTTPResponse, bytes | None]:
    """Send the request and read the response: (response, body), body None for a redirect.

    A socket read can block up to its timeout; shutting the socket down at the deadline
    makes the deadline hard for headers and body alike, even against a server that
    trickles bytes."""
    conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    expired = threading.Event()
    sock = conn.sock

    def cut():
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = _watchdog.schedule(deadline, cut)
    try:
        conn.request("GET", target.path, headers={**headers, "Host": target.netloc})
        resp = conn.getresponse()
        if resp.status in _REDIRECT_CODES:
            return resp, None
        if resp.status != 200:
            raise FetchFailure(f"http_{resp.status}", f"HTTP {resp.status}", resp.status)
        if cfg.respect_robots_header and robots_optout(resp.headers.get_all("X-Robots-Tag") or [],
                                                       cfg.user_agent):
            raise FetchFailure("robots_optout", "X-Robots-Tag opts out", resp.status)
        return resp, _read_body(resp, cfg, deadline)  # a cut-short read fails there
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or time.monotonic() >= deadline:
            raise FetchFailure("deadline", "response not received before the deadline") from None
        reason = "timeout" if isinstance(e, TimeoutError) else "connection_error"
        raise FetchFailure(reason, f"{type(e).__name__}: {e}") from None
    finally:
        timer.cancel()
        if expired.is_set():  # the cut may land after the last byte: this socket is done
            conn.close()


"""Download one URL politely and safely, ending in a bounded set of failure reasons.

Guarantees: each attempt ends by ``deadline_s`` (headers and body, even against a server
that trickles bytes or never answers); at most ``max_bytes`` are held; hosts resolving to
private/loopback/link-local/reserved/multicast addresses are refused before any connection
(unless allow-listed), every redirect hop is checked again, and the connection goes to the
address that was checked; a host is resolved once per ``dns_cache_s`` per process;
``X-Robots-Tag`` AI opt-outs are honoured. Only connection errors, timeouts, 5xx and 429
are retried, with exponential backoff.

Reasons: bad_url, dns_error, private_address, connection_error, timeout, deadline,
too_large, empty_body, too_many_redirects, robots_optout, http_<code>.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, TimeoutError

from data_pipeline.config import FetchConfig

_CHUNK = 64 * 1024
_OPTOUT_TOKENS = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# "deadline" is not retried: a server too slow once is usually too slow again.
_RETRYABLE_REASONS = frozenset({"connection_error", "timeout"})


@dataclass
class FetchResult:
    ok: bool
    data: bytes | None
    status: str  # "ok" | "failed"
    reason: str | None
    http_status: int | None
    final_url: str
    elapsed_s: float
    error: str | None = None  # human detail; ``reason`` is the bounded label


class _Failure(Exception):
    def __init__(self, reason: str, detail: str = "", http_status: int | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.http_status = http_status


class DomainRateLimiter:
    """Spaces requests to the same host at least ``1 / rate_per_s`` seconds apart (thread-safe)."""

    def __init__(self, rate_per_s: float):
        if rate_per_s < 0:
            raise ValueError(f"rate_per_s must be >= 0, got {rate_per_s}")
        self.interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> float:
        """Block until ``host`` may be requested again; returns the seconds slept."""
        if self.interval == 0:
            return 0.0
        with self._lock:  # reserve a slot, then sleep outside the lock
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.interval
        delay = slot - now
        if delay > 0:
            time.sleep(delay)
        return max(delay, 0.0)


class _Watchdog:
    """One thread per process that runs callbacks at their deadlines: a deadline per
    request without a timer thread per request."""

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
            self._cond.notify()
        return _Handle(entry)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
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


def _pool() -> urllib3.PoolManager:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = urllib3.PoolManager(num_pools=32, maxsize=4)
    return pool


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses the OS resolver gives for ``host`` (the one place DNS is asked)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))


class _DnsCache:
    """Host -> addresses (or the resolver's error) for ``ttl`` seconds, shared by the
    threads of a process: a shard of 10,000 URLs on one host asks DNS once, not 10,000
    times, and a dead domain is not asked again for every row that names it."""

    def __init__(self):
        self._entries: dict[str, tuple[float, list[str] | str]] = {}
        self._lock = threading.Lock()

    def lookup(self, host: str, port: int, ttl: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(host)
        if hit is None or hit[0] <= now:
            try:
                value: list[str] | str = resolve_host(host, port)
            except (OSError, UnicodeError) as e:
                value = f"{host}: {e}"
            if ttl > 0:
                with self._lock:
                    if len(self._entries) > 100_000:  # bounded: a long run meets many hosts
                        self._entries.clear()
                    self._entries[host] = (now + ttl, value)
            hit = (now + ttl, value)
        if isinstance(hit[1], str):
            raise _Failure("dns_error", hit[1])
        return hit[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


dns_cache = _DnsCache()


@dataclass
class Target:
    """Where one request goes: the checked address to connect to and the name to ask for."""

    scheme: str
    host: str  # lower-cased name from the URL (Host header, TLS SNI and certificate check)
    port: int
    address: str  # the checked IP the connection is made to
    netloc: str  # Host header value
    path: str  # path and query


def check_host(url: str, cfg: FetchConfig) -> Target:
    """Validate ``url`` and resolve its host; raise ``_Failure`` if it must not be fetched.

    Every address must be public unless the name or the address is allow-listed. The
    request then connects to the address checked here (not to a second DNS answer), so a
    name whose DNS answer changes in between (rebinding) cannot slip through.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Failure("bad_url", str(e)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Failure("bad_url", f"unsupported URL {url!r}")
    host = parts.hostname.lower()
    port = port or (443 if parts.scheme == "https" else 80)
    allowed = {a.lower() for a in cfg.allow_private_hosts}
    try:
        addresses = [str(ipaddress.ip_address(host))]  # a literal address: no DNS
    except ValueError:
        addresses = cfg.resolve.get(host) or dns_cache.lookup(host, port, cfg.dns_cache_s)
    if host not in allowed:
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if not _is_public(ip) and str(ip) not in allowed:
                raise _Failure("private_address", f"{host} resolves to {ip}")
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, addresses[0], netloc, path)


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


def _read_body(resp, cfg: FetchConfig, deadline: float) -> bytes:
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
        raise _Failure("too_large", f"Content-Length {length} > {cfg.max_bytes}")
    # A socket read can block up to the read timeout; shutting the socket down at the
    # deadline makes the deadline hard even against a server that trickles bytes.
    expired = threading.Event()

    def cut():
        expired.set()
        resp.shutdown()

    timer = _watchdog.schedule(deadline, cut)
    chunks, total = [], 0
    try:
        while True:
            if time.monotonic() >= deadline:
                raise _Failure("deadline", "body not received before the deadline")
            chunk = resp.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cfg.max_bytes:
                raise _Failure("too_large", f"body exceeds {cfg.max_bytes} bytes")
            chunks.append(chunk)
    except (HTTPError, OSError) as e:
        if expired.is_set() or time.monotonic() >= deadline:
            raise _Failure("deadline", "body not received before the deadline") from None
        reason = "timeout" if isinstance(e, TimeoutError) else "connection_error"
        raise _Failure(reason, f"{type(e).__name__}: {e}") from None
    finally:
        timer.cancel()
    if expired.is_set():
        raise _Failure("deadline", "body not received before the deadline")
    return b"".join(chunks)


def _connection(target: Target):
    """A keep-alive pool to the checked address that still speaks to the named host."""
    kwargs = {}
    if target.scheme == "https":
        kwargs = {"server_hostname": target.host, "assert_hostname": target.host}
    return _pool().connection_from_host(target.address, target.port, target.scheme, pool_kwargs=kwargs)


def _attempt(url: str, cfg: FetchConfig, rate_limiter) -> tuple[bytes, int, str]:
    """One attempt, following redirects; returns (body, http_status, final_url)."""
    deadline = None
    headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"}
    for _hop in range(cfg.max_redirects + 1):
        target = check_host(url, cfg)
        if rate_limiter is not None:
            rate_limiter.wait(target.host)
        if deadline is None:  # the clock starts once our turn has come, not while queued
            deadline = time.monotonic() + cfg.deadline_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure("deadline", "no time left before the deadline")
        timeout = urllib3.Timeout(connect=min(cfg.connect_timeout_s, remaining), read=remaining)
        try:
            resp = _connection(target).urlopen(
                "GET", target.path, headers={**headers, "Host": target.netloc}, timeout=timeout,
                retries=False, redirect=False, preload_content=False, assert_same_host=False,
            )
        except NewConnectionError as e:  # before TimeoutError: it subclasses it
            raise _Failure("connection_error", f"{type(e).__name__}: {e}") from None
        except TimeoutError as e:  # connect and read timeouts alike
            raise _Failure("timeout", f"{type(e).__name__}: {e}") from None
        except (ProtocolError, HTTPError, OSError) as e:
            raise _Failure("connection_error", f"{type(e).__name__}: {e}") from None
        complete = False
        try:
            if resp.status in _REDIRECT_CODES:
                location = resp.headers.get("Location")
                if not location:
                    raise _Failure(f"http_{resp.status}", "redirect without Location", resp.status)
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise _Failure(f"http_{resp.status}", f"HTTP {resp.status}", resp.status)
            if cfg.respect_robots_header and robots_optout(
                resp.headers.getlist("X-Robots-Tag"), cfg.user_agent
            ):
                raise _Failure("robots_optout", "X-Robots-Tag opts out", resp.status)
            body = _read_body(resp, cfg, deadline)
            complete = True
            if not body:
                raise _Failure("empty_body", "HTTP 200 with an empty body", resp.status)
            return body, resp.status, url
        finally:
            # Only a fully read response may go back to the pool; anything else
            # (redirect bodies, errors, cut-off reads) closes its connection.
            if complete:
                resp.release_conn()
            else:
                resp.close()
    raise _Failure("too_many_redirects", f"more than {cfg.max_redirects} redirects")


def _retryable(failure: _Failure) -> bool:
    code = failure.http_status
    return failure.reason in _RETRYABLE_REASONS or code == 429 or (code is not None and code >= 500)


def fetch(
    url: str, cfg: FetchConfig, *, rate_limiter: DomainRateLimiter | None = None
) -> FetchResult:
    """Download ``url``; never raises for network or HTTP problems, reports them instead."""
    start = time.monotonic()
    failure = _Failure("bad_url")
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            data, code, final_url = _attempt(url, cfg, rate_limiter)
        except _Failure as f:
            failure = f
            if not _retryable(f):
                break
            continue
        return FetchResult(True, data, "ok", None, code, final_url, time.monotonic() - start)
    return FetchResult(
        False, None, "failed", failure.reason, failure.http_status, url,
        time.monotonic() - start, error=str(failure),
    )

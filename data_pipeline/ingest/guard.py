"""The address guard of fetch: which hosts and addresses may be fetched, DNS with its
per-process cache, and ``FetchFailure``, the bounded failure every fetch stage raises.

Hosts resolving to an address that is not globally routable (an IPv6 form carrying an
IPv4 address is judged by the IPv4 one) are refused before any connection unless
allow-listed, and so are odd IPv4 spellings such as ``127.1``; the connection goes to the
address checked here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from data_pipeline.config import FetchConfig


class FetchFailure(Exception):
    """A fetch that failed: ``reason`` is the bounded label, the message its detail."""

    def __init__(self, reason: str, detail: str = "", http_status: int | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.http_status = http_status


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)\Z")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d (deprecated)
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (SIIT)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, or None for a name to resolve.

    Only the canonical spellings are addresses: a dotted quad without leading zeros, or
    IPv6. A host whose last label is a number (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
    ``127.1``, ``127.0.0.1.``) is what inet_aton, getaddrinfo and browsers would read as an
    address, each by its own rules (octal or decimal for leading zeros), so it is refused as
    ``bad_url`` rather than normalised: no two readers can disagree on where it goes, and no
    public image is addressed that way. Raises ``FetchFailure("bad_url")``.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        raise FetchFailure("bad_url", f"{host!r} is not a valid IPv6 address")
    try:  # what getaddrinfo will see: a non-ASCII name goes out in its IDNA form
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise FetchFailure("bad_url", f"{host!r} is not a valid host name: {e}") from None
    labels = ascii_host.lower().split(".")
    if labels[-1] == "" and len(labels) > 1:  # one trailing dot ends a fully qualified name
        labels.pop()
    if _NUMERIC_LABEL.match(labels[-1]):
        raise FetchFailure("bad_url", f"{host!r} is an IPv4 address in a non-canonical spelling; "
                                  "write it as four decimal numbers (a.b.c.d)")
    return None


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, where packets to it end up: IPv4-mapped,
    IPv4-translated, 6to4, Teredo (server and client), NAT64 and IPv4-compatible forms."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    return []


def address_refusal(ip: IPAddress) -> str | None:
    """None if ``ip`` may be fetched without an allow-list entry, else why not.

    The rule is ``is_global`` (IANA's special-purpose registries: private, carrier-grade
    NAT, loopback, link-local, documentation, benchmarking, unspecified, ...), less
    multicast, reserved and site-local addresses, which is_global admits in some Python
    versions. An IPv6 address that carries IPv4 ones is judged by those: is_global alone
    admits 2002:a9fe:a9fe::1, which is 169.254.169.254.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
        return "local-use NAT64 prefix (the IPv4 address it reaches is not known)"
    inner = embedded_ipv4(ip)
    if inner:
        for v4 in inner:
            why = address_refusal(v4)
            if why is not None:
                return f"carries {v4}, {why}"
        return None
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global or ip.is_reserved or getattr(ip, "is_site_local", False):
        return "not a globally routable address"
    return None


@functools.lru_cache(maxsize=64)
def _allow_list(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple]:
    """(host names, networks) of ``allow_private_hosts``; parsed once per distinct list."""
    names, networks = set(), []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower())
    return frozenset(names), tuple(networks)


def admit(host: str, addresses: list[IPAddress], allow: list[str]) -> IPAddress:
    """The address to connect to if ``host`` with these (resolved) addresses may be fetched;
    raises ``FetchFailure("private_address")`` otherwise. No I/O.

    Every address must pass ``address_refusal``, unless ``host`` is an allowed name, or the
    address (or an IPv4 address it carries) lies in an allowed address or network.
    """
    names, networks = _allow_list(tuple(allow))
    if host not in names:
        for ip in addresses:
            why = address_refusal(ip)
            if why is not None and not any(a.version == n.version and a in n
                                           for a in (ip, *embedded_ipv4(ip)) for n in networks):
                where = host if host == str(ip) else f"{host} resolves to {ip}"
                raise FetchFailure("private_address", f"{where}: {why}")
    return addresses[0]


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
            raise FetchFailure("dns_error", hit[1])
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
    """Validate ``url`` and resolve its host; raise ``FetchFailure`` if it must not be fetched.

    Every address must be globally routable (``admit``) unless the name or the address is
    allow-listed. The request then connects to the address checked here, given to the
    socket as a numeric string (no second DNS answer), so a name whose DNS answer changes
    in between (rebinding) cannot slip through.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchFailure("bad_url", str(e)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchFailure("bad_url", f"unsupported URL {url!r}")
    host = parts.hostname.lower()
    port = port or (443 if parts.scheme == "https" else 80)
    literal = ip_literal(host)
    if literal is not None:  # no DNS
        addresses = [literal]
    else:
        found = cfg.resolve.get(host) or dns_cache.lookup(host, port, cfg.dns_cache_s)
        addresses = [ipaddress.ip_address(a) for a in found]
    address = admit(host, addresses, cfg.allow_private_hosts)
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc.isascii():  # the Host header is ASCII: a name goes out in its IDNA form
        netloc = host.encode("idna").decode("ascii") + ("" if parts.port is None else f":{parts.port}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # Web URL tables hold raw non-ASCII and spaces in paths, which http.client would refuse
    # (it sends the request line as ASCII); they go out as browsers send them, UTF-8
    # percent-encoded, and an existing %XX escape is left as it is.
    path = quote(path, safe="/:@!$&'()*+,;=?%[]~")
    return Target(parts.scheme, host, port, str(address), netloc, path)


"""The ingest address guard, decided without I/O: a URL's host is admitted only if every
address it stands for is globally routable (an IPv6 form carrying an IPv4 address is judged
by the IPv4 one), or the user allowed it; an IPv4 address spelled any way but a.b.c.d is
refused outright. Literal hosts and names mapped by ``fetch.resolve`` need no DNS, and the
fixture below makes any resolver call or connection fail the test."""
from __future__ import annotations

import ipaddress
import socket

import pytest
from pydantic import ValidationError

import data_pipeline.ingest.guard as guard_mod
from data_pipeline.config import FetchConfig
from data_pipeline.ingest.fetch import fetch
from data_pipeline.ingest.guard import address_refusal, check_host

OK, PRIVATE, BAD = None, "private_address", "bad_url"

# (url, expected reason, the address connected to when admitted, fetch config fields)
CASES = [
    # globally routable: admitted, and the connection goes to the judged address
    ("http://8.8.8.8/a.jpg", OK, "8.8.8.8", {}),
    ("https://1.1.1.1:8443/a.jpg", OK, "1.1.1.1", {}),
    ("http://[2606:4700:4700::1111]/a.jpg", OK, "2606:4700:4700::1111", {}),
    ("http://[::ffff:8.8.8.8]/a.jpg", OK, "::ffff:808:808", {}),  # IPv4-mapped public
    ("http://[2002:808:808::1]/a.jpg", OK, "2002:808:808::1", {}),  # 6to4 of 8.8.8.8
    ("http://[64:ff9b::8.8.8.8]/a.jpg", OK, "64:ff9b::808:808", {}),  # NAT64 of 8.8.8.8
    ("http://cdn.test/a.jpg", OK, "8.8.8.8", {"resolve": {"cdn.test": ["8.8.8.8", "2606:4700::1"]}}),
    # IPv4 that is not globally routable
    ("http://127.0.0.1/a.jpg", PRIVATE, None, {}),
    ("http://127.255.255.254/a.jpg", PRIVATE, None, {}),
    ("http://10.1.2.3/a.jpg", PRIVATE, None, {}),
    ("http://172.16.0.1/a.jpg", PRIVATE, None, {}),
    ("http://192.168.1.1/a.jpg", PRIVATE, None, {}),
    ("http://100.64.0.1/a.jpg", PRIVATE, None, {}),  # carrier-grade NAT
    ("http://100.100.100.200/latest/meta-data/", PRIVATE, None, {}),  # a cloud's metadata, in CGNAT
    ("http://169.254.169.254/latest/meta-data/", PRIVATE, None, {}),  # link-local metadata
    ("http://224.0.0.1/a.jpg", PRIVATE, None, {}),  # multicast
    ("http://239.255.255.250/a.jpg", PRIVATE, None, {}),
    ("http://240.0.0.1/a.jpg", PRIVATE, None, {}),  # reserved
    ("http://255.255.255.255/a.jpg", PRIVATE, None, {}),  # broadcast
    ("http://0.0.0.0/a.jpg", PRIVATE, None, {}),  # unspecified (reaches the local host)
    ("http://0.1.2.3/a.jpg", PRIVATE, None, {}),  # "this network"
    ("http://192.0.0.1/a.jpg", PRIVATE, None, {}),  # IETF protocol assignments
    ("http://192.0.2.1/a.jpg", PRIVATE, None, {}),  # documentation
    ("http://198.51.100.7/a.jpg", PRIVATE, None, {}),
    ("http://203.0.113.9/a.jpg", PRIVATE, None, {}),
    ("http://198.18.0.1/a.jpg", PRIVATE, None, {}),  # benchmarking 198.18.0.0/15
    ("http://198.19.255.254/a.jpg", PRIVATE, None, {}),
    # IPv6 that is not globally routable
    ("http://[::1]/a.jpg", PRIVATE, None, {}),
    ("http://[::]/a.jpg", PRIVATE, None, {}),
    ("http://[fe80::1]/a.jpg", PRIVATE, None, {}),
    ("http://[fe80::1%25eth0]/a.jpg", PRIVATE, None, {}),
    ("http://[fd12:3456::1]/a.jpg", PRIVATE, None, {}),  # unique local
    ("http://[fec0::1]/a.jpg", PRIVATE, None, {}),  # site-local (deprecated)
    ("http://[ff02::1]/a.jpg", PRIVATE, None, {}),  # multicast
    ("http://[ff0e::1]/a.jpg", PRIVATE, None, {}),  # global-scope multicast
    ("http://[2001:db8::1]/a.jpg", PRIVATE, None, {}),  # documentation
    ("http://[4000::1]/a.jpg", PRIVATE, None, {}),  # reserved (unallocated)
    # IPv6 forms that carry a non-public IPv4 address
    ("http://[::ffff:127.0.0.1]/a.jpg", PRIVATE, None, {}),  # IPv4-mapped
    ("http://[::ffff:100.100.100.200]/a.jpg", PRIVATE, None, {}),
    ("http://[::ffff:a9fe:a9fe]/a.jpg", PRIVATE, None, {}),
    ("http://[::ffff:0:a9fe:a9fe]/a.jpg", PRIVATE, None, {}),  # IPv4-translated (SIIT)
    ("http://[2002:a9fe:a9fe::1]/a.jpg", PRIVATE, None, {}),  # 6to4 of 169.254.169.254
    ("http://[2002:7f00:1::]/a.jpg", PRIVATE, None, {}),  # 6to4 of 127.0.0.1
    ("http://[2002:6464:64c8::1]/a.jpg", PRIVATE, None, {}),  # 6to4 of 100.100.100.200
    ("http://[2002:c0a8:101::1]/a.jpg", PRIVATE, None, {}),  # 6to4 of 192.168.1.1
    ("http://[2001:0:808:808::f5ff:fffe]/a.jpg", PRIVATE, None, {}),  # Teredo, client 10.0.0.1
    ("http://[2001:0:a9fe:a9fe::f7f7:f7f7]/a.jpg", PRIVATE, None, {}),  # Teredo, server 169.254.169.254
    ("http://[64:ff9b::a9fe:a9fe]/a.jpg", PRIVATE, None, {}),  # NAT64 of 169.254.169.254
    ("http://[64:ff9b::6464:64c8]/a.jpg", PRIVATE, None, {}),  # NAT64 of 100.100.100.200
    ("http://[64:ff9b:1::808:808]/a.jpg", PRIVATE, None, {}),  # local-use NAT64: target unknown
    ("http://[::7f00:1]/a.jpg", PRIVATE, None, {}),  # IPv4-compatible 127.0.0.1
    ("http://[::a9fe:a9fe]/a.jpg", PRIVATE, None, {}),
    # IPv4 in a spelling other than a.b.c.d: refused, whatever it means (8.8.8.8 too)
    ("http://2130706433/a.jpg", BAD, None, {}),  # decimal 127.0.0.1
    ("http://0x7f000001/a.jpg", BAD, None, {}),  # hex
    ("http://0x7f.0.0.1/a.jpg", BAD, None, {}),
    ("http://0X7F.0.0.1/a.jpg", BAD, None, {}),
    ("http://0177.0.0.1/a.jpg", BAD, None, {}),  # octal
    ("http://017700000001/a.jpg", BAD, None, {}),
    ("http://127.1/a.jpg", BAD, None, {}),  # short forms
    ("http://10.1/a.jpg", BAD, None, {}),
    ("http://0x7f.1:8080/a.jpg", BAD, None, {}),
    ("http://127.000.000.001/a.jpg", BAD, None, {}),  # leading zeros
    ("http://127.0.0.1./a.jpg", BAD, None, {}),  # trailing dot
    ("http://0x64.0x64.0x64.0xc8/latest/", BAD, None, {}),  # 100.100.100.200 in hex
    ("http://134744072/a.jpg", BAD, None, {}),  # 8.8.8.8 in decimal
    ("http://1.2.3.4.5/a.jpg", BAD, None, {}),
    ("http://①②⑦.0.0.1/a.jpg", BAD, None, {}),  # IDNA would turn it into 127.0.0.1
    ("http://[::ffff:127.1]/a.jpg", BAD, None, {}),
    ("http://127.1/a.jpg", BAD, None, {"allow_private_hosts": ["127.0.0.1"]}),  # allowed, still odd
    # names: every address they resolve to is judged
    ("http://intranet.test/a.jpg", PRIVATE, None, {"resolve": {"intranet.test": ["10.0.0.5"]}}),
    ("http://mixed.test/a.jpg", PRIVATE, None, {"resolve": {"mixed.test": ["8.8.8.8", "100.64.0.1"]}}),
    ("http://six.test/a.jpg", PRIVATE, None, {"resolve": {"six.test": ["2002:a9fe:a9fe::1"]}}),
    # allowed explicitly: by name, address or network
    ("http://127.0.0.1:8000/a.jpg", OK, "127.0.0.1", {"allow_private_hosts": ["127.0.0.1"]}),
    ("http://[::ffff:127.0.0.1]/a.jpg", OK, "::ffff:7f00:1", {"allow_private_hosts": ["127.0.0.1"]}),
    ("http://intranet.test/a.jpg", OK, "10.0.0.5",
     {"resolve": {"intranet.test": ["10.0.0.5"]}, "allow_private_hosts": ["Intranet.test"]}),
    ("http://10.20.30.40/a.jpg", OK, "10.20.30.40", {"allow_private_hosts": ["10.0.0.0/8"]}),
    ("http://10.20.30.40/a.jpg", PRIVATE, None, {"allow_private_hosts": ["10.20.30.41"]}),
    ("http://other.test/a.jpg", PRIVATE, None,
     {"resolve": {"other.test": ["127.0.0.1"]}, "allow_private_hosts": ["intranet.test"]}),
]


@pytest.fixture
def no_io(monkeypatch):
    """Any DNS lookup or connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the guard did I/O: {args}")

    monkeypatch.setattr(guard_mod, "resolve_host", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    guard_mod.dns_cache.clear()


@pytest.mark.parametrize("url, reason, address, fields", CASES, ids=[f"{c[0]}-{sorted(c[3])}" for c in CASES])
def test_guard_decision(url, reason, address, fields, no_io):
    cfg = FetchConfig(**fields)
    if reason is None:
        target = check_host(url, cfg)
        assert target.address == address
        ipaddress.ip_address(target.address)  # numeric: connecting to it asks no resolver
    else:
        with pytest.raises(guard_mod.FetchFailure) as info:
            check_host(url, cfg)
        assert info.value.reason == reason, str(info.value)


def test_the_table_is_broad():
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} == {OK, PRIVATE, BAD}


@pytest.mark.parametrize("url", ["http://100.100.100.200/latest/meta-data/", "http://[2002:a9fe:a9fe::1]/",
                                 "http://[64:ff9b::a9fe:a9fe]/", "http://0x7f.1/", "http://2130706433/"])
def test_fetch_refuses_without_connecting_or_retrying(url, no_io):
    result = fetch(url, FetchConfig(retries=2, backoff_s=5))
    assert not result.ok and result.reason in (PRIVATE, BAD) and result.elapsed_s < 1
    assert url.split("/")[2].strip("[]") in result.error


def test_a_resolved_name_is_judged_by_its_answer(monkeypatch, no_io):
    """The DNS path: what the resolver answers is judged, and that address is connected to."""
    answers = {"rebind.test": ["127.0.0.1"], "meta.test": ["100.100.100.200"],
               "v6.test": ["::ffff:169.254.169.254"], "cdn.test": ["2606:4700::1", "8.8.4.4"]}
    monkeypatch.setattr(guard_mod, "resolve_host", lambda host, port: answers[host])
    for host in ("rebind.test", "meta.test", "v6.test"):
        with pytest.raises(guard_mod.FetchFailure, match=host) as info:
            check_host(f"http://{host}/a.jpg", FetchConfig())
        assert info.value.reason == PRIVATE
    assert check_host("http://cdn.test/a.jpg", FetchConfig()).address == "2606:4700::1"


@pytest.mark.parametrize("ip, why", [
    ("2002:a9fe:a9fe::1", "carries 169.254.169.254"),
    ("2001:0:a9fe:a9fe::f7f7:f7f7", "carries 169.254.169.254"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("ff0e::1", "multicast"),
    ("100.100.100.200", "not a globally routable address"),
])
def test_refusals_say_why(ip, why):
    assert why in address_refusal(ipaddress.ip_address(ip))


@pytest.mark.parametrize("entry", ["127.1", "0x7f000001", "10.0.0.1/8", "", "a:b"])
def test_allow_list_entries_must_be_names_addresses_or_networks(entry):
    with pytest.raises(ValidationError, match="allow_private_hosts"):
        FetchConfig(allow_private_hosts=[entry])
    assert FetchConfig(allow_private_hosts=["Images.Test", "::1", "10.0.0.0/8"]).allow_private_hosts == [
        "images.test", "::1", "10.0.0.0/8"]

"""The fetch path's transport (http.client with per-thread keep-alive connections), against
real servers on 127.0.0.1. HTTPS: the connection goes to the checked address, but TLS is
spoken to the URL's host name (SNI and the certificate check use the name), with a
certificate made here. Keep-alive: connections are reused, a dead one is replaced, and a
body shorter than its Content-Length is a failure."""
from __future__ import annotations

import datetime
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import data_pipeline.ingest.transport as transport_mod
from data_pipeline.config import FetchConfig
from data_pipeline.ingest.fetch import fetch

BODY = b"\x89PNG fake body, the fetch path does not decode"


def _certificate(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_hosts: list = []
    seen_sni: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).seen_hosts.append(self.headers.get("Host"))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


@pytest.fixture
def tls_server(tmp_path):
    cert, key = _certificate(tmp_path, "images.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, _ctx: _Handler.seen_sni.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Handler.seen_hosts, _Handler.seen_sni = [], []
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def _cfg(**kw) -> FetchConfig:
    return FetchConfig(retries=0, deadline_s=5, resolve={"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]},
                       allow_private_hosts=["images.test", "other.test"], **kw)


def test_https_verifies_the_named_host(tls_server, monkeypatch):
    port, cert = tls_server
    monkeypatch.setattr(transport_mod, "_ssl", None)  # a context that does not trust our certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert.parent / "nothing.pem"))
    untrusted = fetch(f"https://images.test:{port}/a.png", _cfg())
    assert untrusted.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.error

    monkeypatch.setattr(transport_mod, "_ssl", None)  # now trusting it (the default context reads SSL_CERT_FILE)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    ok = fetch(f"https://images.test:{port}/a.png", _cfg())
    assert ok.ok and ok.data == BODY, ok.error
    assert _Handler.seen_sni[-1] == "images.test" and _Handler.seen_hosts[-1] == f"images.test:{port}"

    # same address, another name: the certificate does not cover it, so it is refused
    wrong = fetch(f"https://other.test:{port}/a.png", _cfg())
    assert wrong.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in wrong.error


def test_keep_alive_connection_is_reused_per_host(tls_server, monkeypatch):
    port, cert = tls_server
    monkeypatch.setattr(transport_mod, "_ssl", None)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    transport_mod._idle().clear()
    for _ in range(3):
        assert fetch(f"https://images.test:{port}/a.png", _cfg()).ok
    assert _Handler.seen_sni == ["images.test"]  # one handshake for three requests
    transport_mod._idle().clear()


class _RawServer:
    """A loopback server that answers each connection's first request with ``response``
    and then closes the connection, whatever the response promised."""

    def __init__(self, response: bytes):
        import socket

        self.response, self.connections, self.requests = response, 0, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data.decode("latin-1"))
                conn.sendall(self.response)

    def close(self):
        self.sock.close()


def _plain_cfg() -> FetchConfig:
    return FetchConfig(retries=0, deadline_s=5, allow_private_hosts=["127.0.0.1"])


def test_body_cut_short_is_a_failure_not_a_short_image():
    srv = _RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    try:
        result = fetch(f"http://127.0.0.1:{srv.port}/a.png", _plain_cfg())
        assert result.reason == "connection_error" and "990 bytes" in result.error
    finally:
        srv.close()


def test_a_keep_alive_connection_closed_by_the_server_is_replaced():
    """The server closes each connection after one response although HTTP/1.1 lets the
    client keep it: the second fetch meets the dead connection, and goes again on a new one."""
    srv = _RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
    try:
        transport_mod._idle().clear()
        first = fetch(f"http://127.0.0.1:{srv.port}/a.png", _plain_cfg())
        second = fetch(f"http://127.0.0.1:{srv.port}/b.png", _plain_cfg())
        assert (first.data, second.data) == (b"abcd", b"abcd"), (first.error, second.error)
        assert srv.connections == 2
    finally:
        transport_mod._idle().clear()
        srv.close()


def test_request_names_our_agent_and_the_host_not_the_address():
    srv = _RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
    try:
        cfg = FetchConfig(retries=0, deadline_s=5, user_agent="testbot/2.0", resolve={"img.test": ["127.0.0.1"]},
                          allow_private_hosts=["img.test"])
        assert fetch(f"http://img.test:{srv.port}/a/b.png?x=1", cfg).data == b"abcd"
        head = srv.requests[-1].split("\r\n")
        assert head[0] == "GET /a/b.png?x=1 HTTP/1.1"
        assert f"Host: img.test:{srv.port}" in head and "User-Agent: testbot/2.0" in head
    finally:
        transport_mod._idle().clear()
        srv.close()


def test_non_ascii_names_and_paths_go_out_as_browsers_send_them():
    """Real URL tables hold non-ASCII host names and raw non-ASCII or spaces in paths: the
    Host header carries the IDNA form, the path is UTF-8 percent-encoded (an existing %XX
    escape is kept), and fetch returns the body instead of raising."""
    srv = _RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
    try:
        cfg = FetchConfig(retries=0, deadline_s=5, resolve={"例え.test": ["127.0.0.1"]},
                          allow_private_hosts=["例え.test"])
        result = fetch(f"http://例え.test:{srv.port}/фото/a b%20c.jpg?q=ü", cfg)
        assert result.data == b"abcd", result.error
        head = srv.requests[-1].split("\r\n")
        assert head[0] == "GET /%D1%84%D0%BE%D1%82%D0%BE/a%20b%20c.jpg?q=%C3%BC HTTP/1.1"
        assert f"Host: xn--r8jz45g.test:{srv.port}" in head
    finally:
        transport_mod._idle().clear()
        srv.close()

"""TLS session resumption, real TLS on loopback: the proxy's listeners issue tickets that clients
resume (unless `session_tickets = false`), a resumed client is judged again (expired, revoked,
pinned: the same reasons as in a full handshake, and no DICOM), and the proxy resumes its own
sessions with upstreams, through a route's `upstream_tls` and through `echo.open_link` (the
store-and-forward forwarder's way out), until a reload drops them.
"""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.config.schema import TlsTable
from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.engine import echo
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem
from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.security.thumbprint import parse_thumbprint
from dicom_tls_proxy.transport import sessions
from dicom_tls_proxy.transport.tlscontext import TlsFailure, client_context, server_context
from dicom_tls_proxy.transport.tlsstream import ByteStream, TlsStream
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ScriptedUpstream,
    build_ac,
    build_rq,
    client_ssl_context,
    pacs_ssl_context,
    plaintext_association,
    proxy_config,
    recv_pdu,
    running_proxy,
    sha256_of,
    tls_in,
    tls_origination_config,
    toml_dumps,
    wait_until,
)

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def client_context_for(pki: Path, cert: Path | None = None, version: str = "TLSv1.3") -> Any:
    ctx = client_ssl_context(pki / "ca.pem", cert or pki / "client.pem", pki / "client.key")
    ctx.maximum_version = VERSIONS[version]
    return ctx


def associate_over_tls(
    address: tuple[str, int], ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """One association (RQ, AC, release) as a TLS client offering `session`: whether the session
    was reused, the session to offer next time, and the first PDU answered (b"" if none)."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    with ctx.wrap_socket(sock, session=session) as tls:
        reused = bool(tls.session_reused)
        tls.sendall(build_rq("CT"))
        try:
            answer = recv_pdu(tls)
        except (OSError, EOFError, AssertionError):
            return reused, None, b""
        if answer[0] == pdu.A_ASSOCIATE_AC:
            tls.sendall(pdu.encode_release_rq())
            recv_pdu(tls)
        return reused, tls.session, answer


# -- the proxy as a TLS server -----------------------------------------------------------------


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_a_client_resumes_its_session(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, version: str
) -> None:
    with running_proxy(tmp_path, proxy_config(pki, legacy.address)) as proxy:
        address = proxy.address("tls")
        ctx = client_context_for(pki, version=version)
        reused, session, answer = associate_over_tls(address, ctx)
        assert not reused and answer[0] == pdu.A_ASSOCIATE_AC
        first = proxy.association()
        assert first["resumed"] is False and first["tls_version"] == version
        assert first["peer_subject"]  # named in a full handshake ...
        reused, _, answer = associate_over_tls(address, ctx, session)
        assert reused and answer[0] == pdu.A_ASSOCIATE_AC
        wait_until(lambda: len(proxy.find(event="association")) == 2, what="the second line")
        second = proxy.find(event="association")[-1]
        assert second["resumed"] is True, second
        assert second["peer_sha256"] == first["peer_sha256"]  # ... and in a resumed one
        started = proxy.wait_for(event="started")
        assert "per process" in started["ticket_keys"]


def test_no_tickets_no_resumption(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    config = proxy_config(pki, legacy.address, tls={"in": tls_in(pki, session_tickets=False)})
    with running_proxy(tmp_path, config) as proxy:
        address = proxy.address("tls")
        for version in VERSIONS:
            ctx = client_context_for(pki, version=version)
            _, session, _ = associate_over_tls(address, ctx)
            reused, _, answer = associate_over_tls(address, ctx, session)
            assert not reused and answer[0] == pdu.A_ASSOCIATE_AC
        wait_until(lambda: len(proxy.find(event="association")) == 4, what="four lines")
        assert all(line["resumed"] is False for line in proxy.find(event="association"))
        assert "ticket_keys" not in proxy.wait_for(event="started")


def short_lived_client(pki: Path, folder: Path, seconds: int) -> tuple[Path, datetime.datetime]:
    """A client certificate from the test CA that expires `seconds` from now (client.key's key)."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((pki / "client.key").read_bytes(), None)
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    _, cert = devpki.make_leaf(
        ca_key,  # type: ignore[arg-type]
        ca_cert,
        "short-lived",
        server=False,
        not_after=not_after.replace(microsecond=0),
        private_key=key,  # type: ignore[arg-type]
    )
    path = folder / "short-lived.pem"
    devpki.write_pem_cert(path, cert)
    return path, cert.not_valid_after_utc


def test_an_expired_client_is_refused_on_resumption(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cert, not_after = short_lived_client(pki, tmp_path, seconds=3)
    with running_proxy(tmp_path, proxy_config(pki, legacy.address)) as proxy:
        address = proxy.address("tls")
        ctx = client_context_for(pki, cert)
        reused, session, answer = associate_over_tls(address, ctx)
        assert answer[0] == pdu.A_ASSOCIATE_AC, answer
        proxy.association(reason="released")
        wait_until(
            lambda: datetime.datetime.now(datetime.UTC) > not_after + datetime.timedelta(0, 1),
            what="the certificate's expiry",
        )
        reused, _, answer = associate_over_tls(address, ctx, session)
        assert reused and answer == b""  # resumed by the client's TLS, then no DICOM at all
        line = proxy.association(reason="tls-expired")
        assert "session resumed" in line["detail"], line
        assert line["peer_sha256"] == sha256_of(cert)
        assert "A-ASSOCIATE" not in str(line.get("answer", ""))


# -- a resumed session against a table that changed (in process, real TLS on loopback) ---------


def tables(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> TlsTable:
    path = tmp_path / "tables.toml"
    path.write_text(toml_dumps(proxy_config(pki, legacy.address)))
    return load_config(path).tls["in"]


def revoking(table: TlsTable, pki: Path) -> TlsTable:
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    client = x509.load_pem_x509_certificate((pki / "client.pem").read_bytes())
    next_update = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    crl = devpki.make_crl(ca_key, ca_cert, [client.serial_number], next_update=next_update)  # type: ignore[arg-type]
    return replace(table, crls=(crl,))


def pinning_another(table: TlsTable, pki: Path) -> TlsTable:
    other = parse_thumbprint(sha256_of(pki / "proxy.pem"))
    return replace(table, verify="chain+thumbprint", accepted_thumbprints=(other,))


async def serve_twice(table: TlsTable, second: TlsTable, client: Any) -> list[object]:
    """Two handshakes on one server context (made from `table`), the second judged by `second`
    as after a reload that kept the context; `client(port)` runs in a thread."""
    ctx = server_context(table)
    outcomes: list[object] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, client, port)
        for judged_by in (table, second):
            stream = await listeners[0].accept()
            try:
                tls = await TlsStream.accept(stream, ctx, judged_by)
            except TlsFailure as failure:
                outcomes.append(failure)
                await stream.aclose()
                continue
            outcomes.append(tls.info())
            await tls.send_all(b"hello")  # the TLS 1.3 tickets went before it
            await tls.aclose()
    await listeners[0].aclose()
    return outcomes


@pytest.mark.parametrize("change", ["revoked", "pinned"])
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_a_changed_table_refuses_a_resumed_client(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, change: str, version: str
) -> None:
    table = tables(tmp_path, pki, legacy)
    second = revoking(table, pki) if change == "revoked" else pinning_another(table, pki)
    seen: list[tuple[bool, bytes]] = []

    def client(port: int) -> None:
        ctx = client_context_for(pki, version=version)
        session = None
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            with ctx.wrap_socket(sock, session=session) as tls:
                try:
                    data = tls.recv(100)
                except OSError:  # closed without close_notify
                    data = b""
                seen.append((bool(tls.session_reused), data))
                session = tls.session

    outcomes = trio.run(serve_twice, table, second, client)
    assert seen[0] == (False, b"hello")
    failure = outcomes[1]
    assert isinstance(failure, TlsFailure), outcomes
    want = Reason.TLS_REVOKED if change == "revoked" else Reason.TLS_THUMBPRINT_MISMATCH
    assert failure.reason == want and "session resumed" in str(failure)
    assert seen[1] == (True, b"")  # the client resumed, and got nothing but the close


# -- the proxy as a TLS client -----------------------------------------------------------------


class TlsPacs(ScriptedUpstream):
    """A TLS PACS (`pacs_ssl_context`) that accepts one association per connection and notes
    whether each connection resumed a session."""

    def __init__(self, pki: Path) -> None:
        self.reused: list[bool] = []
        super().__init__(self.serve, tls=pacs_ssl_context(pki))

    def serve(self, conn: socket.socket) -> None:
        assert isinstance(conn, ssl.SSLSocket)
        self.reused.append(bool(conn.session_reused))
        rq = self.read_pdu(conn)
        conn.sendall(build_ac(rq))
        self.read_pdu(conn)  # the A-RELEASE-RQ
        conn.sendall(pdu.encode_release_rp())


def test_the_proxy_resumes_with_its_upstream(tmp_path: Path, pki: Path) -> None:
    pacs = TlsPacs(pki)
    config = tls_origination_config(pacs.address, pki)
    try:
        with running_proxy(tmp_path, config) as proxy:
            address = proxy.address("in")
            for _ in range(3):
                assert plaintext_association(address)[0] == pdu.A_ASSOCIATE_AC
            assert pacs.reused == [False, True, True]
            proxy.proc.send_signal(signal.SIGHUP)  # a reload: new contexts, no old session
            proxy.wait_for(event="reloaded")
            for _ in range(2):
                assert plaintext_association(address)[0] == pdu.A_ASSOCIATE_AC
            assert pacs.reused == [False, True, True, False, True]
            assert not pacs.errors, pacs.errors
    finally:
        pacs.close()


def test_no_tickets_no_upstream_resumption(tmp_path: Path, pki: Path) -> None:
    pacs = TlsPacs(pki)
    config = tls_origination_config(pacs.address, pki, session_tickets=False)
    try:
        with running_proxy(tmp_path, config) as proxy:
            for _ in range(2):
                assert plaintext_association(proxy.address("in"))[0] == pdu.A_ASSOCIATE_AC
            assert pacs.reused == [False, False]
    finally:
        pacs.close()


def test_open_link_resumes(tmp_path: Path, pki: Path) -> None:
    """The forwarder's way out: `echo.open_link` with the generation's client context."""
    pacs = TlsPacs(pki)
    path = tmp_path / "out.toml"
    path.write_text(toml_dumps(tls_origination_config(pacs.address, pki)))
    loaded = load_config(path)
    table, route = loaded.tls["pacs"], loaded.routes[0]
    context = client_context(table)

    async def twice() -> None:
        for _ in range(2):
            result = echo.EchoResult()
            opened: list[ByteStream] = []
            contexts = [PresentationContextItem(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))]
            link = await echo.open_link(
                route.upstream, "PACS", "SCU", table, contexts, result, opened, ssl_context=context
            )
            assert link is not None, result
            await link.stream.send_all(pdu.encode_release_rq())
            await link.stream.receive_some()
            await opened[-1].aclose()

    try:
        trio.run(twice)
        wait_until(lambda: len(pacs.reused) == 2, what="two connections")
        assert pacs.reused == [False, True]
        cache = sessions.sessions_of(context)
        assert cache is not None and len(cache) == 1
    finally:
        pacs.close()


def test_session_tickets_key(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "p.toml"
    config = proxy_config(pki, "127.0.0.1:11112", tls={"in": tls_in(pki, session_tickets="yes")})
    path.write_text(toml_dumps(config))
    with pytest.raises(Exception, match=r"tls\.in\.session_tickets: expected"):
        load_config(path)
    config["tls"]["in"]["session_tickets"] = False
    path.write_text(toml_dumps(config))
    assert load_config(path).tls["in"].session_tickets is False
    assert TlsTable("x").session_tickets is True


def test_ticket_keys_rotate(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    """A table that issues tickets gets a new context (new keys) once its own is ROTATE_AFTER
    old; one that does not keeps its context."""
    table = tables(tmp_path, pki, legacy)
    now = [0.0]
    contexts = sessions.ServerContexts(
        {"in": table, "off": replace(table, name="off", session_tickets=False)},
        server_context,
        clock=lambda: now[0],
    )
    first, off = contexts["in"], contexts["off"]
    now[0] = sessions.ROTATE_AFTER - 1
    assert contexts["in"] is first
    now[0] = sessions.ROTATE_AFTER
    rotated = contexts["in"]
    assert rotated is not first and contexts["in"] is rotated
    assert contexts["off"] is off and sorted(contexts) == ["in", "off"]

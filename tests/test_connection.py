"""The connection driver in-process: the proxy composed in the test's own trio loop, real sockets on
127.0.0.1, a scripted upstream as a trio task. No subprocess: each case shows the PDU the client
gets, the PDU the upstream gets and the association record, from accept to end."""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.engine.listener import serve
from dicom_tls_proxy.engine.proxy import Proxy
from dicom_tls_proxy.ops.audit import AssociationRecord, Audit
from dicom_tls_proxy.ops.process import bind_listeners
from dicom_tls_proxy.protocol import dimse, pdu
from tests.support import build_ac, build_rq, client_ssl_context, proxy_config, toml_dumps

ABORT = pdu.encode_abort(2, 0)
Script = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class Records:
    """A sink of the proxy's `Audit`: every association record, as it ended."""

    ended: list[AssociationRecord] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def association(self, record: AssociationRecord, fields: dict[str, Any]) -> None:
        self.ended.append(record)
        self.changed.set()
        self.changed = trio.Event()

    def event(self, fields: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    async def next(self, n: int = 1) -> AssociationRecord:
        with trio.fail_after(10):
            while len(self.ended) < n:
                await self.changed.wait()
        return self.ended[n - 1]


async def read_pdu(stream: trio.abc.ReceiveStream) -> bytes:
    """One whole PDU, or b"" when the peer closes first."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        data += chunk
    return data


async def read_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


@dataclass
class Upstream:
    """A scripted upstream on 127.0.0.1: each connection runs the script."""

    address: str


@asynccontextmanager
async def upstream_running(script: Script) -> AsyncIterator[Upstream]:
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, script, 0, host="127.0.0.1"))
        yield Upstream(f"127.0.0.1:{listener.socket.getsockname()[1]}")
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxy_running(tmp_path: Path, cfg: dict[str, Any]) -> AsyncIterator[tuple[str, Records]]:
    """The proxy of `cfg`, composed in this loop with an Audit of the test's own."""
    (tmp_path / "proxy.toml").write_text(toml_dumps(cfg))
    config = load_config(tmp_path / "proxy.toml")
    records = Records()
    audit = Audit(logger=logging.Logger("test-connection", logging.INFO))
    proxy = Proxy(config, audit)
    with audit.attached(records):
        async with trio.open_nursery() as nursery:
            [address] = await nursery.start(serve, proxy, await bind_listeners(config))
            yield address, records
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def in_front_of(
    tmp_path: Path, pki: Path, script: Script, **proxy: Any
) -> AsyncIterator[tuple[str, Records]]:
    """A scripted upstream, and the proxy of `plain_config` in front of it."""
    async with (
        upstream_running(script) as upstream,
        proxy_running(tmp_path, plain_config(pki, upstream.address, **proxy)) as running,
    ):
        yield running


def plain_config(pki: Path, upstream: str, **proxy: Any) -> dict[str, Any]:
    return proxy_config(
        pki,
        upstream,
        proxy={"log_format": "json", **proxy},
        listener=[{"name": "plain", "bind": "127.0.0.1:0"}],
        route=[
            {
                "called_ae": "CT",
                "upstream": upstream,
                "listeners": ["plain"],
                "upstream_called_ae": "DEVICE",
                "allow_calling_ae": ["RAW*"],
            }
        ],
    )


async def connect(address: str) -> trio.SocketStream:
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def test_accepted_relayed_and_released(tmp_path: Path, pki: Path) -> None:
    seen: list[bytes] = []

    async def device(stream: trio.SocketStream) -> None:
        rq = await read_pdu(stream)
        seen.append(rq)
        await stream.send_all(build_ac(rq))
        data = await read_pdu(stream)
        seen.append(data)
        await stream.send_all(dimse.encode_p_data(1, b"\x03\x00" + bytes(10), command=True))
        seen.append(await read_pdu(stream))
        await stream.send_all(pdu.encode_release_rp())

    async with in_front_of(tmp_path, pki, device) as (addr, rec):
        client = await connect(addr)
        rq = build_rq("CT")
        await client.send_all(rq)
        ac = await read_pdu(client)
        assert ac[0] == pdu.A_ASSOCIATE_AC and ac[10:26] == rq[10:26]  # its own Called AE
        payload = dimse.encode_p_data(1, b"\x03\x00" + bytes(100), command=True)
        await client.send_all(payload)
        assert (await read_pdu(client))[0] == pdu.P_DATA_TF
        await client.send_all(pdu.encode_release_rq())
        assert await read_pdu(client) == pdu.encode_release_rp()
        record = await rec.next()
        await client.aclose()

    assert seen[0][10:26] == b"DEVICE".ljust(16)  # upstream_called_ae on the way up
    assert seen[1] == payload and seen[2] == pdu.encode_release_rq()
    assert (record.outcome, record.reason) == ("completed", "released")
    assert (record.calling_ae, record.called_ae, record.route) == ("RAW_SCU", "CT", "CT")
    assert record.bytes_up == len(rq) + len(payload) + 10
    assert record.bytes_down == len(ac) + 24 + 10


async def _never_called(stream: trio.SocketStream) -> None:
    raise AssertionError("no connection was expected upstream")


def _rq(**kw: Any) -> bytes:
    return build_rq(**kw)


REFUSALS = [
    # (case, config tweak, what the client sends, answer expected, reason, outcome)
    ("no-route", {}, _rq(called_ae="XX"), pdu.encode_reject(1, 1, 7), "no-route", "rejected"),
    (
        "calling-ae",
        {},
        _rq(calling_ae="OTHER"),
        pdu.encode_reject(1, 1, 3),
        "calling-ae-not-allowed",
        "rejected",
    ),
    (
        "protocol-version",
        {},
        _rq(version=2),
        pdu.encode_reject(1, 2, 2),
        "protocol-version",
        "rejected",
    ),
    (
        "route-source",
        {"allow_source": ["10.0.0.0/8"]},
        _rq(),
        pdu.encode_reject(1, 1, 1),
        "source-not-allowed",
        "rejected",
    ),
    (
        "unrecognized",
        {},
        b"\x0a\x00\x00\x00\x00\x00",
        pdu.encode_abort(2, 1),
        "unrecognized-pdu",
        "aborted",
    ),
    (
        "unexpected",
        {},
        pdu.encode_release_rq(),
        pdu.encode_abort(2, 2),
        "unexpected-pdu",
        "aborted",
    ),
    (
        "invalid",
        {},
        b"\x01\x00\x00\x00\x00\x10" + bytes(16),
        pdu.encode_abort(2, 6),
        "invalid-pdu",
        "aborted",
    ),
]


@pytest.mark.parametrize(
    ("tweak", "sent", "answer", "reason", "outcome"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_each_refusal_before_the_upstream(
    tmp_path: Path,
    pki: Path,
    tweak: dict[str, Any],
    sent: bytes,
    answer: bytes,
    reason: str,
    outcome: str,
) -> None:
    async with upstream_running(_never_called) as upstream:
        cfg = plain_config(pki, upstream.address)
        cfg["route"][0].update(tweak)
        async with proxy_running(tmp_path, cfg) as (address, records):
            client = await connect(address)
            await client.send_all(sent)
            assert await read_pdu(client) == answer
            assert await read_eof(client) == b""  # then an orderly close
            record = await records.next()
    assert (record.reason, record.outcome) == (reason, outcome)


async def test_refused_at_accept_before_any_byte(tmp_path: Path, pki: Path) -> None:
    cfg = plain_config(pki, "127.0.0.1:9")
    cfg["listener"][0]["allow_source"] = ["10.0.0.0/8"]
    async with proxy_running(tmp_path, cfg) as (address, records):
        client = await connect(address)
        assert await read_eof(client) == b""
        record = await records.next()
    assert (record.reason, record.outcome) == ("source-not-allowed", "refused")


async def test_handshake_timeout_closes(tmp_path: Path, pki: Path) -> None:
    cfg = plain_config(pki, "127.0.0.1:9", handshake_timeout=0.3)
    async with proxy_running(tmp_path, cfg) as (address, records):
        client = await connect(address)
        await client.send_all(build_rq()[:20])  # half an RQ, then nothing
        assert await read_eof(client) == b""
        record = await records.next()
    assert (record.reason, record.outcome) == ("handshake-timeout", "timed-out")


async def test_upstream_refuses_connection(tmp_path: Path, pki: Path) -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connection refused
        async with proxy_running(tmp_path, plain_config(pki, f"127.0.0.1:{port}")) as (a, rec):
            client = await connect(a)
            await client.send_all(build_rq())
            assert await read_pdu(client) == pdu.encode_reject(2, 3, 1)
            record = await rec.next()
    assert (record.reason, record.outcome) == ("upstream-unreachable", "rejected")


async def test_upstream_rejects_and_its_rj_is_relayed(tmp_path: Path, pki: Path) -> None:
    async def rejecting(stream: trio.SocketStream) -> None:
        await read_pdu(stream)
        await stream.send_all(pdu.encode_reject(1, 1, 3))
        await read_eof(stream)

    async with in_front_of(tmp_path, pki, rejecting) as (a, rec):
        client = await connect(a)
        await client.send_all(build_rq())
        assert await read_pdu(client) == pdu.encode_reject(1, 1, 3)
        record = await rec.next()

    assert (record.reason, record.outcome) == ("upstream-rejected", "rejected")


async def test_upstream_silent_gets_an_abort_and_the_client_an_rj(
    tmp_path: Path, pki: Path
) -> None:
    upstream_got: list[bytes] = []

    async def silent(stream: trio.SocketStream) -> None:
        await read_pdu(stream)
        upstream_got.append(await read_pdu(stream))

    async with upstream_running(silent) as upstream:
        cfg = plain_config(pki, upstream.address, associate_timeout=0.3)
        async with proxy_running(tmp_path, cfg) as (address, records):
            client = await connect(address)
            await client.send_all(build_rq())
            assert await read_pdu(client) == pdu.encode_reject(2, 3, 1)
            record = await records.next()
    assert (record.reason, record.outcome) == ("upstream-no-answer", "rejected")
    assert upstream_got == [ABORT]


async def test_too_many_associations(tmp_path: Path, pki: Path) -> None:
    release = trio.Event()

    async def holding(stream: trio.SocketStream) -> None:
        await stream.send_all(build_ac(await read_pdu(stream)))
        await release.wait()

    async with upstream_running(holding) as upstream:
        cfg = plain_config(pki, upstream.address, max_connections=1)
        async with proxy_running(tmp_path, cfg) as (address, records):
            first = await connect(address)
            await first.send_all(build_rq())
            assert (await read_pdu(first))[0] == pdu.A_ASSOCIATE_AC
            second = await connect(address)
            await second.send_all(build_rq())
            assert await read_pdu(second) == pdu.encode_reject(2, 3, 2)
            record = await records.next()
            release.set()
            await first.aclose()
    assert (record.reason, record.outcome) == ("too-many-associations", "rejected")


async def test_upstream_drops_mid_association(tmp_path: Path, pki: Path) -> None:
    async def dropping(stream: trio.SocketStream) -> None:
        await stream.send_all(build_ac(await read_pdu(stream)))
        await stream.aclose()

    async with in_front_of(tmp_path, pki, dropping) as (a, rec):
        client = await connect(a)
        await client.send_all(build_rq())
        assert (await read_pdu(client))[0] == pdu.A_ASSOCIATE_AC
        assert await read_pdu(client) == ABORT
        record = await rec.next()

    assert (record.reason, record.outcome) == ("upstream-closed", "aborted")


async def test_client_drops_mid_association(tmp_path: Path, pki: Path) -> None:
    upstream_got: list[bytes] = []

    async def listening(stream: trio.SocketStream) -> None:
        await stream.send_all(build_ac(await read_pdu(stream)))
        upstream_got.append(await read_pdu(stream))

    async with in_front_of(tmp_path, pki, listening) as (a, rec):
        client = await connect(a)
        await client.send_all(build_rq())
        assert (await read_pdu(client))[0] == pdu.A_ASSOCIATE_AC
        await client.aclose()
        record = await rec.next()

    assert (record.reason, record.outcome) == ("client-closed", "aborted")
    assert upstream_got == [ABORT]


async def test_idle_timeout_aborts_both(tmp_path: Path, pki: Path) -> None:
    upstream_got: list[bytes] = []

    async def idle(stream: trio.SocketStream) -> None:
        await stream.send_all(build_ac(await read_pdu(stream)))
        upstream_got.append(await read_pdu(stream))

    async with upstream_running(idle) as upstream:
        cfg = plain_config(pki, upstream.address, idle_timeout=0.5)
        async with proxy_running(tmp_path, cfg) as (address, records):
            client = await connect(address)
            await client.send_all(build_rq())
            assert (await read_pdu(client))[0] == pdu.A_ASSOCIATE_AC
            assert await read_pdu(client) == ABORT
            record = await records.next()
    assert (record.reason, record.outcome) == ("idle-timeout", "timed-out")
    assert upstream_got == [ABORT]


async def test_plaintext_on_a_tls_listener_and_tls_on_a_plaintext_one(
    tmp_path: Path, pki: Path
) -> None:
    cfg = proxy_config(
        pki,
        "127.0.0.1:9",
        listener=[
            {"name": "tls", "bind": "127.0.0.1:0", "tls": "in"},
        ],
    )
    async with proxy_running(tmp_path, cfg) as (address, records):
        client = await connect(address)
        await client.send_all(build_rq())
        assert await read_pdu(client) == pdu.encode_reject(1, 1, 1)
        record = await records.next()
    assert (record.reason, record.outcome) == ("plaintext-on-tls", "rejected")

    async with proxy_running(tmp_path, plain_config(pki, "127.0.0.1:9")) as (address, records):
        ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        tls_client = trio.SSLStream(await connect(address), ctx, server_hostname="localhost")
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await tls_client.do_handshake()
        record = await records.next()
    assert (record.reason, record.outcome) == ("tls-on-plaintext", "refused")


async def test_peer_certificate_refused_in_the_handshake(tmp_path: Path, pki: Path) -> None:
    cfg = proxy_config(pki, "127.0.0.1:9")
    async with proxy_running(tmp_path, cfg) as (address, records):
        ctx = client_ssl_context(pki / "ca.pem")  # no client certificate
        client = trio.SSLStream(await connect(address), ctx, server_hostname="localhost")
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await client.do_handshake()
            await client.send_all(build_rq())
            await client.receive_some(1)
        record = await records.next()
    assert record.outcome == "tls-failed" and record.reason == "tls-no-certificate"

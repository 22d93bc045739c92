"""W4: many associations held open and idle, to measure what one costs the middlebox in memory.

DCMTK cannot hold 500 associations open and idle, so this module plays both ends in one asyncio
loop: clients that send a real A-ASSOCIATE-RQ and wait for the A-ASSOCIATE-AC, and the device, an
acceptor that answers every RQ with an AC and swallows whatever follows. TLS is on whichever side
the setup puts it (client side for termination, device side for origination), with the same PKI,
TLS 1.3 only, client certificates required.

Readings, each taken once the middlebox used no CPU for a moment (it is idle):
  before     after one warm-up association came and went
  handshake  with every association established (A-ASSOCIATE-AC received), nothing sent yet
  traffic    after every association sent 1 MiB of P-DATA and the device received all of it
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass

import procs
from setups import CALLING_AE, Endpoint, Pki

from dicom_tls_proxy.protocol import dimse, pdu, pdu_items

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MAX_PDU = 16384
OPEN_CONCURRENCY = 50  # handshakes in flight at once (well inside the proxy's max_pending)
CLOSE_TIMEOUT = 5.0
TRAFFIC_CONCURRENCY = 50  # associations sending their 1 MiB at once (all 500 measured the same)


@dataclass
class IdleReadings:
    associations: int
    traffic_bytes: int  # P-DATA bytes each association sent
    rss_before_kib: int
    rss_handshake_kib: int
    rss_traffic_kib: int

    def per_association_kib(self, reading: int) -> float:
        return (reading - self.rss_before_kib) / self.associations


# -- PDUs -----------------------------------------------------------------------------------


def associate_rq(called_ae: str) -> bytes:
    context = pdu_items.PresentationContextItem(1, VERIFICATION, (IMPLICIT_LE,))
    return pdu.encode_associate_rq(
        called_ae,
        CALLING_AE,
        [context],
        max_pdu_length=MAX_PDU,
        implementation_class_uid="1.2.826.0.1.3680043.10.543.1",
        implementation_version_name="BENCH_IDLE",
    )


def associate_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting every proposed context with Implicit VR Little Endian."""
    parsed = pdu.parse_pdu(rq)
    if not isinstance(parsed, pdu.AssociateRequest):
        raise procs.BenchmarkError(f"the device expected an A-ASSOCIATE-RQ, got {parsed}")

    def item(item_type: int, value: bytes) -> bytes:
        return struct.pack(">BxH", item_type, len(value)) + value

    items = item(0x10, parsed.application_context.encode())
    for pc in parsed.presentation_contexts:
        items += item(0x21, bytes([pc.context_id, 0, 0, 0]) + item(0x40, IMPLICIT_LE.encode()))
    items += item(0x50, item(0x51, struct.pack(">I", MAX_PDU)))
    body = struct.pack(">Hxx", 1) + rq[10:42] + bytes(32) + items
    return struct.pack(">BxI", pdu.A_ASSOCIATE_AC, len(body)) + body


def p_data_pdus(total: int) -> list[bytes]:
    """P-DATA-TF PDUs of MAX_PDU bytes (a data PDV on context 1) adding up to at least `total`."""
    payload = bytes(MAX_PDU - 6)
    one = dimse.encode_p_data(1, payload, command=False, last=False)
    return [one] * -(-total // len(payload))


async def read_pdu(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(6)
    return header + await reader.readexactly(int.from_bytes(header[2:6], "big"))


# -- TLS ------------------------------------------------------------------------------------


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(pki.cert("client")), str(pki.key("client")))
    return ctx


def device_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(pki.cert("proxy")), str(pki.key("proxy")))
    return ctx


# -- the device -----------------------------------------------------------------------------


class Acceptor:
    """Answers every A-ASSOCIATE-RQ with an AC, then counts and discards what it receives."""

    def __init__(self) -> None:
        self.received = 0
        self.open = 0
        self._target = 0
        self._reached = asyncio.Event()
        self._all_closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self._all_closed.clear()
        try:
            writer.write(associate_ac(await read_pdu(reader)))
            await writer.drain()
            while chunk := await reader.read(256 * 1024):
                self.received += len(chunk)
                if self._target and self.received >= self._target:
                    self._reached.set()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:  # the loop is closing: nothing to report
            return
        finally:
            writer.close()
            self.open -= 1
            if not self.open:
                self._all_closed.set()

    def expect(self, total: int) -> None:
        """From now on, `total` more bytes are expected (call it before they are sent)."""
        self._target = self.received + total
        self._reached.clear()

    async def wait_expected(self) -> None:
        if self.received < self._target:
            await asyncio.wait_for(self._reached.wait(), procs.TIMEOUT * 5)

    async def wait_all_closed(self) -> None:
        """Until the middlebox closed every connection to the device."""
        if self.open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), procs.TIMEOUT)


# -- the clients ----------------------------------------------------------------------------


@dataclass
class Association:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def associate(endpoint: Endpoint, tls: ssl.SSLContext | None) -> Association:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", endpoint.port, ssl=tls, server_hostname="localhost" if tls else None
    )
    writer.write(associate_rq(endpoint.called_ae))
    await writer.drain()
    answer = await read_pdu(reader)
    if answer[0] != pdu.A_ASSOCIATE_AC:
        writer.close()
        raise procs.BenchmarkError(f"association refused: {pdu.describe(pdu.parse_pdu(answer))}")
    return Association(reader, writer)


async def associate_all(
    endpoint: Endpoint, tls: ssl.SSLContext | None, count: int
) -> list[Association]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> Association:
        async with gate:
            return await associate(endpoint, tls)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    opened = [r for r in results if isinstance(r, Association)]
    failures = [r for r in results if not isinstance(r, Association)]
    if failures:
        await close_all(opened)
        raise procs.BenchmarkError(
            f"{len(failures)} of {count} associations failed; first: {failures[0]!r}"
        )
    return opened


async def send_traffic(
    associations: list[Association], pdus: list[bytes], concurrency: int
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(a: Association) -> None:
        async with gate:
            for p in pdus:
                a.writer.write(p)
                await a.writer.drain()

    await asyncio.gather(*(one(a) for a in associations))


async def close_all(associations: list[Association]) -> None:
    async def one(a: Association) -> None:
        with contextlib.suppress(Exception):
            a.writer.write(pdu.encode_abort(0, 0))
            await a.writer.drain()
            a.writer.close()
            await asyncio.wait_for(a.writer.wait_closed(), CLOSE_TIMEOUT)

    await asyncio.gather(*(one(a) for a in associations))


# -- the measurement ------------------------------------------------------------------------


async def _rss_when_quiet(pid: int, settle: float) -> int:
    """RSS once the process is idle: no CPU for a moment, then `settle` more seconds (a process
    may hand freed memory back on its own idle timer; the same for every middlebox measured)."""
    await asyncio.to_thread(procs.wait_cpu_quiet, pid)
    await asyncio.sleep(settle)
    return procs.memory_kib(pid)["VmRSS"]


async def _measure(
    endpoint: Endpoint, pki: Pki, count: int, traffic: int, settle: float
) -> IdleReadings:
    pid = endpoint.measured_pid
    assert pid is not None, "W4 measures a middlebox"
    client_tls = client_context(pki) if endpoint.setup.client_tls else None
    device_tls = device_context(pki) if endpoint.setup.upstream_tls else None
    acceptor = Acceptor()
    server = await asyncio.start_server(
        acceptor.handle, "127.0.0.1", endpoint.device_port, ssl=device_tls, backlog=1024
    )
    async with server:
        await close_all([await associate(endpoint, client_tls)])  # warm-up
        await acceptor.wait_all_closed()
        before = await _rss_when_quiet(pid, settle)
        associations = await associate_all(endpoint, client_tls, count)
        try:
            handshake = await _rss_when_quiet(pid, settle)
            pdus = p_data_pdus(traffic)
            acceptor.expect(count * sum(map(len, pdus)))
            await send_traffic(associations, pdus, TRAFFIC_CONCURRENCY)
            await acceptor.wait_expected()
            after_traffic = await _rss_when_quiet(pid, settle)
        finally:
            await close_all(associations)
            await acceptor.wait_all_closed()
    return IdleReadings(count, traffic, before, handshake, after_traffic)


def measure(endpoint: Endpoint, pki: Pki, count: int, traffic: int, settle: float) -> IdleReadings:
    return asyncio.run(_measure(endpoint, pki, count, traffic, settle))

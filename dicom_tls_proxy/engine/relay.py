"""Relaying an established association: two pumps, large chunks, PDU boundaries only.

Once the upstream has answered the A-ASSOCIATE-RQ the proxy moves bytes as they come, one chunk per
wake-up, with no per-byte Python work: a `BoundaryTracker` reads only the 6-byte PDU headers so the
relay knows whether the association was released or aborted and whether an A-ABORT may be injected
(only between PDUs; never after an A-RELEASE-RP). Backpressure is natural: a pump does not
read again until its `send_all` returned, so a slow side slows the other and memory stays
bounded. The idle timeout is one cancel-scope deadline that both pumps push forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.protocol.association import Ending, RelayFacts
from dicom_tls_proxy.protocol.pdu import Abort, PduError
from dicom_tls_proxy.protocol.pdu_framing import BoundaryTracker
from dicom_tls_proxy.transport.streams import STREAM_ERRORS, abort_quietly
from dicom_tls_proxy.transport.tlsstream import ByteStream

# One read takes what the kernel holds, up to a share of READ_BUDGET: a single busy association
# reads up to 1 MiB at a time (measured in W1 origination: 0.7 CPU seconds per GB against 1.0 with
# 256 KiB reads, fewer wake-ups and window updates); a gateway holding hundreds of associations
# reads 64 KiB at a time, so that fifty of them moving data at once do not hold 1 MiB each.
READ_BUDGET = 16 * 1024 * 1024
CHUNK = 1024 * 1024
SMALLEST_CHUNK = 64 * 1024
# The idle deadline moves forward at most once per 1/16 of idle_timeout (and at least once a
# second): setting a trio deadline re-files it in the scheduler's heap, which per chunk cost more
# than the chunk's own bookkeeping. So an idle association ends between 15/16 of idle_timeout
# and idle_timeout after its last byte.
DEADLINE_STEPS = 16
# Longest PDU relayed, as dcm4che: pynetdicom (and others) read whatever length a header announces.
MAX_PDU_LENGTH = 16 * 1024 * 1024


class RelayOwner(Protocol):
    """What the proxy offers the relay: its relays to cancel on drain, whether it stops, and a
    count of bytes moved (its housekeeping trims the heap when traffic goes quiet)."""

    relays: set[trio.CancelScope]
    stopping: bool
    moved: int


@dataclass
class _Side:
    name: str  # "client" or "upstream"
    stream: ByteStream
    tracker: BoundaryTracker  # PDUs this side has *sent*
    closed: bool = False
    broken: bool = False  # our writes to it failed
    sending: bool = False  # a write to it was under way (if cancelled, the PDU is cut off)
    forwarded_at_boundary: bool = True  # what we forwarded *from* this side ends between PDUs


class Relay:
    """One established association's two pumps. `run` relays until the association ends and
    says what it saw (`RelayFacts`, named by `association.relay_reason`); `carry_out` then sends
    the ending's A-ABORTs, only where they can go (see `_abort`). Closes nothing.
    `shutdown` lets a draining proxy end the relay. `pending_up`/`pending_down` are bytes
    already read with the RQ / the AC: they take the same way as everything else (tracked,
    capped, counted), never a shortcut around it."""

    def __init__(
        self,
        client: ByteStream,
        upstream: ByteStream,
        record: AssociationRecord,
        idle_timeout: float,
        max_pdu_length: int | None = MAX_PDU_LENGTH,
        shutdown: RelayOwner | None = None,
    ) -> None:
        self.client = _Side("client", client, BoundaryTracker(max_pdu_length))
        self.upstream = _Side("upstream", upstream, BoundaryTracker(max_pdu_length))
        self.record = record
        self.idle_timeout = idle_timeout
        self.shutdown = shutdown
        self.invalid = ""  # the first invalid PDU seen, in words

    async def run(self, pending_up: bytes = b"", pending_down: bytes = b"") -> RelayFacts:
        c, u, record, shutdown = self.client, self.upstream, self.record, self.shutdown
        idle_timeout = self.idle_timeout
        with trio.CancelScope() as idle:
            moved_at = trio.current_time()
            idle.deadline = moved_at + idle_timeout
            step = min(1.0, idle_timeout / DEADLINE_STEPS)
            if shutdown is not None:
                shutdown.relays.add(idle)

            async def forward(src: _Side, dst: _Side, data: bytes | bytearray | memoryview) -> bool:
                """Track, cap and send one chunk from src to dst; False when the relay ends."""
                nonlocal moved_at
                if (now := trio.current_time()) - moved_at >= step:
                    moved_at = now
                    idle.deadline = now + idle_timeout
                try:
                    src.tracker.feed(data)
                except PduError as exc:  # not forwarded: the other side never sees it
                    self.invalid = self.invalid or f"{src.name} sent an invalid PDU: {exc}"
                    return False
                dst.sending = True
                try:
                    await dst.stream.send_all(data)
                except STREAM_ERRORS:
                    dst.broken = dst.closed = True
                    return False
                dst.sending = False
                src.forwarded_at_boundary = src.tracker.at_boundary
                if src is c:
                    record.bytes_up += len(data)
                else:
                    record.bytes_down += len(data)
                if shutdown is not None:
                    shutdown.moved += len(data)
                return not src.tracker.seen_abort

            async def pump(src: _Side, dst: _Side, pending: bytes, nursery: trio.Nursery) -> None:
                try:
                    if not pending or await forward(src, dst, pending):
                        del pending
                        while True:
                            data = await src.stream.receive_some(chunk_size(shutdown))
                            if not data:
                                src.closed = True
                                break
                            if not await forward(src, dst, data):
                                break
                            # Not kept alive while this side idles: it can be a 256 KiB chunk,
                            # and hundreds of associations wait between studies (measured: 578
                            # KiB each).
                            del data
                except STREAM_ERRORS:
                    src.closed = True
                nursery.cancel_scope.cancel()

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, c, u, pending_up, nursery)
                    # The other direction in this task: one task less per association (idle
                    # ones are counted in hundreds).
                    await pump(u, c, pending_down, nursery)
            finally:
                if shutdown is not None:
                    shutdown.relays.discard(idle)
        return RelayFacts(
            client_aborted=c.tracker.seen_abort,
            upstream_aborted=u.tracker.seen_abort,
            released=c.tracker.seen_release_rp or u.tracker.seen_release_rp,
            invalid=bool(self.invalid),
            idle=idle.cancelled_caught,
            stopping=shutdown is not None and shutdown.stopping,
            client_closed=c.closed and not c.broken,
        )

    async def carry_out(self, ending: Ending) -> None:
        """The ending's A-ABORTs: the client's first, then the upstream's."""
        if isinstance(ending.client, Abort):
            await _abort(self.client, self.upstream)
        if isinstance(ending.upstream, Abort):
            await _abort(self.upstream, self.client)


def chunk_size(owner: RelayOwner | None) -> int:
    """The most the next read may take: an equal share of READ_BUDGET, within its bounds."""
    relays = len(owner.relays) if owner is not None else 1
    return max(SMALLEST_CHUNK, min(CHUNK, READ_BUDGET // max(relays, 1)))


async def _abort(to: _Side, other: _Side) -> None:
    """A-ABORT (2, 0) to `to`, only where the bytes it received so far end on a PDU boundary."""
    if not (to.closed or to.broken or to.sending) and other.forwarded_at_boundary:
        await abort_quietly(to.stream)

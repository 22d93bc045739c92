"""A store-and-forward route's association, served by the proxy itself: its own A-ASSOCIATE-AC,
C-ECHO answered, every C-STORE written to the route's spool and acknowledged once it is durable.

Why this exists: on such a route the upstream may be down for an hour, and the modality must still
be able to send (issue 14). The connection driver (`connection`) has done the TLS, AE and peer
checks exactly as for a relay route and hands the association here once routed; what is said is
decided in `protocol.storescp` (contexts, which request gets what) and `store.spool` (whether the
instance is on disk), and this module carries it out: it reads PDUs, joins DIMSE messages
(`protocol.messages`), writes data set pieces as they arrive (a large instance never sits whole in
memory) and answers. It returns a `Stop` as every other step of the driver does; the association
model says what that ending sends.

What it must never do: send Success before `Incoming.finish` returned (the file and its folder
entry are on disk); leave a partial file behind when the association ends in the middle of an
instance; block the event loop on a disk write (they run in a thread); log PHI (instance UIDs and
AE titles are identifiers, the data set never appears).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import trio

from dicom_tls_proxy.config.schema import Route
from dicom_tls_proxy.ops.audit import AssociationRecord, Audit
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.association import Stop
from dicom_tls_proxy.protocol.dimse import SUCCESS, Command, describe_status, response
from dicom_tls_proxy.protocol.messages import CommandReceived, DataReceived, Event, MessageReader
from dicom_tls_proxy.protocol.messages import fragments as message_fragments
from dicom_tls_proxy.protocol.storescp import Context, Echo, Refuse, negotiate, request_action
from dicom_tls_proxy.protocol.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, uid_name
from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.store.spool import Incoming, Refused, Spool
from dicom_tls_proxy.transport.streams import answer_and_close, read_pdu
from dicom_tls_proxy.transport.tlsstream import ByteStream

# The Maximum Length Received the proxy announces: large P-DATA-TFs cost fewer Python steps per
# MB; a PDU this size is held whole in memory once per association.
MAX_PDU_LENGTH = 1 << 20


class StoreService:
    """One association on a store-and-forward route, from the proxy's AC to its end."""

    def __init__(
        self,
        client: ByteStream,
        record: AssociationRecord,
        route: Route,
        spool: Spool,
        audit: Audit,
        *,
        idle_timeout: float,
        stored: Callable[[], None],
    ) -> None:
        self.client = client
        self.record = record
        self.route = route
        self.spool = spool
        self.audit = audit
        self.idle_timeout = idle_timeout
        self.stored = stored  # tells the route's forwarder that there is something to send
        self.client_max_pdu: int | None = None
        self.contexts: Mapping[int, Context] = {}
        self.command: Command | None = None  # the C-STORE whose data set is arriving
        self.incoming: Incoming | None = None  # ... and where it goes, unless refused
        self.refusal: Refused | None = None  # ... or why it is read and dropped
        self.counts = {"stored": 0, "stored_bytes": 0, "refused": 0}

    async def run(self, rq: pdu.AssociateRequest, extra: bytes, scope: trio.CancelScope) -> Stop:
        """Serve until the association ends; `scope` is cancelled when a drain runs out."""
        negotiation = negotiate(
            rq,
            max_pdu_length=MAX_PDU_LENGTH,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION,
        )
        self.client_max_pdu = rq.max_pdu_length
        self.contexts = negotiation.accepted
        await self.client.send_all(negotiation.ac)
        self.record.bytes_down += len(negotiation.ac)
        try:
            with scope:
                return await self._serve(MessageReader(self.contexts), extra)
            return Stop(Reason.SHUTDOWN, "drain_timeout passed while stopping")
        finally:
            if self.incoming is not None:  # ended in the middle of an instance: nothing stays
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.incoming.discard)

    def summary(self) -> str:
        c = self.counts
        return f"{c['stored']} instances stored ({c['stored_bytes']} bytes), {c['refused']} refused"

    async def _serve(self, reader: MessageReader, rest: bytes) -> Stop:
        while True:
            with trio.move_on_after(self.idle_timeout) as waiting:
                raw, rest = await read_pdu(
                    self.client, MAX_PDU_LENGTH + pdu.HEADER_LENGTH, first=False, initial=rest
                )
            if waiting.cancelled_caught:
                return Stop(Reason.IDLE_TIMEOUT, f"nothing for idle_timeout; {self.summary()}")
            self.record.bytes_up += len(raw)
            kind = raw[0]
            if kind == pdu.P_DATA_TF:
                for event in reader.feed(raw):
                    await self._on(event)
            elif kind == pdu.A_RELEASE_RQ and reader.idle:
                await answer_and_close(self.client, pdu.encode_release_rp())
                self.record.bytes_down += pdu.HEADER_LENGTH + 4
                return Stop(Reason.RELEASED, f"released; {self.summary()}")
            elif kind == pdu.A_ABORT:
                return Stop(Reason.CLIENT_ABORTED, f"the client sent an A-ABORT; {self.summary()}")
            else:
                where = "in the middle of a message" if not reader.idle else "now"
                raise pdu.PduError(f"{pdu.pdu_name(kind)} {where}", pdu.UNEXPECTED_PDU)

    async def _on(self, event: Event) -> None:
        if isinstance(event, CommandReceived):
            await self._request(event.context_id, event.command)
        elif isinstance(event, DataReceived):
            await self._data(event)

    async def _request(self, context_id: int, command: Command) -> None:
        context = self.contexts[context_id]
        action = request_action(command, context)
        if isinstance(action, Echo):
            await self._answer(context_id, command, SUCCESS)
            return
        if isinstance(action, Refuse):
            refusal = Refused(action.status, action.why)
            if command.has_data_set:
                self.command, self.refusal = command, refusal
            else:
                await self._refused(context_id, command, refusal)
            return
        self.command = command
        try:
            self.incoming = self.spool.begin(
                calling_ae=self.record.calling_ae,
                called_ae=self.record.called_ae,
                sop_class=command.sop_class,
                sop_instance=command.sop_instance,
                transfer_syntax=context.transfer_syntax,
            )
        except Refused as refused:
            self.refusal = refused

    async def _data(self, event: DataReceived) -> None:
        incoming = self.incoming
        if incoming is not None:
            try:
                if incoming.add(event.data):
                    await trio.to_thread.run_sync(incoming.flush)
            except Refused as refused:
                self.incoming = None
                self.refusal = refused
                await trio.to_thread.run_sync(incoming.discard)
        if not event.last:
            return
        command, self.command = self.command, None
        assert command is not None  # MessageReader: data only after a command announced it
        if self.incoming is not None:
            incoming, self.incoming = self.incoming, None
            try:
                meta = await trio.to_thread.run_sync(incoming.finish)
            except Refused as refused:
                self.refusal = refused
            else:
                self._log_stored(meta.id, command, incoming.size)
                self.stored()
                await self._answer(event.context_id, command, SUCCESS)
                return
        refusal, self.refusal = self.refusal, None
        assert refusal is not None
        await self._refused(event.context_id, command, refusal)

    def _log_stored(self, ident: str, command: Command, size: int) -> None:
        self.counts["stored"] += 1
        self.counts["stored_bytes"] += size
        self.audit.event(
            "stored",
            route=self.route.name,
            peer=self.record.peer,
            calling_ae=self.record.calling_ae,
            sop_class=uid_name(command.sop_class),
            sop_instance=command.sop_instance,
            bytes=size,
            spool_id=ident,
        )

    async def _refused(self, context_id: int, command: Command, refusal: Refused) -> None:
        self.counts["refused"] += 1
        self.audit.event(
            "store-refused",
            logging.WARNING,
            route=self.route.name,
            peer=self.record.peer,
            calling_ae=self.record.calling_ae,
            sop_instance=command.sop_instance,
            status=f"0x{refusal.status:04x}",
            msg=f"answered {describe_status(refusal.status)}: {refusal}",
        )
        await self._answer(context_id, command, refusal.status)

    async def _answer(self, context_id: int, command: Command, status: int) -> None:
        answer = b"".join(
            message_fragments(
                context_id, response(command, status), self.client_max_pdu, command=True
            )
        )
        await self.client.send_all(answer)
        self.record.bytes_down += len(answer)

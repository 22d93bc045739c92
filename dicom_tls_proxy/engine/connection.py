"""One connection's driver: it walks the way a connection travels and asks `association` what
every ending means.

accept (listener allow_source, per-IP limit) -> TLS handshake -> first PDU within
handshake_timeout -> routing.decide -> connect upstream (plain or TLS) within connect_timeout ->
forward the RQ, relay the answer within associate_timeout -> relay both ways -> one record.

Each step either moves the `Association` forward or returns a `Stop`; the one place an
association ends, `_end`, asks the model for the `Ending` and carries it out (the PDU to the client,
the A-ABORT upstream, a graceful close so that a TCP reset cannot destroy the answer). This module
decides no outcome, reason or wire answer of its own: those are rows of `association.ENDINGS`.
"""

from __future__ import annotations

import ipaddress
import logging

import trio

from dicom_tls_proxy.config.schema import Listener, Route
from dicom_tls_proxy.engine import routing
from dicom_tls_proxy.engine.proxy import Generation, Proxy, Slot, warn_insecure
from dicom_tls_proxy.engine.relay import Relay
from dicom_tls_proxy.engine.storescp import StoreService
from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.ops.netaddr import format_address
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.association import (
    Answer,
    Association,
    Close,
    Forward,
    Relayed,
    State,
    Step,
    Stop,
    relay_reason,
    upstream_answer,
    wire,
)
from dicom_tls_proxy.protocol.uids import uid_name
from dicom_tls_proxy.protocol.vocabulary import Outcome, Reason
from dicom_tls_proxy.security import policy
from dicom_tls_proxy.security.auth import IPAddress, PeerIdentity, plaintext_allowed, source_allowed
from dicom_tls_proxy.transport.sockio import LeanStream, connect
from dicom_tls_proxy.transport.streams import (
    STREAM_ERRORS,
    abort_quietly,
    aclose_quietly,
    answer_and_close,
    os_error_text,
    read_pdu,
)
from dicom_tls_proxy.transport.tlscontext import TlsFailure
from dicom_tls_proxy.transport.tlsstream import ByteStream, TlsStream

FIRST_READ = 65536
TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record
PDU_REASONS = {  # why a first PDU that the codec refused is refused
    pdu.UNRECOGNIZED_PDU: Reason.UNRECOGNIZED_PDU,
    pdu.UNEXPECTED_PDU: Reason.UNEXPECTED_PDU,
}


async def handle(proxy: Proxy, li: Listener, accepted: trio.SocketStream) -> None:
    """Serve one accepted connection to its end; never raises but for cancellation."""
    await Connection(proxy, li, accepted).run()


class Connection:
    """The facts of one connection as it travels, and the steps that move it."""

    def __init__(self, proxy: Proxy, li: Listener, accepted: trio.SocketStream) -> None:
        self.proxy = proxy
        self.gen: Generation = proxy.gen  # this connection's config, whatever a reload does
        self.li = self.gen.config.listener(li.name)
        self.stream = LeanStream(accepted)
        self.peer = _peer_of(self.stream)
        self.record = AssociationRecord(listener=li.name, peer=format_address(self.peer))
        self.association = Association()
        self.pending = Slot(proxy.pending)
        self.client: ByteStream = self.stream
        self.upstream: ByteStream | None = None
        self.relay: Relay | None = None
        self.relayed = b""  # the upstream's own RJ or A-ABORT, passed on as sent

    async def run(self) -> None:
        proxy, record = self.proxy, self.record
        proxy.connection_opened(self.peer[0])
        try:
            stop = await self._walk()
            await self._end(stop)
        except pdu.PduError as exc:
            await self._end(Stop(PDU_REASONS.get(exc.abort_reason, Reason.INVALID_PDU), str(exc)))
        except TlsFailure as failure:
            if failure.certificate is not None:
                d = policy.describe(failure.certificate)
                record.peer_subject, record.peer_sha256 = d["subject"], d["sha256"]
            await self._end(Stop(failure.reason, str(failure)))
        except STREAM_ERRORS as exc:
            await self._end(Stop(Reason.CLIENT_CLOSED, f"connection lost: {exc}"))
        except Exception as exc:  # a bug of the proxy's, never blamed on the peer
            proxy.audit.exception("internal error", peer=record.peer)
            await self._end(Stop(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            self.pending.release()
            with trio.CancelScope(shield=True):
                if self.upstream is not None:
                    await aclose_quietly(self.upstream)
                await aclose_quietly(self.client)
            if not record.outcome:  # cancelled (a drain ran out, a second signal)
                record.finish(Outcome.ABORTED, Reason.SHUTDOWN)
            proxy.connection_closed(self.peer[0])
            proxy.audit.emit(record)

    async def _end(self, stop: Stop) -> None:
        """The one place an association ends: the model says how, this carries it out."""
        state = self.association.state
        ending = self.association.end(stop.reason)
        self.record.finish(ending.outcome, stop.reason, stop.detail)
        if state is State.RELAYING and self.relay is not None:
            await self.relay.carry_out(ending)
            return
        if self.upstream is not None and ending.upstream is not None:
            await abort_quietly(self.upstream)
        await self._answer(ending.client)

    async def _answer(self, answer: Answer) -> None:
        if isinstance(answer, Relayed):
            await answer_and_close(self.client, self.relayed)
        elif isinstance(answer, Close):
            if answer.graceful:
                await answer_and_close(self.client, b"")
        elif answer is not None:
            await answer_and_close(self.client, wire(answer))

    async def _walk(self) -> Stop:
        """Accept to end; returns why it ended."""
        gen, li, record, proxy = self.gen, self.li, self.record, self.proxy
        source = ipaddress.ip_address(self.peer[0].split("%")[0])
        if stop := self._admit(source):
            return stop
        self.association.step(Step.ADMITTED)
        with trio.move_on_after(gen.config.proxy.handshake_timeout) as scope:
            secured = await self._secure()
            if isinstance(secured, Stop):
                return secured
            identity, initial = secured
            raw, extra = await read_pdu(
                self.client, gen.config.proxy.max_associate_length, first=True, initial=initial
            )
            rq = _parse_request(raw)
            _describe_request(record, rq)
            plaintext_on_tls = li.tls is not None and self.client is self.stream
            if plaintext_on_tls and (stop := self._plaintext_on_tls(rq, source)):
                return stop
        if scope.cancelled_caught:
            return Stop(
                Reason.HANDSHAKE_TIMEOUT, "no complete A-ASSOCIATE-RQ within handshake_timeout"
            )
        self.association.step(Step.REQUEST)
        self.pending.release()
        decision = routing.decide(gen.config, li, identity, source, rq)
        if isinstance(decision, routing.Refusal):
            if decision.route:
                record.route = decision.route.name
            return Stop(decision.reason, decision.detail)
        route = decision.route
        record.route, record.upstream = route.name, str(route.upstream)
        if proxy.active >= proxy.max_connections:
            return Stop(Reason.TOO_MANY_ASSOCIATIONS, f"{proxy.active} associations relayed")
        self.association.step(Step.SERVED if route.stores else Step.ROUTED)
        proxy.association_opened(record)
        try:
            if route.stores:
                return await self._store(route, rq, extra)
            return await self._associate_and_relay(route, rq, extra)
        finally:
            proxy.association_closed(record)
            proxy.relayed += 1

    def _admit(self, source: IPAddress) -> Stop | None:
        per_ip_limit = self.gen.config.proxy.max_connections_per_ip
        if per_ip_limit and self.proxy.per_ip[self.peer[0]] > per_ip_limit:
            return Stop(
                Reason.TOO_MANY_ASSOCIATIONS,
                f"{source} already has {per_ip_limit} connections (max_connections_per_ip)",
            )
        if not source_allowed(self.li.allow_source, source):
            return Stop(
                Reason.SOURCE_NOT_ALLOWED, f"{source} is not in {self.li.name}'s allow_source"
            )
        return None

    async def _secure(self) -> tuple[PeerIdentity, bytes] | Stop:
        """TLS if the listener has it; returns the peer and bytes already read. The first byte
        tells the protocol: TLS starts with 0x16, an A-ASSOCIATE-RQ with 0x01, so plaintext DICOM
        on a TLS port can be answered in plaintext."""
        li, stream = self.li, self.stream
        first = bytes(await stream.receive_some(FIRST_READ))
        if not first:
            raise trio.BrokenResourceError("closed before sending anything")
        if li.tls is None:
            if first[0] == TLS_HANDSHAKE:
                return Stop(
                    Reason.TLS_ON_PLAINTEXT,
                    f"TLS handshake received on plaintext listener {li.name}: the peer expects TLS",
                )
            return PeerIdentity(), first
        if first[0] == pdu.A_ASSOCIATE_RQ:
            return PeerIdentity(), first
        return await self._handshake(first), b""

    async def _handshake(self, initial: bytes) -> PeerIdentity:
        li, record, audit = self.li, self.record, self.proxy.audit
        assert li.tls is not None
        table = self.gen.config.tls[li.tls]
        tstream = await TlsStream.accept(
            self.stream, self.gen.server_contexts[li.tls], table, initial=initial
        )
        self.client = tstream
        record.handshake_done()
        info = tstream.info()
        record.tls_version, record.cipher = info.version, info.cipher
        record.encryption, record.mac, record.tls_group = info.encryption, info.mac, info.group
        record.resumed = info.resumed
        if info.certificate is not None:
            d = policy.describe(info.certificate)
            record.peer_subject, record.peer_sha256 = d["subject"], d["sha256"]
            record.peer_certificate = d
        for warning in info.warnings:
            audit.event(
                "weak-certificate-accepted",
                logging.WARNING,
                listener=li.name,
                peer=record.peer,
                msg=warning,
            )
        negotiated = f"{info.version} {info.cipher}"
        warn_insecure(audit, table, negotiated, listener=li.name, peer=record.peer)
        return info.identity

    def _plaintext_on_tls(self, rq: pdu.AssociateRequest, source: IPAddress) -> Stop | None:
        """A plaintext RQ on a TLS listener: refused, unless allow_plaintext_from names it."""
        li, record = self.li, self.record
        if not plaintext_allowed(li.allow_plaintext_from, rq.calling_ae, source):
            return Stop(
                Reason.PLAINTEXT_ON_TLS,
                f"plaintext DICOM received on TLS listener {li.name} from Calling AE "
                f"{rq.calling_ae!r} at {source}",
            )
        self.proxy.audit.event(
            "plaintext-allowed",
            logging.WARNING,
            listener=li.name,
            peer=record.peer,
            calling_ae=rq.calling_ae,
            msg="plaintext DICOM on a TLS listener, let through by allow_plaintext_from",
        )
        record.tls_version = "none (allow_plaintext_from)"
        return None

    async def _associate_and_relay(
        self, route: Route, rq: pdu.AssociateRequest, extra: bytes
    ) -> Stop:
        opened = await self._open_upstream(route)
        if isinstance(opened, Stop):
            return opened
        self.upstream = opened
        self.association.step(Step.CONNECTED)
        answered = await self._associate(route, rq)
        if isinstance(answered, Stop):
            return answered
        # Not kept for the association's life (hundreds may idle between studies): the RQ and
        # its parse; the route and the record hold what is needed.
        del rq
        self.association.step(Step.ACCEPTED)
        self.relay = Relay(
            self.client,
            opened,
            self.record,
            self.gen.config.proxy.idle_timeout,
            shutdown=self.proxy,
        )
        facts = await self.relay.run(pending_up=extra, pending_down=answered)
        reason = relay_reason(facts)
        detail = self.relay.invalid if reason is Reason.INVALID_PDU else ""
        if reason is Reason.SHUTDOWN:
            detail = "drain_timeout passed while stopping"
        return Stop(reason, detail)

    async def _store(self, route: Route, rq: pdu.AssociateRequest, extra: bytes) -> Stop:
        """A store-and-forward route: the proxy is the association's acceptor (`storescp`)."""
        forwarding = self.proxy.forwarding
        service = StoreService(
            self.client,
            self.record,
            route,
            forwarding.spool(route),
            self.proxy.audit,
            idle_timeout=self.gen.config.proxy.idle_timeout,
            stored=lambda: forwarding.wake(route.name),
        )
        scope = trio.CancelScope()
        self.proxy.relays.add(scope)
        try:
            return await service.run(rq, extra, scope)
        finally:
            self.proxy.relays.discard(scope)

    async def _open_upstream(self, route: Route) -> ByteStream | Stop:
        timeout = self.gen.config.proxy.connect_timeout
        with trio.move_on_after(timeout):
            try:
                sock = await connect(route.upstream.host, route.upstream.port)
            except OSError as exc:
                return Stop(Reason.UPSTREAM_UNREACHABLE, f"{route.upstream}: {os_error_text(exc)}")
            if route.upstream_tls is None:
                return sock
            table = self.gen.config.tls[route.upstream_tls]
            name = table.server_name or route.upstream.host
            ctx = self.gen.client_contexts[route.upstream_tls]
            try:  # `str(route.upstream)`: the session kept for it is resumed
                return await TlsStream.connect(sock, ctx, table, name, str(route.upstream))
            except TlsFailure as failure:
                await aclose_quietly(sock)
                detail = f"{route.upstream}: {failure.reason}: {failure}"
                if failure.certificate is not None:
                    d = policy.describe(failure.certificate)
                    detail += f" (upstream certificate {d['subject']}, {d['sha256']})"
                return Stop(Reason.UPSTREAM_TLS_FAILED, detail)
            except STREAM_ERRORS as exc:
                await aclose_quietly(sock)
                return Stop(Reason.UPSTREAM_TLS_FAILED, f"{route.upstream}: {exc}")
            except BaseException:  # connect_timeout (or a drain) in the middle of the handshake
                await trio.aclose_forcefully(sock)
                raise
        return Stop(Reason.UPSTREAM_TIMEOUT, f"{route.upstream}: no connection within {timeout}s")

    async def _associate(self, route: Route, rq: pdu.AssociateRequest) -> bytes | Stop:
        """Forward the RQ, judge the upstream's answer. When the association is up (AC), the AC
        went to the client and the bytes that came after it are returned, for the relay."""
        assert self.upstream is not None
        upstream, record = self.upstream, self.record
        raw = rq.raw
        if route.upstream_called_ae:
            raw = pdu.rewrite_called_ae(raw, route.upstream_called_ae)
        timeout = self.gen.config.proxy.associate_timeout
        answer: bytes | None = None
        after = b""
        problem = ""
        with trio.move_on_after(timeout):
            try:
                await upstream.send_all(raw)
                answer, after = await read_pdu(
                    upstream, max(self.gen.config.proxy.max_associate_length, 1 << 20), first=False
                )
            except STREAM_ERRORS as exc:
                if route.upstream_tls is not None:
                    # TLS 1.3: the server judges our client certificate after our side of the
                    # handshake is done; its refusal shows up here, as an alert or a reset.
                    return Stop(
                        Reason.UPSTREAM_TLS_FAILED,
                        f"{route.upstream}: the upstream ended the TLS session right after the "
                        f"handshake ({exc}): it most likely refuses the proxy's client "
                        f"certificate of [tls.{route.upstream_tls}]",
                    )
                problem = f"the upstream closed the connection before answering ({exc})"
            except pdu.PduError as exc:
                problem = f"the upstream answered with an invalid PDU: {exc}"
        if answer is None:
            return Stop(
                Reason.UPSTREAM_NO_ANSWER,
                problem or f"no answer within associate_timeout ({timeout}s)",
            )
        verdict = upstream_answer(
            answer, rq.raw, called_ae_rewritten=bool(route.upstream_called_ae)
        )
        if isinstance(verdict, Stop):
            self.relayed = answer
            return verdict
        assert isinstance(verdict, Forward)
        await self.client.send_all(verdict.answer)
        record.bytes_down += len(verdict.answer)
        record.bytes_up += len(raw)
        return after


def _parse_request(raw: bytes) -> pdu.AssociateRequest:
    parsed = pdu.parse_pdu(raw)
    if not isinstance(parsed, pdu.AssociateRequest):
        raise pdu.PduError(
            f"first PDU is {type(parsed).__name__}, not an A-ASSOCIATE-RQ", pdu.UNEXPECTED_PDU
        )
    return parsed


def _describe_request(record: AssociationRecord, rq: pdu.AssociateRequest) -> None:
    record.calling_ae, record.called_ae = rq.calling_ae, rq.called_ae
    names: list[str] = []
    for pc in rq.presentation_contexts:
        name = uid_name(pc.abstract_syntax)
        if name not in names:
            names.append(name)
    record.abstract_syntaxes = names


def _peer_of(stream: LeanStream) -> tuple[str, int]:
    try:
        name = stream.socket.getpeername()
        return str(name[0]), int(name[1])
    except OSError:
        return ("0.0.0.0", 0)

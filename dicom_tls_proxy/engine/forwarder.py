"""Forwarding a store-and-forward route's spool to its upstream: in the background, oldest first,
many instances per association, retried with back-off for as long as it takes.

Why this exists: a modality got Success for every instance in the spool (`storescp`); this is the
half that hands them on (issue 14). Per route one task (`Forwarding.run`) takes the spool's
forwarder lock, so with `workers = N` exactly one process forwards a route at a time and another
takes over within LOCK_RETRY seconds when it dies; its place is the spool itself, so a restart
loses nothing. An association is opened with `echo.open_link` (the same connect, TLS and
associate as `dicom-tls-proxy echo`, so a failure is told in the same words), proposing what
`protocol.forwarding` says; each C-STORE-RSP status is judged by `dimse.store_disposition`:
delivered (the file is removed), refused for good (moved to failed/ with the reason), or worth a
retry (the association ends, the route backs off: retry_interval doubling up to
retry_max_interval, back to retry_interval after a success).

What it must never do: remove an instance before the upstream's Success or Warning for it (so a
crash in between sends it again: delivery is at least once); block the event loop on a file
(reads, removals and renames run in a thread); stop retrying a transient failure; log a data set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import Config, Route
from dicom_tls_proxy.engine import echo
from dicom_tls_proxy.ops.audit import Audit
from dicom_tls_proxy.protocol import forwarding, pdu
from dicom_tls_proxy.protocol.dimse import (
    C_STORE_RSP,
    c_store_rq,
    describe_status,
    store_disposition,
)
from dicom_tls_proxy.protocol.messages import CommandReceived, MessageReader, fragments
from dicom_tls_proxy.protocol.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, uid_name
from dicom_tls_proxy.store import dicomfile
from dicom_tls_proxy.store.spool import Meta, Spool, SpoolError
from dicom_tls_proxy.transport.streams import STREAM_ERRORS, abort_quietly, aclose_quietly, read_pdu
from dicom_tls_proxy.transport.tlsstream import ByteStream

LOCK_RETRY = 2.0  # seconds between two tries for a spool's forwarder lock another process holds
POLL = 1.0  # seconds between two looks at an empty queue (other workers may have stored)
SCAN = 1000  # queued instances read per look
CHUNK = 4 << 20  # bytes of a data set read from the file at a time
LINGER = 1.0  # seconds a forwarding association waits for more instances before its release


class _Generation(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def client_contexts(self) -> Mapping[str, SSL.Context]: ...


class Owner(Protocol):
    """What the forwarders read of the proxy (`proxy.Proxy` is one, structurally): the
    generation in force, its audit, and whether it stops."""

    @property
    def gen(self) -> _Generation: ...

    @property
    def audit(self) -> Audit: ...

    @property
    def stopping(self) -> bool: ...


class Forwarding:
    """The store-and-forward routes of one proxy process: their spools (shared with the
    associations that fill them) and their forwarders."""

    def __init__(self, proxy: Owner) -> None:
        self.proxy = proxy
        self._spools: dict[Path, Spool] = {}
        self._wake: dict[str, trio.Event] = {}
        self._layout: tuple[tuple[str, Path | None], ...] = ()
        self._routes: tuple[Route, ...] = ()
        self.reloaded = trio.Event()  # set when a reload changed a route: a back-off ends
        self._round = trio.CancelScope()

    def spool(self, route: Route) -> Spool:
        """The route's spool (one object per folder, whatever the generation)."""
        assert route.spool is not None
        spool = self._spools.get(route.spool)
        if spool is None:
            spool = Spool(route.spool, route.spool_max_bytes)
            spool.implementation_class_uid = IMPLEMENTATION_CLASS_UID
            spool.implementation_version_name = IMPLEMENTATION_VERSION
            self._spools[route.spool] = spool
        spool.max_bytes = route.spool_max_bytes
        return spool

    def prepare(self, config: Config) -> list[str]:
        """Create the spool folders of `config`'s routes; what failed, by key."""
        problems = []
        if any(route.stores for route in config.routes):
            dicomfile.load_pydicom()  # now, not in the first modality's C-STORE
        for route in config.routes:
            if route.stores:
                try:
                    self.spool(route).prepare()
                except SpoolError as exc:
                    problems.append(f"{route.key_path}.spool: {exc}")
        return problems

    def follow(self, config: Config) -> None:
        """A reload: restart the forwarders if a store-and-forward route came, went or moved its
        spool. Other changes (upstream, intervals, spool_max_bytes...) are taken by each
        forwarder between two associations (`RouteForwarder.current`): cancelling one in the
        middle would send its instance again."""
        if _layout(config) != self._layout:
            self._round.cancel()
        routes = tuple(r for r in config.routes if r.stores)
        if routes != self._routes:
            self._routes = routes
            self.reloaded.set()
            self.reloaded = trio.Event()

    def wake(self, name: str) -> None:
        """Something was stored for route `name`: its forwarder looks now."""
        event = self._wake.get(name)
        if event is not None:
            event.set()

    async def run(self) -> None:
        while True:
            config = self.proxy.gen.config
            self._layout = _layout(config)
            self._routes = tuple(r for r in config.routes if r.stores)
            with trio.CancelScope() as self._round:
                async with trio.open_nursery() as nursery:
                    for route in (r for r in config.routes if r.stores):
                        nursery.start_soon(self._forward, route)
                    await trio.sleep_forever()

    async def nap(self, route: Route, seconds: float) -> None:
        """Wait `seconds`, less if something is stored for the route meanwhile."""
        with trio.move_on_after(seconds):
            await self._wake[route.name].wait()
        self._wake[route.name] = trio.Event()

    async def _forward(self, route: Route) -> None:
        """Forward the route's spool whenever this process holds its lock. A failure of the
        forwarder's own (a bug, a spool folder removed under it) is an error line with its
        traceback and a new start after LOCK_RETRY: it must not take down the proxy, which
        goes on accepting into the spool and serving the other routes."""
        spool = self.spool(route)
        self._wake[route.name] = trio.Event()
        while True:
            try:
                with spool.forwarder_lock() as mine:
                    if mine:
                        await RouteForwarder(self.proxy, route, spool, self).run()
            except Exception:  # a bug of the proxy's: the modalities are still served
                self.proxy.audit.exception("internal error in a forwarder", route=route.name)
                await trio.sleep(route.retry_max_interval)
            await self.nap(route, LOCK_RETRY)


def _layout(config: Config) -> tuple[tuple[str, Path | None], ...]:
    return tuple((r.name, r.spool) for r in config.routes if r.stores)


@dataclass
class Batch:
    """What one forwarding association did."""

    sent: int = 0
    bytes: int = 0
    failed: int = 0
    problem: str = ""  # a transient failure ended it: retry later
    advice: str = ""
    messages: int = 0  # C-STORE-RQs sent: the next one's Message ID is this + 1

    @property
    def handled(self) -> int:
        return self.sent + self.failed


class RouteForwarder:
    """The forwarding of one route, by the process that holds its spool's lock."""

    def __init__(
        self,
        proxy: Owner,
        route: Route,
        spool: Spool,
        forwarding: Forwarding,
    ) -> None:
        self.proxy = proxy
        self.route = route
        self.spool = spool
        self.forwarding = forwarding
        self.audit = proxy.audit

    async def run(self) -> None:
        route, spool = self.route, self.spool
        removed = await trio.to_thread.run_sync(spool.remove_orphans)
        if removed:
            self.audit.event(
                "spool-cleaned",
                route=route.name,
                files=len(removed),
                msg="removed what interrupted writes left",
            )
        delay = route.retry_interval
        while not self.proxy.stopping:
            route = self.route = self.current()
            queued = await trio.to_thread.run_sync(spool.queued, SCAN)
            if not queued:
                await self.forwarding.nap(route, POLL)
                continue
            result = await self._batch(self._choose(queued))
            if not result.problem:
                delay = route.retry_interval
                continue
            self.audit.event(
                "forward-failed",
                logging.WARNING,
                route=route.name,
                upstream=str(route.upstream),
                cause=result.problem,
                advice=result.advice,
                queued=len(queued) - result.sent - result.failed,
                next_attempt_in=delay,
            )
            with trio.move_on_after(delay):  # or until a reload changed a route
                await self.forwarding.reloaded.wait()
            delay = min(delay * 2, route.retry_max_interval)

    def current(self) -> Route:
        """The route as the generation in force says (a reload may have changed it)."""
        for route in self.proxy.gen.config.routes:
            if route.stores and (route.name, route.spool) == (self.route.name, self.route.spool):
                return route
        return self.route  # gone: `Forwarding.follow` cancels this forwarder

    def _called_ae(self, meta: Meta) -> str:
        route = self.route
        if route.upstream_called_ae:
            return route.upstream_called_ae
        return meta.called_ae or route.called_ae

    def _parties(self, meta: Meta) -> tuple[str, str]:
        """The Calling and Called AE an instance is forwarded with: one pair per association."""
        return meta.calling_ae, self._called_ae(meta)

    def _choose(self, queued: list[Meta]) -> list[Meta]:
        """The oldest instance and those after it that share its Calling and Called AE (one
        association has one of each), as many as fit in one association."""
        key = self._parties(queued[0])
        same = [m for m in queued if self._parties(m) == key]
        kinds = [(m.sop_class, m.transfer_syntax) for m in same]
        return same[: forwarding.batch(kinds, self.route.forward_batch)]

    async def _batch(self, chosen: list[Meta]) -> Batch:
        route, gen = self.route, self.proxy.gen
        proposal = forwarding.Proposal.of([(m.sop_class, m.transfer_syntax) for m in chosen])
        table = gen.config.tls[route.upstream_tls] if route.upstream_tls else None
        context = gen.client_contexts.get(route.upstream_tls) if route.upstream_tls else None
        calling = chosen[0].calling_ae or route.health_check_calling_ae
        result = echo.EchoResult()
        opened: list[ByteStream] = []
        done = Batch()
        started = time.monotonic()
        timeout = gen.config.proxy.connect_timeout + gen.config.proxy.associate_timeout
        try:
            with trio.move_on_after(timeout) as scope:
                link = await echo.open_link(
                    route.upstream,
                    self._called_ae(chosen[0]),
                    calling,
                    table,
                    proposal.contexts,
                    result,
                    opened,
                    ssl_context=context,
                )
            if scope.cancelled_caught:
                echo.timed_out(result, table, str(route.upstream), timeout)
                link = None
            if link is None:
                await self._attempted(chosen[0], result.cause)
                return Batch(problem=result.cause, advice=result.advice)
            await self._send(link, proposal, chosen, done)
            while not done.problem and done.handled < route.forward_batch:
                more = await self._more(proposal, chosen[0], route.forward_batch - done.handled)
                if not more:
                    break
                await self._send(link, proposal, more, done)
            if done.problem:
                await abort_quietly(link.stream)
            else:
                await echo.release(link.stream)
        finally:
            if opened:
                with trio.CancelScope(shield=True):
                    await aclose_quietly(opened[-1])
        if done.sent or done.failed:
            self.audit.event(
                "forwarded",
                route=route.name,
                upstream=str(route.upstream),
                count=done.sent,
                bytes=done.bytes,
                failed=done.failed,
                duration_s=round(time.monotonic() - started, 3),
            )
        return done

    async def _send(
        self, link: echo.Link, proposal: forwarding.Proposal, chosen: list[Meta], done: Batch
    ) -> None:
        reader = MessageReader(proposal.ids.values())
        for meta in chosen:
            if self.proxy.stopping:
                return
            done.messages += 1
            number = done.messages
            step = forwarding.plan(link.accept, proposal, (meta.sop_class, meta.transfer_syntax))
            if isinstance(step, forwarding.Refuse):
                if await self._fail(meta, step.reason, done):
                    continue
                return
            try:
                with trio.move_on_after(self.route.forward_timeout) as scope:
                    await self._store(link, meta, step, number)
                    status, link.rest = await self._response(link, reader, number, link.rest)
                if scope.cancelled_caught:
                    status = (
                        f"no C-STORE-RSP within forward_timeout ({self.route.forward_timeout}s)"
                    )
            except dicomfile.ConversionError as exc:  # raised before the C-STORE-RQ went out
                why = f"cannot be converted to {uid_name(step.transfer_syntax)}: {exc}"
                if await self._fail(meta, why, done):
                    continue
                return
            except (pdu.PduError, *STREAM_ERRORS) as exc:
                status = f"the upstream connection failed while sending: {exc}"
            except OSError as exc:  # reading the spool file
                status = f"reading {self.spool.path_of(meta)} failed: {exc}"
            if isinstance(status, str):
                done.problem = status
                await self._attempted(meta, status)
                return
            disposition = store_disposition(status)
            if disposition == "delivered":
                try:
                    await trio.to_thread.run_sync(self.spool.delivered, meta)
                except OSError as exc:  # it is sent again later: at least once
                    done.problem = (
                        f"removing the delivered {self.spool.path_of(meta)} failed: {exc}"
                    )
                    return
                done.sent += 1
                done.bytes += meta.size
                self._forwarded(meta, status)
            elif disposition == "failed":
                why = f"the upstream answered {describe_status(status)}"
                if not await self._fail(meta, why, done):
                    return
            else:
                done.problem = f"the upstream answered {describe_status(status)}"
                await self._attempted(meta, done.problem)
                return

    async def _more(self, proposal: forwarding.Proposal, first: Meta, limit: int) -> list[Meta]:
        """What else this association can carry, waiting up to LINGER for it: the oldest queued
        instances, as long as they share its Calling and Called AE and their kind was proposed.
        Oldest first holds: once the oldest queued instance does not fit, the association ends
        and the next one is opened for it. A modality sending a study while the upstream is up
        is so forwarded in a few associations, not one per instance."""
        key = self._parties(first)
        with trio.move_on_after(LINGER):
            while not self.proxy.stopping:
                queued = await trio.to_thread.run_sync(self.spool.queued, limit)
                fit = []
                for meta in queued:
                    kind = (meta.sop_class, meta.transfer_syntax)
                    if self._parties(meta) != key or kind not in proposal.ids:
                        break
                    fit.append(meta)
                if fit or queued:
                    return fit
                await self.forwarding.nap(self.route, LINGER)
        return []

    async def _store(
        self, link: echo.Link, meta: Meta, step: forwarding.Send, message_id: int
    ) -> None:
        """Send the C-STORE-RQ and its data set; a conversion is done (and may fail with
        ConversionError) before anything is sent, so that the association stays usable."""
        max_pdu = link.accept.max_pdu_length
        path = self.spool.path_of(meta)
        converted = step.transfer_syntax != meta.transfer_syntax
        if converted:
            data = await trio.to_thread.run_sync(dicomfile.data_set_as, path, step.transfer_syntax)
        command = c_store_rq(message_id & 0xFFFF, meta.sop_class, meta.sop_instance)
        await link.stream.send_all(
            b"".join(fragments(step.context_id, command, max_pdu, command=True))
        )
        if converted:
            await link.stream.send_all(
                b"".join(fragments(step.context_id, data, max_pdu, command=False))
            )
            return
        with path.open("rb") as handle:
            handle.seek(meta.data_offset)
            left = meta.size
            while True:
                data = await trio.to_thread.run_sync(handle.read, min(CHUNK, left))
                left -= len(data)
                if not data and left > 0:
                    raise OSError(f"{path} is {left} bytes shorter than its JSON says")
                last = left <= 0
                pieces = fragments(step.context_id, data, max_pdu, command=False, last=last)
                await link.stream.send_all(b"".join(pieces))
                if last:
                    return

    async def _response(
        self, link: echo.Link, reader: MessageReader, message_id: int, rest: bytes
    ) -> tuple[int | str, bytes]:
        """The status of the C-STORE-RSP to `message_id`, or what the upstream did instead."""
        while True:
            link.ack_at_once()
            raw, rest = await read_pdu(link.stream, 1 << 20, first=False, initial=rest)
            if raw[0] != pdu.P_DATA_TF:
                return f"the upstream sent {pdu.describe(pdu.parse_pdu(raw))}", rest
            for event in reader.feed(raw):
                if not isinstance(event, CommandReceived):
                    return "the upstream sent a data set instead of a C-STORE-RSP", rest
                command = event.command
                if command.field != C_STORE_RSP or command.message_id != message_id & 0xFFFF:
                    return f"the upstream sent command 0x{command.field:04x}, not the RSP", rest
                if command.status is None:
                    return "the upstream sent a C-STORE-RSP without a status", rest
                return command.status, rest

    async def _attempted(self, meta: Meta, error: str) -> None:
        await trio.to_thread.run_sync(self.spool.attempted, meta, error)

    async def _fail(self, meta: Meta, reason: str, done: Batch) -> bool:
        """Move the instance to failed/ for `reason` (counted in `done.failed`); False when the
        spool cannot (its disk full...): it stays queued, `done.problem` says why, and it is
        sent, refused and moved again after the back-off."""
        try:
            await trio.to_thread.run_sync(self.spool.fail, meta, reason)
        except OSError as exc:
            done.problem = f"moving {self.spool.path_of(meta)} to failed/ failed: {exc}"
            return False
        done.failed += 1
        self.audit.event(
            "failed",
            logging.ERROR,
            route=self.route.name,
            calling_ae=meta.calling_ae,
            sop_class=uid_name(meta.sop_class),
            sop_instance=meta.sop_instance,
            reason=reason,
            msg=f"moved to {self.spool.failed_folder}; not retried (spool retry puts it back)",
        )
        return True

    def _forwarded(self, meta: Meta, status: int) -> None:
        self.audit.event(
            "instance-forwarded",
            logging.DEBUG,
            route=self.route.name,
            upstream=str(self.route.upstream),
            calling_ae=meta.calling_ae,
            sop_class=uid_name(meta.sop_class),
            sop_instance=meta.sop_instance,
            bytes=meta.size,
            status=f"0x{status:04x}",
        )

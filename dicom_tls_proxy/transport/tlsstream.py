"""TLS streams over trio sockets: what the relay reads plaintext from and writes plaintext to.

Why a stream of our own instead of `trio.SSLStream`: `SSLStream.receive_some()` hands back one TLS
record (at most 16 KiB) per call, so every 16 KiB costs a trip through the scheduler; measured, a
relay built on it ran at half of stunnel's speed.

Two transports under one `TlsStream` base (the handshake's outcome, the peer's identity, the
SSL_read loop and its errors, closing), each moving ciphertext its own way:
- `MemoryTlsStream` (the listeners, and any stream that is not over a `sockio.LeanStream`): one
  large socket read per wake-up goes into a memory BIO (in 32 KiB slices, so OpenSSL's BIOs,
  which never shrink, stay small) and is decrypted until OpenSSL has nothing more, then returned
  all at once. Writes are encrypted the same way and go out in one `send_all`. Every path that
  writes ciphertext (application data, but also TLS 1.3 tickets and KeyUpdate answers produced
  while reading) drains the outgoing BIO under one lock, so records leave in the order OpenSSL
  made them. The proxy hands it a `sockio.LeanStream`, which passes through the scheduler once
  per chunk (and whose socket has TCP_NODELAY, as `trio.SocketStream` sets it).
- `SocketTlsStream` (the proxy's own upstream connections, origination): OpenSSL reads and writes
  the socket itself, which spares the three passes over every written byte that the memory BIOs
  cost; its docstring says why the listeners keep the memory BIOs.
How bytes get into and out of OpenSSL (pyOpenSSL's private bindings, or its public API when they
are gone) is `_openssl`'s: this module calls its functions and never touches a private name.

This module never logs and never decides routing or verification (`tlscontext` does): it reports a
`TlsFailure` with a `Reason`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn, Protocol

import trio
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import TlsTable
from dicom_tls_proxy.transport import _openssl, sessions
from dicom_tls_proxy.transport._openssl import RECORD, Buffer
from dicom_tls_proxy.transport.sockio import LeanStream, stream_error, waiting
from dicom_tls_proxy.transport.tlscontext import (
    TlsInfo,
    Verification,
    client_connection,
    handshake_completed,
    handshake_failure,
    negotiated,
    server_connection,
    ssl_error_text,
)

RECEIVE_SIZE = 256 * 1024  # one socket read; large, so one wake-up moves many records
SLICE = 32 * 1024  # what goes through OpenSSL's memory BIOs at a time
RECORD_OVERHEAD = 64  # more than a record adds: header, explicit nonce, CBC padding and MAC, tag
_NO_LIMIT = sys.maxsize


class ByteStream(Protocol):
    """What the relay needs of either side: a plain `trio.SocketStream` or a `TlsStream`."""

    async def receive_some(
        self, max_bytes: int | None = None
    ) -> bytes | bytearray | memoryview: ...
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> None: ...


class TlsStream:
    """A TLS connection over a trio socket stream, after its handshake: made by `accept` (a
    listener's side, `MemoryTlsStream`) or `connect` (`SocketTlsStream` over a `LeanStream`,
    `MemoryTlsStream` over anything else). Subclasses move the ciphertext."""

    def __init__(
        self, transport: trio.abc.HalfCloseableStream, conn: SSL.Connection, v: Verification
    ):
        self.transport = transport
        self._conn = conn
        self._verification = v
        self._eof = False
        self._error = ""
        self._error_cause: OSError | None = None  # a reset OpenSSL met on its own socket
        self._keep_session: Callable[[], None] | None = None  # at the peer's first data

    # -- setting up -------------------------------------------------------------------------

    @staticmethod
    async def accept(
        transport: trio.abc.HalfCloseableStream,
        ctx: SSL.Context,
        table: TlsTable,
        initial: bytes = b"",
    ) -> TlsStream:
        """Server side handshake. `initial` is what the caller already read from the socket."""
        v = Verification(table, "client", error_text=_openssl.verify_error_text)
        conn = server_connection(ctx, v)
        stream = MemoryTlsStream(transport, conn, v)
        if initial:
            _openssl.feed(conn, memoryview(initial))
        await stream._handshake()
        return stream

    @staticmethod
    async def connect(
        transport: trio.abc.HalfCloseableStream,
        ctx: SSL.Context,
        table: TlsTable,
        server_name: str,
        upstream: str = "",
    ) -> TlsStream:
        """Client side handshake; `server_name` is checked against the certificate, sent as SNI.
        Over a `LeanStream` (the proxy's upstream connections) OpenSSL reads and writes the socket
        itself: see `SocketTlsStream`. With `upstream` ("host:port") the session last made with
        it (and `server_name`) through `ctx` is resumed, and this one kept in its place, and the
        key exchange group it chose last time gets the key share (`sessions.ClientSessions`)."""
        v = Verification(
            table, "server", server_name=server_name, error_text=_openssl.verify_error_text
        )
        stream: TlsStream
        if isinstance(transport, LeanStream):
            sock = transport.socket
            conn = client_connection(ctx, v, sock)
            stream = SocketTlsStream(transport, sock, conn, v)
        else:
            conn = client_connection(ctx, v, None)
            stream = MemoryTlsStream(transport, conn, v)
        cache = sessions.sessions_of(ctx) if upstream else None
        if cache is None:
            await stream._handshake()
            return stream
        key = (upstream, server_name)
        cache.offer(conn, key)
        try:
            await stream._handshake()
        except BaseException:
            cache.forget(key)
            raise
        cache.learn(conn, key)
        stream._keep_session = lambda: cache.keep(conn, key)
        return stream

    async def _handshake(self) -> None:
        raise NotImplementedError

    def info(self) -> TlsInfo:
        return negotiated(self._conn, self._verification)

    def _completed(self) -> None:
        handshake_completed(self._verification, self._conn, _openssl.session_reused(self._conn))

    def _first_data(self) -> None:
        """The peer's first data: TLS 1.3 tickets, sent after the handshake, came before it."""
        keep, self._keep_session = self._keep_session, None
        if keep is not None:
            keep()

    # -- moving bytes -----------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _raise_if_broken(self) -> None:
        """A fatal TLS error while reading is a broken stream, like a reset, above."""
        if self._error:
            raise trio.BrokenResourceError(self._error) from self._error_cause

    def _decrypt_into(self, out: Buffer, limit: int = _NO_LIMIT) -> bool:
        """Every record OpenSSL can decrypt now (or until `out` holds `limit` bytes), appended to
        `out`; an end or an error is noted for `receive_some`. True when OpenSSL must write before
        it can read on (a socket BIO whose socket is full)."""
        try:
            _openssl.read_into(self._conn, out, limit)
        except SSL.WantWriteError:  # only on a socket BIO: its socket is full
            return True
        except SSL.SysCallError as exc:  # a reset or a TCP close, on a socket BIO
            if (cause := _socket_cause(exc)) is not None:
                self._error, self._error_cause = str(stream_error(cause)), cause
            else:
                self._eof = True
        except SSL.ZeroReturnError:  # close_notify, or a TCP close (OP_IGNORE_UNEXPECTED_EOF)
            self._eof = True
        except SSL.Error as exc:  # bad record, or a fatal alert from the peer
            self._error = f"TLS error: {ssl_error_text(exc)}"
        return False

    # -- closing ----------------------------------------------------------------------------

    async def _close_notify(self) -> None:
        """Tell the peer we are done, if that takes at most a second; never raises."""
        raise NotImplementedError

    async def send_eof(self) -> None:
        """close_notify, then shut the TCP write side; the peer may still send."""
        await self._close_notify()
        try:
            await self.transport.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def aclose(self) -> None:
        try:
            await self._close_notify()
        finally:
            await self.transport.aclose()


class MemoryTlsStream(TlsStream):
    """TLS through memory BIOs over any trio stream (see the module docstring)."""

    def __init__(
        self, transport: trio.abc.HalfCloseableStream, conn: SSL.Connection, v: Verification
    ):
        super().__init__(transport, conn, v)
        self._send_lock = trio.Lock()
        self._buffered = True  # the handshake may have left application data in the BIO

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
                break
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                await self._flush_quietly()  # the alert tells the peer why
                raise handshake_failure(self._verification, exc) from None
            await self._flush()
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                raise handshake_failure(self._verification, None)
            _openssl.feed(self._conn, memoryview(data))
        self._completed()
        await self._flush()  # the last flight, and TLS 1.3 session tickets

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray | memoryview:
        """All plaintext available now (may exceed `max_bytes`); b"" at the end of the stream."""
        while True:
            if self._buffered:  # the peer's first bytes may have come with its last flight
                self._buffered = False
                out = self._decrypt(b"")
                await self._flush()
                if out:
                    self._first_data()
                    return out
            self._raise_if_broken()
            if self._eof:
                return b""
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:  # TCP close without close_notify: normal for DICOM after A-RELEASE
                self._eof = True
                return b""
            out = self._decrypt(data)
            del data
            await self._flush()  # reading can produce records to send (KeyUpdate, alerts)
            if out:
                if self._keep_session is not None:
                    self._first_data()
                return out

    def _decrypt(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Ciphertext in, in slices (OpenSSL's memory BIOs never shrink); plaintext out, all of it
        decrypted straight into one buffer for the whole chunk. Plaintext is shorter than its
        ciphertext; the extra records are for one OpenSSL held back from an earlier chunk and for
        the room each SSL_read asks for."""
        view = memoryview(data)
        out = _openssl.new_buffer(len(view) + 2 * RECORD)
        conn = self._conn
        start = 0
        while True:
            if start < len(view):
                _openssl.feed(conn, view[start : start + SLICE])
                start += SLICE
            self._decrypt_into(out)
            if self._eof or self._error or start >= len(view):
                return out.view()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        size = len(view)
        # Room for the whole chunk's ciphertext: the drain grows it if OpenSSL ever writes more.
        out = _openssl.new_buffer(size + (size // RECORD + 1) * RECORD_OVERHEAD)
        try:
            _openssl.encrypt_into(self._conn, view, out, SLICE)
        except SSL.Error as exc:
            raise trio.BrokenResourceError(f"TLS error: {ssl_error_text(exc)}") from None
        await self._send_ciphertext(out.view())

    async def _flush(self) -> None:
        if not _openssl.has_output(self._conn):
            return
        out = _openssl.new_buffer(4 * RECORD)
        _openssl.drain(self._conn, out)
        await self._send_ciphertext(out.view())

    async def _send_ciphertext(self, data: memoryview) -> None:
        """Ciphertext is drained from the BIO synchronously and sent in FIFO lock order, so
        records from the reading and the writing task leave in the order OpenSSL made them."""
        if not data:
            return
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:  # nobody waits (trio hands a released lock straight to the next waiter): no yield
            lock.acquire_nowait()
        try:
            await self.transport.send_all(data)
        finally:
            lock.release()

    async def _flush_quietly(self) -> None:
        try:
            with trio.move_on_after(1):
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _close_notify(self) -> None:
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass
        await self._flush_quietly()


def _socket_cause(exc: SSL.Error) -> OSError | None:
    """The OSError of a `SysCallError` OpenSSL met on its own socket (a reset); None for an EOF."""
    code = exc.args[0] if isinstance(exc, SSL.SysCallError) and exc.args else -1
    return OSError(code, os.strerror(code)) if isinstance(code, int) and code > 0 else None


def _raise_broken(exc: SSL.Error) -> NoReturn:
    """A socket error OpenSSL met (a reset) as `sockio` raises it, the OSError as its cause; any
    other TLS error as a broken stream."""
    if (cause := _socket_cause(exc)) is not None:
        raise stream_error(cause) from cause
    raise trio.BrokenResourceError(f"TLS error: {ssl_error_text(exc)}") from None


class SocketTlsStream(TlsStream):
    """TLS where OpenSSL reads and writes the socket itself (`SSL_set_fd`, a socket BIO): the
    proxy's upstream connections. Through memory BIOs every byte written crosses OpenSSL's BIO
    three more times (the BIO's buffer zeroed, the records copied in, copied out to us): measured,
    a third of the proxy's instructions when it originates TLS, where writing is the heavy
    direction (a modality storing to a remote PACS). A socket BIO writes each record from
    OpenSSL's own buffer, as stunnel does. The price is on reading: pyOpenSSL's bindings cannot turn
    on read-ahead, so OpenSSL reads each record with two `read()` calls, again as stunnel does. The
    listeners, where reading is the heavy direction, keep `MemoryTlsStream`'s one large read per
    wake-up.

    Waiting is trio's `wait_readable`/`wait_writable` on the socket; the reading and the writing
    task may each need the other direction (a KeyUpdate answer, a full socket), so one waits on the
    socket and a second one on an event the first sets."""

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        sock: trio.socket.SocketType,
        conn: SSL.Connection,
        v: Verification,
    ):
        super().__init__(transport, conn, v)
        self._socket = sock
        self._waiters: dict[bool, trio.Event] = {}  # writing? -> the event of the task waiting

    async def _wait(self, writing: bool) -> None:
        """Until the socket is writable (or readable); a second waiter waits for the first."""
        if (other := self._waiters.get(writing)) is not None:
            await other.wait()
            return
        self._waiters[writing] = done = trio.Event()
        try:
            if writing:
                await trio.lowlevel.wait_writable(self._socket)
            else:
                await trio.lowlevel.wait_readable(self._socket)
        finally:
            del self._waiters[writing]
            done.set()

    async def _until_done(self, step: Callable[[], object]) -> None:
        """Call `step` (a handshake or shutdown step) until OpenSSL wants nothing more."""
        while True:
            try:
                step()
                return
            except SSL.WantReadError:
                await self._wait(writing=False)
            except SSL.WantWriteError:
                await self._wait(writing=True)

    async def _handshake(self) -> None:
        v = self._verification
        try:
            await self._until_done(self._conn.do_handshake)
        except SSL.SysCallError as exc:
            if _socket_cause(exc) is not None:  # a reset, as a memory BIO's transport raises it
                _raise_broken(exc)
            raise handshake_failure(v, None) from None  # the peer closed during the handshake
        except SSL.ZeroReturnError:
            raise handshake_failure(v, None) from None
        except SSL.Error as exc:  # OpenSSL has sent the alert that tells the peer why
            raise handshake_failure(v, exc) from None
        self._completed()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray | memoryview:
        """All plaintext available now, up to about `max_bytes`; b"" at the end of the stream."""
        limit = max_bytes or RECEIVE_SIZE
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            self._raise_if_broken()
            if self._eof:
                return b""
            # Sized by what the kernel holds, plus a record OpenSSL may hold back from before.
            out = _openssl.new_buffer(min(waiting(self._socket), limit) + RECORD + RECORD_OVERHEAD)
            want_write = self._decrypt_into(out, limit)
            if out.pos:
                if self._keep_session is not None:
                    self._first_data()
                if not waited:  # as sockio.LeanStream: one yield per chunk, a wait is one
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return out.view()
            del out  # not held while the association idles (hundreds may, for hours)
            if not (self._eof or self._error):
                await self._wait(writing=want_write)
                waited = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        size = len(view)
        start = 0
        # Partial writes are off: one call encrypts and writes the whole chunk, record by record;
        # after "want write" it must be called again with the same arguments.
        while start < size:
            try:
                start += _openssl.write(self._conn, view[start:] if start else view)
            except SSL.WantWriteError:
                await self._wait(writing=True)
            except SSL.Error as exc:  # incl. "want read": no renegotiation in the middle
                _raise_broken(exc)

    async def _close_notify(self) -> None:
        with trio.move_on_after(1):
            try:
                await self._until_done(self._conn.shutdown)
            except SSL.Error:
                pass

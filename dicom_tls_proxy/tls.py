"""TLS for the proxy: contexts built from a `[tls.*]` table, the verify callback, and a trio stream.

Why pyOpenSSL and not the stdlib `ssl` module: `ssl` has no certificate verification callback, so it
cannot accept a self-signed modality certificate by thumbprint alone, nor show us a refused
certificate so that its thumbprint can be logged. pyOpenSSL's `set_verify` callback lets this module
decide inside the handshake, which makes a refused peer receive a proper TLS alert.

Why a stream of our own instead of `trio.SSLStream`: `SSLStream.receive_some()` hands back one TLS
record (at most 16 KiB) per call, so every 16 KiB costs a trip through the scheduler; measured, a
relay built on it ran at half of stunnel's speed. `TlsStream` feeds one large socket read into a
memory BIO (in 32 KiB slices, so OpenSSL's BIOs, which never shrink, stay small) and decrypts until
OpenSSL has nothing more, then returns all of it at once. Writes are encrypted the same way and go
out in one `send_all`. Every path that writes ciphertext (application data, but also TLS 1.3
tickets and KeyUpdate answers produced while reading) drains the outgoing BIO under one lock, so
records leave in the order OpenSSL made them. TCP_NODELAY is set by `trio.SocketStream` itself; the
proxy hands this stream a `sockio.LeanStream`, which passes through the scheduler once per chunk.

The proxy's own upstream connections (origination) are a `SocketTlsStream` instead: OpenSSL reads
and writes the socket itself, which spares the three passes over every written byte that the
memory BIOs cost; see its docstring for why the listeners keep the memory BIOs.

This module never logs and never decides routing: it reports a `TlsFailure` with a `Reason`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn, Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from dicom_tls_proxy import certnames, policy
from dicom_tls_proxy.auth import PeerIdentity
from dicom_tls_proxy.config_schema import TlsTable
from dicom_tls_proxy.sockio import LeanStream, stream_error, waiting
from dicom_tls_proxy.thumbprint import matches_any
from dicom_tls_proxy.vocabulary import Reason

RECEIVE_SIZE = 256 * 1024  # one socket read; large, so one wake-up moves many records
SLICE = 32 * 1024  # what goes through OpenSSL's memory BIOs at a time
RECORD = 16 * 1024  # the most plaintext one TLS record carries
RECORD_OVERHEAD = 64  # more than a record adds: header, explicit nonce, CBC padding and MAC, tag

Purpose = Literal["client", "server"]

# Reasons a `allow_weak_peer_certificates = true` table lets through (with a warning each time).
OVERRIDABLE: frozenset[Reason] = frozenset(
    {
        Reason.TLS_WEAK_CERTIFICATE,
        Reason.TLS_EXPIRED,
        Reason.TLS_NOT_YET_VALID,
        Reason.TLS_WRONG_USAGE,
    }
)
# pyOpenSSL's cffi bindings: decrypt into and drain straight from our buffers, without its copies.
_NEEDED = (
    "SSL_read",
    "SSL_write",
    "BIO_read",
    "BIO_get_mem_data",
    "SSL_CTX_clear_mode",
    "X509_verify_cert_error_string",
)
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _FAST = all(hasattr(_lib, name) for name in _NEEDED) and all(
        hasattr(SSL.Connection, name) for name in ("_raise_ssl_error",)
    )
    _uninitialised = _ffi.new_allocator(should_clear_after_alloc=False)
except ImportError:  # pragma: no cover - pyOpenSSL reorganised: the public API still works
    _FAST = False
_BCP195_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
_LEGACY_CIPHERS = (
    b"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:"
    b"AES128-SHA:AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0"
)


class ByteStream(Protocol):
    """What the relay needs of either side: a plain `trio.SocketStream` or a `TlsStream`."""

    async def receive_some(
        self, max_bytes: int | None = None
    ) -> bytes | bytearray | memoryview: ...
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> None: ...


class TlsFailure(Exception):
    """The handshake failed; `reason` is the vocabulary word, `str()` the operator's explanation."""

    def __init__(self, reason: Reason, message: str, certificate: x509.Certificate | None = None):
        super().__init__(message)
        self.reason = reason
        self.certificate = certificate


@dataclass
class _Verification:
    """Per-connection state the verify callback fills in (OpenSSL calls it once per depth/error)."""

    table: TlsTable
    purpose: Purpose  # what the *peer* must be allowed to do: "client" or "server"
    server_name: str | None = None
    leaf: x509.Certificate | None = None
    failure: policy.Problem | None = None
    warnings: list[str] = field(default_factory=list)
    leaf_checked: bool = False
    # A chain error OpenSSL reported above depth 0 before showing us the leaf (it checks the chain
    # top-down): the refusal waits for the leaf's callback, so that the log can name the leaf.
    chain_failure: policy.Problem | None = None


def _openssl_error_text(errnum: int) -> str:
    if _FAST:
        return str(_ffi.string(_lib.X509_verify_cert_error_string(errnum)).decode())
    return f"verification error {errnum}"  # pragma: no cover - pyOpenSSL without its internals


def _parsed(cert: crypto.X509) -> x509.Certificate:
    """pyOpenSSL's certificate as cryptography's, through policy's cache: a modality shows the
    same certificate on every association (`to_cryptography()` would parse it every time)."""
    return policy.certificate_from_der(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    state: _Verification = conn.get_app_data()
    try:
        return _decide(state, cert, errnum, depth, bool(ok))
    except Exception as exc:  # never let a surprise escape into OpenSSL: fail closed
        state.failure = policy.Problem(Reason.TLS_PROTOCOL, f"certificate check failed: {exc!r}")
        return False


def _decide(state: _Verification, cert: crypto.X509, errnum: int, depth: int, ok: bool) -> bool:
    table = state.table
    if state.failure is not None:
        return False
    if depth == 0 and state.leaf is None:
        state.leaf = _parsed(cert)
    if table.verify == "none":
        return True
    if depth == 0 and state.chain_failure is not None:
        state.failure = state.chain_failure
        return False
    allow_weak = table.allow_weak_peer_certificates
    if not ok and table.verifies_chain:
        reason = policy.openssl_error_reason(errnum)
        text = f"{_openssl_error_text(errnum)} (depth {depth})"
        if allow_weak and reason in OVERRIDABLE:
            state.warnings.append(f"accepted despite {reason}: {text}")
        elif depth > 0 and state.leaf is None:
            # E.g. a client sending its leaf and its own untrusted root: the root's error comes
            # first. Refuse at depth 0 (and after the handshake should OpenSSL never get there).
            if state.chain_failure is None:
                state.chain_failure = policy.Problem(reason, text)
            return True
        else:
            state.failure = policy.Problem(reason, text)
            return False
    if depth > 0:
        return True  # thumbprint mode ignores the chain; chain mode already judged it above
    if state.leaf_checked:
        return True
    state.leaf_checked = True
    leaf = state.leaf
    assert leaf is not None
    if (
        table.pins_thumbprint
        and matches_any(leaf.public_bytes(Encoding.DER), table.accepted_thumbprints) is None
    ):
        sha256 = policy.describe(leaf)["sha256"]
        state.failure = policy.Problem(
            Reason.TLS_THUMBPRINT_MISMATCH, f"thumbprint {sha256} is not in accepted_thumbprints"
        )
        return False
    now = datetime.now(UTC)
    problems = policy.check_certificate(
        leaf, now=now, purpose=state.purpose, pinned=table.verify == "thumbprint"
    )
    revoked = policy.check_revocation(leaf, table.crls, now) if table.crls else None
    if revoked is not None:
        problems.insert(0, revoked)
    if (
        state.server_name
        and table.verifies_chain
        and not certnames.server_name_matches(leaf, state.server_name)
    ):
        names = ", ".join(certnames.certificate_names(leaf)) or "no names"
        problems.insert(
            0,
            policy.Problem(
                Reason.TLS_NAME_MISMATCH,
                f"the certificate is not for {state.server_name} (it is for: {names})",
            ),
        )
    for problem in problems:
        if allow_weak and problem.reason in OVERRIDABLE:
            state.warnings.append(f"accepted despite {problem.reason}: {problem.message}")
        else:
            state.failure = problem
            return False
    return True


def _apply_profile(ctx: SSL.Context, table: TlsTable) -> None:
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF)
    # An idle association then holds no 16 KiB record buffers: hundreds wait between studies.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if _FAST:  # pyOpenSSL turns on partial writes: one SSL_write per 16 KiB record. Into a memory
        # BIO a write never blocks, so one call can encrypt a whole slice.
        _lib.SSL_CTX_clear_mode(ctx._context, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    if table.profile == "tls13":
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    elif table.profile == "legacy":
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
    else:
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if table.ciphers:
        ciphers = table.ciphers.encode()
    else:
        ciphers = _LEGACY_CIPHERS if table.profile == "legacy" else _BCP195_CIPHERS
    if table.allow_weak_peer_certificates and b"@SECLEVEL" not in ciphers:
        # OpenSSL would refuse small keys and SHA-1 itself; policy.py enforces what is allowed.
        ciphers += b":@SECLEVEL=0"
    ctx.set_cipher_list(ciphers)
    if table.tls13_ciphersuites:
        ctx.set_tls13_ciphersuites(table.tls13_ciphersuites.encode())


def _load_trust(ctx: SSL.Context, table: TlsTable) -> None:
    store = ctx.get_cert_store()
    assert store is not None
    for ca in table.ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))


def _use_identity(ctx: SSL.Context, table: TlsTable) -> None:
    identity = table.identity
    if identity is None:
        return
    ctx.use_certificate(identity.certificate)
    for extra in identity.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(identity.private_key)  # type: ignore[arg-type]  # others raise TypeError
    ctx.check_privatekey()


def server_context(table: TlsTable) -> SSL.Context:
    """The context a TLS listener accepts with; the peer (a client) is judged by `table`."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _apply_profile(ctx, table)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    # No resumption: DICOM peers open a fresh TLS connection per association and do not resume;
    # a session cache and TLS 1.3 tickets would only cost memory and a write per handshake.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _use_identity(ctx, table)
    _load_trust(ctx, table)
    ctx.set_session_id(b"dicom-tls-proxy")
    if table.peer_certificate == "none":
        ctx.set_verify(SSL.VERIFY_NONE)
    else:
        mode = SSL.VERIFY_PEER
        if table.peer_certificate == "required":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode, _verify_callback)
        if table.ca_certificates:
            ctx.set_client_ca_list(
                [crypto.X509.from_cryptography(c).get_subject() for c in table.ca_certificates]
            )
    return ctx


def client_context(table: TlsTable) -> SSL.Context:
    """The context the proxy connects upstream with; the peer (a server) is judged by `table`."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _apply_profile(ctx, table)
    # Every upstream connection is a fresh handshake: no session to resume, no tickets to keep.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _use_identity(ctx, table)
    _load_trust(ctx, table)
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    return ctx


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What was negotiated, for the association record and the `echo` command."""

    version: str
    cipher: str
    bits: int
    encryption: str
    mac: str
    certificate: x509.Certificate | None
    identity: PeerIdentity
    warnings: tuple[str, ...]


def split_cipher(name: str) -> tuple[str, str]:
    """Encryption and integrity algorithms of a suite name (as LEADTOOLS shows them)."""
    n = name.upper().replace("TLS_", "").replace("_", "-")
    if "CHACHA20" in n:
        return "CHACHA20-POLY1305", "AEAD"
    enc = "unknown"
    for algo in (
        "AES-256",
        "AES-128",
        "AES256",
        "AES128",
        "DES-CBC3",
        "3DES",
        "CAMELLIA256",
        "CAMELLIA128",
    ):
        if algo in n:
            enc = {"AES256": "AES-256", "AES128": "AES-128", "DES-CBC3": "3DES"}.get(algo, algo)
            break
    if "GCM" in n or "CCM" in n:
        return f"{enc}-{'GCM' if 'GCM' in n else 'CCM'}", "AEAD"
    mac = "SHA384" if n.endswith("SHA384") else "SHA256" if n.endswith("SHA256") else "SHA1"
    return f"{enc}-CBC", mac


class _Buffer:
    """Bytes OpenSSL writes for us: plaintext from SSL_read, ciphertext from the outgoing BIO.
    With pyOpenSSL's internals at hand it is uninitialised C memory that OpenSSL fills directly:
    a `bytearray` would be zeroed first, and pyOpenSSL's `recv`/`bio_read` copy every read once
    more. `view()` hands it on without a copy; nothing keeps it once the relay has sent it."""

    __slots__ = ("buffer", "pos", "room")

    def __init__(self, room: int) -> None:
        self.room = room
        self.pos = 0
        self.buffer: Any = _uninitialised("char[]", room) if _FAST else bytearray(room)

    def reserve(self, n: int) -> None:
        """At least `n` bytes of room after `pos`."""
        if self.room - self.pos >= n:
            return
        room = max(2 * self.room, self.pos + n)
        if _FAST:
            bigger = _uninitialised("char[]", room)
            _ffi.memmove(bigger, self.buffer, self.pos)
            self.buffer = bigger
        else:  # pragma: no cover - pyOpenSSL without its cffi internals
            self.buffer.extend(bytes(room - self.room))
        self.room = room

    def view(self) -> memoryview:
        if _FAST:
            return memoryview(_ffi.buffer(self.buffer, self.pos))
        return memoryview(self.buffer)[: self.pos]  # pragma: no cover


def _drain(conn: SSL.Connection, out: _Buffer) -> None:
    """Append all ciphertext OpenSSL has written to its outgoing BIO so far."""
    while True:
        if _FAST:
            pending = _lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL)  # bytes waiting in the BIO
            if pending <= 0:
                return
            out.reserve(pending)
            n = _lib.BIO_read(conn._from_ssl, out.buffer + out.pos, pending)
        else:  # pragma: no cover - pyOpenSSL without its cffi internals
            out.reserve(RECORD + RECORD_OVERHEAD)
            try:
                chunk = conn.bio_read(out.room - out.pos)
            except SSL.WantReadError:
                return
            n = len(chunk)
            out.buffer[out.pos : out.pos + n] = chunk
        out.pos += n


def _has_output(conn: SSL.Connection) -> bool:
    """Whether OpenSSL wrote ciphertext that waits to be sent (without reading it out)."""
    return not _FAST or _lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL) > 0


class TlsStream:
    """A TLS connection over a trio socket stream through memory BIOs (see the module docstring)."""

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        conn: SSL.Connection,
        verification: _Verification,
    ):
        self.transport = transport
        self._conn = conn
        self._verification = verification
        self._send_lock = trio.Lock()
        self._eof = False
        self._buffered = True  # the handshake may have left application data in the BIO
        self._error = ""
        self._error_cause: OSError | None = None  # a reset OpenSSL met on its own socket
        self._want_write = False  # SSL_read has a record to send first (on its own socket)
        conn.set_app_data(verification)

    # -- setting up -------------------------------------------------------------------------

    @classmethod
    async def accept(
        cls,
        transport: trio.abc.HalfCloseableStream,
        ctx: SSL.Context,
        table: TlsTable,
        initial: bytes = b"",
    ) -> TlsStream:
        """Server side handshake. `initial` is what the caller already read from the socket."""
        conn = SSL.Connection(ctx, None)
        conn.set_accept_state()
        stream = cls(transport, conn, _Verification(table, "client"))
        if initial:
            conn.bio_write(initial)
        await stream._handshake()
        return stream

    @classmethod
    async def connect(
        cls,
        transport: trio.abc.HalfCloseableStream,
        ctx: SSL.Context,
        table: TlsTable,
        server_name: str,
    ) -> TlsStream:
        """Client side handshake; `server_name` is checked against the certificate, sent as SNI.
        Over a `LeanStream` (the proxy's upstream connections) OpenSSL reads and writes the socket
        itself: see `SocketTlsStream`."""
        sock = transport.socket if isinstance(transport, LeanStream) and _FAST else None
        conn = SSL.Connection(ctx, sock)  # type: ignore[arg-type]  # it only needs fileno()
        conn.set_connect_state()
        try:
            ipaddress.ip_address(server_name)
        except ValueError:
            conn.set_tlsext_host_name(server_name.encode("idna"))
        kind = SocketTlsStream if sock is not None else TlsStream
        stream = kind(transport, conn, _Verification(table, "server", server_name=server_name))
        await stream._handshake()
        return stream

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
                break
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                await self._flush_quietly()  # the alert tells the peer why
                raise self._failure(exc) from None
            await self._flush()
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                raise self._failure(None)
            self._conn.bio_write(data)
        self._verified()
        await self._flush()  # the last flight, and TLS 1.3 session tickets

    def _verified(self) -> None:
        """After a handshake OpenSSL completed: fail closed, and let go of the peer's leaf."""
        v = self._verification
        if v.failure is None and v.chain_failure is not None:  # fail closed, never reached so far
            v.failure = v.chain_failure
            raise self._failure(None)
        # Only failures need the parsed leaf (to name it); `info()` reads the certificate afresh.
        # Hundreds of associations may sit idle for hours: each kept ~4 KiB alive with it.
        v.leaf = None

    def _failure(self, exc: SSL.Error | None) -> TlsFailure:
        v = self._verification
        if v.failure is not None:
            return TlsFailure(v.failure.reason, v.failure.message, v.leaf)
        if exc is None:
            text = "the peer closed the connection during the handshake"
        else:
            text = _ssl_error_text(exc)
        if "peer did not return a certificate" in text or "certificate required" in text:
            return TlsFailure(
                Reason.TLS_NO_CERTIFICATE, "the peer presented no certificate", v.leaf
            )
        return TlsFailure(Reason.TLS_PROTOCOL, text, v.leaf)

    def info(self) -> TlsInfo:
        conn = self._conn
        cipher = conn.get_cipher_name() or ""
        encryption, mac = split_cipher(cipher)
        peer = conn.get_peer_certificate()
        cert = _parsed(peer) if peer is not None else None
        v = self._verification
        identity = (
            policy.peer_identity(cert, chain_verified=v.table.verifies_chain)
            if cert is not None
            else PeerIdentity()
        )
        return TlsInfo(
            version=conn.get_protocol_version_name(),
            cipher=cipher,
            bits=conn.get_cipher_bits() or 0,
            encryption=encryption,
            mac=mac,
            certificate=cert,
            identity=identity,
            warnings=tuple(dict.fromkeys(v.warnings)),  # OpenSSL and policy may both report it
        )

    # -- moving bytes -----------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray | memoryview:
        """All plaintext available now (may exceed `max_bytes`); b"" at the end of the stream."""
        while True:
            if self._buffered:  # the peer's first bytes may have come with its last flight
                self._buffered = False
                out = self._decrypt(b"")
                await self._flush()
                if out:
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
                return out

    def _raise_if_broken(self) -> None:
        """A fatal TLS error while reading is a broken stream, like a reset, above."""
        if self._error:
            raise trio.BrokenResourceError(self._error) from self._error_cause

    def _decrypt(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Ciphertext in, in slices (OpenSSL's memory BIOs never shrink); plaintext out, all of it
        decrypted straight into one buffer for the whole chunk. Plaintext is shorter than its
        ciphertext; the extra records are for one OpenSSL held back from an earlier chunk and for
        the room each SSL_read asks for."""
        view = memoryview(data)
        out = _Buffer(len(view) + 2 * RECORD)
        conn = self._conn
        start = 0
        while True:
            if start < len(view):
                conn.bio_write(view[start : start + SLICE])
                start += SLICE
            self._decrypt_into(out)
            if self._eof or self._error or start >= len(view):
                return out.view()

    def _decrypt_into(self, out: _Buffer, limit: int | None = None) -> None:
        """Every record OpenSSL can decrypt now (or until `out` holds `limit` bytes), appended to
        `out`. With pyOpenSSL's internals at hand, SSL_read writes into `out` directly:
        pyOpenSSL's own `recv` would decrypt into a temporary buffer and copy it out again, per
        16 KiB record."""
        conn = self._conn
        while limit is None or out.pos < limit:
            out.reserve(RECORD)
            try:
                if _FAST:
                    n = _lib.SSL_read(conn._ssl, out.buffer + out.pos, out.room - out.pos)
                    if n <= 0:
                        conn._raise_ssl_error(conn._ssl, n)
                else:  # pragma: no cover - pyOpenSSL without its cffi internals
                    n = conn.recv_into(memoryview(out.buffer)[out.pos :])
                out.pos += n
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:  # only on a socket BIO: its socket is full
                self._want_write = True
                break
            except SSL.SysCallError as exc:  # a reset or a TCP close, on a socket BIO
                if (cause := _socket_cause(exc)) is not None:
                    self._error, self._error_cause = str(stream_error(cause)), cause
                else:
                    self._eof = True
                break
            except SSL.ZeroReturnError:  # close_notify, or a TCP close (OP_IGNORE_UNEXPECTED_EOF)
                self._eof = True
                break
            except SSL.Error as exc:  # bad record, or a fatal alert from the peer
                self._error = f"TLS error: {_ssl_error_text(exc)}"
                break

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        size = len(view)
        # Room for the whole chunk's ciphertext: the drain grows it if OpenSSL ever writes more.
        out = _Buffer(size + (size // RECORD + 1) * RECORD_OVERHEAD)
        conn = self._conn
        try:
            if _FAST:  # SSL_write straight from the caller's buffer, no per-slice wrapper
                with _ffi.from_buffer(view) as src:
                    start = 0
                    while start < size:
                        n = _lib.SSL_write(conn._ssl, src + start, min(SLICE, size - start))
                        if n <= 0:
                            conn._raise_ssl_error(conn._ssl, n)
                        start += n
                        _drain(conn, out)
            else:  # pragma: no cover - pyOpenSSL without its cffi internals
                for start in range(0, size, SLICE):
                    conn.sendall(view[start : start + SLICE])
                    _drain(conn, out)
        except SSL.Error as exc:
            raise trio.BrokenResourceError(f"TLS error: {_ssl_error_text(exc)}") from None
        await self._send_ciphertext(out.view())

    async def _flush(self) -> None:
        if not _has_output(self._conn):
            return
        out = _Buffer(4 * RECORD)
        _drain(self._conn, out)
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
        """Tell the peer we are done, if that takes at most a second; never raises."""
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass
        await self._flush_quietly()

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


def _socket_cause(exc: SSL.Error) -> OSError | None:
    """The OSError of a `SysCallError` OpenSSL met on its own socket (a reset); None for an EOF."""
    code = exc.args[0] if isinstance(exc, SSL.SysCallError) and exc.args else -1
    return OSError(code, os.strerror(code)) if isinstance(code, int) and code > 0 else None


def _raise_broken(exc: SSL.Error) -> NoReturn:
    """A socket error OpenSSL met (a reset) as `sockio` raises it, the OSError as its cause; any
    other TLS error as a broken stream."""
    if (cause := _socket_cause(exc)) is not None:
        raise stream_error(cause) from cause
    raise trio.BrokenResourceError(f"TLS error: {_ssl_error_text(exc)}") from None


class SocketTlsStream(TlsStream):
    """TLS where OpenSSL reads and writes the socket itself (`SSL_set_fd`, a socket BIO): the
    proxy's upstream connections. Through memory BIOs every byte written crosses OpenSSL's BIO
    three more times (the BIO's buffer zeroed, the records copied in, copied out to us): measured,
    a third of the proxy's instructions when it originates TLS, where writing is the heavy
    direction (a modality storing to a remote PACS). A socket BIO writes each record from
    OpenSSL's own buffer, as stunnel does. The price is on reading: pyOpenSSL's bindings cannot turn
    on read-ahead, so OpenSSL reads each record with two `read()` calls, again as stunnel does. The
    listeners, where reading is the heavy direction, keep `TlsStream`'s one large read per wake-up.

    Waiting is trio's `wait_readable`/`wait_writable` on the socket; the reading and the writing
    task may each need the other direction (a KeyUpdate answer, a full socket), so one waits on the
    socket and a second one on an event the first sets."""

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        conn: SSL.Connection,
        verification: _Verification,
    ):
        super().__init__(transport, conn, verification)
        assert isinstance(transport, LeanStream)
        self._socket = transport.socket
        self._buffered = False  # nothing sits in a BIO: OpenSSL reads from the socket on demand
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
        try:
            await self._until_done(self._conn.do_handshake)
        except SSL.SysCallError as exc:
            if _socket_cause(exc) is not None:  # a reset, as a memory BIO's transport raises it
                _raise_broken(exc)
            raise self._failure(None) from None  # the peer closed during the handshake
        except SSL.ZeroReturnError:
            raise self._failure(None) from None
        except SSL.Error as exc:  # OpenSSL has sent the alert that tells the peer why
            raise self._failure(exc) from None
        self._verified()

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
            out = _Buffer(min(waiting(self._socket), limit) + RECORD + RECORD_OVERHEAD)
            self._want_write = False
            self._decrypt_into(out, limit=limit)
            if out.pos:
                if not waited:  # as sockio.LeanStream: one yield per chunk, a wait is one
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return out.view()
            del out  # not held while the association idles (hundreds may, for hours)
            if not (self._eof or self._error):
                await self._wait(writing=self._want_write)
                waited = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        size = len(view)
        if not size:
            return
        conn = self._conn
        with _ffi.from_buffer(view) as src:
            # Partial writes are off: one call encrypts and writes the whole chunk, record by
            # record; after "want write" it must be called again with the same arguments.
            while (n := _lib.SSL_write(conn._ssl, src, size)) <= 0:
                try:
                    conn._raise_ssl_error(conn._ssl, n)
                except SSL.WantWriteError:
                    await self._wait(writing=True)
                except SSL.Error as exc:  # incl. "want read": no renegotiation in the middle
                    _raise_broken(exc)

    async def _flush(self) -> None:
        """OpenSSL has written everything itself."""

    async def _close_notify(self) -> None:
        with trio.move_on_after(1):
            try:
                await self._until_done(self._conn.shutdown)
            except SSL.Error:
                pass


def _ssl_error_text(exc: SSL.Error) -> str:
    """OpenSSL's reason strings, without the library noise around them."""
    parts: list[str] = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return "; ".join(parts) or str(exc) or type(exc).__name__

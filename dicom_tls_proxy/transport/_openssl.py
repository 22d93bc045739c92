"""Every use of pyOpenSSL's private names, and the public-API path for when they are gone.

Why it exists: on the relay's hot path pyOpenSSL's public API copies every byte once more than
needed. `Connection.recv_into` decrypts into a temporary buffer and copies it out, `bio_read`
allocates and copies, `sendall` cannot be told to drain the outgoing BIO between slices, and there
is no public way to ask whether OpenSSL wrote ciphertext that waits to be sent. Through the cffi
bindings pyOpenSSL uses itself (`OpenSSL._util.ffi` and `lib`, a connection's `_ssl` and
`_into_ssl`, `_from_ssl`, `Connection._raise_ssl_error`) SSL_read decrypts straight into our buffer,
BIO_read drains into it, SSL_write reads from the caller's buffer, BIO_write feeds ciphertext
without pyOpenSSL's wrapper, and the usual end of a chunk (OpenSSL wants more input) is a return,
not an exception raised and caught. Measured with callgrind, both ends
of one TLS connection in one process (pyOpenSSL 26.4.0, OpenSSL 4.0.3): 16.2 M instructions per
MiB through memory BIOs on the private path, 25.3 M on the public one; 12.4 M and 16.3 M with the
sender on a socket BIO. W1 termination through the proxy: about 1.6 and 1.9 CPU s/GB.

The private path is written for, and was tested with, pyOpenSSL 26.4.0 with cryptography 50.0.2
(its bundled OpenSSL 4.0.3) and pyOpenSSL 26.1.0 with cryptography 47.0.0 (OpenSSL 4.0.0):
`WRITTEN_FOR` is that range, and pyproject.toml pins the same one (a test holds them equal). At
import this module decides which path the streams use (`PATH`, and `WHY` in words; the proxy logs
both when it starts):
- "private" when the installed versions are inside `WRITTEN_FOR` and a probe finds the private
  names and sees them behave (a ClientHello written and drained, a WantReadError raised);
- "public" otherwise: the same streams through pyOpenSSL's public API, slower (more copies),
  with the same behaviour. A pyOpenSSL release that moves its internals degrades to it instead
  of crashing.
`DICOM_TLS_PROXY_OPENSSL=public` forces the public path (the tests run the relay on it);
`=private` takes the private path outside `WRITTEN_FOR` too, if the probe passes.

What it must never do: decide anything about TLS (verification, profiles, ciphers), log, or do
I/O of its own. Nothing else in the package may import `OpenSSL._util` or touch a private name
of a pyOpenSSL object: whatever needs one gets a function here, with a public twin.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Literal

import cryptography
import OpenSSL
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

Which = Literal["private", "public"]

ENV = "DICOM_TLS_PROXY_OPENSSL"
# [lowest, first too new) release of each package this module was written for and tested with.
WRITTEN_FOR: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "pyOpenSSL": ((26, 1), (26, 5)),
    "cryptography": ((47,), (51,)),
}
INSTALLED = {"pyOpenSSL": OpenSSL.__version__, "cryptography": cryptography.__version__}

RECORD = 16 * 1024  # the most plaintext one TLS record carries, and one SSL_read returns

# What the private path calls in pyOpenSSL's cffi `lib` (cryptography's OpenSSL bindings).
_NEEDED = (
    "SSL_read",
    "SSL_write",
    "SSL_get_error",
    "SSL_ERROR_WANT_READ",
    "BIO_read",
    "BIO_write",
    "BIO_get_mem_data",
    "X509_verify_cert_error_string",
)
try:
    from OpenSSL._util import ffi as _imported_ffi
    from OpenSSL._util import lib as _imported_lib
except ImportError as exc:  # pyOpenSSL reorganised: the public path still works
    _ffi: Any = None
    _lib: Any = None
    _import_error = f"OpenSSL._util cannot be imported ({exc})"
else:
    _ffi, _lib, _import_error = _imported_ffi, _imported_lib, ""
_uninitialised: Any = _ffi.new_allocator(should_clear_after_alloc=False) if _ffi else None


class Buffer:
    """Bytes OpenSSL writes for us: plaintext from SSL_read, ciphertext from the outgoing BIO.
    `view()` hands them on without a copy; nothing keeps a buffer once the relay has sent it."""

    __slots__ = ("buffer", "pos", "room")

    def __init__(self, room: int) -> None:
        self.room = room
        self.pos = 0
        self.buffer: Any = None

    def reserve(self, n: int) -> None:
        """At least `n` bytes of room after `pos`."""
        raise NotImplementedError

    def view(self) -> memoryview:
        raise NotImplementedError


# -- the private path -------------------------------------------------------------------------


class _CBuffer(Buffer):
    """Uninitialised C memory that OpenSSL fills directly: a `bytearray` would be zeroed first,
    and pyOpenSSL's `recv_into`/`bio_read` copy every read once more."""

    __slots__ = ()

    def __init__(self, room: int) -> None:
        self.room = room
        self.pos = 0
        self.buffer = _uninitialised("char[]", room)

    def reserve(self, n: int) -> None:
        if self.room - self.pos >= n:
            return
        room = max(2 * self.room, self.pos + n)
        bigger = _uninitialised("char[]", room)
        _ffi.memmove(bigger, self.buffer, self.pos)
        self.buffer, self.room = bigger, room

    def view(self) -> memoryview:
        return memoryview(_ffi.buffer(self.buffer, self.pos))


_NEVER = "OpenSSL returned {} without an error"  # `_raise_ssl_error` passes SSL_ERROR_NONE by


def _private_read_into(conn: SSL.Connection, out: Buffer, limit: int) -> None:
    ssl = conn._ssl
    while out.pos < limit:
        out.reserve(RECORD)
        n = _lib.SSL_read(ssl, out.buffer + out.pos, out.room - out.pos)
        if n > 0:
            out.pos += n
            continue
        # Every slice of every chunk ends so: answered without `_raise_ssl_error`'s exception,
        # raised and caught (about 1 us each). What it would check first, an exception a verify
        # callback left, cannot be there: such a callback fails the handshake (SSL_ERROR_SSL).
        if _lib.SSL_get_error(ssl, n) == _lib.SSL_ERROR_WANT_READ:
            return
        conn._raise_ssl_error(ssl, n)
        raise SSL.Error(_NEVER.format(n))  # never seen: never loop


def _private_feed(conn: SSL.Connection, data: memoryview) -> None:
    with _ffi.from_buffer(data) as src:
        n: int = _lib.BIO_write(conn._into_ssl, src, len(data))
    if n != len(data):  # a memory BIO takes everything, or fails to grow
        raise SSL.Error(f"BIO_write took {n} of {len(data)} bytes")


def _private_write(conn: SSL.Connection, data: memoryview) -> int:
    ssl = conn._ssl
    with _ffi.from_buffer(data) as src:
        n: int = _lib.SSL_write(ssl, src, len(data))
    if n <= 0:
        conn._raise_ssl_error(ssl, n)
        raise SSL.Error(_NEVER.format(n))
    return n


def _private_encrypt_into(conn: SSL.Connection, data: memoryview, out: Buffer, step: int) -> None:
    ssl = conn._ssl
    size = len(data)
    with _ffi.from_buffer(data) as src:  # SSL_write straight from the caller's buffer
        start = 0
        while start < size:
            n = _lib.SSL_write(ssl, src + start, min(step, size - start))
            if n <= 0:
                conn._raise_ssl_error(ssl, n)
                raise SSL.Error(_NEVER.format(n))
            start += n
            _private_drain(conn, out)


def _private_drain(conn: SSL.Connection, out: Buffer) -> None:
    bio = conn._from_ssl
    while (pending := _lib.BIO_get_mem_data(bio, _ffi.NULL)) > 0:  # bytes waiting in the BIO
        out.reserve(pending)
        out.pos += _lib.BIO_read(bio, out.buffer + out.pos, pending)


def _private_has_output(conn: SSL.Connection) -> bool:
    return bool(_lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL) > 0)


def _private_verify_error_text(errnum: int) -> str:
    return str(_ffi.string(_lib.X509_verify_cert_error_string(errnum)).decode())


def _private_session_reused(conn: SSL.Connection) -> bool | None:
    return bool(_lib.SSL_session_reused(conn._ssl))


# -- the public path --------------------------------------------------------------------------


class _ByteBuffer(Buffer):
    """A `bytearray`: zeroed when made, and filled through pyOpenSSL's copies."""

    __slots__ = ()

    def __init__(self, room: int) -> None:
        self.room = room
        self.pos = 0
        self.buffer = bytearray(room)

    def reserve(self, n: int) -> None:
        if self.room - self.pos >= n:
            return
        room = max(2 * self.room, self.pos + n)
        self.buffer.extend(bytes(room - self.room))
        self.room = room

    def view(self) -> memoryview:
        return memoryview(self.buffer)[: self.pos]


def _public_read_into(conn: SSL.Connection, out: Buffer, limit: int) -> None:
    while out.pos < limit:
        out.reserve(RECORD)
        try:  # at most a record: pyOpenSSL allocates a temporary buffer of the size offered
            out.pos += conn.recv_into(memoryview(out.buffer)[out.pos :], RECORD)
        except SSL.WantReadError:
            return


def _public_write(conn: SSL.Connection, data: memoryview) -> int:
    return conn.send(data)


def _public_feed(conn: SSL.Connection, data: memoryview) -> None:
    conn.bio_write(data)


def _public_encrypt_into(conn: SSL.Connection, data: memoryview, out: Buffer, step: int) -> None:
    for start in range(0, len(data), step):
        conn.sendall(data[start : start + step])
        _public_drain(conn, out)


def _public_drain(conn: SSL.Connection, out: Buffer) -> None:
    while True:
        try:  # a copy pyOpenSSL makes, of at most a slice's records (it allocates what it is asked)
            chunk = conn.bio_read(4 * RECORD)
        except SSL.WantReadError:  # the BIO is empty
            return
        n = len(chunk)
        out.reserve(n)
        out.buffer[out.pos : out.pos + n] = chunk
        out.pos += n


def _public_has_output(conn: SSL.Connection) -> bool:
    return True  # no public way to look: the caller drains, and may find nothing


# OpenSSL's words (crypto/x509/x509_txt.c) for the X509_V_ERR_* codes peers cause, so that the
# public path logs what the private one would. The OpenSSL 3.5.2 and 4.0.3 of the tested
# cryptography wheels agree, except that 4.0.3 adds "or the system clock is incorrect" to 9.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    3: "unable to get certificate CRL",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    12: "CRL has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "issuer certificate doesn't have a public key",
    25: "path length constraint exceeded",
    26: "unsuitable certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
    62: "hostname mismatch",
    64: "IP address mismatch",
    66: "EE certificate key too weak",
    67: "CA certificate key too weak",
    68: "CA signature digest algorithm too weak",
}


def _public_verify_error_text(errnum: int) -> str:
    return _VERIFY_ERRORS.get(errnum, f"verification error {errnum}")


def _public_session_reused(conn: SSL.Connection) -> bool | None:
    return None  # pyOpenSSL has no public word for it: `tlscontext.handshake_completed` infers it


# -- key exchange groups (not on the hot path: whichever names are there) -----------------------


def _set_groups_private(handle: Any, setter: str, groups: str) -> None:
    if getattr(_lib, setter)(handle, groups.encode()) != 1:
        _lib.ERR_clear_error()
        raise ValueError(
            f"the OpenSSL of cryptography {INSTALLED['cryptography']} refuses {groups!r}"
        )


_CURVES = {
    name: curve
    for names, curve in (
        (("p-256", "secp256r1", "prime256v1"), ec.SECP256R1()),
        (("p-384", "secp384r1"), ec.SECP384R1()),
        (("p-521", "secp521r1"), ec.SECP521R1()),
    )
    for name in names
}


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """OpenSSL's group list `groups` for every connection of `ctx` (SSL_CTX_set1_groups_list,
    which the bindings call `SSL_CTX_set1_curves_list`). pyOpenSSL's public twin,
    `set_tmp_ecdh`, takes one elliptic curve: without the private name, only that works; any
    other list raises ValueError rather than be ignored."""
    if _lib is not None and hasattr(_lib, "SSL_CTX_set1_curves_list"):
        _set_groups_private(ctx._context, "SSL_CTX_set1_curves_list", groups)
        return
    curve = _CURVES.get(groups.strip().lstrip("*").lower())
    if curve is None:
        raise ValueError(f"groups {groups!r}: these pyOpenSSL bindings set one NIST curve only")
    ctx.set_tmp_ecdh(curve)


def lead_with(conn: SSL.Connection, groups: str) -> bool:
    """`groups` for this connection only (SSL_set1_groups_list), the first one getting the key
    share; False, and nothing changed, where the bindings cannot (the context's list stays)."""
    if _lib is None or not hasattr(_lib, "SSL_set1_curves_list"):
        return False
    _set_groups_private(conn._ssl, "SSL_set1_curves_list", groups)
    return True


# -- which path -------------------------------------------------------------------------------


def _release(version: str) -> tuple[int, ...]:
    """(26, 4, 0) for "26.4.0" (and for "26.4.0rc1")."""
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def outside_written_for() -> list[str]:
    """The installed packages outside `WRITTEN_FOR`, in words; [] when both are inside."""
    problems = []
    for name, (lowest, too_new) in WRITTEN_FOR.items():
        if not lowest <= _release(INSTALLED[name]) < too_new:
            problems.append(
                f"{name} {INSTALLED[name]} is outside the range this module was written for "
                f"(>={_dotted(lowest)},<{_dotted(too_new)})"
            )
    return problems


def _wants_read(step: Callable[[], object]) -> bool:
    try:
        step()
    except SSL.WantReadError:
        return True
    return False


def _probe() -> str:
    """Why the private names cannot be used; empty when they are there and behave as expected."""
    if _import_error:
        return _import_error
    missing = [name for name in _NEEDED if not hasattr(_lib, name)]
    if missing:
        return f"OpenSSL._util.lib lacks {', '.join(missing)}"
    try:
        conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        conn.set_connect_state()
        for name, cname in (("_ssl", "SSL *"), ("_into_ssl", "BIO *"), ("_from_ssl", "BIO *")):
            value = getattr(conn, name, None)
            if not isinstance(value, _ffi.CData) or _ffi.typeof(value).cname != cname:
                return f"Connection.{name} is not an {cname}"
        # Writing before the handshake: OpenSSL puts a ClientHello into the outgoing BIO, then
        # wants the server's answer; reading wants it too.
        if not _wants_read(lambda: _private_write(conn, memoryview(b"x"))):
            return "SSL_write before the handshake did not ask for the server's answer"
        plaintext = _CBuffer(RECORD)
        _private_read_into(conn, plaintext, RECORD)  # returns when OpenSSL wants to read
        if plaintext.pos:
            return "SSL_read before the handshake returned data"
        if not _private_has_output(conn):
            return "no ClientHello waits in the outgoing BIO"
        out = _CBuffer(64)
        _private_drain(conn, out)
        if bytes(out.view()[:1]) != b"\x16" or _private_has_output(conn):
            return "the outgoing BIO did not drain into a handshake record"
        if "expired" not in _private_verify_error_text(10):  # X509_V_ERR_CERT_HAS_EXPIRED
            return "X509_verify_cert_error_string does not name error 10"
    except Exception as exc:  # whatever moved, the public path still works
        return f"the private names do not behave as expected ({exc!r})"
    return ""


def _choose() -> tuple[Which, str]:
    versions = ", ".join(f"{name} {version}" for name, version in INSTALLED.items())
    wanted = os.environ.get(ENV, "").strip().lower() or "auto"
    if wanted == "public":
        return "public", f"{ENV}=public ({versions})"
    ignored = "" if wanted in ("auto", "private") else f"; {ENV}={wanted!r} ignored"
    outside = outside_written_for() if wanted != "private" else []
    if outside:
        return "public", "; ".join(outside) + ignored
    problem = _probe()
    if problem:
        return "public", f"{problem} ({versions}){ignored}"
    if wanted == "private":
        return "private", f"{ENV}=private ({versions})"
    return "private", f"{versions}: the range it was written for{ignored}"


PATH, WHY = _choose()

# What the streams call, bound once: no test per record on the hot path.
new_buffer: Callable[[int], Buffer]
read_into: Callable[[SSL.Connection, Buffer, int], None]
"""SSL_read into `out` until it holds `limit` bytes or OpenSSL has nothing more to decrypt; any
other end (an error, close_notify, a socket that must be written first) raises its SSL.Error,
what was read before it in `out`."""
write: Callable[[SSL.Connection, memoryview], int]
"""One SSL_write of all of `data` (partial writes are off); raises as SSL_write fails."""
feed: Callable[[SSL.Connection, memoryview], None]
"""All of `data` (ciphertext from the peer) into the incoming memory BIO."""
encrypt_into: Callable[[SSL.Connection, memoryview, Buffer, int], None]
"""All of `data` encrypted into the outgoing memory BIO, `step` bytes at a time (the BIO never
shrinks), each step's ciphertext drained into `out`."""
drain: Callable[[SSL.Connection, Buffer], None]
"""All ciphertext waiting in the outgoing memory BIO, appended to `out`."""
has_output: Callable[[SSL.Connection], bool]
"""Whether ciphertext may wait in the outgoing memory BIO (without reading it out)."""
verify_error_text: Callable[[int], str]
"""OpenSSL's words for an X509_V_ERR_* code."""
session_reused: Callable[[SSL.Connection], bool | None]
"""Whether the completed handshake resumed a session (SSL_session_reused); None when unknown."""
if PATH == "private":
    new_buffer, read_into, write, feed = _CBuffer, _private_read_into, _private_write, _private_feed
    encrypt_into, drain, has_output = _private_encrypt_into, _private_drain, _private_has_output
    verify_error_text = _private_verify_error_text
    reused_known = hasattr(_lib, "SSL_session_reused")
    session_reused = _private_session_reused if reused_known else _public_session_reused
else:
    new_buffer, read_into, write, feed = _ByteBuffer, _public_read_into, _public_write, _public_feed
    encrypt_into, drain, has_output = _public_encrypt_into, _public_drain, _public_has_output
    verify_error_text = _public_verify_error_text
    session_reused = _public_session_reused

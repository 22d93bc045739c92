"""TLS session resumption: the sessions the proxy keeps as a client, and what the session tickets
its listeners issue are bound to.

Why it exists: every DICOM association is a TLS connection of its own, and a full handshake costs
both sides a signature, a key exchange and a certificate chain to check. Peers that resume (Java,
.NET, most PACS stacks) skip that with a session ticket; the proxy, which opens one upstream
connection per association, should not pay it again and again either.
- As a client (routes with `upstream_tls`, the store-and-forward forwarder): `ClientSessions`,
  the last good session per (upstream "host:port", server name), belongs to the client context
  it was made with (the context's app data), so a reload, which makes new contexts, drops every
  session made under the old trust.
- As a server: OpenSSL encrypts tickets with keys it draws at random when a context is made, in
  memory only. `ServerContexts` makes a table's context afresh every `ROTATE_AFTER` seconds,
  which rotates them (a ticket from before a rotation is not accepted: that client pays one full
  handshake). They cannot be shared by the `workers = N` processes: the bindings pyOpenSSL uses
  offer no way to set ticket keys (`TICKET_KEYS` says so when the proxy starts), so a client
  resumes on the worker that issued its ticket. `session_id_context` binds a ticket to the trust
  of the table that issued it: never resumed under another table, nor after a reload that
  changed its CAs or verify modes.
- Resuming skips the verify callback: `tlscontext.handshake_completed` judges the session's
  certificate again (expiry, CRLs, pins of the table in force).

What it must never do: write a session or a key anywhere (disk, log, environment, another
process), do I/O, or decide whether a peer is trusted (`tlscontext` does).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import TlsTable
from dicom_tls_proxy.transport._openssl import INSTALLED

ROTATE_AFTER = 3600.0  # seconds a listener's ticket keys are used; also the tickets' lifetime
MAX_UPSTREAMS = 256  # sessions a client context keeps (one per upstream and server name)
TICKET_KEYS = (
    "per process: each worker's listeners draw their own ticket keys (OpenSSL's, random, in "
    f"memory), made afresh every {ROTATE_AFTER:.0f} s; with workers > 1 a client resumes only on "
    f"the worker that issued its ticket (cryptography {INSTALLED['cryptography']}'s bindings "
    "offer no way to set shared keys)"
)

Key = tuple[str, str]  # (upstream "host:port", server name)


class ClientSessions:
    """The last good session with each upstream, for one client context (see `attach`)."""

    def __init__(self, limit: int = MAX_UPSTREAMS) -> None:
        self._limit = limit
        self._sessions: dict[Key, SSL.Session] = {}

    def offer(self, conn: SSL.Connection, key: Key) -> None:
        """Before the handshake: offer the session kept for `key`, if any."""
        session = self._sessions.get(key)
        if session is not None:
            conn.set_session(session)

    def keep(self, conn: SSL.Connection, key: Key) -> None:
        """After the peer's first data (TLS 1.3 tickets come after the handshake): the newest
        session of `conn` replaces the one kept for `key`."""
        session = conn.get_session()
        if session is None:
            return
        self._sessions.pop(key, None)
        self._sessions[key] = session
        while len(self._sessions) > self._limit:  # the least recently kept goes first
            del self._sessions[next(iter(self._sessions))]

    def forget(self, key: Key) -> None:
        """A handshake with `key` failed: its session is not offered again."""
        self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)


def attach(ctx: SSL.Context) -> None:
    """Give a client context its own session cache (it dies with the context)."""
    ctx.set_app_data(ClientSessions())


def sessions_of(ctx: SSL.Context) -> ClientSessions | None:
    """The context's session cache; None when the table has `session_tickets = false`."""
    found = ctx.get_app_data()
    return found if isinstance(found, ClientSessions) else None


def session_id_context(table: TlsTable) -> bytes:
    """32 bytes (OpenSSL's most) that a session issued under `table` carries: OpenSSL resumes
    it only where they are the same. They stand for what the verify callback decided and a
    resumption does not check again: the CAs, the modes and the weak certificate override. What
    `tlscontext.handshake_completed` checks again (time, CRLs, pins) is left out, so that a
    reload changing only those keeps the tickets meaningful."""
    digest = hashlib.sha256(b"dicom-tls-proxy session\0")
    for part in (
        table.name,
        table.verify,
        table.peer_certificate,
        str(table.allow_weak_peer_certificates),
        table.profile,
    ):
        digest.update(part.encode() + b"\0")
    for ca in table.ca_certificates:
        digest.update(hashlib.sha256(ca.public_bytes(Encoding.DER)).digest())
    return digest.digest()


class ServerContexts(Mapping[str, SSL.Context]):
    """The listeners' server contexts by table name. A table that issues tickets gets a new
    context (new ticket keys) when its context is `ROTATE_AFTER` seconds old, on the next
    handshake that asks for it; a connection keeps the context it started with."""

    def __init__(
        self,
        tables: Mapping[str, TlsTable],
        make: Callable[[TlsTable], SSL.Context],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tables = dict(tables)
        self._make = make
        self._clock = clock
        now = clock()
        self._made = {name: (make(table), now) for name, table in self._tables.items()}

    def __getitem__(self, name: str) -> SSL.Context:
        ctx, made = self._made[name]
        table = self._tables[name]
        if table.session_tickets and (now := self._clock()) - made >= ROTATE_AFTER:
            ctx = self._make(table)
            self._made[name] = (ctx, now)
        return ctx

    def __iter__(self) -> Iterator[str]:
        return iter(self._made)

    def __len__(self) -> int:
        return len(self._made)

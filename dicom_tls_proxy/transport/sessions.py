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
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from dicom_tls_proxy.config.schema import TlsTable
from dicom_tls_proxy.transport import _openssl
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


# OpenSSL's default group list as a client (cryptography 50's OpenSSL 4.0): key shares for the
# first two, X25519MLKEM768 and X25519, the rest named in supported_groups. A group an upstream
# chose is moved to its front (`leading`); the others stay, in this order.
DEFAULT_GROUPS = (
    "X25519MLKEM768",
    "SecP256r1MLKEM768",
    "SecP384r1MLKEM1024",
    "X25519",
    "secp256r1",
    "X448",
    "secp384r1",
    "secp521r1",
    "ffdhe2048",
    "ffdhe3072",
)
SHARED_BY_DEFAULT = frozenset(("x25519mlkem768", "x25519"))  # as OpenSSL names them, lower case


def leading(group: str) -> str:
    """The group list that sends `group`'s key share alone and names every default group after
    it, so that a server that changed its mind can still ask for another (HelloRetryRequest)."""
    rest = (g for g in DEFAULT_GROUPS if g.lower() != group.lower())
    return ":".join((group, *rest))


class ClientSessions:
    """What the proxy remembers of each upstream, for one client context (see `attach`): the
    last good session (when the table keeps sessions) and, in TLS 1.3, the key exchange group
    the upstream chose. OpenSSL's client sends key shares for X25519MLKEM768 and X25519; a
    server that takes neither (DCMTK's BCP 195 profile takes P-256) answers with a
    HelloRetryRequest, and every association pays a round trip and a second ClientHello. The
    next handshake with that upstream offers its group's share first and lists the others after
    it: nothing is dropped (a server that speaks the hybrid group still sees it offered), and the
    group was learnt from a handshake whose transcript the server signed, so an attacker cannot
    steer it. Tables with their own `groups` keep their list as written."""

    def __init__(
        self, limit: int = MAX_UPSTREAMS, *, keep_sessions: bool = True, learn_groups: bool = True
    ) -> None:
        self._limit = limit
        self._keep_sessions = keep_sessions
        self._learn_groups = learn_groups
        self._sessions: dict[Key, SSL.Session] = {}
        self._groups: dict[Key, str] = {}  # the group list to offer (`leading`), made once

    def offer(self, conn: SSL.Connection, key: Key) -> None:
        """Before the handshake: the session kept for `key`, and its group's key share first."""
        session = self._sessions.get(key)
        if session is not None:
            conn.set_session(session)
        groups = self._groups.get(key)
        if groups is not None:
            _openssl.lead_with(conn, groups)

    def learn(self, conn: SSL.Connection, key: Key) -> None:
        """After a verified handshake: the group the upstream chose, if not one that OpenSSL
        sends a key share for anyway."""
        if not self._learn_groups or conn.get_protocol_version_name() != "TLSv1.3":
            return
        group = conn.get_group_name()
        self._groups.pop(key, None)
        if group and group.lower() not in SHARED_BY_DEFAULT:
            self._groups[key] = leading(group)
            _bound(self._groups, self._limit)

    def keep(self, conn: SSL.Connection, key: Key) -> None:
        """After the peer's first data (TLS 1.3 tickets come after the handshake): the newest
        session of `conn` replaces the one kept for `key`."""
        if not self._keep_sessions:
            return
        session = conn.get_session()
        if session is None:
            return
        self._sessions.pop(key, None)
        self._sessions[key] = session
        _bound(self._sessions, self._limit)

    def forget(self, key: Key) -> None:
        """A handshake with `key` failed: neither its session nor its group is offered again."""
        self._sessions.pop(key, None)
        self._groups.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)


def _bound(kept: dict[Key, Any], limit: int) -> None:
    while len(kept) > limit:  # the least recently kept goes first
        del kept[next(iter(kept))]


def attach(ctx: SSL.Context, table: TlsTable) -> None:
    """Give a client context its own memory of upstreams (it dies with the context)."""
    ctx.set_app_data(
        ClientSessions(keep_sessions=table.session_tickets, learn_groups=not table.groups)
    )


def sessions_of(ctx: SSL.Context) -> ClientSessions | None:
    """The context's memory of upstreams; None for a context `attach` was not given."""
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

"""TLS contexts built from a `[tls.*]` table, and the verify callback that judges the peer.

Why pyOpenSSL and not the stdlib `ssl` module: `ssl` has no certificate verification callback, so it
cannot accept a self-signed modality certificate by thumbprint alone, nor show us a refused
certificate so that its thumbprint can be logged. pyOpenSSL's `set_verify` callback lets this module
decide inside the handshake, which makes a refused peer receive a proper TLS alert.

What is here: the contexts (`server_context`, `client_context`: profile, ciphers, identity, trust),
a connection set up for one handshake (`server_connection`, `client_connection`: its SNI and its
`Verification`), the decision the verify callback makes (`decide`, with `policy`), and what a
handshake ends with (`handshake_failure`, `handshake_completed`, `negotiated`: `TlsFailure`,
`TlsInfo`). Moving bytes is `tlsstream`'s.

What it must never do: I/O, logging, routing, or touch a private name of pyOpenSSL (that is
`_openssl`'s alone; OpenSSL's words for a verification error come in as `Verification.error_text`).
It reports a `TlsFailure` with a `Reason`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from dicom_tls_proxy.config.schema import TlsTable
from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.security import certnames, policy
from dicom_tls_proxy.security.auth import PeerIdentity
from dicom_tls_proxy.security.thumbprint import matches_any
from dicom_tls_proxy.transport import _openssl, sessions

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
_BCP195_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
_LEGACY_CIPHERS = (
    b"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:"
    b"AES128-SHA:AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0"
)
_MODE_ENABLE_PARTIAL_WRITE = 0x1  # ssl.h's SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL has no name)


class TlsFailure(Exception):
    """The handshake failed; `reason` is the vocabulary word, `str()` the operator's explanation."""

    def __init__(self, reason: Reason, message: str, certificate: x509.Certificate | None = None):
        super().__init__(message)
        self.reason = reason
        self.certificate = certificate


def _numbered(errnum: int) -> str:
    return f"verification error {errnum}"


@dataclass
class Verification:
    """Per-connection state the verify callback fills in (OpenSSL calls it once per depth/error)."""

    table: TlsTable
    purpose: Purpose  # what the *peer* must be allowed to do: "client" or "server"
    server_name: str | None = None
    # OpenSSL's words for an X509_V_ERR_* code: `_openssl.verify_error_text`, handed in by the
    # stream (the words come through pyOpenSSL's private bindings, which only `_openssl` touches).
    error_text: Callable[[int], str] = _numbered
    leaf: x509.Certificate | None = None
    failure: policy.Problem | None = None
    warnings: list[str] = field(default_factory=list)
    leaf_checked: bool = False
    # A chain error OpenSSL reported above depth 0 before showing us the leaf (it checks the chain
    # top-down): the refusal waits for the leaf's callback, so that the log can name the leaf.
    chain_failure: policy.Problem | None = None
    resumed: bool = False  # set by `handshake_completed`


def _parsed(cert: crypto.X509) -> x509.Certificate:
    """pyOpenSSL's certificate as cryptography's, through policy's cache: a modality shows the
    same certificate on every association (`to_cryptography()` would parse it every time)."""
    return policy.certificate_from_der(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    state: Verification = conn.get_app_data()
    try:
        return decide(state, cert, errnum, depth, bool(ok))
    except Exception as exc:  # never let a surprise escape into OpenSSL: fail closed
        state.failure = policy.Problem(Reason.TLS_PROTOCOL, f"certificate check failed: {exc!r}")
        return False


def decide(state: Verification, cert: crypto.X509, errnum: int, depth: int, ok: bool) -> bool:
    """The verify callback's answer for one (certificate, error) OpenSSL shows us; a refusal is
    left in `state.failure`, an accepted weakness in `state.warnings`."""
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
        text = f"{state.error_text(errnum)} (depth {depth})"
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
    return judge_leaf(state, leaf)


def judge_leaf(state: Verification, leaf: x509.Certificate) -> bool:
    """The peer's end-entity certificate against the table in force (pins, validity now, usage,
    the CRLs, the server name): in the verify callback, and again after a resumed handshake,
    which skips the callback. A refusal is left in `state.failure`."""
    table = state.table
    allow_weak = table.allow_weak_peer_certificates
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
    # pyOpenSSL turns on partial writes: one SSL_write per 16 KiB record. Into a memory BIO a write
    # never blocks, so one call can encrypt a whole slice; onto a socket, one call writes a chunk.
    ctx.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
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
    if table.groups:
        _openssl.set_groups(ctx, table.groups)


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
    # Resumption by stateless tickets only (TLS 1.2 and 1.3), with the keys OpenSSL draws for this
    # context (see `sessions`): no server-side session cache to hold memory per client.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if table.session_tickets:
        ctx.set_timeout(int(sessions.ROTATE_AFTER))
        ctx.set_session_id(sessions.session_id_context(table))
    else:
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_id(b"dicom-tls-proxy")
    _use_identity(ctx, table)
    _load_trust(ctx, table)
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
    # Sessions are kept by `sessions.ClientSessions` (`TlsStream.connect` offers and keeps them),
    # not by OpenSSL's client cache; it also remembers the group each upstream chose.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    sessions.attach(ctx, table)
    if not table.session_tickets:
        ctx.set_options(SSL.OP_NO_TICKET)
    _use_identity(ctx, table)
    _load_trust(ctx, table)
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    return ctx


def server_connection(ctx: SSL.Context, verification: Verification) -> SSL.Connection:
    """A listener's side of one handshake, over memory BIOs; the verify callback finds
    `verification` as the connection's app data."""
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    conn.set_app_data(verification)
    return conn


def client_connection(
    ctx: SSL.Context, verification: Verification, sock: object | None
) -> SSL.Connection:
    """The client side of one handshake, over `sock` (OpenSSL reads and writes it itself) or over
    memory BIOs (`sock` None); `verification.server_name` goes out as SNI unless it is an
    address."""
    conn = SSL.Connection(ctx, sock)  # type: ignore[arg-type]  # it only needs fileno()
    conn.set_connect_state()
    conn.set_app_data(verification)
    name = verification.server_name
    if name:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            conn.set_tlsext_host_name(name.encode("idna"))
    return conn


def ssl_error_text(exc: SSL.Error) -> str:
    """OpenSSL's reason strings, without the library noise around them."""
    parts: list[str] = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return "; ".join(parts) or str(exc) or type(exc).__name__


def handshake_failure(v: Verification, exc: SSL.Error | None) -> TlsFailure:
    """Why a handshake failed: the verify callback's refusal, else OpenSSL's error (`exc`; None
    when the peer closed the connection during the handshake)."""
    if v.failure is not None:
        return TlsFailure(v.failure.reason, v.failure.message, v.leaf)
    if exc is None:
        text = "the peer closed the connection during the handshake"
    else:
        text = ssl_error_text(exc)
    if "peer did not return a certificate" in text or "certificate required" in text:
        return TlsFailure(Reason.TLS_NO_CERTIFICATE, "the peer presented no certificate", v.leaf)
    return TlsFailure(Reason.TLS_PROTOCOL, text, v.leaf)


def handshake_completed(v: Verification, conn: SSL.Connection, reused: bool | None) -> None:
    """After a handshake OpenSSL completed: fail closed, judge again a certificate the verify
    callback did not see (a resumed session's: it may have expired or been revoked since), and
    let go of the peer's leaf. `reused` is OpenSSL's word on resumption, None when unknown (then
    a certificate no callback saw says it). Raises `TlsFailure` as the callback would."""
    if v.failure is None and v.chain_failure is not None:  # fail closed, never reached so far
        v.failure = v.chain_failure
        raise handshake_failure(v, None)
    peer = conn.get_peer_certificate() if v.leaf is None else None
    unseen = peer is not None
    if peer is not None:
        v.leaf = _parsed(peer)
        if v.table.verify != "none" and not judge_leaf(v, v.leaf):
            assert v.failure is not None
            v.failure = policy.Problem(v.failure.reason, f"{v.failure.message} (session resumed)")
            raise handshake_failure(v, None)
    v.resumed = unseen if reused is None else reused
    # Only failures need the parsed leaf (to name it); `negotiated` reads the certificate afresh.
    # Hundreds of associations may sit idle for hours: each kept ~4 KiB alive with it.
    v.leaf = None


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
    resumed: bool = False
    group: str = ""  # the key exchange group; "" for TLS 1.2 without (EC)DHE or when unknown


def negotiated(conn: SSL.Connection, v: Verification) -> TlsInfo:
    """What the completed handshake on `conn` agreed, and who the peer is."""
    cipher = conn.get_cipher_name() or ""
    encryption, mac = split_cipher(cipher)
    peer = conn.get_peer_certificate()
    cert = _parsed(peer) if peer is not None else None
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
        resumed=v.resumed,
        group=conn.get_group_name() or "",
    )


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

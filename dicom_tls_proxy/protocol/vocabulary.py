"""The words the proxy uses to say what happened: outcomes, reasons and what they mean.

Logs, metrics, the audit trail, tests and the README all read these names from here, so an operator
who greps for ``reason=no-route`` finds the same word everywhere; what each reason answers on the
wire is `association.ENDINGS`. This module must stay pure data: no I/O, no imports from the package.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How an association (or a connection that never became one) ended."""

    COMPLETED = "completed"  # released normally, or relayed to its end
    REJECTED = "rejected"  # answered with an A-ASSOCIATE-RJ
    ABORTED = "aborted"  # ended by an A-ABORT, sent or relayed
    TIMED_OUT = "timed-out"  # a configured timeout fired
    TLS_FAILED = "tls-failed"  # the TLS handshake failed or the peer's certificate was refused
    REFUSED = "refused"  # closed before any DICOM exchange (source address, limits, wrong protocol)


class Reason(enum.StrEnum):
    """Why it ended that way. Each value is the word that appears in logs and metrics."""

    RELEASED = "released"
    NO_ROUTE = "no-route"
    CALLING_AE_NOT_ALLOWED = "calling-ae-not-allowed"
    PEER_NOT_ALLOWED = "peer-not-allowed"
    SOURCE_NOT_ALLOWED = "source-not-allowed"
    PROTOCOL_VERSION = "protocol-version"
    UPSTREAM_UNREACHABLE = "upstream-unreachable"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_TLS_FAILED = "upstream-tls-failed"
    UPSTREAM_NO_ANSWER = "upstream-no-answer"
    UPSTREAM_REJECTED = "upstream-rejected"
    TOO_MANY_ASSOCIATIONS = "too-many-associations"
    UNRECOGNIZED_PDU = "unrecognized-pdu"
    UNEXPECTED_PDU = "unexpected-pdu"
    INVALID_PDU = "invalid-pdu"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    CLIENT_CLOSED = "client-closed"
    UPSTREAM_CLOSED = "upstream-closed"
    CLIENT_ABORTED = "client-aborted"
    UPSTREAM_ABORTED = "upstream-aborted"
    TLS_UNTRUSTED = "tls-untrusted"
    TLS_THUMBPRINT_MISMATCH = "tls-thumbprint-mismatch"
    TLS_EXPIRED = "tls-expired"
    TLS_NOT_YET_VALID = "tls-not-yet-valid"
    TLS_REVOKED = "tls-revoked"
    TLS_CRL_STALE = "tls-crl-stale"
    TLS_WEAK_CERTIFICATE = "tls-weak-certificate"
    TLS_WRONG_USAGE = "tls-wrong-usage"
    TLS_NO_CERTIFICATE = "tls-no-certificate"
    TLS_NAME_MISMATCH = "tls-name-mismatch"
    TLS_PROTOCOL = "tls-protocol"
    PLAINTEXT_ON_TLS = "plaintext-on-tls"
    TLS_ON_PLAINTEXT = "tls-on-plaintext"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


# What the words mean to an operator reading a log line at 3 a.m.
EXPLANATIONS: dict[Reason, str] = {
    Reason.RELEASED: "the association was released normally",
    Reason.NO_ROUTE: "no route is configured for the Called AE title",
    Reason.CALLING_AE_NOT_ALLOWED: "the Calling AE title is not in the route's allow_calling_ae",
    Reason.PEER_NOT_ALLOWED: "the peer certificate matches none of the route's allow_peer",
    Reason.SOURCE_NOT_ALLOWED: "the source address is not in allow_source",
    Reason.PROTOCOL_VERSION: "the A-ASSOCIATE-RQ does not announce protocol version 1",
    Reason.UPSTREAM_UNREACHABLE: "the upstream device refused or failed the connection",
    Reason.UPSTREAM_TIMEOUT: "the upstream did not accept the connection within connect_timeout",
    Reason.UPSTREAM_TLS_FAILED: "the TLS handshake with the upstream failed",
    Reason.UPSTREAM_NO_ANSWER: "no answer to the A-ASSOCIATE-RQ within associate_timeout",
    Reason.UPSTREAM_REJECTED: "the upstream rejected the association",
    Reason.TOO_MANY_ASSOCIATIONS: "max_connections associations are already relayed",
    Reason.UNRECOGNIZED_PDU: "the first PDU has an unknown type",
    Reason.UNEXPECTED_PDU: "the first PDU is not an A-ASSOCIATE-RQ",
    Reason.INVALID_PDU: "the A-ASSOCIATE-RQ is malformed or too long",
    Reason.HANDSHAKE_TIMEOUT: "no complete A-ASSOCIATE-RQ arrived within handshake_timeout",
    Reason.IDLE_TIMEOUT: "no byte went either way for idle_timeout",
    Reason.CLIENT_CLOSED: "the client closed the connection mid-association",
    Reason.UPSTREAM_CLOSED: "the upstream closed the connection mid-association",
    Reason.CLIENT_ABORTED: "the client sent an A-ABORT",
    Reason.UPSTREAM_ABORTED: "the upstream sent an A-ABORT",
    Reason.TLS_UNTRUSTED: "the peer certificate is not signed by a trusted CA",
    Reason.TLS_THUMBPRINT_MISMATCH: "the peer certificate's thumbprint is not accepted",
    Reason.TLS_EXPIRED: "the peer certificate has expired",
    Reason.TLS_NOT_YET_VALID: "the peer certificate is not valid yet",
    Reason.TLS_REVOKED: "the peer certificate is revoked by the configured CRL",
    Reason.TLS_CRL_STALE: "the configured CRL is past its nextUpdate",
    Reason.TLS_WEAK_CERTIFICATE: "the peer certificate uses a weak key or digest",
    Reason.TLS_WRONG_USAGE: "the peer certificate's key usage does not allow this use",
    Reason.TLS_NO_CERTIFICATE: "the peer presented no certificate",
    Reason.TLS_NAME_MISMATCH: "the upstream certificate does not carry the expected server name",
    Reason.TLS_PROTOCOL: "the TLS handshake failed (version, cipher or protocol error)",
    Reason.PLAINTEXT_ON_TLS: "plaintext DICOM was received on a TLS listener",
    Reason.TLS_ON_PLAINTEXT: "a TLS handshake was received on a plaintext listener",
    Reason.SHUTDOWN: "the proxy is shutting down",
    Reason.INTERNAL_ERROR: "the proxy failed on its own (a bug): see the error line's traceback",
}


# Reasons that belong to certificate verification: the peer gets a TLS alert, never a PDU.
TLS_REASONS: frozenset[Reason] = frozenset(r for r in Reason if r.value.startswith("tls-"))

"""What `dicom-tls-proxy echo` and the route health checks say when a C-ECHO fails: a cause and an
advice, in words an integration engineer can act on.

Why this module exists: the probe (`echo`) is protocol and I/O -- connect, TLS, associate, echo,
release -- and each of its failures has to be explained with the numbers a server's log shows and
a next step. Those words are many and change for people, not for the protocol, so they live here,
one function per step that can fail, each returning ``(cause, advice)`` for `EchoResult.fail`;
the probe decides what happened and what to send, this only says it.

What it must never do: touch sockets, TLS connections or trio's scheduling; send or decide
anything; print. Every function is pure: values in, words out.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.dimse import NotEchoResponse, describe_status
from dicom_tls_proxy.protocol.vocabulary import Reason
from dicom_tls_proxy.security import certnames, policy
from dicom_tls_proxy.transport.streams import STREAM_ERRORS, PeerClosed, os_error_text
from dicom_tls_proxy.transport.tlscontext import TlsFailure

Words = tuple[str, str]  # (cause, advice)

TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})
SOURCES = {
    1: "the called application (service user)",
    2: "the ACSE service provider",
    3: "the presentation service provider",
}
ABORT_SOURCES = {  # PS3.8 Table 9-26, seen from the probe: the server is the other side
    0: "the server application (service user)",
    2: "the server's DICOM protocol layer (service provider)",
}
ACCEPTED = "the server accepted the association"
NO_VERIFICATION: Words = (
    "the server accepted the association but not the Verification service",
    "enable C-ECHO (Verification SOP Class) on the server",
)

# What the server can do after its A-ASSOCIATE-AC instead of answering the C-ECHO: send another
# PDU, break the protocol, close or break the connection, or stay silent for so many seconds.
Ending = (
    pdu.Pdu
    | pdu.PduError
    | NotEchoResponse
    | trio.BrokenResourceError
    | trio.ClosedResourceError
    | OSError
    | float
)
_CLOSED_ADVICE = (
    "see the server's log: it may have failed, or refuse this client (Calling AE, address or "
    "certificate) only after accepting"
)
_PROTOCOL_ADVICE = "the server (or a device between) broke the DICOM protocol: see its log"


def describe_abort(abort: pdu.Abort) -> str:
    """Who aborted and why, in words, with the numbers a server's log shows."""
    who = ABORT_SOURCES.get(abort.source, f"source {abort.source}")
    if abort.source == 0:  # a service user gives no reason (PS3.8 Table 9-26)
        why = "no reason given"
    else:
        why = pdu.ABORT_REASONS.get(abort.source, {}).get(abort.reason, f"reason {abort.reason}")
    return f"A-ABORT by {who}: {why} (source {abort.source}, reason {abort.reason})"


def describe_reject(rj: pdu.AssociateReject) -> str:
    kind = {1: "permanently", 2: "transiently"}.get(rj.result, f"(result {rj.result})")
    why = pdu.REJECT_REASONS.get(rj.source, {}).get(rj.reason, f"reason {rj.reason}")
    source = SOURCES.get(rj.source, f"source {rj.source}")
    return (
        f"association rejected {kind} by {source}: {why} "
        f"(result {rj.result}, source {rj.source}, reason {rj.reason})"
    )


def connect_failed(where: str, text: str) -> Words:
    """The TCP connect failed; ``text`` is the operating system's words."""
    if "refused" in text.lower():
        return (
            f"connection refused: nothing listens on {where}",
            "check the host and port, and that the service is running",
        )
    return f"cannot connect to {where}: {text}", "check the address and network"


def timed_out(where: str, timeout: float, step: str | None) -> Words:
    """Nothing came within ``timeout``: the TCP connect (``step`` None), or the named step."""
    if step is None:
        return (
            f"timeout: no connection to {where} within {timeout:g}s",
            "a firewall may drop the packets, or the host may be down or overloaded",
        )
    return (
        f"timeout: no {step} from {where} within {timeout:g}s",
        "a firewall may drop the packets, the host may be down, or the port may expect "
        "the other protocol (TLS or plaintext)",
    )


def closed_during_handshake(where: str, exc: BaseException) -> Words:
    return (
        f"{where} closed the connection during the TLS handshake ({exc})",
        "the port may not speak TLS (try without the TLS options), or the server refused this "
        "client",
    )


def tls_failed(
    where: str, failure: TlsFailure, first: bytes, pinned: Sequence[object], server_name: str
) -> Words:
    """The TLS handshake failed. ``first`` is what the server sent first (up to 8 bytes), to tell
    a plaintext port from a TLS refusal; ``pinned`` the thumbprints the probe expected."""
    if first and first[0] not in TLS_RECORD_TYPES:
        return (
            f"{where} does not speak TLS: it answered with plaintext "
            f"(first bytes {first.hex(' ')})",
            "this looks like a plaintext DICOM port: drop the --tls/--thumbprint "
            "options, or use the TLS port (2762 by convention)",
        )
    if not first:  # closed (not reset) before sending a byte
        return closed_during_handshake(where, failure)
    cert = failure.certificate
    d = policy.describe(cert) if cert is not None else {}
    seen = f"{d.get('sha256', '?')}" if d else "no certificate"
    reason = failure.reason
    if reason == Reason.TLS_UNTRUSTED:
        return (
            f"the server's certificate is not signed by a CA you trust ({failure})",
            f"add the CA that issued it (issuer: {d.get('issuer', '?')}) with --tls-ca, "
            f"or pin the certificate itself with --thumbprint {seen}",
        )
    if reason == Reason.TLS_THUMBPRINT_MISMATCH:
        expected = ", ".join(str(t) for t in pinned)
        return (
            f"thumbprint mismatch: expected {expected}, the server presented {seen}",
            "check that you are talking to the right server; if its certificate was replaced, "
            "pin the new thumbprint",
        )
    if reason == Reason.TLS_NAME_MISMATCH:
        names = ", ".join(certnames.certificate_names(cert)) if cert is not None else "none"
        return (
            f"hostname mismatch: the certificate is not for {server_name} (it is for: {names})",
            "connect by one of those names, or give the expected one with --server-name",
        )
    if reason in (Reason.TLS_EXPIRED, Reason.TLS_NOT_YET_VALID):
        return (
            f"the server's certificate is not valid now: {failure} "
            f"(valid {d.get('not_before', '?')} to {d.get('not_after', '?')})",
            "renew the server's certificate (or check this machine's clock)",
        )
    if reason == Reason.TLS_NO_CERTIFICATE or "alert" in str(failure):
        return (
            f"the server refused the TLS handshake: {failure}",
            "the server may require a client certificate (--tls-cert/--tls-key) signed by a CA it "
            "trusts, or a TLS version or cipher this client does not offer",
        )
    return (f"TLS failed: {reason}: {failure}", "check the TLS settings of both sides")


def associate_failed(where: str, exc: BaseException, *, tls: bool, first: bytes) -> Words:
    """No valid answer to the A-ASSOCIATE-RQ: ``exc`` is the PduError or stream error; ``first``
    is what the server sent first (up to 8 bytes, empty if nothing)."""
    if first and first[0] in (0x15, 0x16) and not tls:
        return (
            f"{where} speaks TLS, and this probe spoke plaintext",
            "add --tls-ca FILE (or --thumbprint T) to connect over TLS",
        )
    text = str(exc)
    if tls and ("alert" in text or not isinstance(exc, pdu.PduError)):
        # With TLS 1.3 a server checks the client certificate after the client has finished
        # its handshake: its refusal is an alert, or a bare reset that overtook the alert.
        return (
            f"{where} ended the TLS session after the handshake: {text}",
            "the server requires a client certificate it trusts: give --tls-cert and "
            "--tls-key (signed by a CA the server trusts, or pinned there by thumbprint)"
            + ("" if "alert" in text else "; otherwise see the server's log"),
        )
    if not tls and not first:
        return (
            f"{where} closed the connection without answering the A-ASSOCIATE-RQ",
            "if this port speaks TLS, add --tls-ca FILE (or --thumbprint T); otherwise see "
            "the server's log (it may refuse this source address)",
        )
    return f"{where} did not answer the A-ASSOCIATE-RQ properly: {text}", "is this a DICOM port?"


def not_accepted(answer: pdu.Pdu, called_ae: str, calling_ae: str, *, tls: bool) -> Words:
    """The server answered the A-ASSOCIATE-RQ with an RJ, an A-ABORT or another PDU."""
    if isinstance(answer, pdu.AssociateReject):
        return describe_reject(answer), _reject_advice(answer, called_ae, calling_ae, tls=tls)
    if isinstance(answer, pdu.Abort):
        return (
            f"the server aborted the association: {describe_abort(answer)}",
            "see the server's log",
        )
    return f"unexpected answer {pdu.describe(answer)}", "is this a DICOM port?"


def echo_failed(status: int) -> Words:
    """The server answered the C-ECHO with a status other than success."""
    return f"the server answered the C-ECHO with {describe_status(status)}", "see the server's log"


def after_accept(ending: Ending) -> Words:
    """What the server did after its A-ASSOCIATE-AC instead of answering the C-ECHO, in words.
    `ending` is the PDU it sent, the error that ended the reading (an invalid PDU, a P-DATA-TF
    that is no C-ECHO-RSP, a closed or broken connection), or the seconds it stayed silent. The
    one place these are worded, for `echo` and the health checks; what the probe sends the server
    before it closes is the probe's (`echo._farewell`)."""
    unanswered = "without answering the C-ECHO"
    if isinstance(ending, float):
        return (
            f"{ACCEPTED} but did not answer the C-ECHO within {ending:g}s",
            "see the server's log: it may be hung or overloaded, or not handle C-ECHO; "
            "a longer --timeout shows whether it answers late",
        )
    if isinstance(ending, PeerClosed):
        return f"{ACCEPTED} and then closed the connection {unanswered}", _CLOSED_ADVICE
    if isinstance(ending, STREAM_ERRORS):  # a reset, a broken pipe, a fatal TLS alert
        return (
            f"{ACCEPTED} and then closed the connection {unanswered} ({os_error_text(ending)})",
            _CLOSED_ADVICE,
        )
    if isinstance(ending, pdu.Abort):
        return (
            f"{ACCEPTED} and then aborted it {unanswered}: {describe_abort(ending)}",
            "see the server's log for why it aborted (it may refuse C-ECHO from this Calling AE "
            "or this client, or have failed)",
        )
    if isinstance(ending, pdu.ReleaseRequest):
        return (
            f"{ACCEPTED} and then asked to release it (A-RELEASE-RQ) {unanswered}",
            "see the server's log: it may not offer C-ECHO to this Calling AE, or end "
            "associations it has no work for",
        )
    if isinstance(ending, NotEchoResponse):
        return (
            f"{ACCEPTED} and then answered the C-ECHO with {ending}",
            "the server (or a device between) mixed up its DIMSE messages: see its log",
        )
    if isinstance(ending, pdu.PduError):
        return (
            f"{ACCEPTED} and then sent an invalid PDU instead of answering the C-ECHO: {ending}",
            _PROTOCOL_ADVICE,
        )
    return (  # an A-ASSOCIATE-AC again, an -RJ, an RQ, an A-RELEASE-RP
        f"{ACCEPTED} and then sent an unexpected {pdu.describe(ending)} instead of answering the "
        "C-ECHO",
        _PROTOCOL_ADVICE,
    )


def _reject_advice(
    rj: pdu.AssociateReject, called_ae: str, calling_ae: str, *, tls: bool = True
) -> str:
    if rj.source == 1 and rj.reason == 7:
        return f"the server has no service called {called_ae!r}: check --called-ae"
    if rj.source == 1 and rj.reason == 3:
        return f"the server does not accept Calling AE {calling_ae!r}: check --calling-ae"
    if rj.source == 1 and not tls:
        # The proxy's TLS listener answers plaintext DICOM so (reason plaintext-on-tls).
        return (
            "if this is a TLS port, connect over TLS: add --tls-ca FILE (or --thumbprint T); "
            "otherwise the server refused this client (source address or rules): see its log"
        )
    if rj.source == 1:
        return "the server refused this client (certificate, source address or rules): see its log"
    if rj.source == 3:
        return "the server or the device behind it is busy or unreachable: try again, see its log"
    return "see the server's log"

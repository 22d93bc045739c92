"""The DICOM audit messages the syslog sink sends (PS3.15 A.5), and their syslog framing.

What is sent, as XML in the DICOM audit message schema (PS3.15 A.5.1):

- Application Activity (EventID 110100) with EventTypeCode 110120 "Application Start" when the
  proxy serves (the `started` event) and 110121 "Application Stop" when it has stopped.
- Security Alert (EventID 110113) with EventTypeCode 110126 "Node Authentication" for every
  connection refused because of who the peer is: a failed TLS handshake, a certificate that is
  untrusted, expired, revoked or not the accepted thumbprint, plaintext spoken to a TLS port (or TLS
  to a plaintext one), a refused Calling AE, peer or source address, an upstream whose certificate
  the proxy refuses. EventOutcomeIndicator 8 (serious failure) when the peer presented an identity
  that is refused (untrusted, wrong thumbprint, revoked, wrong name, not allowed); 4 (minor) else.
  Which refusals these are, and their codes and outcome, is `alerts.classify`: the association's
  JSON line (log and audit file) carries the same classification. A summary of repeated alerts
  (`Alert.repeats`, see `syslogsink.AlertLimiter`) says how many there were.

How it is framed: RFC 5424 `<PRI>1 TIMESTAMP HOSTNAME dicom-tls-proxy PROCID DICOM+RFC3881 - MSG`,
facility 10 (security/authorization), severity 5 (notice) or 4 (warning) for alerts, MSG the XML
after a UTF-8 BOM; each message octet-counted (RFC 5425: `MSGLEN SP SYSLOG-MSG`).

Why it is apart from `syslogsink`: what a message says and how it is framed can be read, and
tested against the schema, without the queue, the connection and the writer task.

What it must never do: any I/O, waiting or logging (the builders are pure: the time and the
identity are passed in); put anything in a message that `alerts.classify` did not decide, or a
secret (certificates appear as subject and SHA-256 thumbprint only).
"""

from __future__ import annotations

import base64
import getpass
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

from dicom_tls_proxy.ops.alerts import NODE_AUTHENTICATION, SECURITY_ALERT, SUCCESS, Code, classify
from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.ops.netaddr import host_of
from dicom_tls_proxy.protocol.vocabulary import EXPLANATIONS, Reason

APP_NAME = "dicom-tls-proxy"
MSGID = "DICOM+RFC3881"  # PS3.15 A.6
FACILITY = 10  # security/authorization messages (PS3.15 A.6)
NOTICE, WARNING = 5, 4
BOM = "\ufeff"
MAX_DESCRIPTION = 1024


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
ROLE_APPLICATION = Code("110150", "Application")
ROLE_LAUNCHER = Code("110151", "Application Launcher")
NODE_ID = Code("110182", "Node ID")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who reports: this process on this machine, and who started it."""

    hostname: str
    pid: int
    user: str = ""  # the operating system user that launched the proxy, if known
    source_id: str = ""  # AuditSourceID; the hostname when empty

    @classmethod
    def local(cls) -> Identity:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = ""
        return cls(hostname=socket.gethostname() or "localhost", pid=os.getpid(), user=user)


@dataclass(frozen=True, slots=True)
class Alert:
    """One Node Authentication alert: the node that failed, why, and what it showed."""

    reason: str
    outcome: int  # MINOR_FAILURE or SERIOUS_FAILURE
    node: str  # the offending node's address, host:port
    description: str
    requestor: bool = True  # the node asked for the connection (false: an upstream we called)
    calling_ae: str = ""
    subject: str = ""  # its certificate subject, if it showed one
    sha256: str = ""
    listener: str = ""
    repeats: int = 0  # > 0: a summary of so many identical alerts held back
    event_id: Code = SECURITY_ALERT  # as `alerts.classify` codes the reason
    event_type: Code = NODE_AUTHENTICATION

    @property
    def source(self) -> str:
        """The node's host without the port: what rate limiting counts by."""
        return host_of(self.node)


def alert_of(record: AssociationRecord) -> Alert | None:
    """The Security Alert a finished association calls for, or None: `alerts.classify` decides,
    as it does for the association's JSON line, so the two never disagree."""
    classification = classify(record.reason)
    if classification is None:
        return None
    reason = Reason(record.reason)
    upstream = reason == Reason.UPSTREAM_TLS_FAILED
    return Alert(
        reason=reason.value,
        outcome=classification.outcome,
        node=record.upstream if upstream and record.upstream else record.peer,
        description=(record.detail or EXPLANATIONS.get(reason, reason.value))[:MAX_DESCRIPTION],
        requestor=not upstream,
        calling_ae=record.calling_ae,
        subject="" if upstream else record.peer_subject,
        sha256="" if upstream else record.peer_sha256,
        listener=record.listener,
        event_id=classification.event_id,
        event_type=classification.event_type,
    )


def _timestamp(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code.value, "codeSystemName": "DCM", "originalText": code.meaning}
    )


def _event(root: ET.Element, event_id: Code, type_code: Code, outcome: int, when: datetime) -> None:
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": "E",
            "EventDateTime": _timestamp(when),
            "EventOutcomeIndicator": str(outcome),
        },
    )
    _code(ident, "EventID", event_id)
    _code(ident, "EventTypeCode", type_code)


def _this_process(root: ET.Element, me: Identity, *, requestor: bool, role: Code | None) -> None:
    participant = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": APP_NAME,
            "AlternativeUserID": str(me.pid),  # A.5.2.1: a process's ID in the local system
            "UserIsRequestor": "true" if requestor else "false",
            "NetworkAccessPointID": me.hostname,
            "NetworkAccessPointTypeCode": "1",  # machine name
        },
    )
    if role is not None:
        _code(participant, "RoleIDCode", role)


def _audit_source(root: ET.Element, me: Identity) -> None:
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": me.source_id or me.hostname})


def _xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode", short_empty_elements=True)


def application_activity(start: bool, me: Identity, when: datetime) -> str:
    """PS3.15 A.5.3.1 Application Activity: the proxy started (true) or stopped (false)."""
    root = ET.Element("AuditMessage")
    _event(
        root,
        APPLICATION_ACTIVITY,
        APPLICATION_START if start else APPLICATION_STOP,
        SUCCESS,
        when,
    )
    _this_process(root, me, requestor=False, role=ROLE_APPLICATION)
    if me.user:
        launcher = ET.SubElement(root, "ActiveParticipant", {"UserID": me.user})
        launcher.set("UserIsRequestor", "true")
        _code(launcher, "RoleIDCode", ROLE_LAUNCHER)
    _audit_source(root, me)
    return _xml(root)


def security_alert(alert: Alert, me: Identity, when: datetime) -> str:
    """PS3.15 A.5.3.11 Security Alert, Node Authentication: the proxy reports, the node failed."""
    root = ET.Element("AuditMessage")
    _event(root, alert.event_id, alert.event_type, alert.outcome, when)
    _this_process(root, me, requestor=not alert.requestor, role=None)
    node: dict[str, str] = {"UserID": alert.node}
    if alert.calling_ae:
        node["AlternativeUserID"] = f"AETITLES={alert.calling_ae}"
    if alert.subject:
        node["UserName"] = alert.subject
    node["UserIsRequestor"] = "true" if alert.requestor else "false"
    node["NetworkAccessPointID"] = alert.source
    node["NetworkAccessPointTypeCode"] = "2"  # IP address (a name for an upstream by name)
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in alert.source else socket.AF_INET, alert.source)
    except OSError:
        node["NetworkAccessPointTypeCode"] = "1"
    ET.SubElement(root, "ActiveParticipant", node)
    _audit_source(root, me)
    subject = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": alert.node,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "13",  # security resource
        },
    )
    _code(subject, "ParticipantObjectIDTypeCode", NODE_ID)
    description = alert.description
    if alert.repeats:
        description = (
            f"{alert.repeats} more alerts like this from {alert.source} (last: {alert.description})"
        )
    details = [("Alert Description", description), ("Reason", alert.reason)]
    if alert.listener:
        details.append(("Listener", alert.listener))
    if alert.sha256:
        details.append(("Certificate SHA-256", alert.sha256))
    if alert.repeats:
        details.append(("Repeats", str(alert.repeats)))
    for kind, text in details:
        ET.SubElement(
            subject,
            "ParticipantObjectDetail",
            {"type": kind, "value": base64.b64encode(text.encode("utf-8")).decode("ascii")},
        )
    return _xml(root)


def _header_field(text: str) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, '-' when empty."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "-" for c in text)[:255]
    return cleaned or "-"


def syslog_message(xml: str, *, severity: int, me: Identity, when: datetime) -> bytes:
    """An RFC 5424 SYSLOG-MSG carrying one audit message (no structured data)."""
    header = " ".join(
        [
            f"<{FACILITY * 8 + severity}>1",
            _timestamp(when),
            _header_field(me.hostname),
            APP_NAME,
            str(me.pid),
            MSGID,
            "-",
        ]
    )
    return f"{header} {BOM}{xml}".encode()


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: `MSGLEN SP SYSLOG-MSG`."""
    return b"%d %s" % (len(message), message)

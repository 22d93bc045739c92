"""`[audit] syslog`: DICOM audit messages (PS3.15 A.5) over syslog TLS (A.6, RFC 5424/5425).

A real TLS syslog receiver (a thread, the dev PKI, octet-counted frames) and real proxy processes;
the messages are checked as RFC 5424 and against the A.5.1 schema transcribed below. The pure
builders and the alert rate limiter are tested on their own.
"""

from __future__ import annotations

import base64
import itertools
import re
import shutil
import signal
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from dicom_tls_proxy.config.load import ConfigError, load_config
from dicom_tls_proxy.ops.audit import AssociationRecord
from dicom_tls_proxy.ops.auditmessage import (
    Alert,
    Identity,
    alert_of,
    application_activity,
    frame,
    security_alert,
    syslog_message,
)
from dicom_tls_proxy.ops.syslogsink import AlertLimiter, SyslogSink
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.protocol.vocabulary import Outcome, Reason
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    RawClient,
    associate,
    build_rq,
    certificate_of,
    client_ssl_context,
    free_port,
    pacs_identities,
    proxy_config,
    running_proxy,
    sha256_of,
    tls_in,
    toml_dumps,
    wait_until,
)
from tests.test_audit_metrics import (
    ctx,
    metrics_address,
    no_route,
    read_audit,
    refused_by_tls,
    scrape,
    value,
)

# -- PS3.15 A.5.1, the DICOM audit message schema, transcribed --------------------------------
#
# Each element: required attributes (name -> allowed values, None = any non-empty token), optional
# attributes, and its content model as a regular expression over the child element names (each
# followed by a space), as the RELAX NG of A.5.1 orders them.

CODED: dict[str, Any] = {
    "required": {"csd-code": None, "codeSystemName": None, "originalText": None},
    "optional": {"displayName": None},
    "children": r"",
}
XSD_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
SCHEMA: dict[str, dict[str, Any]] = {
    "AuditMessage": {
        "required": {},
        "optional": {},
        "children": r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
        r"(ParticipantObjectIdentification )*",
    },
    "EventIdentification": {
        "required": {
            "EventDateTime": XSD_DATETIME,
            "EventOutcomeIndicator": {"0", "4", "8", "12"},
        },
        "optional": {"EventActionCode": {"C", "R", "U", "D", "E"}},
        "children": r"EventID (EventTypeCode )*(EventOutcomeDescription )?(PurposeOfUse )*",
    },
    "EventID": CODED,
    "EventTypeCode": CODED,
    "RoleIDCode": CODED,
    "ParticipantObjectIDTypeCode": CODED,
    "ActiveParticipant": {
        "required": {"UserID": None, "UserIsRequestor": {"true", "false"}},
        "optional": {
            "AlternativeUserID": None,
            "UserName": None,
            "NetworkAccessPointID": None,
            "NetworkAccessPointTypeCode": {"1", "2", "3", "4", "5"},
        },
        "children": r"(RoleIDCode )*(MediaIdentifier )?",
    },
    "AuditSourceIdentification": {
        "required": {"AuditSourceID": None},
        "optional": {"AuditEnterpriseSiteID": None},
        "children": r"(AuditSourceTypeCode )*",
    },
    "ParticipantObjectIdentification": {
        "required": {"ParticipantObjectID": None},
        "optional": {
            "ParticipantObjectTypeCode": {"1", "2", "3", "4"},
            "ParticipantObjectTypeCodeRole": {str(n) for n in range(1, 25)},
            "ParticipantObjectDataLifeCycle": {str(n) for n in range(1, 16)},
            "ParticipantObjectSensitivity": None,
        },
        "children": r"ParticipantObjectIDTypeCode "
        r"((ParticipantObjectName |ParticipantObjectQuery ))?"
        r"(ParticipantObjectDetail )*(ParticipantObjectDescription )*",
    },
    "ParticipantObjectDetail": {
        "required": {"type": None, "value": re.compile(r"[A-Za-z0-9+/=]*")},
        "optional": {},
        "children": r"",
    },
}


def validate(element: ET.Element) -> None:
    """Raise AssertionError where `element` departs from the transcribed A.5.1 schema."""
    spec = SCHEMA.get(element.tag)
    assert spec is not None, f"element {element.tag} is not in the schema"
    allowed = {**spec["required"], **spec["optional"]}
    for name in spec["required"]:
        assert element.get(name), f"{element.tag} lacks {name}"
    for name, text in element.attrib.items():
        assert name in allowed, f"{element.tag} has unknown attribute {name}"
        rule = allowed[name]
        assert text.strip(), f"{element.tag}@{name} is empty"
        if isinstance(rule, set):
            assert text in rule, f"{element.tag}@{name} = {text!r}, expected one of {rule}"
        elif isinstance(rule, re.Pattern):
            assert rule.fullmatch(text), f"{element.tag}@{name} = {text!r}"
    sequence = "".join(f"{child.tag} " for child in element)
    assert re.fullmatch(spec["children"], sequence), f"{element.tag} children: {sequence!r}"
    for child in element:
        validate(child)


# -- RFC 5424 ------------------------------------------------------------------------------

HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) "
    rb"(?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<sd>-) (?P<msg>.*)",
    re.DOTALL,
)


def parse_message(message: bytes) -> tuple[re.Match[bytes], ET.Element]:
    """An RFC 5424 SYSLOG-MSG from the proxy: the header match, and its valid audit message."""
    m = HEADER.fullmatch(message)
    assert m, message[:200]
    assert int(m["pri"]) // 8 == 10  # facility: security/authorization
    assert XSD_DATETIME.fullmatch(m["ts"].decode())
    assert m["app"] == b"dicom-tls-proxy" and m["msgid"] == b"DICOM+RFC3881"
    msg = m["msg"]
    assert msg.startswith(b"\xef\xbb\xbf")  # MSG-UTF8: the BOM, then UTF-8
    root = ET.fromstring(msg[3:].decode("utf-8"))
    assert root.tag == "AuditMessage"
    validate(root)
    return m, root


def codes(root: ET.Element) -> tuple[str, str, str]:
    """(EventID, EventTypeCode, EventOutcomeIndicator) of an audit message."""
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id, type_code = ident.find("EventID"), ident.find("EventTypeCode")
    assert event_id is not None and type_code is not None
    for code in (event_id, type_code):
        assert code.get("codeSystemName") == "DCM"
    return (
        event_id.get("csd-code", ""),
        type_code.get("csd-code", ""),
        ident.get("EventOutcomeIndicator", ""),
    )


OUTCOME_MEANINGS = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}


def classification_of(root: ET.Element) -> dict[str, Any]:
    """What an audit message says it is, in the shape of a JSON line's `security_alert` object
    (README, Logs): what a SIEM reading the audit file must find for the same refusal."""
    ident = root.find("EventIdentification")
    assert ident is not None
    found: dict[str, Any] = {}
    for key, tag in (("event_id", "EventID"), ("event_type", "EventTypeCode")):
        code = ident.find(tag)
        assert code is not None
        found[key] = {
            "code": code.get("csd-code"),
            "scheme": code.get("codeSystemName"),
            "meaning": code.get("originalText"),
        }
    outcome = int(ident.get("EventOutcomeIndicator", ""))
    found["outcome"] = {"code": outcome, "meaning": OUTCOME_MEANINGS[outcome]}
    return found


def details(root: ET.Element) -> dict[str, str]:
    return {
        d.get("type", ""): base64.b64decode(d.get("value", "")).decode()
        for d in root.iter("ParticipantObjectDetail")
    }


# -- the receiver ----------------------------------------------------------------------------


class Receiver:
    """A TLS syslog collector (RFC 5425) on 127.0.0.1: mutual TLS with the dev PKI, frames kept."""

    def __init__(self, pki: Path, port: int = 0, ca: Path | None = None) -> None:
        """`ca`: the CA it trusts client certificates from (the dev PKI's by default)."""
        self.ctx = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(ca or pki / "ca.pem")
        )
        self.ctx.load_cert_chain(str(pki / "proxy.pem"), str(pki / "proxy.key"))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.port = int(self.listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.messages: list[bytes] = []
        self.origins: list[int] = []  # per message: the index of its connection in `peers`
        self.peers: list[bytes] = []  # per connection: the client certificate (DER) it showed
        self.ended = 0  # connections the proxy closed cleanly (close_notify or EOF, no cut frame)
        self.errors: list[BaseException] = []
        self.connections = 0
        self.attempts: list[float] = []  # time.monotonic() of each TCP connection taken
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.attempts.append(time.monotonic())
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT * 4)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tconn:
                with self._lock:
                    index = self.connections
                    self.connections += 1
                    self.peers.append(tconn.getpeercert(binary_form=True) or b"")
                    self._open.append(tconn)
                buf = b""
                while True:
                    while (m := re.match(rb"([1-9]\d{0,8}) ", buf)) and len(buf) >= m.end() + int(
                        m[1]
                    ):
                        end = m.end() + int(m[1])
                        with self._lock:
                            self.messages.append(buf[m.end() : end])
                            self.origins.append(index)
                        buf = buf[end:]
                    assert len(buf) < 1 << 20 and (not buf or buf[:1].isdigit()), buf[:50]
                    data = tconn.recv(65536)
                    if not data:
                        assert not buf, f"cut frame: {buf[:50]!r}"
                        with self._lock:
                            self.ended += 1
                        return
                    buf += data
        except (ssl.SSLError, OSError):
            pass
        except BaseException as exc:
            self.errors.append(exc)

    def audit(self) -> list[ET.Element]:
        with self._lock:
            messages = list(self.messages)
        return [parse_message(m)[1] for m in messages]

    def wait_for(self, event_id: str, type_code: str, count: int = 1) -> list[ET.Element]:
        def found() -> list[ET.Element] | None:
            hits = [r for r in self.audit() if codes(r)[:2] == (event_id, type_code)]
            return hits if len(hits) >= count else None

        return wait_until(found, what=f"{count} audit message(s) {event_id}/{type_code}")  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop listening and cut every connection (shutdown: a blocked accept or recv in
        another thread keeps a merely closed socket alive)."""
        with self._lock:
            sockets = [self.listener, *self._open]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@contextmanager
def receiver(pki: Path, port: int = 0, ca: Path | None = None) -> Iterator[Receiver]:
    r = Receiver(pki, port, ca)
    try:
        yield r
    finally:
        r.close()
    assert not r.errors, r.errors


def config(pki: Path, collector: str, *, metrics: bool = False) -> dict[str, Any]:
    cfg = proxy_config(
        pki,
        "127.0.0.1:9",
        tls={"collector": tls_in(pki)},
        route=[{"called_ae": "CT", "upstream": "127.0.0.1:9", "allow_calling_ae": ["ALLOWED*"]}],
        audit={"syslog": collector, "syslog_tls": "collector"},
    )
    if metrics:
        cfg["metrics"] = {"bind": "127.0.0.1:0"}
    return cfg


def refused_calling_ae(address: tuple[str, int], pki: Path) -> None:
    client = RawClient(
        address, client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    )
    try:
        client.send(build_rq("CT", "INTRUDER"))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 3)
    finally:
        client.close()


SECURITY_ALERT, NODE_AUTHENTICATION = "110113", "110126"
APPLICATION_ACTIVITY, START, STOP = "110100", "110120", "110121"


# -- behaviour ---------------------------------------------------------------------------------


def test_start_alerts_and_stop_reach_the_collector(tmp_path: Path, pki: Path) -> None:
    foreign_key, foreign_cert = pacs_identities(tmp_path, pki)["foreign"]
    foreign = client_ssl_context(pki / "ca.pem", foreign_cert, foreign_key)
    with receiver(pki) as collector:
        with running_proxy(tmp_path, config(pki, collector.address, metrics=True)) as proxy:
            address = proxy.address("tls")
            (start,) = collector.wait_for(APPLICATION_ACTIVITY, START)
            participants = start.findall("ActiveParticipant")
            assert participants[0].get("UserID") == "dicom-tls-proxy"
            assert participants[0].get("UserIsRequestor") == "false"
            role = participants[0].find("RoleIDCode")
            assert role is not None and role.get("csd-code") == "110150"

            refused_by_tls(address, foreign)  # a client certificate from another CA
            refused_calling_ae(address, pki)
            alerts = collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION, 2)
            by_reason = {details(a)["Reason"]: a for a in alerts}
            assert set(by_reason) == {"tls-untrusted", "calling-ae-not-allowed"}

            untrusted = by_reason["tls-untrusted"]
            assert codes(untrusted)[2] == "8"  # serious: an identity the proxy refuses
            ident = untrusted.find("EventIdentification")
            assert ident is not None and ident.get("EventActionCode") == "E"
            node = untrusted.findall("ActiveParticipant")[1]
            assert node.get("UserIsRequestor") == "true"
            assert node.get("NetworkAccessPointID") == "127.0.0.1"
            assert node.get("NetworkAccessPointTypeCode") == "2"
            assert "foreign-pacs" in node.get("UserName", "")
            subject = untrusted.find("ParticipantObjectIdentification")
            assert subject is not None
            assert subject.get("ParticipantObjectID", "").startswith("127.0.0.1:")
            # the refused certificate, as an operator pins it (computed here, not by the proxy)
            assert details(untrusted)["Certificate SHA-256"] == sha256_of(foreign_cert)
            assert details(untrusted)["Listener"] == "tls"

            ae = by_reason["calling-ae-not-allowed"]
            assert codes(ae)[2] == "4"
            assert ae.findall("ActiveParticipant")[1].get("AlternativeUserID") == (
                "AETITLES=INTRUDER"
            )
            source = ae.find("AuditSourceIdentification")
            assert source is not None and source.get("AuditSourceID") == socket.gethostname()

            web = metrics_address(proxy)
            wait_until(
                lambda: value(scrape(web), "dicom_tls_proxy_audit_syslog_sent_total") >= 3,
                what="sent messages counted",
            )
            assert value(scrape(web), "dicom_tls_proxy_audit_syslog_dropped_total") == 0
        # Stopped: the Application Stop went out before the process ended.
        collector.wait_for(APPLICATION_ACTIVITY, STOP)
        with collector._lock:
            raw = list(collector.messages)
        severities = {int(HEADER.fullmatch(m)["pri"]) % 8 for m in raw}  # type: ignore[index]
        assert severities == {4, 5}  # warning for alerts, notice for start and stop


def test_collector_down_at_start_then_up_gets_what_was_queued(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    with running_proxy(tmp_path, config(pki, f"127.0.0.1:{port}")) as proxy:
        failed = proxy.wait_for(event="syslog-failed")
        assert failed["level"] == "error" and failed["queued"] >= 1
        refused_calling_ae(proxy.address("tls"), pki)  # traffic goes on meanwhile
        proxy.association(reason="calling-ae-not-allowed")
        with receiver(pki, port) as collector:
            collector.wait_for(APPLICATION_ACTIVITY, START)
            (alert,) = collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
            assert details(alert)["Reason"] == "calling-ae-not-allowed"
            proxy.wait_for(event="syslog-recovered")
            # The collector goes away and comes back: the next alert waits, then arrives.
            collector.close()
        # Another reason: the same one again within ALERT_INTERVAL would only be counted.
        plaintext = RawClient(proxy.address("tls"))
        try:
            plaintext.send(build_rq("CT", "ALLOWED_SCU"))
            assert plaintext.read_pdu() == pdu.encode_reject(1, 1, 1)
        finally:
            plaintext.close()
        proxy.association(reason="plaintext-on-tls")
        with receiver(pki, port) as again:
            (alert,) = again.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
            assert details(alert)["Reason"] == "plaintext-on-tls"


class Refuser:
    """A collector that is down, at a port of our choosing: it takes each TCP connection and
    closes it at once, so the proxy's TLS handshake fails; keeps when each attempt came."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.attempts: list[float] = []  # time.monotonic() of each connection
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.attempts.append(time.monotonic())
            conn.close()

    def wait(self, count: int) -> list[float]:
        wait_until(lambda: len(self.attempts) >= count, what=f"{count} connection attempts")
        return self.attempts[:count]

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


def backed_off(gap: float, expected: float) -> bool:
    """A wait of about `expected` seconds between two attempts: never shorter (less a little
    for where the attempt was seen), and on a loaded machine possibly somewhat longer."""
    return expected * 0.95 <= gap < expected * 1.5 + 0.5


def test_the_back_off_doubles_while_the_collector_is_down_and_starts_again_after_a_success(
    tmp_path: Path, pki: Path
) -> None:
    """Past the syslog writer's back-off, a step at a time: attempts 0.5, 1, 2 and 4 s apart
    while the collector is down at start; it comes back and gets what waited; it goes down
    again: the first attempts are 0.5 and 1 s apart again, not 8; back again, the alert queued
    meanwhile arrives. (The 30-s ceiling is past what a test may take here.)"""
    port = free_port()
    down = Refuser(port)
    try:
        with running_proxy(tmp_path, config(pki, f"127.0.0.1:{port}")) as proxy:
            address = proxy.address("tls")
            attempts = down.wait(4)  # waits of 0.5, 1 and 2 s so far
            down.close()
            with receiver(pki, port) as collector:
                collector.wait_for(APPLICATION_ACTIVITY, START)  # queued since the start
                recovered = time.monotonic()  # the fifth attempt, 4 s after the fourth
                proxy.wait_for(event="syslog-recovered")
                gaps = [b - a for a, b in itertools.pairwise([*attempts, recovered])]
                assert all(map(backed_off, gaps[:3], (0.5, 1.0, 2.0))), gaps
                assert gaps[3] >= 4.0 * 0.95, gaps
                # The collector goes away again; an alert is queued for it.
                collector.close()
                down = Refuser(port)
                refused_calling_ae(address, pki)
                alerted = time.monotonic()
                again = down.wait(2)
            down.close()
            with receiver(pki, port) as collector:
                (alert,) = collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
                assert details(alert)["Reason"] == "calling-ae-not-allowed"
            gaps = [b - a for a, b in itertools.pairwise([alerted, *again])]
            assert gaps[0] < 0.5 * 1.5 + 0.5, gaps  # 0.5 s after the failed write, not 8
            assert backed_off(gaps[1], 1.0), gaps
            wait_until(
                lambda: len(proxy.find(event="syslog-recovered")) == 2, what="recovered twice"
            )
            assert len(proxy.find(event="syslog-failed")) == 1  # one line a minute at most
    finally:
        down.close()


def test_a_collector_refusing_the_proxys_certificate_after_the_handshake_is_backed_off(
    tmp_path: Path, pki: Path
) -> None:
    """TLS 1.3: the proxy's handshake is over before the collector has checked its client
    certificate; the refusal, an alert, comes after it. Nothing written then counts as sent,
    nothing is reported as reachable, the back-off grows as for a collector that is down, and
    once the collector trusts the proxy, everything that waited arrives."""
    other_ca = pacs_identities(tmp_path, pki)["other-ca"][1]
    port = free_port()
    strict = Receiver(pki, port, ca=other_ca)  # trusts another CA than the proxy's
    try:
        with running_proxy(tmp_path, config(pki, f"127.0.0.1:{port}", metrics=True)) as proxy:
            web = metrics_address(proxy)
            refused_calling_ae(proxy.address("tls"), pki)
            wait_until(lambda: len(strict.attempts) >= 2, what="2 connection attempts")
            assert value(scrape(web), "dicom_tls_proxy_audit_syslog_sent_total") == 0
            assert not proxy.find(event="syslog-connected")
            assert not proxy.find(event="syslog-recovered")
            failed = proxy.wait_for(event="syslog-failed")
            assert "alert" in failed["msg"], failed
            wait_until(lambda: len(strict.attempts) >= 4, what="4 connection attempts")
            gaps = [b - a for a, b in itertools.pairwise(strict.attempts[:4])]
            assert all(map(backed_off, gaps, (0.5, 1.0, 2.0))), gaps
            strict.close()
            assert strict.connections == 0 and not strict.messages
            with receiver(pki, port) as collector:  # it trusts the proxy now
                collector.wait_for(APPLICATION_ACTIVITY, START)
                (alert,) = collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
                assert details(alert)["Reason"] == "calling-ae-not-allowed"
                proxy.wait_for(event="syslog-recovered")
                assert value(scrape(web), "dicom_tls_proxy_audit_syslog_sent_total") == 2
            assert value(scrape(web), "dicom_tls_proxy_audit_syslog_dropped_total") == 0
    finally:
        strict.close()
    assert not strict.errors, strict.errors


def refused_plaintext(address: tuple[str, int]) -> None:
    client = RawClient(address)
    try:
        client.send(build_rq("CT", "ALLOWED_SCU"))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 1)
    finally:
        client.close()


def der_of(path: Path) -> bytes:
    return bytes(certificate_of(path).public_bytes(Encoding.DER))


def threads_of(pid: int) -> list[str]:
    """The names of a process's threads, but trio's idle `to_thread` workers ("Trio thread N")."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            continue
    return [name for name in names if not name.startswith("Trio thread")]


def test_the_writer_is_a_task_not_a_thread(tmp_path: Path, pki: Path) -> None:
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc")
    with receiver(pki) as collector:
        with running_proxy(tmp_path, config(pki, collector.address)) as proxy:
            collector.wait_for(APPLICATION_ACTIVITY, START)
            proxy.wait_for(event="syslog-connected")
            refused_calling_ae(proxy.address("tls"), pki)
            collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
            assert len(threads_of(proxy.proc.pid)) == 1, threads_of(proxy.proc.pid)
        # At stop, the Application Stop still goes out: the writer outlives the proxy's nursery.
        assert proxy.proc.returncode == 0
        collector.wait_for(APPLICATION_ACTIVITY, STOP)
        assert not proxy.find(event="syslog-dropped")
        assert collector.connections == 1


def rotatable_client_certificate(tmp_path: Path, pki: Path, cfg: dict[str, Any]) -> Path:
    """The collector table's client certificate as files of their own (the proxy's at first)."""
    folder = tmp_path / "syslog-client"
    folder.mkdir()
    shutil.copy(pki / "proxy.pem", folder / "client.pem")
    shutil.copy(pki / "proxy.key", folder / "client.key")
    cfg["tls"]["collector"].update(
        certificate=folder / "client.pem", private_key=folder / "client.key"
    )
    return folder


def rotate(folder: Path, pki: Path) -> None:
    """A renewed client certificate at the same paths (the dev PKI's CN=dicom-client)."""
    shutil.copy(pki / "client.key", folder / "client.key")
    shutil.copy(pki / "client.pem", folder / "client.pem")


def test_a_reload_rotates_the_client_certificate(tmp_path: Path, pki: Path) -> None:
    old, new = der_of(pki / "proxy.pem"), der_of(pki / "client.pem")
    with receiver(pki) as collector:
        cfg = config(pki, collector.address)
        folder = rotatable_client_certificate(tmp_path, pki, cfg)
        with running_proxy(tmp_path, cfg) as proxy:
            address = proxy.address("tls")
            collector.wait_for(APPLICATION_ACTIVITY, START)
            refused_calling_ae(address, pki)
            collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
            assert collector.peers == [old]

            rotate(folder, pki)
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for(event="reloaded")
            # Queued at once, while the old connection is being closed: it waits, then goes
            # out on the new one.
            refused_plaintext(address)
            wait_until(lambda: collector.ended >= 1, what="the old connection closed cleanly")
            collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION, 2)
            assert collector.peers == [old, new]
        collector.wait_for(APPLICATION_ACTIVITY, STOP)
        with collector._lock:
            received = list(zip(collector.messages, collector.origins, strict=True))
        seen = []
        for message, origin in received:
            root = parse_message(message)[1]
            seen.append((codes(root)[1], details(root).get("Reason", ""), origin))
        assert seen == [  # each message once, in order, none lost
            (START, "", 0),
            (NODE_AUTHENTICATION, "calling-ae-not-allowed", 0),
            (NODE_AUTHENTICATION, "plaintext-on-tls", 1),
            (STOP, "", 1),
        ]
        assert collector.connections == 2 and not proxy.find(event="syslog-failed")


def test_a_reload_cannot_change_the_collector_or_its_table(tmp_path: Path, pki: Path) -> None:
    with receiver(pki) as collector:
        cfg = config(pki, collector.address)
        with running_proxy(tmp_path, cfg) as proxy:
            collector.wait_for(APPLICATION_ACTIVITY, START)
            cfg["tls"]["other"] = cfg["tls"]["collector"]
            cfg["audit"]["syslog_tls"] = "other"
            proxy.config_path.write_text(toml_dumps(cfg))
            proxy.proc.send_signal(signal.SIGHUP)
            failed = proxy.wait_for(event="reload-failed")
            assert failed["changed"] == ["audit.syslog"]
            assert "cannot change while running" in failed["msg"]
            refused_calling_ae(proxy.address("tls"), pki)  # the old settings go on
            collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION)
            assert collector.connections == 1 and collector.ended == 0


def test_each_worker_sends_and_follows_a_reload(tmp_path: Path, pki: Path) -> None:
    """`workers = N`: every worker has its own sink and connection (the parent none); each
    reloads on the forwarded SIGHUP and connects with the rotated certificate."""
    new = der_of(pki / "client.pem")
    with receiver(pki) as collector:
        cfg = config(pki, collector.address)
        cfg["proxy"]["workers"] = 2
        cfg["listener"][0]["bind"] = f"127.0.0.1:{free_port()}"
        folder = rotatable_client_certificate(tmp_path, pki, cfg)
        with running_proxy(tmp_path, cfg) as proxy:
            pids = set(proxy.wait_for(event="workers-started")["pids"])
            collector.wait_for(APPLICATION_ACTIVITY, START, 2)
            rotate(folder, pki)
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: len(proxy.find(event="reloaded")) == 2, what="both reloaded")
            wait_until(lambda: collector.ended >= 2, what="both old connections closed")
        collector.wait_for(APPLICATION_ACTIVITY, STOP, 2)
        with collector._lock:
            received = list(zip(collector.messages, collector.origins, strict=True))
            peers = list(collector.peers)
        by_kind: dict[str, set[int]] = {START: set(), STOP: set()}
        for message, origin in received:
            m, root = parse_message(message)
            by_kind[codes(root)[1]].add(int(m["procid"]))
            if codes(root)[1] == STOP:
                assert peers[origin] == new
        assert by_kind == {START: pids, STOP: pids}
        assert collector.connections == 4


def test_the_audit_file_classifies_what_syslog_alerts_on(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    """Issue 12: a SIEM reading the JSON audit file finds the refusals of identity by their
    `security_alert` object, which says what the syslog message of the same refusal says; the
    other lines (an association relayed, a refusal by route) carry none. The JSON log line of an
    association carries the same fields as its audit line."""
    trail = tmp_path / "audit.jsonl"
    foreign_key, foreign_cert = pacs_identities(tmp_path, pki)["foreign"]
    foreign = client_ssl_context(pki / "ca.pem", foreign_cert, foreign_key)
    with receiver(pki) as collector:
        cfg = config(pki, collector.address)
        cfg["route"][0]["upstream"] = legacy.address
        cfg["audit"]["file"] = trail
        with running_proxy(tmp_path, cfg) as proxy:
            address = proxy.address("tls")
            accepted = associate(address, "CT", calling_ae="ALLOWED_SCU", ssl_context=ctx(pki))
            assert accepted.is_established and accepted.send_c_echo().Status == 0
            accepted.release()
            no_route(address, pki)
            refused_calling_ae(address, pki)
            refused_by_tls(address, foreign)  # a client certificate from another CA
            refused_plaintext(address)
            alerts = collector.wait_for(SECURITY_ALERT, NODE_AUTHENTICATION, 3)
            wait_until(
                lambda: trail.exists() and trail.read_text().count('"event": "association"') == 5,
                what="the five associations in the audit file",
            )
            reasons = ["released", "no-route", "calling-ae-not-allowed", "tls-untrusted"]
            logged = {r: proxy.association(reason=r) for r in [*reasons, "plaintext-on-tls"]}

    alerted = {details(a)["Reason"]: classification_of(a) for a in alerts}
    assert set(alerted) == {"calling-ae-not-allowed", "tls-untrusted", "plaintext-on-tls"}
    assert alerted["tls-untrusted"]["outcome"] == {"code": 8, "meaning": "Serious failure"}
    assert alerted["plaintext-on-tls"]["outcome"] == {"code": 4, "meaning": "Minor failure"}
    lines = {x["reason"]: x for x in read_audit(trail) if x["event"] == "association"}
    assert set(lines) == set(logged)
    for reason, line in lines.items():
        if reason in alerted:
            assert line["security_alert"] == alerted[reason], reason
        else:
            assert "security_alert" not in line, reason
        assert logged[reason].get("security_alert") == line.get("security_alert"), reason
    # Only associations are classified: the proxy's own events in the file are not alerts.
    assert not [
        x for x in read_audit(trail) if x["event"] != "association" and "security_alert" in x
    ]


# -- the builders, pure ---------------------------------------------------------------------

ME = Identity(hostname="gateway.example.org", pid=4242, user="dicom", source_id="")
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


def record(
    reason: Reason, outcome: Outcome = Outcome.TLS_FAILED, **fields: Any
) -> AssociationRecord:
    r = AssociationRecord(listener="tls", peer="10.1.2.3:40000", **fields)
    r.finish(outcome, reason)
    return r


@pytest.mark.parametrize("start", [True, False])
def test_application_activity_is_valid(start: bool) -> None:
    xml = application_activity(start, ME, WHEN)
    m, root = parse_message(syslog_message(xml, severity=5, me=ME, when=WHEN))
    assert m["pri"] == b"85" and m["host"] == b"gateway.example.org" and m["procid"] == b"4242"
    assert m["ts"] == b"2024-05-06T07:08:09.123Z"
    assert codes(root) == (APPLICATION_ACTIVITY, START if start else STOP, "0")
    app, launcher = root.findall("ActiveParticipant")
    assert app.get("AlternativeUserID") == "4242"
    assert launcher.get("UserID") == "dicom" and launcher.get("UserIsRequestor") == "true"
    role = launcher.find("RoleIDCode")
    assert role is not None and role.get("originalText") == "Application Launcher"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "gateway.example.org"


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        (Reason.TLS_UNTRUSTED, "8"),
        (Reason.TLS_THUMBPRINT_MISMATCH, "8"),
        (Reason.TLS_REVOKED, "8"),
        (Reason.PEER_NOT_ALLOWED, "8"),
        (Reason.TLS_EXPIRED, "4"),
        (Reason.TLS_PROTOCOL, "4"),
        (Reason.PLAINTEXT_ON_TLS, "4"),
        (Reason.TLS_ON_PLAINTEXT, "4"),
        (Reason.CALLING_AE_NOT_ALLOWED, "4"),
        (Reason.SOURCE_NOT_ALLOWED, "4"),
    ],
)
def test_refusals_become_node_authentication_alerts(reason: Reason, outcome: str) -> None:
    alert = alert_of(record(reason, calling_ae="CT_SCU", peer_subject="CN=x", peer_sha256="ab"))
    assert alert is not None and alert.source == "10.1.2.3"
    _, root = parse_message(
        syslog_message(security_alert(alert, ME, WHEN), severity=4, me=ME, when=WHEN)
    )
    assert codes(root) == (SECURITY_ALERT, NODE_AUTHENTICATION, outcome)
    assert details(root)["Reason"] == reason.value


def test_upstream_refused_by_the_proxy_is_the_alert_subject() -> None:
    r = record(Reason.UPSTREAM_TLS_FAILED, Outcome.REJECTED, upstream="pacs.example.org:2762")
    alert = alert_of(r)
    assert alert is not None and alert.node == "pacs.example.org:2762" and not alert.requestor
    root = ET.fromstring(security_alert(alert, ME, WHEN))
    validate(root)
    proxy, upstream = root.findall("ActiveParticipant")
    assert proxy.get("UserIsRequestor") == "true" and upstream.get("UserIsRequestor") == "false"
    assert upstream.get("NetworkAccessPointTypeCode") == "1"  # a machine name


@pytest.mark.parametrize(
    "reason", [Reason.RELEASED, Reason.NO_ROUTE, Reason.IDLE_TIMEOUT, Reason.UPSTREAM_UNREACHABLE]
)
def test_other_endings_are_no_alert(reason: Reason) -> None:
    assert alert_of(record(reason, Outcome.COMPLETED)) is None


@pytest.mark.parametrize("reason", list(Reason))
def test_json_lines_and_syslog_classify_every_reason_alike(reason: Reason) -> None:
    """One decision for both sinks: a record's JSON line has a `security_alert` exactly when the
    syslog sink sends a Security Alert for it, and it says the same codes and outcome."""
    r = record(reason, calling_ae="CT_SCU", peer_subject="CN=x", peer_sha256="ab")
    fields = r.fields()
    alert = alert_of(r)
    if alert is None:
        assert "security_alert" not in fields
        return
    root = ET.fromstring(security_alert(alert, ME, WHEN))
    validate(root)
    assert fields["security_alert"] == classification_of(root)


def test_xml_special_characters_are_escaped() -> None:
    alert = Alert("tls-untrusted", 8, "10.0.0.1:1", 'a <b> & "c"', subject='CN=<&">')
    root = ET.fromstring(security_alert(alert, ME, WHEN))
    validate(root)
    assert root.findall("ActiveParticipant")[1].get("UserName") == 'CN=<&">'


def test_frame_is_octet_counted() -> None:
    message = syslog_message("<AuditMessage/>", severity=5, me=ME, when=WHEN)
    framed = frame(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message) and rest == message
    assert frame("é".encode()) == b"2 \xc3\xa9"  # octets, not characters


def test_identical_alerts_are_one_per_interval() -> None:
    now = [0.0]
    limiter = AlertLimiter(60.0, clock=lambda: now[0])
    a = Alert("tls-untrusted", 8, "10.0.0.1:5000", "x")
    other_port = Alert("tls-untrusted", 8, "10.0.0.1:5001", "y")
    other_reason = Alert("tls-expired", 4, "10.0.0.1:5002", "z")
    assert limiter.admit(a)
    assert not limiter.admit(other_port)  # same source (host) and reason
    assert not limiter.admit(a)
    assert limiter.admit(other_reason)
    now[0] = 30.0
    assert limiter.due() == []
    now[0] = 60.0
    (summary,) = limiter.due()
    assert summary.repeats == 2 and summary.description == "x"
    root = ET.fromstring(security_alert(summary, ME, WHEN))
    validate(root)
    assert details(root)["Repeats"] == "2"
    # Still flooding: counted into the next interval, not sent at once.
    assert not limiter.admit(a)
    now[0] = 121.0
    assert [s.repeats for s in limiter.due()] == [1]
    now[0] = 200.0
    assert limiter.due() == []  # quiet for an interval: forgotten
    assert limiter.admit(a)
    assert not limiter.admit(a)
    assert [s.repeats for s in limiter.due(everything=True)] == [1]  # at stop


def test_full_queue_drops_and_counts(tmp_path: Path, pki: Path) -> None:
    loaded = load_config(write(tmp_path, config(pki, "127.0.0.1:6514")))
    sink = SyslogSink(loaded.audit.syslog, loaded.tls["collector"], identity=ME, capacity=2)  # type: ignore[arg-type]
    for _ in range(3):
        sink.put(b"x")
    assert sink.queued() == 2 and sink.dropped == 1
    sink.close()  # never started: what is queued is lost, and counted
    assert sink.dropped == 3 and sink.queued() == 0
    sink.put(b"late")
    assert sink.dropped == 4


async def test_the_back_off_stays_at_its_ceiling_and_starts_again_after_a_success(
    tmp_path: Path, pki: Path
) -> None:
    """The ceiling, 30 s, is past what a test of the process may wait for: the same writer, in
    this process, with real sockets and a back-off of 0.25 s doubling to 1 s. Attempts 0.25, 0.5,
    1, 1 and 1 s apart; the collector comes back and gets the message; it goes again: the next
    attempts are 0.25 and 0.5 s apart again."""
    port = free_port()
    loaded = load_config(write(tmp_path, config(pki, f"127.0.0.1:{port}")))
    assert loaded.audit.syslog is not None
    sink = SyslogSink(
        loaded.audit.syslog, loaded.tls["collector"], identity=ME, backoff=(0.25, 1.0)
    )

    async def attempts(refuser: Refuser, count: int) -> list[float]:
        with trio.fail_after(TIMEOUT):
            while len(refuser.attempts) < count:
                await trio.sleep(0.01)
        return refuser.attempts[:count]

    async def received(collector: Receiver, count: int) -> None:
        with trio.fail_after(TIMEOUT):
            while len(collector.messages) < count:
                await trio.sleep(0.01)

    down = Refuser(port)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            sink.put(b"first")
            first = await attempts(down, 6)
            down.close()
            with receiver(pki, port) as collector:
                await received(collector, 1)
                collector.close()  # gone again, right after a success
                down = Refuser(port)
                # Seen gone before the next message, as in a process, where something happens in
                # between: one written into a connection just closed would be lost unnoticed
                # (syslog over TLS has no acknowledgement), with no attempt to reconnect.
                with trio.fail_after(TIMEOUT):
                    while (gone := sink._connection) is not None and not gone.ended.is_set():
                        await trio.sleep(0.01)
                sink.put(b"second")
                failed = time.monotonic()
                second = await attempts(down, 2)
                down.close()
            with receiver(pki, port) as collector:
                await received(collector, 1)
                assert collector.messages == [b"second"]
                await sink.finish()
            nursery.cancel_scope.cancel()
    finally:
        down.close()
    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert all(map(backed_off, gaps, (0.25, 0.5, 1.0, 1.0, 1.0))), gaps
    gaps = [b - a for a, b in itertools.pairwise([failed, *second])]
    assert gaps[0] < 1.0 * 0.95 and backed_off(gaps[1], 0.5), gaps  # not 1 s: started again
    assert sink.sent == 2 and sink.dropped == 0


# -- config ------------------------------------------------------------------------------------


def write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(cfg))
    return path


def problems(tmp_path: Path, cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, cfg))
    return caught.value.problems


def test_config_loads_syslog(tmp_path: Path, pki: Path) -> None:
    loaded = load_config(write(tmp_path, config(pki, "collector.example.org:6514")))
    assert str(loaded.audit.syslog) == "collector.example.org:6514"
    assert loaded.audit.syslog_tls == "collector"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda a: a.pop("syslog_tls"), "audit.syslog_tls: missing: audit messages go to the"),
        (lambda a: a.update(syslog_tls="nowhere"), "audit.syslog_tls: no [tls.nowhere] table"),
        (lambda a: a.pop("syslog"), "audit.syslog_tls: set without audit.syslog"),
        (lambda a: a.update(syslog="collector"), "audit.syslog: expected host:port"),
        (lambda a: a.update(syslog="*:6514"), "audit.syslog: needs the collector's host"),
        (lambda a: a.update(syslog_port=6514), "audit.syslog_port: unknown key"),
    ],
)
def test_config_refuses(
    tmp_path: Path, pki: Path, change: Callable[[dict[str, Any]], object], expected: str
) -> None:
    cfg = config(pki, "127.0.0.1:6514")
    change(cfg["audit"])
    found = problems(tmp_path, cfg)
    assert any(expected in p for p in found), found


def test_unauthenticated_collector_warns(tmp_path: Path, pki: Path) -> None:
    cfg = config(pki, "127.0.0.1:6514")
    cfg["tls"]["collector"] = {"verify": "none"}
    loaded = load_config(write(tmp_path, cfg))
    assert any("collector is not authenticated" in w for w in loaded.warnings)

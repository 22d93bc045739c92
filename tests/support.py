"""Real parts for behaviour tests: the proxy as a subprocess, real DICOM peers, waits on conditions.

Nothing here mocks a socket or TLS. Tests wait on log lines, open ports and files, never on fixed
sleeps, so they hold on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMEOUT = 30.0  # generous upper bound for any wait; a passing test never sleeps it out


def dcmtk(tool: str) -> str:
    """The DCMTK binary, not pynetdicom's same-named Python apps that may come first on PATH."""
    for folder in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        path = Path(folder) / tool
        try:
            if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
                return str(path)
        except OSError:
            continue
    return tool


HAVE_DCMTK = all(Path(dcmtk(t)).is_absolute() for t in ("storescu", "storescp", "echoscu"))


# -- TOML -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(type(value))


def toml_dumps(data: dict[str, Any]) -> str:
    """Enough TOML for configs: top-level tables, `tls.NAME` tables, arrays of tables."""
    lines: list[str] = []
    for key, value in data.items():
        if key == "tls":
            for name, table in value.items():
                lines.append(f"[tls.{json.dumps(name)}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# -- waiting --------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = TIMEOUT) -> None:
    def is_open() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(is_open, timeout, f"port {host}:{port}")


# -- the proxy ------------------------------------------------------------------------------


EVERY_PROXY_LINE: list[str] = []  # the whole session's proxy output, for the secrets check
EVERY_PAGE: list[str] = []  # every status page and JSON a test fetched, for the same check


class ProxyProcess:
    """`dicom-tls-proxy run` with JSON logs; every stderr line is parsed and kept."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_tls_proxy", "run", "-c", str(config_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                self.raw.append(line)
                EVERY_PROXY_LINE.append(line)
                try:
                    self.lines.append(json.loads(line))
                except json.JSONDecodeError:
                    self.lines.append({"event": "unparsed", "msg": line})

    def find(self, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [x for x in self.lines if all(x.get(k) == v for k, v in match.items())]

    def wait_for(self, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            hits = self.find(**match)
            if not hits and self.proc.poll() is not None:
                raise AssertionError(
                    f"proxy exited ({self.proc.returncode}):\n" + "\n".join(self.raw)
                )
            return hits[-1] if hits else None

        try:
            return wait_until(found, timeout, f"log line {match}")  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"no log line {match}; log:\n" + "\n".join(self.raw)) from None

    def association(self, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        return self.wait_for(timeout, event="association", **match)

    def address(self, listener: str) -> tuple[str, int]:
        line = self.wait_for(event="listening", listener=listener)
        host, _, port = line["address"].rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self) -> int:
        """SIGTERM (graceful drain); then a second signal (stop at once); then kill."""
        for how, wait in (
            (signal.SIGTERM, 5.0),
            (signal.SIGINT, TIMEOUT),
            (signal.SIGKILL, TIMEOUT),
        ):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(how)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(TIMEOUT)
        return self.proc.returncode


@contextmanager
def running_proxy(
    tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None
) -> Iterator[ProxyProcess]:
    config.setdefault("proxy", {}).setdefault("log_format", "json")
    path = tmp / "proxy.toml"
    path.write_text(toml_dumps(config))
    proxy = ProxyProcess(path, env)
    try:
        for li in config.get("listener", []):
            proxy.address(li["name"])
        yield proxy
    finally:
        proxy.stop()


# -- configs ------------------------------------------------------------------------------


def tls_in(pki: Path, **overrides: Any) -> dict[str, Any]:
    """The proxy's server table from the test PKI (proxy.pem, proxy.key, ca.pem); an override of
    None leaves that key out."""
    table = {
        "certificate": pki / "proxy.pem",
        "private_key": pki / "proxy.key",
        "ca": pki / "ca.pem",
        **overrides,
    }
    return {k: v for k, v in table.items() if v is not None}


def proxy_config(
    pki: Path,
    upstream: str,
    *,
    proxy: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    listener: list[dict[str, Any]] | None = None,
    route: list[dict[str, Any]] | None = None,
    **tables: Any,
) -> dict[str, Any]:
    """The config most tests run: [proxy] (`proxy`, default log_format = "json"), [tls.in] from
    the test PKI (plus or replaced by the `tls` tables), one TLS listener "tls" on an ephemeral
    port and one route, CT to `upstream`. `listener` and `route` replace those lists; other
    keyword arguments are further top-level tables ([audit], [metrics])."""
    return {
        "proxy": {"log_format": "json"} if proxy is None else proxy,
        "tls": {"in": tls_in(pki), **(tls or {})},
        "listener": (
            [{"name": "tls", "bind": "127.0.0.1:0", "tls": "in"}] if listener is None else listener
        ),
        "route": [{"called_ae": "CT", "upstream": upstream}] if route is None else route,
        **tables,
    }


# -- DICOM peers ----------------------------------------------------------------------------


def storescp_command(port: int, out: Path, *extra: str, aet: str = "LEGACY") -> list[str]:
    """DCMTK storescp on `port`, storing what it receives into `out`."""
    return [dcmtk("storescp"), *extra, "-aet", aet, "-od", str(out), str(port)]


@contextmanager
def storescp_running(port: int, out: Path, *extra: str, aet: str = "LEGACY") -> Iterator[Path]:
    """DCMTK storescp (`storescp_command`) while the block runs, once its port is open."""
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        storescp_command(port, out, *extra, aet=aet),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield out
    finally:
        proc.terminate()
        proc.wait()


class LegacyDevice:
    """A plaintext pynetdicom SCP (Verification, storage, C-FIND) that remembers what it saw."""

    def __init__(self, ae_title: str = "LEGACY", port: int = 0) -> None:
        """On `port` (0: any free one); pynetdicom's server reuses the address, so a device
        can come back on the port of one that was closed."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import (
            PatientRootQueryRetrieveInformationModelFind,
            Verification,
        )

        self.called_aes: list[str] = []
        self.calling_aes: list[str] = []
        self.stored: list[Any] = []
        self.associations = 0
        self.store_status: Callable[[Any], int] = lambda data_set: 0x0000  # a test may change it
        ae = AE(ae_title)
        ae.require_called_aet = False
        ae.maximum_pdu_size = 0
        ae.maximum_associations = 64
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)

        def on_request(event: Any) -> None:
            self.associations += 1
            primitive = event.assoc.requestor.primitive
            self.called_aes.append(primitive.called_ae_title.strip())
            self.calling_aes.append(primitive.calling_ae_title.strip())

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            status = self.store_status(ds)
            if status == 0x0000:
                self.stored.append(ds)
            return status

        def on_find(event: Any) -> Iterator[tuple[int, Any]]:
            from pydicom.dataset import Dataset

            ds = Dataset()
            ds.PatientName = "DOE^JOHN"
            ds.PatientID = "12345"
            ds.QueryRetrieveLevel = "PATIENT"
            yield 0xFF00, ds

        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[
                (evt.EVT_REQUESTED, on_request),
                (evt.EVT_C_STORE, on_store),
                (evt.EVT_C_FIND, on_find),
            ],
        )
        self.port = int(self.server.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self.closed = False

    def close(self) -> None:
        """Stop listening and serving; again is a no-op."""
        if not self.closed:
            self.closed = True
            self.server.shutdown()


def make_dataset(rows: int = 64, columns: int = 64, seed: int = 1) -> Any:
    """A small CT image with pixel data that differs by seed."""
    import random

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import CTImageStorage

    rnd = random.Random(seed)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = f"P{seed}"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(rnd.getrandbits(8) for _ in range(rows * columns * 2))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def client_ssl_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> Any:
    """A stdlib context for pynetdicom as the TLS client (hostname not checked, as DCMTK)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.check_hostname = False
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def pacs_ssl_context(pki: Path) -> Any:
    """A stdlib server context for a TLS PACS: proxy.pem (serverAuth), client certificate
    required and verified against the test CA, TLS 1.2 or later."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki / "proxy.pem"), str(pki / "proxy.key"))
    ctx.load_verify_locations(str(pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_origination_config(upstream: str, pki: Path, **table: Any) -> dict[str, Any]:
    """A proxy whose plaintext listener "in" routes Called AE PACS to the TLS `upstream` with
    `tls_out` (plus `table`'s keys) as [tls.pacs]; JSON log lines."""
    return {
        "proxy": {"log_format": "json"},
        "tls": {"pacs": {**tls_out(pki), **table}},
        "listener": [{"name": "in", "bind": "127.0.0.1:0"}],
        "route": [
            {
                "called_ae": "PACS",
                "upstream": upstream,
                "upstream_tls": "pacs",
                "listeners": ["in"],
            }
        ],
    }


def plaintext_association(address: tuple[str, int]) -> bytes:
    """One plaintext association to Called AE PACS: the answer to its RQ, released if it was
    an A-ASSOCIATE-AC."""
    from dicom_tls_proxy.protocol import pdu

    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(build_rq("PACS"))
        answer = recv_pdu(sock)
        if answer[0] == pdu.A_ASSOCIATE_AC:
            sock.sendall(pdu.encode_release_rq())
            recv_pdu(sock)
        return answer


def tls_out(pki: Path) -> dict[str, Any]:
    """The proxy's client table towards `pacs_ssl_context`: its client certificate, the test CA,
    and the name in proxy.pem."""
    return {
        "certificate": pki / "client.pem",
        "private_key": pki / "client.key",
        "ca": pki / "ca.pem",
        "server_name": "localhost",
    }


def associate(
    address: tuple[str, int],
    called_ae: str,
    *,
    calling_ae: str = "TEST_SCU",
    ssl_context: Any = None,
    contexts: list[str] | None = None,
) -> Any:
    """A pynetdicom association (or its failure) through the proxy."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (
        CTImageStorage,
        PatientRootQueryRetrieveInformationModelFind,
        Verification,
    )

    ae = AE(calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for cx in contexts or [
        Verification,
        CTImageStorage,
        PatientRootQueryRetrieveInformationModelFind,
    ]:
        ae.add_requested_context(cx)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    return ae.associate(address[0], address[1], ae_title=called_ae, tls_args=tls_args)


# -- scripted peers, for what real peers never send -------------------------------------------


def build_rq(called_ae: str = "CT", calling_ae: str = "RAW_SCU", *, version: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ for Verification, from pynetdicom's own encoder."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    cx = build_context(Verification)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    raw = bytearray(rq.encode())
    raw[6:8] = version.to_bytes(2, "big")
    return bytes(raw)


def build_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting every presentation context of `rq` with Implicit VR LE."""
    import struct

    from dicom_tls_proxy.protocol import pdu

    parsed = pdu.parse_pdu(rq)
    assert isinstance(parsed, pdu.AssociateRequest)
    ts = b"1.2.840.10008.1.2"
    items = bytearray()
    app = parsed.application_context.encode()
    items += struct.pack(">BBH", 0x10, 0, len(app)) + app
    for pc in parsed.presentation_contexts:
        sub = struct.pack(">BBH", 0x40, 0, len(ts)) + ts
        items += struct.pack(">BBHBBBB", 0x21, 0, 4 + len(sub), pc.context_id, 0, 0, 0) + sub
    user = struct.pack(">BBHI", 0x51, 0, 4, 16384)
    items += struct.pack(">BBH", 0x50, 0, len(user)) + user
    body = struct.pack(">HH", 1, 0) + rq[10:42] + bytes(32) + bytes(items)
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


class RawClient:
    """A TLS (or plain) socket speaking bytes: for PDUs no real peer would send."""

    def __init__(self, address: tuple[str, int], ssl_context: Any = None) -> None:
        sock = socket.create_connection(address, timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = (
            ssl_context.wrap_socket(sock, suppress_ragged_eofs=False)
            if ssl_context is not None
            else sock
        )

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def read_pdu(self) -> bytes:
        header = self.read_exact(6)
        length = int.from_bytes(header[2:6], "big")
        return header + self.read_exact(length)

    def read_eof(self) -> bytes:
        """Everything until the peer closes (b"" if it closes at once), however it closes: a
        reset or a TLS close without close_notify ends it too (see `read_clean_close`)."""
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except (ConnectionResetError, OSError):
            pass
        return data

    def read_clean_close(self) -> bytes:
        """Everything until the peer closes; raises unless it closes cleanly: no TCP reset, and
        over TLS its close_notify first (a bare TCP close is SSLEOFError here)."""
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


class ScriptedUpstream:
    """A TCP server whose behaviour per connection is a function of the socket: plaintext, or
    TLS when given a server context (see `pacs_ssl_context`); the script then gets the TLS
    socket, whose `setsockopt` and `shutdown` are the TCP socket's."""

    def __init__(self, script: Callable[[socket.socket], None], tls: Any | None = None) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self._script = script
        self._tls = tls
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            self._script(conn)
        except BaseException as exc:  # kept for the test to look at
            self.errors.append(exc)
        finally:
            conn.close()

    def read_pdu(self, conn: socket.socket) -> bytes:
        header = _recv_exact(conn, 6)
        data = header + _recv_exact(conn, int.from_bytes(header[2:6], "big"))
        self.received.append(data)
        return data

    def close(self) -> None:
        self.listener.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


# -- certificates and peers for TLS origination and the echo command -----------------------


def pacs_identities(folder: Path, pki: Path) -> dict[str, tuple[Path, Path]]:
    """Server identities for a remote PACS on 127.0.0.1, as (key file, certificate file):
    `pacs` (the dev CA, SAN IP:127.0.0.1), `dns-only` (the dev CA, SAN DNS:pacs.example.org only),
    `expired` (the dev CA, SAN IP:127.0.0.1, expired yesterday), `foreign` (SAN IP:127.0.0.1, from
    another CA) and `other-ca` (that other CA)."""
    import datetime

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from dicom_tls_proxy.dev import pki as factory

    ca: Any = (
        load_pem_private_key((pki / "ca.key").read_bytes(), None),
        certificate_of(pki / "ca.pem"),
    )
    other_ca = factory.make_ca("another CA")
    now = datetime.datetime.now(datetime.UTC)
    made = {
        "pacs": factory.make_leaf(*ca, "pacs", ips=["127.0.0.1"]),
        "dns-only": factory.make_leaf(*ca, "pacs.example.org", dns=["pacs.example.org"]),
        "expired": factory.make_leaf(
            *ca,
            "expired-pacs",
            ips=["127.0.0.1"],
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
        "foreign": factory.make_leaf(*other_ca, "foreign-pacs", ips=["127.0.0.1"]),
        "other-ca": other_ca,
    }
    files: dict[str, tuple[Path, Path]] = {}
    for name, (key, cert) in made.items():
        files[name] = (folder / f"{name}.key", folder / f"{name}.pem")
        factory.write_pem_key(files[name][0], key)
        factory.write_pem_cert(files[name][1], cert)
    return files


def certificate_of(path: Path) -> Any:
    """The first certificate of a PEM file."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def sha256_of(path: Path) -> str:
    """`sha256:HEX` of the first certificate of a PEM file, computed here, not by the product."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding

    return "sha256:" + hashlib.sha256(certificate_of(path).public_bytes(Encoding.DER)).hexdigest()


@contextmanager
def silent_listener(*, backlog_full: bool) -> Iterator[str]:
    """A listener that never accepts; yields its `host:port`. With a full backlog further SYNs are
    dropped (a connect times out); without, the kernel completes the connect and nothing answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0 if backlog_full else 8)
    fillers = []
    for _ in range(4 if backlog_full else 0):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
        fillers.append(s)
    try:
        yield f"127.0.0.1:{hole.getsockname()[1]}"
    finally:
        for s in fillers:
            s.close()
        hole.close()


# -- leak and memory checks (appended for tests/hostile) ------------------------------------------

STAT_KEYS = ("connections", "associations", "tasks", "fds")


def proxy_stats(proxy: ProxyProcess) -> dict[str, int]:
    """What the proxy logs on SIGUSR1 (`event=stats`): connections, associations, tasks, fds.
    Sends the signal and returns the first stats line logged after it."""
    before = len(proxy.find(event="stats"))
    os.kill(proxy.proc.pid, signal.SIGUSR1)
    wait_until(lambda: len(proxy.find(event="stats")) > before, what="a stats line")
    line = proxy.find(event="stats")[before]
    return {k: int(line[k]) for k in STAT_KEYS}


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) to at least `needed` if the
    hard limit allows; returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a socket (plain or TLS); EOFError if it closes first."""
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"closed after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def recv_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, header included, without keeping it anywhere."""
    head = recv_exact(sock, 6)
    return head + recv_exact(sock, int.from_bytes(head[2:6], "big"))


class RssSampler:
    """Samples a process's VmRSS every 20 ms in a thread while entered; keeps the first and peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.first = vm_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, vm_rss_kib(self.pid))
            except (OSError, AssertionError):  # the process ended
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

"""`dicom-tls-proxy demo`: the whole product in one process, with nothing else installed.

A temporary development PKI, a built-in plaintext legacy device (pynetdicom C-ECHO and C-STORE
SCP), the real proxy (one TLS listener, one route) and TLS clients: the `echo` probe, a pynetdicom
C-STORE, and a client refused for an unknown Called AE. Each step says what to notice, and the
config is printed so the user can start from it.

What it shares with `run`: the config goes through `load_config`; the proxy is composed in this
process from the parts `run` composes (`Proxy`, `listener.serve`, the connection driver: TLS,
routing, relay, the association record), with an `Audit` of its own whose lines each step shows.
What `run` adds around that is not started here: its logging setup, signals (drain, reload),
`watch`, the audit file, syslog and metrics sinks, the pid file, housekeeping, route health checks
and workers. Its C-ECHO client is the `echo` command's own (`echo.client_table`, `echo.echo`); the
C-STORE client is pynetdicom over the standard library's `ssl`.
"""

from __future__ import annotations

import logging
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.config.schema import Endpoint
from dicom_tls_proxy.dev.pki import init_pki
from dicom_tls_proxy.engine import echo
from dicom_tls_proxy.engine.listener import serve
from dicom_tls_proxy.engine.proxy import Proxy
from dicom_tls_proxy.ops import audit
from dicom_tls_proxy.ops.process import bind_listeners
from dicom_tls_proxy.protocol import dimse

CALLED_AE = "CT_SCANNER"
DEVICE_AE = "CT01"
CLIENT_AE = "PACS_MAIN"

CONFIG = """\
# The demo's config: copy it and change the addresses and files to start your own.
[proxy]
log_format = "text"

[tls.inbound]
certificate = "certs/proxy.pem"
private_key = "certs/proxy.key"
ca = "certs/ca.pem"            # clients must present a certificate signed by this CA
verify = "chain"

[[listener]]
name = "dicom-tls"
bind = "127.0.0.1:0"           # port 0: any free port (use 2762 in production)
tls = "inbound"

[[route]]
called_ae = "{called}"
upstream = "127.0.0.1:{device_port}"   # the legacy device, plaintext
upstream_called_ae = "{device}"
allow_calling_ae = ["PACS*"]
allow_peer = ["cn:dicom-client"]
"""


class _Device:
    """The built-in legacy device: plaintext, C-ECHO and C-STORE, remembers what it stored."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.stored: list[Any] = []
        self.called: list[str] = []
        ae = AE(DEVICE_AE)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(dimse.VERIFICATION)

        def on_request(event: Any) -> None:
            self.called.append(event.assoc.requestor.primitive.called_ae_title.strip())

        def on_store(event: Any) -> int:
            self.stored.append(event.dataset)
            return 0x0000

        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_REQUESTED, on_request), (evt.EVT_C_STORE, on_store)],
        )
        assert server is not None  # block=False returns the running server
        self.server = server
        self.port = int(server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()


class _Capture(logging.Handler):
    """Keeps the proxy's log lines so each step can show the one it produced."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.associations: list[dict[str, Any]] = []
        self.setFormatter(audit.make_formatter("text"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        fields = getattr(record, "fields", {})
        if fields.get("event") == "association":
            self.associations.append(fields)


def _dataset() -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "DEMO^PATIENT", "DEMO-1", "CT"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 32
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store(address: tuple[str, int], certs: Path, ds: Any) -> int | None:
    """A pynetdicom TLS client (stdlib ssl, verifying the proxy by CA and IP address)."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    ae = AE(CLIENT_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(address[0], address[1], ae_title=CALLED_AE, tls_args=(ctx, address[0]))
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status) if status else None


async def run_demo(say: Callable[[str], None]) -> bool:
    capture = _Capture()
    log = logging.Logger("dicom_tls_proxy.demo", logging.INFO)  # the demo's own, not registered
    log.addHandler(capture)
    ok = True

    def check(condition: bool, what: str) -> None:
        nonlocal ok
        say(f"   {'ok' if condition else 'UNEXPECTED'}: {what}")
        ok = ok and condition

    with tempfile.TemporaryDirectory(prefix="dicom-tls-proxy-demo-") as tmp:
        folder = Path(tmp)
        say("1. A development PKI (what `dicom-tls-proxy certs init` writes):")
        for path in init_pki(folder / "certs"):
            say(f"   {path}")
        device = await trio.to_thread.run_sync(_Device)
        try:
            say(f"2. A legacy device, plaintext only: AE {DEVICE_AE} on 127.0.0.1:{device.port}")
            text = CONFIG.format(called=CALLED_AE, device_port=device.port, device=DEVICE_AE)
            (folder / "demo.toml").write_text(text)
            config = load_config(folder / "demo.toml")
            say("3. The proxy, with this config (every key: config.example.toml):")
            say("   | " + "\n   | ".join(text.rstrip().splitlines()))
            async with trio.open_nursery() as nursery:
                proxy = Proxy(config, audit.Audit(logger=log))
                addresses = await nursery.start(serve, proxy, await bind_listeners(config))
                host, _, port = addresses[0].rpartition(":")
                target = Endpoint(host, int(port))
                say(f"   listening on {addresses[0]} (TLS, mutual authentication)")
                ok = (
                    await _client_steps(target, folder / "certs", device, capture, say, check)
                    and ok
                )
                nursery.cancel_scope.cancel()
        finally:
            device.close()
    say("")
    say("Everything went as expected." if ok else "Something did not go as expected: see above.")
    return ok


async def _client_steps(
    target: Endpoint,
    certs: Path,
    device: _Device,
    capture: _Capture,
    say: Callable[[str], None],
    check: Callable[[bool, str], None],
) -> bool:
    table = echo.client_table(certs / "ca.pem", certs / "client.pem", certs / "client.key")

    async def wait_log(n: int) -> dict[str, Any]:
        with trio.fail_after(10):
            while len(capture.associations) < n:
                await trio.sleep(0.01)
        return capture.associations[n - 1]

    say(f"4. A TLS client sends a C-ECHO to Called AE {CALLED_AE} (the `echo` probe):")
    result = await echo.echo(target, CALLED_AE, CLIENT_AE, table)
    check(
        result.ok,
        f"C-ECHO answered with status 0x0000 in {result.timings.get('total', 0) * 1000:.0f} ms",
    )
    if result.tls:
        say(f"   notice: {result.tls.version}, {result.tls.cipher}: the link is encrypted")
    line = await wait_log(1)
    check(
        device.called == [DEVICE_AE],
        f"the device was asked for Called AE {DEVICE_AE!r} (upstream_called_ae); "
        f"the client got its own {CALLED_AE!r} back",
    )
    say(f"   notice: the proxy saw Calling AE {line['calling_ae']} from {line['peer_subject']}")
    say(f"   proxy log: {capture.lines[-1]}")

    say("5. The same client stores a CT image (pynetdicom C-STORE over TLS):")
    ds = _dataset()
    status = await trio.to_thread.run_sync(_store, (target.host, target.port), certs, ds)
    check(status == 0, f"C-STORE status {status!r}")
    stored = device.stored[-1] if device.stored else None
    same = stored is not None and stored.PixelData == ds.PixelData
    check(same, f"the device stored SOP Instance {ds.SOPInstanceUID}, pixel data identical")
    line = await wait_log(2)
    say(
        f"   notice: {line['bytes_up']} bytes up, {line['bytes_down']} down; "
        f"outcome {line['outcome']} ({line['reason']})"
    )

    say("6. A client asks for a Called AE that has no route:")
    refused = await echo.echo(target, "NO_SUCH_AE", CLIENT_AE, table)
    check(
        not refused.ok and "(result 1, source 1, reason 7)" in refused.cause,
        "refused in DICOM with A-ASSOCIATE-RJ (1, 1, 7), not a TCP reset",
    )
    say(f"   notice: {refused.cause}")
    line = await wait_log(3)
    check(line["reason"] == "no-route", f"the proxy logged reason={line['reason']}")
    say(f"   proxy log: {capture.lines[-1]}")
    return True

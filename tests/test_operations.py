"""Operations with real processes: graceful drain, SIGHUP reload, `reload`, readiness, pid file."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from dicom_tls_proxy.dev.pki import make_leaf, write_pem_cert, write_pem_key
from dicom_tls_proxy.protocol import dimse, pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    RawClient,
    ScriptedUpstream,
    associate,
    build_ac,
    build_rq,
    client_ssl_context,
    proxy_config,
    proxy_stats,
    running_proxy,
    toml_dumps,
    wait_until,
)


def config(pki: Path, upstream: str, tmp_path: Path, **proxy: Any) -> dict[str, Any]:
    return proxy_config(pki, upstream, proxy={"pid_file": str(tmp_path / "proxy.pid"), **proxy})


def ctx(pki: Path) -> ssl.SSLContext:
    return client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")  # type: ignore[no-any-return]


class HeldUpstream(ScriptedUpstream):
    """Accepts, answers the RQ, then holds each P-DATA's answer until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.got_data = threading.Event()
        super().__init__(self._script)

    def _script(self, conn: socket.socket) -> None:
        conn.sendall(build_ac(self.read_pdu(conn)))
        while True:
            data = self.read_pdu(conn)
            if data[0] == pdu.A_RELEASE_RQ:
                conn.sendall(pdu.encode_release_rp())
                return
            if data[0] == pdu.A_ABORT:
                return
            self.got_data.set()
            self.release.wait(TIMEOUT)
            conn.sendall(dimse.encode_p_data(1, b"answer", command=True))


def test_sigterm_lets_an_association_in_flight_finish(tmp_path: Path, pki: Path) -> None:
    upstream = HeldUpstream()
    try:
        with running_proxy(
            tmp_path, config(pki, upstream.address, tmp_path, drain_timeout=20.0)
        ) as proxy:
            client = RawClient(proxy.address("tls"), ctx(pki))
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            client.send(dimse.encode_p_data(1, b"request", command=True))
            assert upstream.got_data.wait(TIMEOUT)
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.wait_for(event="draining", connections=1)
            with socket.socket() as late:  # no new connections while draining
                assert late.connect_ex(proxy.address("tls")) != 0
            upstream.release.set()
            assert client.read_pdu()[0] == pdu.P_DATA_TF
            client.send(pdu.encode_release_rq())
            assert client.read_pdu() == pdu.encode_release_rp()
            client.close()
            assert proxy.proc.wait(TIMEOUT) == 0
            assert proxy.association()["reason"] == "released"
            assert not (tmp_path / "proxy.pid").exists()
    finally:
        upstream.close()


def test_drain_timeout_aborts_both_ways_then_exits_0(tmp_path: Path, pki: Path) -> None:
    upstream = HeldUpstream()
    try:
        with running_proxy(
            tmp_path, config(pki, upstream.address, tmp_path, drain_timeout=1.0)
        ) as proxy:
            client = RawClient(proxy.address("tls"), ctx(pki))
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            proxy.proc.send_signal(signal.SIGTERM)
            assert client.read_pdu() == pdu.encode_abort(2, 0)
            client.close()
            assert proxy.proc.wait(TIMEOUT) == 0
            line = proxy.association(reason="shutdown")
        assert line["outcome"] == "aborted"
        wait_until(
            lambda: pdu.encode_abort(2, 0) in upstream.received, what="abort at the upstream"
        )
    finally:
        upstream.release.set()
        upstream.close()


def test_second_signal_stops_at_once_with_exit_1(tmp_path: Path, pki: Path) -> None:
    upstream = HeldUpstream()
    try:
        with running_proxy(
            tmp_path, config(pki, upstream.address, tmp_path, drain_timeout=60.0)
        ) as proxy:
            client = RawClient(proxy.address("tls"), ctx(pki))
            client.send(build_rq("CT"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.wait_for(event="draining")
            proxy.proc.send_signal(signal.SIGINT)
            assert proxy.proc.wait(TIMEOUT) == 1
            proxy.wait_for(event="stopping-now")
            client.close()
    finally:
        upstream.release.set()
        upstream.close()


def _new_server_certificate(pki: Path, folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key, cert = make_leaf(ca_key, ca_cert, "renewed-proxy", dns=["localhost"], ips=["127.0.0.1"])  # type: ignore[arg-type]
    write_pem_key(folder / "renewed.key", key)
    write_pem_cert(folder / "renewed.pem", cert)
    return folder / "renewed.pem", folder / "renewed.key"


def _server_subject(address: tuple[str, int], pki: Path) -> str:
    with (
        socket.create_connection(address, timeout=TIMEOUT) as raw,
        ctx(pki).wrap_socket(raw) as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])  # type: ignore[index]
        return str(subject["commonName"])


def test_sighup_swaps_the_certificate_and_keeps_associations_in_flight(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address, tmp_path)
    with running_proxy(tmp_path, cfg) as proxy:
        address = proxy.address("tls")
        assert _server_subject(address, pki) == "dicom-tls-proxy"
        streaming = associate(address, "CT", ssl_context=ctx(pki))
        assert streaming.is_established
        cert, key = _new_server_certificate(pki, tmp_path)
        cfg["tls"]["in"].update(certificate=cert, private_key=key)
        (tmp_path / "proxy.toml").write_text(
            toml_dumps({**cfg, "proxy": {**cfg["proxy"], "log_format": "json"}})
        )
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(event="reloaded")
        from tests.support import make_dataset

        for i in range(3):  # the association from before the reload goes on
            assert streaming.send_c_store(make_dataset(32, 32, seed=i)).Status == 0
        streaming.release()
        assert _server_subject(address, pki) == "renewed-proxy"  # the next one sees the new one
    assert len(legacy.stored) == 3


def test_broken_config_on_sighup_keeps_the_old_one(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address, tmp_path)
    with running_proxy(tmp_path, cfg) as proxy:
        config_file = tmp_path / "proxy.toml"
        good = config_file.read_text()
        config_file.write_text(good.replace('called_ae = "CT"', 'called_ae = "CT\\\\X"'))
        proxy.proc.send_signal(signal.SIGHUP)
        failed = proxy.wait_for(event="reload-failed")
        assert any("route[0].called_ae" in p for p in failed["problems"])
        changed = good.replace("127.0.0.1:0", "127.0.0.1:1")  # a bind cannot change while running
        config_file.write_text(changed)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(proxy.find(event="reload-failed")) == 2, what="second refusal")
        assert proxy.find(event="reload-failed")[-1]["changed"] == ["listener bind"]
        assoc = associate(proxy.address("tls"), "CT", ssl_context=ctx(pki))
        assert assoc.is_established  # still serving with the old config
        assoc.release()


def _reload_command(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "reload", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_reload_command(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = config(pki, legacy.address, tmp_path)
    with running_proxy(tmp_path, cfg) as proxy:
        assert (tmp_path / "proxy.pid").read_text().strip() == str(proxy.proc.pid)
        result = _reload_command(tmp_path / "proxy.toml")
        assert result.returncode == 0, result.stderr
        proxy.wait_for(event="reloaded")
        broken = tmp_path / "broken.toml"
        broken.write_text(
            (tmp_path / "proxy.toml").read_text().replace("[proxy]", "[proxy]\nbogus = 1")
        )
        result = _reload_command(broken)
        assert result.returncode == 2 and "proxy.bogus: unknown key" in result.stderr
        # Nothing was signalled: a SIGHUP sent before this SIGUSR1 would be logged before its
        # stats line (the proxy takes its signals in order), so the count cannot race.
        proxy_stats(proxy)
        assert len(proxy.find(event="reloaded")) == 1
    result = _reload_command(tmp_path / "proxy.toml")  # the proxy is gone
    assert result.returncode == 1 and "no running proxy" in result.stderr


def test_ready_and_stopping_notifications(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(TIMEOUT)
        with running_proxy(
            tmp_path, config(pki, legacy.address, tmp_path), env={"NOTIFY_SOCKET": str(notify)}
        ):
            assert sock.recv(100) == b"READY=1"  # once its listener is up
        assert sock.recv(100) == b"STOPPING=1"  # SIGTERM: it drains, and tells systemd so

"""The audit file and the metrics/health server, with real proxy processes and real peers.

The counts a test checks are the ones it caused: so many accepted, so many refused by route, so
many refused in TLS. The audit file and /metrics are fed by the same record as the log line, so
they are checked against each other as well as against what was sent.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_tls_proxy.protocol import pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    ProxyProcess,
    RawClient,
    associate,
    build_rq,
    certificate_of,
    client_ssl_context,
    free_port,
    pacs_identities,
    proxy_config,
    running_proxy,
    toml_dumps,
    wait_until,
)
from tests.test_operations import HeldUpstream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(
    pki: Path,
    upstream: str,
    tmp_path: Path,
    *,
    audit: Path | None = None,
    metrics: bool = True,
    **proxy: Any,
) -> dict[str, Any]:
    cfg = proxy_config(
        pki,
        upstream,
        proxy={"log_format": "json", **proxy},
        route=[{"called_ae": "CT", "upstream": upstream, "allow_calling_ae": ["ALLOWED*"]}],
    )
    if audit is not None:
        cfg["audit"] = {"file": str(audit)}
    if metrics:
        cfg["metrics"] = {"bind": "127.0.0.1:0"}
    return cfg


def ctx(pki: Path, *, certificate: bool = True) -> ssl.SSLContext:
    if certificate:
        return client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")  # type: ignore[no-any-return]
    return client_ssl_context(pki / "ca.pem")  # type: ignore[no-any-return]


def metrics_address(proxy: ProxyProcess) -> tuple[str, int]:
    host, _, port = proxy.wait_for(event="metrics-listening")["address"].rpartition(":")
    return host.strip("[]"), int(port)


def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def scrape(address: tuple[str, int]) -> Samples:
    status, content_type, body = get(address, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def refused_by_tls(address: tuple[str, int], context: ssl.SSLContext) -> None:
    """A client whose certificate the proxy refuses; the refusal (an alert) may come during the
    handshake or, with TLS 1.3, on the first read after it."""
    try:
        client = RawClient(address, context)
        try:
            client.send(build_rq("CT", "ALLOWED_SCU"))
            client.read_eof()
        finally:
            client.close()
    except (ssl.SSLError, OSError):
        pass


def no_route(address: tuple[str, int], pki: Path) -> None:
    client = RawClient(address, ctx(pki))
    try:
        client.send(build_rq("NOWHERE", "ALLOWED_SCU"))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 7)
    finally:
        client.close()


def at_once(clients: int, client: Callable[[], None]) -> None:
    """`client` in as many threads at once; the first failure of any is raised here (an
    exception in a thread would only be printed, as a warning, and the test would pass)."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            client()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not [t for t in threads if t.is_alive()], "a client never finished"
    if failures:
        raise failures[0]


def test_audit_file_and_metrics_count_what_was_sent(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    trail = tmp_path / "audit.jsonl"
    foreign_key, foreign_cert = pacs_identities(tmp_path, pki)["foreign"]
    foreign = client_ssl_context(pki / "ca.pem", foreign_cert, foreign_key)
    refusals = 20  # more than the log lets through in a second from one source
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path, audit=trail)) as proxy:
        address, web = proxy.address("tls"), metrics_address(proxy)
        before = scrape(web)
        assert value(before, "dicom_tls_proxy_active_associations") == 0

        accepted = associate(address, "CT", calling_ae="ALLOWED_SCU", ssl_context=ctx(pki))
        assert accepted.is_established
        assert accepted.send_c_echo().Status == 0
        accepted.release()
        # Written and fsynced within about a second, while the proxy runs.
        wait_until(
            lambda: trail.exists() and '"outcome": "completed"' in trail.read_text(),
            what="the accepted association in the audit file",
        )
        # The wire, not pynetdicom's view: its DUL may see our close before its ACSE sees the RJ.
        intruder = RawClient(address, ctx(pki))
        intruder.send(build_rq("CT", "INTRUDER"))
        assert intruder.read_pdu() == pdu.encode_reject(1, 1, 3)
        intruder.close()
        at_once(refusals, lambda: no_route(address, pki))
        refused_by_tls(address, foreign)

        total = 1 + 1 + refusals + 1
        samples: Samples = {}

        def counted() -> bool:
            nonlocal samples
            samples = scrape(web)
            return (
                sum(
                    v
                    for (name, _), v in samples.items()
                    if name == "dicom_tls_proxy_associations_total"
                )
                == total
            )

        wait_until(counted, what=f"{total} associations in /metrics")
        tls_line = proxy.association(outcome="tls-failed")
        log_no_route = proxy.find(event="association", reason="no-route")
    proxy_log_association = proxy.association(outcome="completed")

    # -- /metrics ----------------------------------------------------------------------
    assoc = "dicom_tls_proxy_associations_total"
    assert value(samples, assoc, listener="tls", route="CT", outcome="completed") == 1
    assert value(samples, assoc, listener="tls", route="CT", outcome="rejected") == 1
    assert value(samples, assoc, listener="tls", route="_other", outcome="rejected") == refusals
    assert value(samples, assoc, listener="tls", route="_other", outcome="tls-failed") == 1
    assert value(samples, "dicom_tls_proxy_refusals_total", reason="no-route") == refusals
    assert value(samples, "dicom_tls_proxy_refusals_total", reason="calling-ae-not-allowed") == 1
    assert value(samples, "dicom_tls_proxy_refusals_total", reason="released") == 0
    reason = tls_line["reason"]
    assert reason == "tls-untrusted"  # another CA's client certificate
    assert value(samples, "dicom_tls_proxy_tls_handshake_failures_total", reason=reason) == 1
    assert value(samples, "dicom_tls_proxy_active_associations") == 0
    up = value(samples, "dicom_tls_proxy_bytes_total", direction="up")
    down = value(samples, "dicom_tls_proxy_bytes_total", direction="down")
    assert up == proxy_log_association["bytes_up"] and down == proxy_log_association["bytes_down"]
    assert up > 0 and down > 0
    assert value(samples, "dicom_tls_proxy_association_duration_seconds_count") == total
    # Every connection but the refused certificate finished its TLS handshake.
    assert value(samples, "dicom_tls_proxy_handshake_seconds_count") == total - 1
    assert 0 < value(samples, "dicom_tls_proxy_handshake_seconds_sum") < TIMEOUT * total
    assert value(samples, "dicom_tls_proxy_audit_dropped_total") == 0
    assert value(samples, "dicom_tls_proxy_audit_failures_total") == 0
    # No AE title ever becomes a label value.
    labels = {v for (_, pairs) in samples for _, v in pairs}
    assert not labels & {"INTRUDER", "ALLOWED_SCU", "NOWHERE"}
    # Certificate times: the leaf served by [tls.in] and its CA, from the files themselves.
    expiry = "dicom_tls_proxy_certificate_expiry_seconds"
    for kind, path in (("certificate", pki / "proxy.pem"), ("ca", pki / "ca.pem")):
        expected = certificate_of(path).not_valid_after_utc.timestamp() - time.time()
        assert abs(value(samples, expiry, tls="in", kind=kind) - expected) < 120

    # -- the audit file: every association, none rate-limited, and the proxy's own events ----
    lines = read_audit(trail)
    associations = [x for x in lines if x["event"] == "association"]
    assert len(associations) == total
    audited_no_route = [x for x in associations if x["reason"] == "no-route"]
    assert len(audited_no_route) == refusals
    assert len(log_no_route) < refusals  # the log was rate-limited; the audit file was not
    assert {x["outcome"] for x in associations} == {"completed", "rejected", "tls-failed"}
    completed = next(x for x in associations if x["outcome"] == "completed")
    assert completed["calling_ae"] == "ALLOWED_SCU" and completed["route"] == "CT"
    log_keys = set(proxy_log_association) - {"level"}
    # The log line's field names; a refusal of who the peer is adds its security classification.
    for x in associations:
        alert = x["reason"] in ("calling-ae-not-allowed", reason)
        assert set(x) == (log_keys | {"security_alert"} if alert else log_keys), x["reason"]
    refused = next(x for x in associations if x["outcome"] == "tls-failed")
    assert refused["reason"] == reason and refused["peer_sha256"].startswith("sha256:")
    events = [x["event"] for x in lines if x["event"] != "association"]
    assert events[:2] == ["listening", "started"]
    assert events[-3:] == ["stopping", "draining", "stopped"]
    started = next(x for x in lines if x["event"] == "started")
    assert started["config"] == str(tmp_path / "proxy.toml")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(trail.stat().st_mode) == 0o640 & ~umask


def test_healthz_and_readyz(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path)) as proxy:
        web = metrics_address(proxy)
        assert get(web, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
        status, content_type, body = get(web, "/readyz")
        assert status == 200 and content_type == "application/json"
        host, port = proxy.address("tls")
        assert json.loads(body) == {
            "ready": True,
            "listeners": [f"{host}:{port}"],
            "config": str(tmp_path / "proxy.toml"),
            "routes": {},
            "spools": {},
        }
        assert get(web, "/readyz?verbose=1")[0] == 200
        assert get(web, "/healthz", "HEAD")[:2] == (200, "text/plain; charset=utf-8")
        assert get(web, "/nothing-here")[0] == 404
        assert get(web, "/metrics", "POST")[0] == 405


def test_readyz_is_503_while_draining_and_before_listeners_are_up(
    tmp_path: Path, pki: Path
) -> None:
    from dicom_tls_proxy.ops.metrics import Metrics

    not_yet = SimpleNamespace(
        active=0,
        worker=None,
        stopping=False,
        gen=SimpleNamespace(config=None),
        health=SimpleNamespace(results={}),
    )
    not_yet.gen.config = SimpleNamespace(
        path=tmp_path / "proxy.toml",
        routes=(),
        tls={},
        audit=SimpleNamespace(file=None),
        proxy=SimpleNamespace(pid_file=None),
    )
    status, _, body = Metrics(not_yet).page("/readyz")  # type: ignore[arg-type]
    assert status == 503 and json.loads(body)["ready"] is False

    upstream = HeldUpstream()
    try:
        cfg = config(pki, upstream.address, tmp_path, drain_timeout=20.0)
        with running_proxy(tmp_path, cfg) as proxy:
            web = metrics_address(proxy)
            client = RawClient(proxy.address("tls"), ctx(pki))
            client.send(build_rq("CT", "ALLOWED_SCU"))
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            assert value(scrape(web), "dicom_tls_proxy_active_associations") == 1
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.wait_for(event="draining")
            status, _, body = get(web, "/readyz")
            assert status == 503 and json.loads(body)["ready"] is False
            assert get(web, "/healthz")[0] == 200  # alive, just not taking new peers
            upstream.release.set()
            client.close()
            assert proxy.proc.wait(TIMEOUT) == 0
    finally:
        upstream.release.set()
        upstream.close()


def _raw_http(address: tuple[str, int], data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_garbage_on_the_metrics_port_breaks_nothing(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path)) as proxy:
        web = metrics_address(proxy)
        slow = socket.create_connection(web, timeout=TIMEOUT)  # never finishes its request
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        idle = socket.create_connection(web, timeout=TIMEOUT)  # says nothing at all
        try:
            answers = {
                "binary": _raw_http(web, bytes(range(256)) * 4),
                "no version": _raw_http(web, b"GET /metrics\r\n\r\n"),
                "bad version": _raw_http(web, b"GET /metrics SPDY/9\r\n\r\n"),
                "huge head": _raw_http(web, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"),
                "tls": _raw_http(web, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64),
                "empty": _raw_http(web, b""),
                "lf only": _raw_http(web, b"GET /healthz HTTP/1.0\n\n"),
            }
            assert answers["binary"].startswith(b"HTTP/1.1 400 ")
            assert answers["no version"].startswith(b"HTTP/1.1 400 ")
            assert answers["bad version"].startswith(b"HTTP/1.1 505 ")
            assert answers["huge head"].startswith(b"HTTP/1.1 431 ")
            assert answers["tls"].startswith(b"HTTP/1.1 400 ")  # not a silent close
            assert answers["empty"] == b""
            assert answers["lf only"].startswith(b"HTTP/1.1 200 ")
            # The stalled clients hold no one else up, and the proxy still relays.
            assert get(web, "/healthz")[0] == 200
            assoc = associate(
                proxy.address("tls"), "CT", calling_ae="ALLOWED_SCU", ssl_context=ctx(pki)
            )
            assert assoc.is_established and assoc.send_c_echo().Status == 0
            assoc.release()
            # The server closes a client that does not finish its request (5 s).
            slow.settimeout(TIMEOUT)
            assert slow.recv(100) == b""
        finally:
            slow.close()
            idle.close()
        assert get(web, "/healthz")[0] == 200
        assert proxy.proc.poll() is None
        assert not proxy.find(event="metrics-error") and not proxy.find(event="internal-error")


def _echo(proxy: ProxyProcess, pki: Path) -> None:
    assoc = associate(proxy.address("tls"), "CT", calling_ae="ALLOWED_SCU", ssl_context=ctx(pki))
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_audit_file_is_written_batch_after_batch_while_the_proxy_runs(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    """Past the writer's 1-s batch several times: refusals every 200 ms for 4 s reach the file
    while the proxy runs, in several batches at most one a second, each line once; after a quiet
    spell longer than the batch interval the next line is written too. Nothing dropped."""
    trail = tmp_path / "audit.jsonl"
    peers: list[str] = []
    growth: list[tuple[float, int]] = []  # (when, size) each time the file was seen to grow
    sampling = threading.Event()

    def refuse() -> None:
        client = RawClient(address, ctx(pki))
        try:
            host, port = client.sock.getsockname()[:2]
            peers.append(f"{host}:{port}")
            client.send(build_rq("NOWHERE", "ALLOWED_SCU"))
            assert client.read_pdu() == pdu.encode_reject(1, 1, 7)
        finally:
            client.close()

    def sample() -> None:
        size = 0
        while not sampling.is_set():
            now = trail.stat().st_size if trail.exists() else 0
            if now != size:
                growth.append((time.monotonic(), now))
                size = now
            sampling.wait(0.01)

    def in_file() -> list[str]:
        return [x["peer"] for x in read_audit(trail) if x["event"] == "association"]

    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path, audit=trail)) as proxy:
        address, web = proxy.address("tls"), metrics_address(proxy)
        wait_until(lambda: "started" in trail.read_text(), what="the started line")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        for _ in range(20):
            refuse()
            time.sleep(0.2)  # the pace of the traffic: a steady trickle across several batches
        wait_until(lambda: sorted(in_file()) == sorted(peers), what="20 lines in the file")
        spread = time.monotonic() - start
        batches = [when for when, _ in growth if when >= start]
        # Quiet for longer than the batch interval: the next line is not held back.
        wait_until(lambda: time.monotonic() - growth[-1][0] > 2.0, what="a quiet spell")
        refuse()
        wait_until(lambda: sorted(in_file()) == sorted(peers), what="the line after the lull")
        sampling.set()
        sampler.join(TIMEOUT)
        assert value(scrape(web), "dicom_tls_proxy_audit_dropped_total") == 0
        assert value(scrape(web), "dicom_tls_proxy_audit_failures_total") == 0
    assert len(in_file()) == len(set(in_file())) == 21  # each once, after the stop too
    # Written as it came, not at the end: several batches, but at most one per second. The
    # file is seen to grow by a 10 ms poll, so two writes a second apart can be seen 0.96 s
    # apart (measured): the bound allows one batch of that jitter.
    assert 3 <= len(batches) <= spread + 2, (batches, spread)
    gaps = [b - a for a, b in itertools.pairwise(batches)]
    assert min(gaps) > 0.5, gaps


def test_a_removed_audit_folder_does_not_stop_traffic(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    trail = folder / "audit.jsonl"
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path, audit=trail)) as proxy:
        web = metrics_address(proxy)
        _echo(proxy, pki)
        wait_until(lambda: '"association"' in trail.read_text(), what="first line")
        shutil.rmtree(folder)  # works as root too, unlike chmod
        _echo(proxy, pki)
        failed = proxy.wait_for(event="audit-failed")
        assert failed["level"] == "error" and str(trail) == failed["file"]
        for _ in range(3):  # traffic goes on; the error line is not repeated for each batch
            _echo(proxy, pki)
        wait_until(  # the four lines since the folder went are lost, and counted
            lambda: value(scrape(web), "dicom_tls_proxy_audit_dropped_total") == 4,
            what="4 lines dropped",
        )
        assert value(scrape(web), "dicom_tls_proxy_audit_failures_total") >= 1
        assert len(proxy.find(event="audit-failed")) == 1
        # The folder comes back (a remount, an operator): the next batch writes a new file.
        folder.mkdir()
        _echo(proxy, pki)
        proxy.wait_for(event="audit-recovered")
        assert [x["outcome"] for x in read_audit(trail) if x["event"] == "association"] == [
            "completed"
        ]
    assert len(proxy.find(event="association", outcome="completed")) == 6


def test_a_path_replaced_by_a_folder_does_not_stop_traffic(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    trail = tmp_path / "audit.jsonl"
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path, audit=trail)) as proxy:
        _echo(proxy, pki)
        wait_until(lambda: '"association"' in trail.read_text(), what="first line")
        trail.unlink()
        trail.mkdir()
        _echo(proxy, pki)
        assert "Is a directory" in proxy.wait_for(event="audit-failed")["msg"]
        _echo(proxy, pki)
    assert proxy.proc.returncode == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_does_not_stop_traffic(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    trail = tmp_path / "audit.jsonl"
    trail.symlink_to("/dev/full")  # every write fails with ENOSPC
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path, audit=trail)) as proxy:
        _echo(proxy, pki)
        assert "No space left" in proxy.wait_for(event="audit-failed")["msg"]
        _echo(proxy, pki)
        web = metrics_address(proxy)
        assert value(scrape(web), "dicom_tls_proxy_audit_failures_total") >= 1
    assert proxy.proc.returncode == 0


def test_metrics_with_workers_loads(tmp_path: Path, pki: Path) -> None:
    from dicom_tls_proxy.config.load import load_config

    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(config(pki, "127.0.0.1:104", tmp_path, workers=2)))
    loaded = load_config(path)
    assert loaded.proxy.workers == 2 and str(loaded.metrics.bind) == "127.0.0.1:0"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr


def test_a_metrics_port_in_use_is_a_start_error(tmp_path: Path, pki: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cfg = config(pki, "127.0.0.1:104", tmp_path)
        cfg["metrics"]["bind"] = f"127.0.0.1:{taken.getsockname()[1]}"
        path = tmp_path / "proxy.toml"
        path.write_text(toml_dumps(cfg))
        result = subprocess.run(
            [sys.executable, "-m", "dicom_tls_proxy", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == 1
    assert "metrics.bind: cannot listen on" in result.stderr and "in use" in result.stderr


def test_workers_share_one_audit_file_without_mixing_lines(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    trail = tmp_path / "audit.jsonl"
    port = free_port()
    cfg = config(pki, legacy.address, tmp_path, audit=trail, metrics=False, workers=2)
    cfg["listener"][0]["bind"] = f"127.0.0.1:{port}"
    clients = 60
    with running_proxy(tmp_path, cfg) as proxy:
        wait_until(lambda: len(proxy.find(event="listening")) == 2, what="both workers")
        at_once(clients, lambda: no_route(("127.0.0.1", port), pki))
        wait_until(
            lambda: trail.read_text().count('"event": "association"') == clients,
            what="every association in the audit file",
        )
    lines = read_audit(trail)  # each line parses: nothing was interleaved
    associations = [x for x in lines if x["event"] == "association"]
    assert len(associations) == clients
    assert {x["worker"] for x in lines} <= {0, 1}
    assert sorted(x["worker"] for x in lines if x["event"] == "stopped") == [0, 1]

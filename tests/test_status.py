"""The status page for the people who run the proxy, with real proxy processes, real TLS peers and a
real browser (Debian's `chromium`, headless).

/status.json is checked key by key against what the test did: the association it holds open, the
certificate it was refused, the route it asked for. The page is drawn by the browser from that
JSON and fetched again by its own script. Every page a test fetches goes to `EVERY_PAGE`, which the
session-wide secrets check reads too.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dicom_tls_proxy import __version__
from dicom_tls_proxy.config.load import load_config
from tests.support import (
    EVERY_PAGE,
    TIMEOUT,
    LegacyDevice,
    ProxyProcess,
    associate,
    certificate_of,
    client_ssl_context,
    free_port,
    make_dataset,
    pacs_identities,
    proxy_config,
    running_proxy,
    sha256_of,
    toml_dumps,
    wait_until,
)
from tests.test_audit_metrics import no_route, refused_by_tls, scrape, value

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def config(pki: Path, upstream: str, tmp_path: Path, **metrics: Any) -> dict[str, Any]:
    return proxy_config(
        pki,
        upstream,
        route=[
            {"called_ae": "CT", "upstream": upstream},
            {"called_ae": "MR", "upstream": upstream, "allow_calling_ae": ["MR_*"]},
        ],
        audit={"file": str(tmp_path / "audit.jsonl")},
        metrics={"bind": "127.0.0.1:0", **metrics},
    )


def web_address(proxy: ProxyProcess) -> tuple[str, int]:
    host, _, port = proxy.wait_for(event="metrics-listening")["address"].rpartition(":")
    return host.strip("[]"), int(port)


def fetch(address: tuple[str, int], path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        EVERY_PAGE.append(body.decode(errors="replace"))
        return response.status, dict(response.getheaders()), body
    finally:
        conn.close()


def status(address: tuple[str, int]) -> dict[str, Any]:
    code, headers, body = fetch(address, "/status.json")
    assert code == 200 and headers["Content-Type"] == "application/json"
    return json.loads(body)  # type: ignore[no-any-return]


def subject_of(path: Path) -> str:
    return certificate_of(path).subject.rfc4514_string()  # type: ignore[no-any-return]


def not_after_of(path: Path) -> str:
    return certificate_of(path).not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[no-any-return]


def client_leaf(folder: Path, pki: Path, name: str, days: float) -> tuple[Path, Path]:
    """A client certificate of the test CA that expires in `days`: (key file, certificate file)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from dicom_tls_proxy.dev import pki as factory

    ca_key: Any = load_pem_private_key((pki / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    key, cert = factory.make_leaf(
        ca_key,
        certificate_of(pki / "ca.pem"),
        name,
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=days),
    )
    files = folder / f"{name}.key", folder / f"{name}.pem"
    factory.write_pem_key(files[0], key)
    factory.write_pem_cert(files[1], cert)
    return files


@contextmanager
def held(
    address: tuple[str, int], calling_ae: str, key: Path, cert: Path, ca: Path
) -> Iterator[Any]:
    """A pynetdicom association through the proxy, open for the block, then released."""
    assoc = associate(
        address, "CT", calling_ae=calling_ae, ssl_context=client_ssl_context(ca, cert, key)
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def test_status_json_says_what_the_test_did(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    foreign_key, foreign = pacs_identities(tmp_path, pki)["foreign"]
    client, client_key, ca = pki / "client.pem", pki / "client.key", pki / "ca.pem"
    pixels = make_dataset(seed=15).PixelData
    cfg = config(pki, legacy.address, tmp_path)
    with running_proxy(tmp_path, cfg) as proxy:
        address, web = proxy.address("tls"), web_address(proxy)
        refused_by_tls(address, client_ssl_context(ca, foreign, foreign_key))
        no_route(address, pki)
        with held(address, "STATUS_SCU", client_key, client, ca) as assoc:
            assert assoc.send_c_store(make_dataset(seed=15)).Status == 0
            doc = wait_until(
                lambda: (d := status(web))["recent_refusals"][1:] and d,
                what="both refusals in /status.json",
            )
            assert set(doc) == {
                "proxy",
                "listeners",
                "routes",
                "associations",
                "recent_refusals",
                "peer_certificates",
                "certificates",
                "generated",
            }
            p = doc["proxy"]
            assert (p["version"], p["pid"], p["config"]) == (
                __version__,
                proxy.proc.pid,
                str(proxy.config_path),
            )
            assert (p["workers"], p["ready"], p["stopping"]) == (1, True, False)
            assert 0 <= p["uptime_s"] < TIMEOUT * 4
            (li,) = doc["listeners"]
            assert li["name"] == "tls" and li["addresses"] == [f"{address[0]}:{address[1]}"]
            assert (li["tls"], li["verify"], li["peer_certificate"]) == ("in", "chain", "required")
            ct, mr, other = doc["routes"]
            assert (ct["name"], ct["called_ae"], ct["upstream"]) == ("CT", "CT", legacy.address)
            assert (ct["upstream_tls"], ct["mode"], ct["health"]) == (None, "relay", None)
            assert ct["allow"] == {"calling_ae": [], "peer": [], "source": []}
            assert mr["allow"]["calling_ae"] == ["MR_*"]
            assert (ct["associations_now"], ct["associations_total"], ct["refusals_total"]) == (
                1,
                0,
                0,
            )
            assert other == {
                "name": "_other",
                "associations_now": 0,
                "associations_total": 2,
                "refusals_total": 2,
            }
            (a,) = doc["associations"]
            assert re.fullmatch(r"127\.0\.0\.1:\d+", a["peer"])
            assert (a["calling_ae"], a["called_ae"], a["route"]) == ("STATUS_SCU", "CT", "CT")
            assert (a["peer_subject"], a["peer_sha256"]) == (subject_of(client), sha256_of(client))
            assert a["tls_version"] == "TLSv1.3" and a["cipher"]
            assert a["bytes_up"] > len(pixels) and a["bytes_down"] > 0
            assert 0 <= a["duration_s"] < TIMEOUT * 4
            routed, untrusted = doc["recent_refusals"]  # newest first
            assert (routed["reason"], routed["calling_ae"], routed["called_ae"]) == (
                "no-route",
                "ALLOWED_SCU",
                "NOWHERE",
            )
            assert routed["explanation"] and routed["peer_sha256"] == sha256_of(client)
            assert untrusted["reason"] == "tls-untrusted" and untrusted["outcome"] == "tls-failed"
            assert untrusted["peer_sha256"] == sha256_of(foreign)
            assert untrusted["peer_subject"] == subject_of(foreign) == "CN=foreign-pacs"
            assert untrusted["ts"] < routed["ts"] and re.fullmatch(
                r"127\.0\.0\.1:\d+", untrusted["peer"]
            )
            own = {(c["kind"], c["sha256"]): c for c in doc["certificates"] if c["tls"] == "in"}
            served = own["certificate", sha256_of(pki / "proxy.pem")]
            assert served["not_after"] == not_after_of(pki / "proxy.pem")
            assert served["days_left"] > 300 and ("ca", sha256_of(ca)) in own
            # The no-route association presented a verified certificate: in the inventory.
            (seen,) = doc["peer_certificates"]
            assert seen["sha256"] == sha256_of(client) and seen["associations"] == 1
        line = proxy.association(calling_ae="STATUS_SCU")
        assert line["peer"] == a["peer"]
        doc = wait_until(lambda: not (d := status(web))["associations"] and d, what="released")
        assert [r["associations_total"] for r in doc["routes"]] == [1, 0, 2]
        assert doc["routes"][0]["associations_now"] == 0
        (seen,) = doc["peer_certificates"]
        assert (seen["sha256"], seen["subject"], seen["issuer"]) == (
            sha256_of(client),
            subject_of(client),
            subject_of(ca),
        )
        assert seen["not_after"] == not_after_of(client) and seen["associations"] == 2
        assert seen["first_seen"] < seen["last_seen"] == line["ts"]
        expiry = value(
            scrape(web),
            "dicom_tls_proxy_peer_certificate_expiry_seconds",
            sha256=sha256_of(client),
            cn="dicom-client",
        )
        left = certificate_of(client).not_valid_after_utc.timestamp() - time.time()
        assert abs(expiry - left) < 60
        page = fetch(web, "/status")[2].decode()
        kept = seen
    # The inventory outlives the process, beside the audit file.
    assert (tmp_path / "audit.jsonl.peers.json").is_file()
    with running_proxy(tmp_path, cfg) as proxy:
        doc = status(web_address(proxy))
        assert doc["peer_certificates"][0] == {
            **kept,
            "days_left": doc["peer_certificates"][0]["days_left"],
        }
        assert doc["associations"] == doc["recent_refusals"] == []
    # No pixel data on a page: not as bytes, hex or base64.
    for shown in [page, *EVERY_PAGE]:
        for form in (pixels[:24].hex(), base64.b64encode(pixels[:24]).decode()):
            assert form not in shown


def test_the_page_in_a_browser_shows_the_association_and_the_refused_certificate(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium (scripts/test.sh does)")
    ca = pki / "ca.pem"
    soon = client_leaf(tmp_path, pki, "ultrasound-2", 5)
    later = client_leaf(tmp_path, pki, "ct-scanner-1", 20)
    foreign_key, foreign = pacs_identities(tmp_path, pki)["foreign"]
    with running_proxy(tmp_path, config(pki, legacy.address, tmp_path)) as proxy:
        address, web = proxy.address("tls"), web_address(proxy)
        for calling_ae, (key, cert) in (("US_ROOM2", soon), ("CT_ROOM1", later)):
            with held(address, calling_ae, key, cert, ca):
                pass  # into the inventory, with its expiry
        refused_by_tls(address, client_ssl_context(ca, foreign, foreign_key))
        with (
            held(address, "CT_ROOM1", *later, ca),
            held(address, "STATUS_SCU", pki / "client.key", pki / "client.pem", ca),
        ):
            wait_until(lambda: status(web)["recent_refusals"], what="the refusal")
            dom = chromium(tmp_path, f"http://{web[0]}:{web[1]}/status", "--dump-dom")
            screenshot = tmp_path / "status-page.png"
            chromium(tmp_path, f"http://{web[0]}:{web[1]}/status", f"--screenshot={screenshot}")
    EVERY_PAGE.append(dom)
    assert screenshot.stat().st_size > 10_000
    if target := os.environ.get("STATUS_PAGE_SCREENSHOT"):  # the README's picture
        shutil.copyfile(screenshot, target)
    tables = {m.group(1): m.group(2) for m in re.finditer(r'<table id="(\w+)">(.*?)</table>', dom)}
    rows = re.findall(r"<tr>(.*?)</tr>", tables["associations"])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert ["STATUS_SCU", "CT", "CT", "CN=dicom-client"] in [c[1:5] for c in cells]
    assert ["CT_ROOM1", "CT", "CT", "CN=ct-scanner-1"] in [c[1:5] for c in cells]
    assert sha256_of(foreign) in tables["refusals"] and "tls-untrusted" in tables["refusals"]
    alarm = re.search(r"CN=ultrasound-2</td>(.*?)</tr>", tables["peers"])
    assert alarm and re.search(r'<td class="num alarm">[45]\.\d</td>', alarm.group(1))
    warn = re.search(r"CN=ct-scanner-1</td>(.*?)</tr>", tables["peers"])
    assert warn and re.search(r'<td class="num warn">(19|20)\.\d</td>', warn.group(1))
    # Drawn from the embedded JSON, then again from /status.json by the page's own script.
    embedded = json.loads(re.search(r'id="data">(.*?)</script>', dom, re.S).group(1))  # type: ignore[union-attr]
    state = re.search(r'<span id="state"[^>]*>as of ([^<]+)</span>', dom)
    assert state and state.group(1) != embedded["generated"], "the page did not refresh"


def chromium(tmp_path: Path, url: str, *what: str) -> str:
    """Headless chromium on `url`, with 7 s of virtual time (the page refreshes after 5 s)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1500,1300",
        "--virtual-time-budget=7000",
        *what,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT * 2, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_allow_source_closes_other_addresses_and_says_so(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    cfg = config(pki, legacy.address, tmp_path, allow_source=["192.0.2.0/24"])
    with running_proxy(tmp_path, cfg) as proxy:
        web = web_address(proxy)
        for path in ("/status", "/status.json", "/metrics"):
            with pytest.raises(ConnectionError):  # closed unanswered (reset, or EOF)
                fetch(web, path)
        line = proxy.wait_for(event="metrics-refused")
        assert line["source"] == "127.0.0.1" and line["level"] == "warning"
        assert len(proxy.find(event="metrics-refused")) == 1  # one line per source and minute


def test_check_warns_of_a_status_page_open_to_all(tmp_path: Path, pki: Path) -> None:
    def warnings(**metrics: Any) -> list[str]:
        path = tmp_path / "proxy.toml"
        path.write_text(toml_dumps(proxy_config(pki, "127.0.0.1:104", metrics=metrics)))
        return [w for w in load_config(path).warnings if "metrics" in w]

    (warning,) = warnings(bind="0.0.0.0:9100")
    assert "allow_source" in warning and "status page" in warning
    assert warnings(bind="0.0.0.0:9100", allow_source=["10.1.2.0/24"]) == []
    assert warnings(bind="127.0.0.1:9100") == warnings(bind="[::1]:9100") == []
    checked = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(tmp_path / "proxy.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(proxy_config(pki, "127.0.0.1:104", metrics={"bind": "*:9100"})))
    checked = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "metrics.allow_source is empty" in checked.stderr


def status_command(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "status", "-c", str(path), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_the_status_command_prints_the_running_proxy_s_status(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    port = free_port()
    cfg = config(pki, legacy.address, tmp_path)
    cfg["metrics"]["bind"] = f"127.0.0.1:{port}"
    path = tmp_path / "proxy.toml"
    with running_proxy(tmp_path, cfg) as proxy:
        address = proxy.address("tls")
        with held(address, "TERMINAL_SCU", pki / "client.key", pki / "client.pem", pki / "ca.pem"):
            shown = status_command(path)
            as_json = status_command(path, "--json")
    assert shown.returncode == 0, shown.stderr
    assert "associations open: 1" in shown.stdout
    assert "TERMINAL_SCU -> CT" in shown.stdout and sha256_of(pki / "client.pem") in shown.stdout
    assert json.loads(as_json.stdout)["associations"][0]["calling_ae"] == "TERMINAL_SCU"
    EVERY_PAGE.extend([shown.stdout, as_json.stdout])
    gone = status_command(path)
    assert gone.returncode == 1 and "nothing answers" in gone.stderr and str(port) in gone.stderr
    del cfg["metrics"]
    path.write_text(toml_dumps(cfg))
    unset = status_command(path)
    assert unset.returncode == 2 and "metrics.bind: not set" in unset.stderr


def test_with_workers_the_page_shows_every_worker_s_associations(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    foreign_key, foreign = pacs_identities(tmp_path, pki)["foreign"]
    cfg = config(pki, legacy.address, tmp_path)
    cfg["proxy"]["workers"] = 2
    client = pki / "client.key", pki / "client.pem", pki / "ca.pem"
    with running_proxy(tmp_path, cfg) as proxy:
        address, web = proxy.address("tls"), web_address(proxy)
        refused_by_tls(address, client_ssl_context(pki / "ca.pem", foreign, foreign_key))
        with (
            held(address, "W_SCU_1", *client),
            held(address, "W_SCU_2", *client),
            held(address, "W_SCU_3", *client),
            held(address, "W_SCU_4", *client),
        ):
            doc = wait_until(
                lambda: len((d := status(web))["associations"]) == 4 and d["recent_refusals"] and d,
                what="4 associations and a refusal from the workers",
            )
            assert sorted(a["calling_ae"] for a in doc["associations"]) == [
                f"W_SCU_{i}" for i in range(1, 5)
            ]
            assert {a["worker"] for a in doc["associations"]} <= {0, 1}
            assert doc["proxy"]["workers"] == 2 and doc["proxy"]["pid"] == proxy.proc.pid
            assert [w["worker"] for w in doc["proxy"]["worker_processes"]] == [0, 1]
            assert doc["routes"][0]["associations_now"] == 4
            assert doc["recent_refusals"][0]["peer_sha256"] == sha256_of(foreign)
            assert fetch(web, "/status")[0] == 200
        doc = wait_until(
            lambda: (
                (d := status(web))["peer_certificates"]
                and d["peer_certificates"][0]["associations"] == 4
                and d
            ),
            what="the workers' inventories, merged",
        )
        assert doc["peer_certificates"][0]["sha256"] == sha256_of(pki / "client.pem")
        assert doc["routes"][0]["associations_total"] == 4
        samples = scrape(web)
        assert (
            value(
                samples,
                "dicom_tls_proxy_peer_certificate_expiry_seconds",
                sha256=sha256_of(pki / "client.pem"),
                cn="dicom-client",
            )
            > 300 * 86400
        )

"""Store-and-forward routes end to end (issue 14), with real peers: DCMTK storescu/storescp (TLS
in, TLS out) and pynetdicom, the upstream down while the modality sends, then up; a SIGKILL between
Success and forwarding; an upstream that refuses one instance for good; a spool at its limit; a
full disk. What is asserted is what users see: the C-STORE statuses, the bytes that arrive, the
files in the spool, the log lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests import support
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    associate,
    dcmtk,
    free_port,
    make_dataset,
    running_proxy,
    storescp_running,
    wait_until,
)
from tests.test_origination import data_set
from tests.test_termination import dcmtk_tls

pytestmark = pytest.mark.dcmtk


def instances(folder: Path, count: int, rows: int = 128, first_seed: int = 100) -> list[Path]:
    """`count` CT files with distinct pixel data."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"ct{i:04d}.dcm"
        make_dataset(rows, rows, seed=first_seed + i).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sf_route(upstream: str, spool: Path, **extra: Any) -> dict[str, Any]:
    return {
        "called_ae": "PACS",
        "upstream": upstream,
        "mode": "store-and-forward",
        "spool": str(spool),
        "retry_interval": 0.5,
        "retry_max_interval": 2.0,
        **extra,
    }


def plaintext_config(route: dict[str, Any], **tables: Any) -> dict[str, Any]:
    route.setdefault("listeners", ["legacy-in"])
    return {
        "proxy": {"log_format": "json"},
        "listener": [{"name": "legacy-in", "bind": "127.0.0.1:0"}],
        "route": [route],
        **tables,
    }


def storescu(address: tuple[str, int], files: list[Path], *extra: str) -> None:
    run = subprocess.run(
        [
            dcmtk("storescu"),
            *extra,
            "-aet",
            "MODALITY",
            "-aec",
            "PACS",
            address[0],
            str(address[1]),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def spooled(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.dcm"))


def assert_arrived(sent: list[Path], received: Path) -> None:
    """Every instance arrived once, its data set byte for byte."""
    by_uid = {dcmread(p).SOPInstanceUID: data_set(p) for p in sent}
    got = {dcmread(p).SOPInstanceUID: data_set(p) for p in received.iterdir()}
    assert got.keys() == by_uid.keys()
    assert all(got[uid] == by_uid[uid] for uid in by_uid)


def test_tls_modality_to_plaintext_pacs_while_the_pacs_is_down(tmp_path: Path, pki: Path) -> None:
    """storescu +tls -> proxy -> storescp, the storescp started only after the modality is done:
    every instance was acknowledged from the spool, then arrives, and the spool empties."""
    files = instances(tmp_path / "sent", 6)
    spool, port = tmp_path / "spool", free_port()
    config = support.proxy_config(
        pki, "unused:1", route=[sf_route(f"127.0.0.1:{port}", spool, listeners=["tls"])]
    )
    with running_proxy(tmp_path, config) as proxy:
        storescu(proxy.address("tls"), files, *dcmtk_tls(pki))
        line = proxy.association(calling_ae="MODALITY")
        assert line["outcome"] == "completed" and line["reason"] == "released"
        assert "6 instances stored" in line["detail"]
        assert line["tls_version"].startswith("TLSv1.")
        assert len(spooled(spool)) == 6
        assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in spool.iterdir() if p.is_file())
        assert os.stat(spool).st_mode & 0o777 == 0o700
        failed = proxy.wait_for(event="forward-failed")
        assert "connection refused" in failed["cause"] and failed["next_attempt_in"] > 0
        with storescp_running(port, tmp_path / "pacs", aet="PACS") as received:
            proxy.wait_for(event="forwarded", count=6)
            wait_until(lambda: not spooled(spool), what="an empty spool")
            assert_arrived(files, received)
    stored = [x for x in proxy.lines if x.get("event") == "stored"]
    assert len(stored) == 6 and {x["calling_ae"] for x in stored} == {"MODALITY"}


def test_plaintext_modality_to_tls_pacs_while_the_pacs_is_down(tmp_path: Path, pki: Path) -> None:
    """Origination: plaintext storescu -> proxy -> storescp +tls requiring the proxy's client
    certificate, down while sending."""
    (tmp_path / "ids").mkdir()
    key, cert = support.pacs_identities(tmp_path / "ids", pki)["pacs"]
    files = instances(tmp_path / "sent", 4)
    spool, port = tmp_path / "spool", free_port()
    route = sf_route(f"127.0.0.1:{port}", spool, upstream_tls="pacs")
    client = {
        "certificate": pki / "proxy.pem",
        "private_key": pki / "proxy.key",
        "ca": pki / "ca.pem",
    }
    with running_proxy(tmp_path, plaintext_config(route, tls={"pacs": client})) as proxy:
        storescu(proxy.address("legacy-in"), files)
        assert len(spooled(spool)) == 4
        proxy.wait_for(event="forward-failed")
        tls = ["+tls", str(key), str(cert), "+cf", str(pki / "ca.pem")]
        with storescp_running(port, tmp_path / "pacs", *tls, aet="PACS") as received:
            proxy.wait_for(event="forwarded", count=4)
            wait_until(lambda: not spooled(spool), what="an empty spool")
            assert_arrived(files, received)


def test_sigkill_after_success_loses_nothing(tmp_path: Path) -> None:
    """The modality got Success, the proxy is killed before it could forward; the next proxy on
    the same spool sends every instance."""
    files = instances(tmp_path / "sent", 5)
    spool, port = tmp_path / "spool", free_port()
    config = plaintext_config(sf_route(f"127.0.0.1:{port}", spool))
    with running_proxy(tmp_path, config) as proxy:
        storescu(proxy.address("legacy-in"), files)
        proxy.wait_for(event="forward-failed")
        proxy.proc.send_signal(signal.SIGKILL)
        proxy.proc.wait(TIMEOUT)
    assert len(spooled(spool)) == 5
    with storescp_running(port, tmp_path / "pacs", aet="PACS") as received:
        with running_proxy(tmp_path, config) as again:
            again.wait_for(event="forwarded", count=5)
            wait_until(lambda: not spooled(spool), what="an empty spool")
        assert_arrived(files, received)


def test_a_permanent_refusal_goes_to_failed_and_the_rest_flows(tmp_path: Path) -> None:
    """The upstream answers 0xA900 to one instance: after one attempt it is in failed/ with its
    reason beside it; the other instances arrive; `spool` lists it; `spool retry` queues it."""
    files = instances(tmp_path / "sent", 4)
    refused_uid = dcmread(files[1]).SOPInstanceUID
    spool = tmp_path / "spool"
    pacs = LegacyDevice("PACS")
    pacs.store_status = lambda ds: 0xA900 if ds.SOPInstanceUID == refused_uid else 0x0000
    try:
        config = plaintext_config(sf_route(pacs.address, spool))
        with running_proxy(tmp_path, config) as proxy:
            storescu(proxy.address("legacy-in"), files)
            failed = proxy.wait_for(event="failed")
            wait_until(lambda: len(pacs.stored) == 3, what="three instances at the PACS")
            wait_until(lambda: not spooled(spool), what="an empty queue")
        assert failed["sop_instance"] == refused_uid and "0xa900" in failed["reason"]
        assert {ds.SOPInstanceUID for ds in pacs.stored} == {
            dcmread(p).SOPInstanceUID for p in files
        } - {refused_uid}
        (kept,) = (spool / "failed").glob("*.dcm")
        why = json.loads(kept.with_suffix(".json").read_text())
        assert why["sop_instance"] == refused_uid and why["attempts"] == 1
        assert "status 0xa900" in why["failed_reason"]
        path = tmp_path / "proxy.toml"
        listing = cli("spool", "-c", str(path))
        assert "0 queued" in listing and "1 failed" in listing and refused_uid in listing
        assert "0xa900" in listing
        assert "1 failed instances back" in cli("spool", "retry", "-c", str(path), "PACS")
        assert len(spooled(spool)) == 1 and not list((spool / "failed").glob("*"))
        pacs.store_status = lambda ds: 0x0000
        with running_proxy(tmp_path, config) as proxy:
            proxy.wait_for(event="forwarded", count=1)
            wait_until(lambda: not spooled(spool), what="an empty queue")
        assert refused_uid in {ds.SOPInstanceUID for ds in pacs.stored}
    finally:
        pacs.close()


def cli(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def pynetdicom_store(address: tuple[str, int], data_sets: list[Any]) -> list[int]:
    """C-STORE each data set in one association; the statuses the proxy answered."""
    assoc = associate(address, "PACS", calling_ae="US_CART", contexts=[CTImageStorage])
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in data_sets]
    finally:
        assoc.release()


def test_past_spool_max_bytes_a_c_store_is_refused_with_a700(tmp_path: Path) -> None:
    """Every instance that got 0x0000 is in the spool; the one that would pass the limit gets
    0xA700 and leaves nothing behind."""
    spool = tmp_path / "spool"
    data_sets = [make_dataset(128, 128, seed=i) for i in range(5)]  # about 33 KB each
    route = sf_route(f"127.0.0.1:{free_port()}", spool, spool_max_bytes=80_000)
    with running_proxy(tmp_path, plaintext_config(route)) as proxy:
        statuses = pynetdicom_store(proxy.address("legacy-in"), data_sets)
        refused = proxy.wait_for(event="store-refused")
    assert statuses[:2] == [0x0000, 0x0000] and set(statuses[2:]) == {0xA700}
    assert "spool_max_bytes" in refused["msg"]
    kept = {dcmread(p).SOPInstanceUID for p in spooled(spool)}
    assert kept == {ds.SOPInstanceUID for ds in data_sets[:2]}
    assert not list(spool.glob("*.tmp"))


def test_echo_answered_and_other_services_refused_while_the_upstream_is_down(
    tmp_path: Path,
) -> None:
    route = sf_route(f"127.0.0.1:{free_port()}", tmp_path / "spool")
    with running_proxy(tmp_path, plaintext_config(route)) as proxy:
        assoc = associate(
            proxy.address("legacy-in"),
            "PACS",
            contexts=[Verification, CTImageStorage, PatientRootQueryRetrieveInformationModelFind],
        )
        assert assoc.is_established
        results = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {Verification, CTImageStorage}
        assert results == {PatientRootQueryRetrieveInformationModelFind: 3}
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        line = proxy.association()
    assert line["outcome"] == "completed" and line["reason"] == "released"


def test_a_data_set_that_does_not_parse_gets_c000(tmp_path: Path) -> None:
    from dicom_tls_proxy.protocol import dimse, messages, pdu
    from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem

    route = sf_route(f"127.0.0.1:{free_port()}", tmp_path / "spool")
    with running_proxy(tmp_path, plaintext_config(route)) as proxy:
        client = support.RawClient(proxy.address("legacy-in"))
        contexts = [PresentationContextItem(1, CTImageStorage, ("1.2.840.10008.1.2",))]
        client.send(
            pdu.encode_associate_rq("PACS", "RAW", contexts, implementation_class_uid="2.25.7")
        )
        assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
        command = dimse.c_store_rq(7, CTImageStorage, "1.2.3.4")
        client.send(b"".join(messages.fragments(1, command, 16384, command=True)))
        garbage = bytes([0x10, 0x00, 0x10, 0x00, 0xFF, 0xFF, 0x00, 0x00]) + b"x" * 20
        client.send(b"".join(messages.fragments(1, garbage, 16384, command=False)))
        answer = client.read_pdu()
        fields = dimse.parse_command(answer[12:])
        assert fields.field == dimse.C_STORE_RSP and fields.status == 0xC000
        assert fields.message_id == 7 and fields.sop_instance == "1.2.3.4"
        client.send(pdu.encode_release_rq())
        assert client.read_pdu()[0] == pdu.A_RELEASE_RP
        client.close()
        refused = proxy.wait_for(event="store-refused")
    assert refused["status"] == "0xc000" and "runs past" in refused["msg"]
    assert not [
        p for p in (tmp_path / "spool").iterdir() if p.is_file() and p.name != ".forwarder.lock"
    ]


def test_full_disk_refuses_with_a700_and_other_routes_go_on(tmp_path: Path) -> None:
    """The spool on a 1 MiB tmpfs: an instance larger than the disk gets 0xA700, no file of it
    is left; a small one after it is stored; a relay route of the same proxy keeps working."""
    with small_disk(tmp_path / "small") as disk:
        full_disk_refuses_and_other_routes_go_on(tmp_path, disk / "spool")


@contextmanager
def small_disk(folder: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at `folder` (skips the test where mounting is not allowed)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def full_disk_refuses_and_other_routes_go_on(tmp_path: Path, spool: Path) -> None:
    legacy = LegacyDevice("LEGACY")
    try:
        routes = [
            sf_route(f"127.0.0.1:{free_port()}", spool, listeners=["legacy-in"]),
            {"called_ae": "CT", "upstream": legacy.address, "listeners": ["legacy-in"]},
        ]
        config = plaintext_config(routes[0])
        config["route"] = routes
        with running_proxy(tmp_path, config) as proxy:
            big, small = make_dataset(1024, 1024, seed=1), make_dataset(64, 64, seed=2)
            statuses = pynetdicom_store(proxy.address("legacy-in"), [big, small])
            refused = proxy.wait_for(event="store-refused")
            assert statuses == [0xA700, 0x0000]
            assert "No space left on device" in refused["msg"]
            assert [dcmread(p).SOPInstanceUID for p in spooled(spool)] == [small.SOPInstanceUID]
            assert not list(spool.glob("*.tmp"))
            relayed = associate(proxy.address("legacy-in"), "CT", contexts=[CTImageStorage])
            assert relayed.is_established
            assert int(relayed.send_c_store(big).Status) == 0x0000
            relayed.release()
        assert legacy.stored[-1].SOPInstanceUID == big.SOPInstanceUID
    finally:
        legacy.close()


def test_backoff_doubles_and_a_long_outage_still_delivers(tmp_path: Path) -> None:
    """Run past the timers: retry_interval 0.5 s doubling to retry_max_interval 2 s, for more
    than several rounds at the ceiling; the instance arrives once the upstream is back."""
    files = instances(tmp_path / "sent", 2)
    spool, port = tmp_path / "spool", free_port()
    config = plaintext_config(sf_route(f"127.0.0.1:{port}", spool))
    with running_proxy(tmp_path, config) as proxy:
        storescu(proxy.address("legacy-in"), files)
        wait_until(
            lambda: len(proxy.find(event="forward-failed")) >= 7,
            timeout=TIMEOUT,
            what="seven failed attempts",
        )
        delays = [x["next_attempt_in"] for x in proxy.find(event="forward-failed")][:7]
        assert delays == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        head = json.loads(sorted(spool.glob("*.json"))[0].read_text())
        assert head["attempts"] >= 7 and "connection refused" in head["last_error"]
        with storescp_running(port, tmp_path / "pacs", aet="PACS") as received:
            proxy.wait_for(event="forwarded", count=2)
            wait_until(lambda: not spooled(spool), what="an empty spool")
            assert_arrived(files, received)


def test_readyz_and_metrics_show_the_spool(tmp_path: Path) -> None:
    import urllib.request

    files = instances(tmp_path / "sent", 3)
    spool, port = tmp_path / "spool", free_port()
    metrics_port = free_port()
    config = plaintext_config(
        sf_route(f"127.0.0.1:{port}", spool), metrics={"bind": f"127.0.0.1:{metrics_port}"}
    )
    base = f"http://127.0.0.1:{metrics_port}"
    with running_proxy(tmp_path, config) as proxy:
        storescu(proxy.address("legacy-in"), files)
        proxy.wait_for(event="forward-failed")
        ready = json.loads(urllib.request.urlopen(f"{base}/readyz", timeout=TIMEOUT).read())
        assert ready["spools"]["PACS"]["queued"] == 3
        assert ready["spools"]["PACS"]["oldest_age_s"] >= 0
        text = urllib.request.urlopen(f"{base}/metrics", timeout=TIMEOUT).read().decode()
        assert 'dicom_tls_proxy_spool_queued_instances{route="PACS"} 3.0' in text
        assert 'dicom_tls_proxy_spool_stored_total{route="PACS"} 3.0' in text
        status = json.loads(urllib.request.urlopen(f"{base}/status.json", timeout=TIMEOUT).read())
        (route,) = status["routes"]
        assert route["mode"] == "store-and-forward" and route["queue"]["queued"] == 3
        assert status["spools"]["PACS"]["queued"] == 3
        page = urllib.request.urlopen(f"{base}/status", timeout=TIMEOUT).read().decode()
        assert "store-and-forward" in page
        with storescp_running(port, tmp_path / "pacs", aet="PACS"):
            proxy.wait_for(event="forwarded", count=3)
            wait_until(lambda: not spooled(spool), what="an empty spool")
        text = urllib.request.urlopen(f"{base}/metrics", timeout=TIMEOUT).read().decode()
        assert 'dicom_tls_proxy_spool_forwarded_total{route="PACS"} 3.0' in text
        assert 'dicom_tls_proxy_spool_queued_instances{route="PACS"} 0.0' in text


def test_two_workers_share_one_spool_and_one_forwarder(tmp_path: Path) -> None:
    """workers = 2: both accept into the same spool (rounds of four concurrent storescu until
    each worker has stored some: the kernel picks the worker); one forwarder sends each instance
    once; killing the worker that forwards hands the forwarding to the other."""
    spool = tmp_path / "spool"
    pacs = LegacyDevice("PACS")
    sent = 0
    try:
        config = plaintext_config(sf_route(pacs.address, spool))
        config["proxy"]["workers"] = 2
        with running_proxy(tmp_path, config) as proxy:
            address = proxy.address("legacy-in")
            for round_ in range(10):
                files = instances(tmp_path / f"sent{round_}", 8, first_seed=100 + 8 * round_)
                command = [
                    dcmtk("storescu"),
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "PACS",
                    *map(str, address),
                ]
                procs = [
                    subprocess.Popen(
                        [*command, *map(str, files[i::4])],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for i in range(4)
                ]
                assert all(p.wait(TIMEOUT * 2) == 0 for p in procs)
                sent += len(files)
                if len({x.get("worker") for x in proxy.find(event="stored")}) == 2:
                    break
            assert len({x.get("worker") for x in proxy.find(event="stored")}) == 2
            wait_until(lambda: len(pacs.stored) == sent, what=f"{sent} instances at the PACS")
            wait_until(lambda: not spooled(spool), what="an empty spool")
            wait_until(  # a forwarding association logs once it is released
                lambda: sum(x["count"] for x in proxy.find(event="forwarded")) >= sent,
                what=f"forwarded lines for {sent} instances",
            )
            forwarded = proxy.find(event="forwarded")
            assert sum(x["count"] for x in forwarded) == sent
            assert len({x.get("worker") for x in forwarded}) == 1
            forwarder = forwarded[0]["worker"]
            pids = proxy.wait_for(event="workers-started")["pids"]
            os.kill(pids[forwarder], signal.SIGKILL)
            storescu(address, instances(tmp_path / "more", 2, first_seed=5000))
            wait_until(lambda: len(pacs.stored) == sent + 2, what="the two later instances")
        assert len({ds.SOPInstanceUID for ds in pacs.stored}) == sent + 2
    finally:
        pacs.close()


def test_idle_association_on_a_store_route_is_aborted_after_idle_timeout(
    tmp_path: Path,
) -> None:
    route = sf_route(f"127.0.0.1:{free_port()}", tmp_path / "spool")
    config = plaintext_config(route)
    config["proxy"]["idle_timeout"] = 1.5
    with running_proxy(tmp_path, config) as proxy:
        assoc = associate(proxy.address("legacy-in"), "PACS", contexts=[Verification])
        assert assoc.is_established
        wait_until(lambda: not assoc.is_established, timeout=TIMEOUT, what="the abort")
        assert assoc.is_aborted
        line = proxy.association()
    assert line["outcome"] == "timed-out" and line["reason"] == "idle-timeout"

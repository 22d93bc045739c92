"""`watch = true`: the snapshot and its diff; real proxies reloading on a Kubernetes-style swap."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.dev.pki import key_pem, make_leaf
from dicom_tls_proxy.ops.watch import SETTLE_LOOKS, Targets, changes, snapshot, targets_of
from tests.support import (
    TIMEOUT,
    ProxyProcess,
    free_port,
    proxy_config,
    running_proxy,
    tls_in,
    toml_dumps,
    wait_until,
)
from tests.test_operations import ctx

# -- Kubernetes' atomic writer, as kubelet does it for a Secret mount ------------------------------


def publish(folder: Path, version: str, files: dict[str, bytes]) -> None:
    """Write `files` into a new hidden folder `..VERSION`, point `..data` at it by renaming a new
    symlink over the old one, link each name to `..data/NAME` once, then remove older versions."""
    data = folder / f"..{version}"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
        (data / name).chmod(0o600)
    os.symlink(data.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    for old in folder.glob("..2*"):
        if old != data:
            shutil.rmtree(old)


def server_identity(pki: Path, name: str) -> dict[str, bytes]:
    """A new server certificate and key from the test CA, as `tls.crt` and `tls.key`."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key, cert = make_leaf(ca_key, ca_cert, name, ips=["127.0.0.1"])  # type: ignore[arg-type]
    return {"tls.crt": cert.public_bytes(serialization.Encoding.PEM), "tls.key": key_pem(key)}


# -- the snapshot and its diff, without a process -------------------------------------------------


def _targets(folder: Path, *named: str) -> Targets:
    return Targets((folder,), frozenset(folder / n for n in named), frozenset())


def test_a_kubernetes_data_swap_is_seen(tmp_path: Path, pki: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    publish(secret, "2026_11_22_10_00_00.1", server_identity(pki, "first"))
    targets = _targets(secret, "tls.crt", "tls.key")
    before = snapshot(targets)
    assert changes(before, snapshot(targets)) == []  # looking twice changes nothing
    publish(secret, "2026_11_22_10_05_00.2", server_identity(pki, "second"))
    seen = changes(before, snapshot(targets))
    assert {str(secret / n) for n in ("..data", "tls.crt", "tls.key")} <= set(seen)
    assert str(secret / "..2026_11_22_10_00_00.1") in seen  # gone
    assert str(secret / "..2026_11_22_10_05_00.2") in seen  # new


def test_a_same_size_rewrite_in_place_is_seen(tmp_path: Path) -> None:
    """Within one kernel clock tick size and mtime stay the same: the named file's hash tells."""
    (tmp_path / "ca.pem").write_bytes(b"A" * 100)
    targets = _targets(tmp_path, "ca.pem")
    before = snapshot(targets)
    with open(tmp_path / "ca.pem", "r+b") as f:  # same inode, same size
        f.write(b"B" * 100)
    assert changes(before, snapshot(targets)) == [str(tmp_path / "ca.pem")]


def test_entries_added_removed_and_a_replaced_folder(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "old.pem").write_text("x")
    targets = _targets(folder)
    before = snapshot(targets)
    (folder / "new.pem").write_text("y")
    (folder / "old.pem").unlink()
    assert changes(before, snapshot(targets)) == [str(folder / "new.pem"), str(folder / "old.pem")]
    folder.rename(tmp_path / "gone")
    assert changes(before, snapshot(targets)) == [str(folder)]  # vanished
    folder.mkdir()
    assert changes(before, snapshot(targets)) == [str(folder)]  # another folder at the path


def test_what_is_watched_and_what_is_ignored(tmp_path: Path, pki: Path) -> None:
    """The folders of the config and of every file it names; CA folders themselves; never the
    files the proxy writes (audit file and its rotations, pid file)."""
    cas = tmp_path / "cas"
    cas.mkdir()
    shutil.copy(pki / "ca.pem", cas / "ca.pem")
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = {
        "proxy": {"pid_file": str(conf / "proxy.pid"), "watch": True},
        "audit": {"file": str(conf / "audit.jsonl")},
        "tls": {
            "in": {"certificate": pki / "proxy.pem", "private_key": pki / "proxy.key", "ca": cas}
        },
        "listener": [{"name": "tls", "bind": "127.0.0.1:0", "tls": "in"}],
        "route": [{"called_ae": "CT", "upstream": "127.0.0.1:104"}],
    }
    (conf / "proxy.toml").write_text(toml_dumps(cfg))
    targets = targets_of(load_config(conf / "proxy.toml"))
    assert set(targets.folders) == {conf, pki, cas}
    assert targets.named == {conf / "proxy.toml", pki / "proxy.pem", pki / "proxy.key"}
    before = snapshot(targets)
    for written in ("proxy.pid", "audit.jsonl", "audit.jsonl.1"):
        (conf / written).write_text("written by the proxy")
    assert changes(before, snapshot(targets)) == []
    (cas / "second-ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    assert changes(before, snapshot(targets)) == [str(cas / "second-ca.pem")]


# -- real proxies ---------------------------------------------------------------------------------


def watched_config(pki: Path, secret: Path, folder: Path, **proxy: Any) -> dict[str, Any]:
    return proxy_config(
        pki,
        "127.0.0.1:104",
        proxy={"pid_file": str(folder / "proxy.pid"), "watch_interval": 0.2, **proxy},
        tls={"in": tls_in(pki, certificate=secret / "tls.crt", private_key=secret / "tls.key")},
        audit={"file": str(folder / "audit.jsonl")},  # beside the config: must not trigger
    )


def served_sha256(address: tuple[str, int], pki: Path) -> str:
    """`sha256:HEX` of the certificate a new TLS connection is served, computed here."""
    with (
        socket.create_connection(address, timeout=TIMEOUT) as raw,
        ctx(pki).wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def sha256_of_pem(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _count(proxy: ProxyProcess, n: int, **match: Any) -> None:
    wait_until(lambda: len(proxy.find(**match)) >= n, what=f"{n} log lines {match}")


def test_a_symlink_swap_reloads_and_a_broken_key_keeps_the_old_certificate(
    tmp_path: Path, pki: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second, third = (server_identity(pki, n) for n in ("first", "second", "third"))
    publish(secret, "2026_11_22_10_00_00.1", first)
    with running_proxy(tmp_path, watched_config(pki, secret, tmp_path, watch=True)) as proxy:
        address = proxy.address("tls")
        assert served_sha256(address, pki) == sha256_of_pem(first["tls.crt"])
        watching = proxy.wait_for(event="watching")
        assert set(watching["folders"]) == {str(tmp_path), str(secret), str(pki)}

        publish(secret, "2026_11_22_10_05_00.2", second)
        changed = proxy.wait_for(event="watch-changed")
        assert str(secret / "..data") in changed["changed"]
        proxy.wait_for(event="reloaded")
        assert served_sha256(address, pki) == sha256_of_pem(second["tls.crt"])

        half = third["tls.key"][: len(third["tls.key"]) // 2]  # a writer caught half-way
        publish(secret, "2026_11_22_10_10_00.3", {**third, "tls.key": half})
        failed = proxy.wait_for(event="reload-failed")
        assert any("tls.in.private_key" in p for p in failed["problems"]), failed
        assert served_sha256(address, pki) == sha256_of_pem(second["tls.crt"])

        publish(secret, "2026_11_22_10_15_00.4", third)  # the next change tries again
        _count(proxy, 2, event="reloaded")
        assert served_sha256(address, pki) == sha256_of_pem(third["tls.crt"])

        # Exactly one reload per change: none caused by a reload itself, by the audit file or
        # by the pid file beside the config (the audit file has the reloads in it by now).
        wait_until(
            lambda: (tmp_path / "audit.jsonl").read_text().count('"reload-failed"') == 1,
            what="the audit file written",
        )
        publish(secret, "2026_11_22_10_20_00.5", second)
        _count(proxy, 3, event="reloaded")
        assert served_sha256(address, pki) == sha256_of_pem(second["tls.crt"])
        assert len(proxy.find(event="watch-changed")) == 4
        assert len(proxy.find(event="reloaded")) == 3
        for line in proxy.find(event="watch-changed"):
            assert line["changed"], line  # each names what changed, all of it in the secret
            assert all(p.startswith(str(secret)) for p in line["changed"]), line


def test_a_folder_that_never_settles_is_reloaded_after_30_looks_and_watching_goes_on(
    tmp_path: Path, pki: Path
) -> None:
    """Past watch_interval many times: quiet intervals reload nothing; a file written to every
    10 ms keeps the folder from settling, so after SETTLE_LOOKS looks the proxy reloads anyway
    (`watch-unsettled`); once the writer stops, its last change is reloaded too; quiet again,
    nothing; and the next change after that is still seen."""
    interval = 0.1
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second = server_identity(pki, "first"), server_identity(pki, "second")
    publish(secret, "2026_11_22_10_00_00.1", first)
    cfg = watched_config(pki, secret, tmp_path, watch=True, watch_interval=interval)
    stop = threading.Event()
    written: list[float] = []  # wall-clock times of the writes, as the log's `ts`

    def write() -> None:
        with open(secret / "noise.log", "ab", buffering=0) as noise:
            while True:
                noise.write(b".")
                written.append(time.time())
                if stop.wait(0.01):
                    noise.write(b".")  # a last change, after anything the proxy looked at
                    written.append(time.time())
                    return

    def at(line: dict[str, Any]) -> float:
        return datetime.fromisoformat(line["ts"]).timestamp()

    def quiet(what: str) -> None:
        """The point here is that nothing happens: ten intervals with no change, no reload."""
        counts = len(proxy.find(event="watch-changed")), len(proxy.find(event="reloaded"))
        time.sleep(10 * interval)
        assert counts == (len(proxy.find(event="watch-changed")), len(proxy.find(event="reloaded")))
        assert not proxy.find(event="reload-failed"), what

    with running_proxy(tmp_path, cfg) as proxy:
        address = proxy.address("tls")
        proxy.wait_for(event="watching")
        quiet("at start")
        writer = threading.Thread(target=write, daemon=True)
        began = time.monotonic()
        writer.start()
        try:
            proxy.wait_for(event="watch-unsettled")
            unsettled_after = time.monotonic() - began
        finally:
            stop.set()
            writer.join(TIMEOUT)
        assert unsettled_after >= SETTLE_LOOKS * interval
        changed = proxy.wait_for(event="watch-changed")  # logged right after watch-unsettled
        assert str(secret / "noise.log") in changed["changed"]
        last_write = written[-1]
        settled = wait_until(
            lambda: [x for x in proxy.find(event="watch-changed") if at(x) > last_write],
            what="the writer's last change seen",
        )
        assert str(secret / "noise.log") in settled[0]["changed"]
        _count(proxy, len(proxy.find(event="watch-changed")), event="reloaded")
        quiet("after the writer stopped")
        publish(secret, "2026_11_22_10_05_00.2", second)
        wait_until(
            lambda: served_sha256(address, pki) == sha256_of_pem(second["tls.crt"]),
            what="the new certificate served",
        )
        wait_until(
            lambda: len(proxy.find(event="reloaded")) == len(proxy.find(event="watch-changed")),
            what="one reload per change",
        )
        assert len(proxy.find(event="watch-unsettled")) == 1


def test_without_watch_nothing_reloads(tmp_path: Path, pki: Path) -> None:
    """Two proxies on the same certificate folder, one watching: once the watching one has
    reloaded, the other one, which looks at the same folder, has not."""
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second = server_identity(pki, "first"), server_identity(pki, "second")
    publish(secret, "2026_11_22_10_00_00.1", first)
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off_cfg = watched_config(pki, secret, tmp_path / "off")
    on_cfg = watched_config(pki, secret, tmp_path / "on", watch=True)
    with (
        running_proxy(tmp_path / "off", off_cfg) as off,
        running_proxy(tmp_path / "on", on_cfg) as on,
    ):
        on.wait_for(event="watching")
        publish(secret, "2026_11_22_10_05_00.2", second)
        on.wait_for(event="reloaded")
        assert served_sha256(on.address("tls"), pki) == sha256_of_pem(second["tls.crt"])
        assert served_sha256(off.address("tls"), pki) == sha256_of_pem(first["tls.crt"])
        assert not off.find(event="watch-changed") and not off.find(event="reloaded")


def test_watch_can_be_turned_on_by_a_reload(tmp_path: Path, pki: Path) -> None:
    """`watch` changes live: SIGHUP with `watch = true` in the config starts watching."""
    import signal

    secret = tmp_path / "secret"
    secret.mkdir()
    publish(secret, "2026_11_22_10_00_00.1", server_identity(pki, "first"))
    cfg = watched_config(pki, secret, tmp_path)
    with running_proxy(tmp_path, cfg) as proxy:
        cfg["proxy"]["watch"] = True
        (tmp_path / "proxy.toml").write_text(toml_dumps(cfg))
        assert not proxy.find(event="watching")
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(event="reloaded")
        proxy.wait_for(event="watching")  # from here on changes are seen
        second = server_identity(pki, "second")
        publish(secret, "2026_11_22_10_05_00.2", second)
        proxy.wait_for(event="watch-changed")
        _count(proxy, 2, event="reloaded")
        assert served_sha256(proxy.address("tls"), pki) == sha256_of_pem(second["tls.crt"])


def test_with_workers_the_parent_watches_and_every_worker_reloads(
    tmp_path: Path, pki: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    publish(secret, "2026_11_22_10_00_00.1", server_identity(pki, "first"))
    cfg = watched_config(pki, secret, tmp_path, watch=True, workers=2)
    cfg["listener"][0]["bind"] = f"127.0.0.1:{free_port()}"
    with running_proxy(tmp_path, cfg) as proxy:
        proxy.wait_for(event="workers-started")
        wait_until(lambda: len(proxy.find(event="listening")) == 2, what="both workers listening")
        proxy.wait_for(event="watching")
        second = server_identity(pki, "second")
        publish(secret, "2026_11_22_10_05_00.2", second)
        watched = proxy.wait_for(event="watch-changed")
        assert "worker" not in watched  # the parent, once
        _count(proxy, 2, event="reloaded")
        assert {line["worker"] for line in proxy.find(event="reloaded")} == {0, 1}
        assert len(proxy.find(event="watch-changed")) == 1
        expected = sha256_of_pem(second["tls.crt"])
        address = ("127.0.0.1", int(cfg["listener"][0]["bind"].rsplit(":", 1)[1]))
        for _ in range(4):  # whichever worker accepts
            assert served_sha256(address, pki) == expected

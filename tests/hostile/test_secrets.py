"""No key, no password in any output: the proxy run through successes and failures with an encrypted
key and a password file, `check` and `echo` with right and wrong passwords, a failed reload.

Every private key file the test session made (the `pki` fixture's and this test's own) is read back
and its PEM body lines, its private numbers and both passwords are searched for in every line the
commands printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dicom_tls_proxy.dev import pki as factory
from dicom_tls_proxy.protocol import pdu
from tests.hostile.cases import ABORT_INVALID, BY_NAME, proxy_config, throw
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    RawClient,
    associate,
    build_rq,
    client_ssl_context,
    pacs_identities,
    proxy_stats,
    running_proxy,
    toml_dumps,
)

PASSWORD = b"correct horse battery staple 7f3a"
WRONG = b"wrong horse battery staple 91c4"


def secrets_of(key_files: list[Path], passwords: list[bytes]) -> list[str]:
    """What must never be printed: PEM body lines, private numbers, passwords."""
    found: list[str] = [p.decode() for p in passwords]
    for path in key_files:
        data = path.read_bytes()
        found += [
            line.decode()
            for line in data.splitlines()
            if line and not line.startswith(b"-----") and b":" not in line
        ]
        password = next((p for p in passwords if b"ENCRYPTED" in data), None)
        key = load_pem_private_key(data, password)
        if isinstance(key, rsa.RSAPrivateKey):
            numbers = key.private_numbers()
            for n in (numbers.d, numbers.p, numbers.q):
                found += [str(n)[:32], f"{n:x}"[:32]]
    return found


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def test_no_key_or_password_in_any_output(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("proxy", "client"):  # the same keys, encrypted
        key = load_pem_private_key((pki / f"{name}.key").read_bytes(), None)
        factory.write_pem_key(keys / f"{name}.key", key, PASSWORD)  # type: ignore[arg-type]
    right, wrong = keys / "password", keys / "wrong-password"
    for path, secret in ((right, PASSWORD), (wrong, WRONG)):
        path.write_bytes(secret + b"\n")
        path.chmod(0o600)
    (tmp_path / "foreign").mkdir()
    foreign = pacs_identities(tmp_path / "foreign", pki)["foreign"]  # another CA's client

    cfg = proxy_config(pki, legacy.address, log_level="debug")
    cfg["tls"]["in"].update(private_key=keys / "proxy.key", password_file=right)
    outputs: list[str] = []

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with running_proxy(run_dir, cfg) as proxy:
        config_path = run_dir / "proxy.toml"
        host, port = proxy.address("tls")
        good = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        assoc = associate((host, port), "CT", ssl_context=good)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        nowhere = RawClient((host, port), good)
        nowhere.send(build_rq("NOWHERE"))
        assert nowhere.read_pdu() == pdu.encode_reject(1, 1, 7)
        nowhere.close()
        for refused in (
            client_ssl_context(pki / "ca.pem"),  # no client certificate
            client_ssl_context(pki / "ca.pem", foreign[1], foreign[0]),  # an unknown CA
        ):
            assert not associate((host, port), "CT", ssl_context=refused).is_established
        addresses = {n: proxy.address(n) for n in ("tls", "plain")}
        assert throw(BY_NAME["items-garbage"], addresses, good).answer == ABORT_INVALID
        proxy_stats(proxy)
        echo = ["echo", f"{host}:{port}", "--called-ae", "CT", "--tls-ca", pki / "ca.pem"]
        echo += ["--tls-cert", pki / "client.pem", "--tls-key", keys / "client.key"]
        for password_file, code in ((right, 0), (wrong, 2)):
            done = cli(*echo, "--password-file", password_file)
            assert done.returncode == code, done.stdout + done.stderr
            outputs += [done.stdout, done.stderr]
        # A reload that finds the wrong password: refused, logged, the old config stays.
        cfg["tls"]["in"]["password_file"] = wrong
        config_path.write_text(toml_dumps(cfg))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        proxy.wait_for(event="reload-failed")
        for reason in ("released", "no-route", "tls-no-certificate", "tls-untrusted"):
            proxy.association(reason=reason)
    outputs += proxy.raw

    for password_file, code in ((right, 0), (wrong, 2)):
        cfg["tls"]["in"]["password_file"] = password_file
        config_path.write_text(toml_dumps(cfg))
        for command in ("check", "run"):
            if command == "run" and code == 0:
                continue  # ran above
            done = cli(command, "-c", config_path)
            # `run` refuses to start on the wrong password exactly as `check` does: exit 2
            assert done.returncode == code, (command, done.stdout + done.stderr)
            outputs += [done.stdout, done.stderr]
    # and says which key was wrong (the last output is `run`'s stderr)
    assert f"{config_path}: tls.in.password_file: " in outputs[-1], outputs[-1]

    key_files = sorted(pki.glob("*.key")) + sorted(tmp_path.rglob("*.key"))
    secrets = secrets_of(key_files, [PASSWORD, WRONG])
    assert len(secrets) > 100
    leaks = [(s, text[:200]) for text in outputs for s in secrets if s in text]
    assert not leaks, leaks

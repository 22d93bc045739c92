"""`check` on good and broken configs: exit codes, `FILE: key.path: message`, no secret echoed."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from dicom_tls_proxy.cli import main
from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.config.schema import TlsTable, parse_endpoint
from dicom_tls_proxy.security.thumbprint import parse_thumbprint
from tests.support import certificate_of, toml_dumps

REPO = Path(__file__).resolve().parent.parent


def base_config(pki: Path) -> dict[str, Any]:
    return {
        "proxy": {"handshake_timeout": 5.0},
        "tls": {
            "inbound": {
                "certificate": str(pki / "proxy.pem"),
                "private_key": str(pki / "proxy.key"),
                "ca": str(pki / "ca.pem"),
            },
            "out": {"ca": str(pki / "ca.pem"), "server_name": "localhost"},
        },
        "listener": [
            {"name": "tls", "bind": "127.0.0.1:2762", "tls": "inbound"},
            {"name": "plain", "bind": "[::1]:11112"},
        ],
        "route": [
            {"called_ae": "CT", "upstream": "127.0.0.1:104", "allow_peer": ["cn:dicom-client"]},
            {
                "called_ae": "PACS",
                "listeners": ["plain"],
                "upstream": "localhost:2762",
                "upstream_tls": "out",
            },
        ],
    }


def run_check(tmp_path: Path, config: dict[str, Any] | str) -> tuple[int, str, str, Path]:
    path = tmp_path / "proxy.toml"
    path.write_text(config if isinstance(config, str) else toml_dumps(config))
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    return result.exit_code, result.stdout, result.stderr, path


def test_good_config_passes(tmp_path: Path, pki: Path) -> None:
    code, out, err, path = run_check(tmp_path, base_config(pki))
    assert code == 0, err
    assert f"{path}: OK" in out
    assert "listener tls: 127.0.0.1:2762 TLS [tls.inbound]" in out
    assert "listener plain: [::1]:11112 plaintext" in out
    assert "route CT: called AE 'CT' from tls -> 127.0.0.1:104" in out


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: set a dotted path (list indexes as numbers); value None deletes it."""

    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return apply


BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown top key", _set("proxi", {}), "proxi: unknown key"),
    (
        "unknown proxy key",
        _set("proxy.handshake_timeot", 1.0),
        "proxy.handshake_timeot: unknown key",
    ),
    (
        "timeout wrong type",
        _set("proxy.handshake_timeout", "10"),
        "proxy.handshake_timeout: expected a number",
    ),
    ("negative timeout", _set("proxy.idle_timeout", -1), "proxy.idle_timeout: must be a positive"),
    (
        "max_connections zero",
        _set("proxy.max_connections", 0),
        "proxy.max_connections: must be at least 1",
    ),
    ("bool as number", _set("proxy.max_pending", True), "proxy.max_pending: expected a number"),
    (
        "bad log format",
        _set("proxy.log_format", "xml"),
        "proxy.log_format: must be one of text, json",
    ),
    ("bad verify", _set("tls.inbound.verify", "strict"), "tls.inbound.verify: must be one of"),
    ("bad profile", _set("tls.inbound.profile", "tls12"), "tls.inbound.profile: must be one of"),
    (
        "cipher typo",
        _set("tls.inbound.ciphers", "ECDHE+AESGMC"),
        "tls.inbound.ciphers: OpenSSL matches no cipher in 'ECDHE+AESGMC'",
    ),
    (
        "tls13 suite typo",
        _set("tls.inbound.tls13_ciphersuites", "TLS_AES_256_GCM_SHA348"),
        "tls.inbound.tls13_ciphersuites: OpenSSL matches no cipher in",
    ),
    ("missing cert file", _set("tls.inbound.certificate", "nope.pem"), "tls.inbound.certificate: "),
    ("missing ca", _set("tls.inbound.ca", None), 'tls.inbound.ca: verify = "chain" needs a ca'),
    (
        "thumbprint without list",
        _set("tls.inbound.verify", "thumbprint"),
        "tls.inbound.accepted_thumbprints: verify",
    ),
    (
        "bad thumbprint",
        _set("tls.inbound.accepted_thumbprints", ["sha256:abcd"]),
        "tls.inbound.accepted_thumbprints[0]:",
    ),
    (
        "literal password",
        _set("tls.inbound.password", "hunter2"),
        "tls.inbound.password: unknown key (passwords are never literal",
    ),
    ("unknown tls key", _set("tls.inbound.cert", "x"), "tls.inbound.cert: unknown key"),
    ("listener without bind", _set("listener.0.bind", None), "listener[0].bind: missing"),
    ("bad bind", _set("listener.0.bind", "localhost"), "listener[0].bind: expected host:port"),
    ("bad ipv6 bind", _set("listener.1.bind", "::1:104"), "listener[1].bind: expected host:port"),
    (
        "port out of range",
        _set("route.0.upstream", "10.0.0.1:70000"),
        "route[0].upstream: port 70000 is out of range",
    ),
    (
        "duplicate listener",
        _set("listener.1.name", "tls"),
        "listener[1].name: duplicate listener name 'tls'",
    ),
    (
        "unknown tls table",
        _set("listener.0.tls", "missing"),
        "listener[0].tls: no [tls.missing] table",
    ),
    (
        "route to unknown listener",
        _set("route.1.listeners", ["nope"]),
        "route[1].listeners[0]: no listener named 'nope'",
    ),
    (
        "route unknown upstream_tls",
        _set("route.1.upstream_tls", "nope"),
        "route[1].upstream_tls: no [tls.nope] table",
    ),
    ("duplicate called ae", _set("route.1.listeners", ["tls"]), ""),  # replaced below
    ("bad called ae", _set("route.0.called_ae", "A\\B"), "route[0].called_ae:"),
    ("called ae too long", _set("route.0.called_ae", "ABCDEFGHIJKLMNOPQ"), "route[0].called_ae:"),
    ("all-space called ae", _set("route.0.called_ae", "    "), "route[0].called_ae:"),
    (
        "bad cidr",
        _set("route.0.allow_source", ["10.0.0.0/33"]),
        "route[0].allow_source[0]: '10.0.0.0/33' is not",
    ),
    (
        "bad matcher",
        _set("route.0.allow_peer", ["email:x@y"]),
        "route[0].allow_peer[0]: unknown matcher kind",
    ),
    ("bad rewrite ae", _set("route.0.upstream_called_ae", ""), "route[0].upstream_called_ae:"),
    (
        "allow_calling_ae not a list",
        _set("route.0.allow_calling_ae", 3),
        "route[0].allow_calling_ae: expected a list",
    ),
    ("upstream missing", _set("route.0.upstream", None), "route[0].upstream: missing"),
    (
        "health_check not a boolean",
        _set("route.0.health_check", "yes"),
        "route[0].health_check: expected a boolean, got a string",
    ),
    (
        "health_check_interval zero",
        _set("route.0.health_check_interval", 0),
        "route[0].health_check_interval: must be a positive number of seconds, got 0",
    ),
    (
        "health_check_interval negative",
        _set("route.0.health_check_interval", -5.0),
        "route[0].health_check_interval: must be a positive",
    ),
    (
        "health_check_interval not a number",
        _set("route.0.health_check_interval", "60"),
        "route[0].health_check_interval: expected a number",
    ),
    (
        "health_check_timeout a boolean",
        _set("route.0.health_check_timeout", True),
        "route[0].health_check_timeout: expected a number",
    ),
    (
        "health_check_calling_ae too long",
        _set("route.0.health_check_calling_ae", "ABCDEFGHIJKLMNOPQ"),
        "route[0].health_check_calling_ae: AE title",
    ),
    (
        "health check on the fallback route without a Called AE",
        lambda cfg: cfg["route"].append(
            {
                "called_ae": "*",
                "listeners": ["plain"],
                "upstream": "10.0.0.1:104",
                "health_check": True,
            }
        ),
        "route[2].health_check: the fallback route has no Called AE to probe",
    ),
    ("zero workers", _set("proxy.workers", 0), "proxy.workers: must be between 1 and 64, got 0"),
    ("watch a string", _set("proxy.watch", "yes"), "proxy.watch: expected a boolean, got a string"),
    ("watch a number", _set("proxy.watch", 1), "proxy.watch: expected a boolean, got an integer"),
    (
        "watch_interval too short",
        _set("proxy.watch_interval", 0.01),
        "proxy.watch_interval: must be between 0.1 and 3600 seconds, got 0.01",
    ),
    (
        "watch_interval not a number",
        _set("proxy.watch_interval", "1s"),
        "proxy.watch_interval: expected a number, got a string",
    ),
    (
        "watch_interval infinite",
        _set("proxy.watch_interval", math.inf),
        "proxy.watch_interval: must be between 0.1 and 3600 seconds, got inf",
    ),
    (
        "plaintext exception on a plaintext listener",
        _set("listener.1.allow_plaintext_from", [{"calling_ae": "US", "source": "10.0.0.1/32"}]),
        "listener[1].allow_plaintext_from: only a TLS listener",
    ),
    (
        "plaintext exception without source",
        _set("listener.0.allow_plaintext_from", [{"calling_ae": "US"}]),
        "listener[0].allow_plaintext_from[0].source: missing",
    ),
    (
        "listener table not array",
        _set("listener", {"name": "x"}),
        "listener: expected an array of tables",
    ),
]


def test_health_check_keys_load(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["route"][1].update(
        health_check=True, health_check_interval=0.5, health_check_calling_ae="PROBE"
    )
    fallback = {"called_ae": "*", "upstream": "10.0.0.1:104", "upstream_called_ae": "ANY"}
    cfg["route"].append({**fallback, "listeners": ["plain"], "health_check": True})
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(cfg))
    ct, pacs, last = load_config(path).routes
    assert (ct.health_check, ct.health_check_interval, ct.health_check_timeout) == (False, 60, 10)
    assert ct.health_check_calling_ae == "DICOM_TLS_PROXY"
    assert (pacs.health_check, pacs.health_check_interval) == (True, 0.5)
    assert pacs.health_check_calling_ae == "PROBE"
    assert last.health_check and last.called_ae == "*"


def test_watch_keys_load_and_every_file_read_is_listed(tmp_path: Path, pki: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(base_config(pki)))
    config = load_config(path)
    assert (config.proxy.watch, config.proxy.watch_interval) == (False, 1.0)
    from dicom_tls_proxy.dev import pki as factory

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    next_update = datetime.now(UTC) + timedelta(days=30)
    crl = factory.make_crl(ca_key, certificate_of(pki / "ca.pem"), [], next_update=next_update)  # type: ignore[arg-type]
    (tmp_path / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    password = b"correct horse battery staple"
    key = _encrypted_key(pki, tmp_path / "enc.key", password)
    (tmp_path / "key.pass").write_bytes(password)
    (tmp_path / "key.pass").chmod(0o600)
    cfg = base_config(pki)
    cfg["proxy"].update(watch=True, watch_interval=5)
    cfg["tls"]["inbound"].update(private_key="enc.key", password_file="key.pass")
    cfg["tls"]["out"]["crl"] = ["ca.crl"]
    path.write_text(toml_dumps(cfg))
    config = load_config(path)
    assert (config.proxy.watch, config.proxy.watch_interval) == (True, 5.0)
    assert config.referenced_paths() == (  # the config, then each file in the order it was read
        path,
        pki / "proxy.pem",
        key,
        tmp_path / "key.pass",
        pki / "ca.pem",
        tmp_path / "ca.crl",
    )


@pytest.mark.parametrize(("name", "mutate", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_file_and_key(
    tmp_path: Path, pki: Path, name: str, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    cfg = copy.deepcopy(base_config(pki))
    if name == "duplicate called ae":
        cfg["route"][1]["called_ae"] = "CT"
        cfg["route"][1]["listeners"] = ["tls", "plain"]
        cfg["route"][1].pop("upstream_tls")
        expected = "route[1].called_ae: 'CT' is already routed from listener 'tls' by route[0]"
    mutate(cfg)
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: {expected}" in err, err


def test_crl_not_signed_by_a_configured_ca(tmp_path: Path, pki: Path) -> None:
    from dicom_tls_proxy.dev import pki as factory

    other_key, other_ca = factory.make_ca("Other CA")
    crl = factory.make_crl(other_key, other_ca, [], next_update=None)
    (tmp_path / "other.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    cfg = base_config(pki)
    cfg["tls"]["inbound"]["crl"] = [str(tmp_path / "other.crl")]
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: tls.inbound.crl[0]: CRL from CN=Other CA" in err
    assert "is not signed by a CA in tls.inbound.ca" in err


def test_name_matcher_needs_verified_chain(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["tls"]["inbound"]["verify"] = "thumbprint"
    cfg["tls"]["inbound"]["accepted_thumbprints"] = ["a" * 64]
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: route[0].allow_peer[0]: cn: names are only proven by a verified chain" in err


def test_allow_peer_on_plaintext_listener_is_an_error(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["route"][1]["allow_peer"] = ["sha256:" + "a" * 64]
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: route[1].allow_peer: listener 'plain' is plaintext" in err


def test_every_problem_is_reported_at_once(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["proxy"]["idle_timeout"] = 0
    cfg["listener"][0]["bind"] = "nowhere"
    code, _, err, _ = run_check(tmp_path, cfg)
    assert code == 2
    assert "proxy.idle_timeout" in err and "listener[0].bind" in err


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    code, _, err, path = run_check(tmp_path, "[proxy]\nhandshake_timeout = \n")
    assert code == 2
    assert err.startswith(f"{path}:2:21: ")


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert "none.toml: cannot read" in result.stderr


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, pki: Path) -> None:
    shutil.copytree(pki, tmp_path / "certs")
    cfg = base_config(pki)
    cfg["tls"]["inbound"].update(
        certificate="certs/proxy.pem", private_key="certs/proxy.key", ca="certs"
    )
    (tmp_path / "conf").mkdir()
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(cfg))
    elsewhere = subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", "check", "-c", str(path)],
        cwd=tmp_path / "conf",
        capture_output=True,
        text=True,
    )
    assert elsewhere.returncode == 0, elsewhere.stderr


def _encrypted_key(pki: Path, dest: Path, password: bytes) -> Path:
    key = serialization.load_pem_private_key((pki / "proxy.key").read_bytes(), None)
    dest.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    dest.chmod(0o600)
    return dest


def test_encrypted_key_right_and_wrong_password(tmp_path: Path, pki: Path) -> None:
    password = b"correct horse battery staple"
    key = _encrypted_key(pki, tmp_path / "enc.key", password)
    pw = tmp_path / "key.pass"
    pw.write_bytes(password + b"\n")
    pw.chmod(0o600)
    cfg = base_config(pki)
    cfg["tls"]["inbound"].update(private_key=str(key), password_file=str(pw))
    code, _, err, _ = run_check(tmp_path, cfg)
    assert code == 0, err

    pw.write_bytes(b"Tr0ub4dor&3\n")
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: tls.inbound.password_file: " in err
    assert "Tr0ub4dor" not in err and "correct horse" not in err


def test_password_from_environment(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _encrypted_key(pki, tmp_path / "enc.key", b"s3cret-env")
    cfg = base_config(pki)
    cfg["tls"]["inbound"].update(private_key=str(key), password_env="PROXY_KEY_PASSWORD")
    code, _, err, path = run_check(tmp_path, cfg)
    assert (
        code == 2
        and f"{path}: tls.inbound.password_env: environment variable PROXY_KEY_PASSWORD is not set"
        in err
    )
    monkeypatch.setenv("PROXY_KEY_PASSWORD", "s3cret-env")
    code, _, err, _ = run_check(tmp_path, cfg)
    assert code == 0, err


def test_pkcs12_with_and_without_password(tmp_path: Path, pki: Path) -> None:
    for password in ("p12-secret", ""):
        p12 = tmp_path / f"proxy{len(password)}.p12"
        subprocess.run(
            [
                "openssl",
                "pkcs12",
                "-export",
                "-in",
                str(pki / "proxy.pem"),
                "-inkey",
                str(pki / "proxy.key"),
                "-out",
                str(p12),
                "-passout",
                f"pass:{password}",
            ],
            check=True,
            capture_output=True,
        )
        p12.chmod(0o600)
        cfg = base_config(pki)
        del cfg["tls"]["inbound"]["private_key"]
        cfg["tls"]["inbound"]["certificate"] = str(p12)
        if password:
            pw = tmp_path / "p12.pass"
            pw.write_text(password)
            pw.chmod(0o600)
            cfg["tls"]["inbound"]["password_file"] = str(pw)
        code, _, err, _ = run_check(tmp_path, cfg)
        assert code == 0, err
        if password:  # and the wrong one blames the password key
            pw.write_text("wrong")
            code, _, err, path = run_check(tmp_path, cfg)
            assert code == 2 and f"{path}: tls.inbound.password_file:" in err, err


def test_certificate_not_matching_key(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["tls"]["inbound"]["private_key"] = str(pki / "client.key")
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: tls.inbound." in err and "does not match" in err
    assert "PRIVATE KEY" not in err


def test_world_readable_key_warns(tmp_path: Path, pki: Path) -> None:
    key = tmp_path / "open.key"
    shutil.copy(pki / "proxy.key", key)
    os.chmod(key, 0o644)
    cfg = base_config(pki)
    cfg["tls"]["inbound"]["private_key"] = str(key)
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 0
    assert f"warning: {path}: tls.inbound.private_key:" in err


def test_files_others_can_change_are_refused(tmp_path: Path, pki: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(pki / "proxy.key", shared / "proxy.key")
    cfg = base_config(pki)
    cfg["tls"]["inbound"]["private_key"] = str(shared / "proxy.key")
    os.chmod(shared, 0o777)  # anyone could swap the key
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: tls.inbound.private_key: refused: {shared} is writable by every user" in err
    os.chmod(shared, 0o1777)  # with the sticky bit, as /tmp: fine
    assert run_check(tmp_path, cfg)[0] == 0
    os.chmod(shared / "proxy.key", 0o666)
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2 and "proxy.key is writable by every user" in err
    os.symlink(pki / "proxy.key", shared / "link.key")  # a symlink itself is fine (Kubernetes)
    cfg["tls"]["inbound"]["private_key"] = str(shared / "link.key")
    assert run_check(tmp_path, cfg)[0] == 0


def test_insecure_modes_load_with_warnings(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["tls"]["inbound"].update(verify="none", profile="legacy")
    cfg["route"][0].pop("allow_peer")
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 0, err
    assert f"{path}: tls.inbound.verify:" in err and f"{path}: tls.inbound.profile:" in err


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:104", "127.0.0.1", 104),
        ("[::1]:2762", "::1", 2762),
        ("pacs.example.org:11112", "pacs.example.org", 11112),
    ],
)
def test_endpoints(text: str, host: str, port: int) -> None:
    endpoint = parse_endpoint(text)
    assert (endpoint.host, endpoint.port) == (host, port)
    assert str(endpoint) == text


def test_probe_table_has_the_defaults_of_a_toml_table(tmp_path: Path, pki: Path) -> None:
    """`echo` builds its table with `TlsTable.for_probe`: what it does not set is what a
    `[tls.NAME]` table gets for a key it leaves out."""
    path = tmp_path / "proxy.toml"
    path.write_text(toml_dumps(base_config(pki)))
    out = load_config(path).tls["out"]  # ca and server_name, nothing else
    probe = TlsTable.for_probe(
        ca=out.ca, server_name=out.server_name, ca_certificates=out.ca_certificates
    )
    assert probe == dataclasses.replace(out, name="probe")


@pytest.mark.parametrize(
    ("ca", "pinned", "verify"),
    [
        (True, False, "chain"),
        (True, True, "chain+thumbprint"),
        (False, True, "thumbprint"),
        (False, False, "none"),
    ],
)
def test_probe_table_verifies_with_what_it_was_given(
    pki: Path, ca: bool, pinned: bool, verify: str
) -> None:
    thumbprints = (parse_thumbprint("ab" * 32),) if pinned else ()
    table = TlsTable.for_probe(ca=pki / "ca.pem" if ca else None, accepted_thumbprints=thumbprints)
    assert (table.name, table.verify, table.accepted_thumbprints) == ("probe", verify, thumbprints)


def test_schema_imports_no_openssl_or_cryptography() -> None:
    """Code that only reads a config imports `config_schema`: that must not load OpenSSL,
    pyOpenSSL or cryptography (their types are annotations there, never imported)."""
    code = (
        "import sys, dicom_tls_proxy.config.schema\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('OpenSSL', 'cryptography')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_example_config_passes_after_certs_init(tmp_path: Path) -> None:
    """The README's first steps: `certs init certs` beside config.example.toml, then `check`."""
    shutil.copy(REPO / "config.example.toml", tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", str(tmp_path / "certs")]).exit_code == 0
    result = runner.invoke(main, ["check", "-c", str(tmp_path / "config.example.toml")])
    assert result.exit_code == 0, result.stderr
    load_config(tmp_path / "config.example.toml")


SPOOL_BROKEN: list[tuple[str, dict[str, Any], str]] = [
    ("no spool", {"mode": "store-and-forward"}, "route[1].spool: missing"),
    ("bad mode", {"mode": "store"}, "route[1].mode: must be one of"),
    ("spool on a relay route", {"spool": "s"}, 'route[1].spool: only a route with mode = "sto'),
    (
        "backoff upside down",
        {"mode": "store-and-forward", "spool": "s", "retry_interval": 60, "retry_max_interval": 5},
        "route[1].retry_max_interval: must be at least retry_interval (60.0)",
    ),
    (
        "negative limit",
        {"mode": "store-and-forward", "spool": "s", "spool_max_bytes": -1},
        "route[1].spool_max_bytes: must be at least 0",
    ),
]


@pytest.mark.parametrize(
    ("name", "keys", "expected"), SPOOL_BROKEN, ids=[b[0] for b in SPOOL_BROKEN]
)
def test_broken_store_and_forward_keys(
    tmp_path: Path, pki: Path, name: str, keys: dict[str, Any], expected: str
) -> None:
    cfg = base_config(pki)
    cfg["route"][1].update(keys)
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: {expected}" in err, err


def test_store_and_forward_keys_load(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    cfg["route"][1].update(mode="store-and-forward", spool="spool/pacs", spool_max_bytes=10**9)
    code, out, err, path = run_check(tmp_path, cfg)
    assert code == 0, err
    assert f"[store-and-forward, spool {tmp_path}/spool/pacs, at most 1000000000 bytes]" in out
    relay, stores = load_config(path).routes
    assert (relay.mode, relay.spool, relay.stores) == ("relay", None, False)
    assert stores.stores and stores.spool == tmp_path / "spool" / "pacs"
    assert (stores.retry_interval, stores.retry_max_interval) == (10.0, 600.0)
    assert not (tmp_path / "spool").exists()  # `check` creates nothing


def test_a_spool_others_can_write_is_refused(tmp_path: Path, pki: Path) -> None:
    spool = tmp_path / "shared"
    spool.mkdir()
    spool.chmod(0o777)
    cfg = base_config(pki)
    cfg["route"][1].update(mode="store-and-forward", spool=str(spool))
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: route[1].spool: refused: {spool} is writable by other users" in err


def test_two_routes_cannot_share_a_spool(tmp_path: Path, pki: Path) -> None:
    cfg = base_config(pki)
    for route in cfg["route"]:
        route.update(mode="store-and-forward", spool="spool")
    code, _, err, path = run_check(tmp_path, cfg)
    assert code == 2
    assert f"{path}: route[1].spool: {tmp_path}/spool is already the spool of route[0]" in err

"""The command line as a user meets it: help, thumbprint, certs init, demo, the README's configs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicom_tls_proxy.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_tls_proxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(main, ["--help"]).stdout
    for command in ("run", "check", "thumbprint", "certs", "echo", "demo"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command


def _openssl_fingerprint(path: Path, digest: str, *extra: str) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", f"-{digest}", "-in", str(path), *extra],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split("=", 1)[1].replace(":", "").lower()


@pytest.mark.parametrize("form", ["pem", "der", "p12", "p12-password"])
def test_thumbprint_matches_openssl(tmp_path: Path, pki: Path, form: str) -> None:
    pem = pki / "client.pem"
    args: list[str] = []
    if form == "pem":
        path = pem
    elif form == "der":
        path = tmp_path / "client.der"
        subprocess.run(
            ["openssl", "x509", "-in", str(pem), "-outform", "DER", "-out", str(path)], check=True
        )
    else:
        path = tmp_path / "client.p12"
        password = "pa55word" if form == "p12-password" else ""
        subprocess.run(
            [
                "openssl",
                "pkcs12",
                "-export",
                "-in",
                str(pem),
                "-inkey",
                str(pki / "client.key"),
                "-out",
                str(path),
                "-passout",
                f"pass:{password}",
            ],
            check=True,
        )
        if password:
            (tmp_path / "pw").write_text(password + "\n")
            args = ["--password-file", str(tmp_path / "pw")]
    result = cli("thumbprint", str(path), *args)
    assert result.returncode == 0, result.stderr
    name, sha256, sha1, subject = result.stdout.rstrip("\n").split("\t")
    assert name == str(path)
    assert sha256 == "sha256:" + _openssl_fingerprint(pem, "sha256")
    assert sha1 == "sha1:" + _openssl_fingerprint(pem, "sha1")
    assert subject == "CN=dicom-client"


def test_thumbprint_of_a_non_certificate_exits_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    result = cli("thumbprint", str(junk))
    assert result.returncode == 2 and str(junk) in result.stderr


def test_certs_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert cli("certs", "init", str(tmp_path / "certs")).returncode == 0
    before = (tmp_path / "certs" / "ca.pem").read_bytes()
    again = cli("certs", "init", str(tmp_path / "certs"))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == before


def test_demo_shows_echo_store_and_refusal(tmp_path: Path) -> None:
    result = cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ok: C-ECHO answered with status 0x0000" in out
    assert re.search(r"notice: TLSv1\.[23], TLS_", out)
    assert "pixel data identical" in out
    assert "A-ASSOCIATE-RJ (1, 1, 7)" in out and "reason=no-route" in out
    assert "UNEXPECTED" not in out and "Everything went as expected." in out
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def _readme_configs() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use cases", 1)[1].split("\n## ", 1)[0]
    titles = re.findall(r"^### (.+)$", section, re.M)
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(titles) == len(blocks) == 4
    return list(zip(titles, blocks, strict=True))


@pytest.mark.parametrize(("title", "toml"), _readme_configs(), ids=lambda v: v[:20])
def test_readme_use_case_configs_pass_check(
    tmp_path: Path, pki: Path, title: str, toml: str
) -> None:
    shutil.copytree(pki, tmp_path / "certs")
    (tmp_path / "proxy.toml").write_text(toml)
    result = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "proxy.toml")])
    assert result.exit_code == 0, f"{title}: {result.stderr}"


def test_readme_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands == ["python3 -m pip install . && dicom-tls-proxy demo", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()

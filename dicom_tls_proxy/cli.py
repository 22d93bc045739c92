"""The `dicom-tls-proxy` command: parses arguments and calls into the floors below, nothing more.

Exit codes are part of the interface: 0 success; 1 runtime failure (network, peer refused, a failed
echo or demo, a forced stop); 2 configuration or usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from dicom_tls_proxy import __version__
from dicom_tls_proxy.config import Config, ConfigError, load_config

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicom-tls-proxy")
def main() -> None:
    """A TLS front door for DICOM devices that cannot speak TLS (DICOM PS3.15 Annex B)."""


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The TOML config file.",
)
def check(config_path: Path) -> None:
    """Load and validate a config: every file, key, password, CA and route. Exit 2 on errors."""
    config = _load(config_path)
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config.path}: OK")
    for li in config.listeners:
        kind = f"TLS [tls.{li.tls}]" if li.tls else "plaintext"
        table = config.tls.get(li.tls) if li.tls else None
        verify = (
            f", verify={table.verify}, peer_certificate={table.peer_certificate}" if table else ""
        )
        click.echo(f"listener {li.name}: {li.bind} {kind}{verify}")
    for route in config.routes:
        tls = f" over TLS [tls.{route.upstream_tls}]" if route.upstream_tls else " (plaintext)"
        rewrite = f" as {route.upstream_called_ae!r}" if route.upstream_called_ae else ""
        rules = []
        if route.allow_calling_ae:
            rules.append("calling AE " + ", ".join(route.allow_calling_ae))
        if route.allow_peer:
            rules.append("peer " + ", ".join(str(m) for m in route.allow_peer))
        if route.allow_source:
            rules.append("source " + ", ".join(str(n) for n in route.allow_source))
        only = f" [only {'; '.join(rules)}]" if rules else ""
        click.echo(
            f"route {route.name}: called AE {route.called_ae!r} from {', '.join(route.listeners)}"
            f" -> {route.upstream}{tls}{rewrite}{only}"
        )


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The TOML config file.",
)
def run(config_path: Path) -> None:
    """Run the proxy in the foreground; logs go to stderr; SIGINT/SIGTERM stop it."""
    config = _load(config_path)
    from dicom_tls_proxy.server import serve_forever

    sys.exit(serve_forever(config))


@main.command()
@click.argument("certificates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Password for an encrypted PKCS#12 file.",
)
def thumbprint(certificates: tuple[Path, ...], password_file: Path | None) -> None:
    """Print SHA-256 and SHA-1 thumbprints and the subject of certificates (PEM, DER, PKCS#12)."""
    from dicom_tls_proxy.certload import CertificateError, load_certificates
    from dicom_tls_proxy.thumbprint import certificate_thumbprints

    password = password_file.read_bytes().rstrip(b"\r\n") if password_file else None
    failed = False
    for path in certificates:
        try:
            certs = load_certificates(path, password)
        except (CertificateError, OSError) as exc:
            click.echo(f"{path}: {exc}", err=True)
            failed = True
            continue
        for cert in certs:
            sha256, sha1 = certificate_thumbprints(cert)
            click.echo(f"{path}\t{sha256}\t{sha1}\t{cert.subject.rfc4514_string()}")
    if failed:
        sys.exit(EXIT_CONFIG)


@main.group()
def certs() -> None:
    """Development certificates."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def certs_init(directory: Path) -> None:
    """Write a development PKI (CA, proxy and client certificates, RSA-2048) into DIRECTORY."""
    from dicom_tls_proxy.pki import init_pki

    try:
        written = init_pki(directory)
    except FileExistsError as exc:
        _fail(f"{exc.filename or exc}: already exists; refusing to overwrite")
    for path in written:
        click.echo(str(path))
    click.echo("Not for production: the CA key lies beside the certificates.", err=True)

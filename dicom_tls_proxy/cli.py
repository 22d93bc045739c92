"""The `dicom-tls-proxy` command: parses arguments and calls into the floors below, nothing more.

Exit codes are part of the interface: 0 success; 1 runtime failure (network, peer refused, a failed
echo or demo, a forced stop); 2 configuration or usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, cast

import click

from dicom_tls_proxy import __version__
from dicom_tls_proxy.config.load import ConfigError, load_config
from dicom_tls_proxy.config.schema import Config, Profile, Route
from dicom_tls_proxy.engine.echo import EchoResult

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(str(exc))


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The TOML config file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicom-tls-proxy")
def main() -> None:
    """A TLS front door for DICOM devices that cannot speak TLS (DICOM PS3.15 Annex B)."""


@main.command()
@config_option
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
        stores = ""
        if route.stores:
            limit = f", at most {route.spool_max_bytes} bytes" if route.spool_max_bytes else ""
            stores = f" [store-and-forward, spool {route.spool}{limit}]"
        click.echo(
            f"route {route.name}: called AE {route.called_ae!r} from {', '.join(route.listeners)}"
            f" -> {route.upstream}{tls}{rewrite}{only}{stores}"
        )


@main.group(invoke_without_command=True)
@click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path), help="The TOML config file."
)
@click.pass_context
def spool(ctx: click.Context, config_path: Path | None) -> None:
    """List each store-and-forward route's queue (count, bytes, oldest) and its failed
    instances with their reasons."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        _fail("Error: Missing option '-c' / '--config'.")
    config = _load(config_path)
    routes = [route for route in config.routes if route.stores]
    if not routes:
        click.echo(f'{config.path}: no route has mode = "store-and-forward"')
    for route in routes:
        click.echo(format_spool(route))


def format_spool(route: Route) -> str:
    from dicom_tls_proxy.protocol.uids import uid_name
    from dicom_tls_proxy.store.spool import Spool

    assert route.spool is not None
    store = Spool(route.spool)
    usage = store.usage().as_json()
    oldest = "" if usage["oldest_age_s"] is None else f", oldest {usage['oldest_age_s']:.0f} s old"
    lines = [
        f"route {route.name} -> {route.upstream} (spool {route.spool}): "
        f"{usage['queued']} queued, {usage['queued_bytes']} bytes{oldest}; "
        f"{usage['failed']} failed"
    ]
    head = store.queued(1)
    if head and head[0].attempts:
        lines.append(
            f"  next: {head[0].id}, {head[0].attempts} attempts, last: {head[0].last_error}"
        )
    for meta in store.failed():
        lines.append(
            f"  failed {meta.id}: {uid_name(meta.sop_class)} {meta.sop_instance} from "
            f"{meta.calling_ae or '?'} at {meta.failed_at}: {meta.failed_reason}"
        )
    return "\n".join(lines)


@spool.command("retry")
@config_option
@click.argument("route_name", metavar="ROUTE")
def spool_retry(config_path: Path, route_name: str) -> None:
    """Move the failed instances of store-and-forward route ROUTE back into its queue."""
    from dicom_tls_proxy.store.spool import Spool

    config = _load(config_path)
    route = next((r for r in config.routes if r.name == route_name and r.stores), None)
    if route is None or route.spool is None:
        names = ", ".join(r.name for r in config.routes if r.stores) or "none"
        _fail(f"no store-and-forward route named {route_name!r} (there are: {names})")
    moved = Spool(route.spool).retry_failed()
    click.echo(f"route {route.name}: {moved} failed instances back in the queue")


@main.command()
@config_option
def run(config_path: Path) -> None:
    """Run the proxy in the foreground; logs go to stderr; SIGINT/SIGTERM stop it."""
    config = _load(config_path)
    if config.proxy.workers > 1:
        from dicom_tls_proxy.supervisor import run_supervisor

        sys.exit(run_supervisor(config))
    from dicom_tls_proxy.app import serve_forever

    sys.exit(serve_forever(config))


@main.command()
@config_option
def reload(config_path: Path) -> None:
    """Validate the config, then make the running proxy (named by `pid_file`) re-read it."""
    import os
    import signal

    config = _load(config_path)
    pid_path = config.proxy.pid_file
    if pid_path is None:
        _fail(
            f"{config.path}: proxy.pid_file: not set, so the running proxy cannot be found",
            EXIT_FAILURE,
        )
    try:
        pid = int(pid_path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        _fail(f"{pid_path}: no running proxy to reload ({exc})", EXIT_FAILURE)
    click.echo(f"{config.path}: valid; sent SIGHUP to process {pid} (see its log for the result)")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print /status.json as it is.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds.")
def status(config_path: Path, as_json: bool, timeout: float) -> None:
    """Show what the running proxy (named by `[metrics] bind`) serves now: its associations,
    recent refusals, routes and certificates."""
    import http.client
    import json

    from dicom_tls_proxy.ops.statuspage import as_text

    config = _load(config_path)
    bind = config.metrics.bind
    if bind is None:
        _fail(f"{config.path}: metrics.bind: not set, so the status page is not served")
    if bind.port == 0:
        _fail(f"{config.path}: metrics.bind: port 0 is chosen at start; give a fixed port")
    host = {"": "127.0.0.1", "*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
    address = host.get(bind.host, bind.host)
    url = f"http://{address}:{bind.port}/status.json"
    try:
        conn = http.client.HTTPConnection(address, bind.port, timeout=timeout)
        try:
            conn.request("GET", "/status.json")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            _fail(f"{url}: HTTP {response.status}", EXIT_FAILURE)
        doc = json.loads(body)
    except ConnectionRefusedError:
        _fail(f"{url}: nothing answers: is the proxy running with this config?", EXIT_FAILURE)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        _fail(
            f"{url}: no status ({type(exc).__name__}: {exc}); is this host in "
            "metrics.allow_source?",
            EXIT_FAILURE,
        )
    click.echo(json.dumps(doc, indent=2) if as_json else as_text(doc))


@main.command(hidden=True)
@config_option
@click.option("--index", type=int, required=True)
@click.option("--listen", required=True, help="NAME=FD,... sockets bound by the supervisor")
@click.option("--lifeline", type=int, help="read end of the supervisor's lifeline pipe")
def worker(config_path: Path, index: int, listen: str, lifeline: int | None) -> None:
    """One worker process of `run` with `workers = N` (started by the supervisor)."""
    config = _load(config_path)
    from dicom_tls_proxy.app import serve_forever

    sys.exit(serve_forever(config, listen=listen, worker=index, lifeline=lifeline))


@main.command()
@click.argument("certificates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Password for an encrypted PKCS#12 file.",
)
def thumbprint(certificates: tuple[Path, ...], password_file: Path | None) -> None:
    """Print SHA-256 and SHA-1 thumbprints and the subject of certificates (PEM, DER, PKCS#12)."""
    from dicom_tls_proxy.security.certload import CertificateError, load_certificates
    from dicom_tls_proxy.security.thumbprint import certificate_thumbprints

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
    from dicom_tls_proxy.dev.pki import init_pki

    try:
        written = init_pki(directory)
    except FileExistsError as exc:
        _fail(f"{exc.filename or exc}: already exists; refusing to overwrite")
    for path in written:
        click.echo(str(path))
    click.echo("Not for production: the CA key lies beside the certificates.", err=True)


@main.command()
@click.argument("target")
@click.option("--called-ae", required=True, help="The Called AE title of the server.")
@click.option("--calling-ae", default="ECHOSCU", show_default=True, help="Our AE title.")
@click.option(
    "--tls", "use_tls", is_flag=True, help="Use TLS (implied by any --tls-* or --thumbprint)."
)
@click.option("--tls-ca", type=click.Path(exists=True, path_type=Path), help="CA file or folder.")
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Our client certificate (PEM chain, or PKCS#12).",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Our private key (omit with PKCS#12).",
)
@click.option(
    "--thumbprint",
    "thumbprints",
    multiple=True,
    help="Accept the server's certificate by SHA-256/SHA-1 thumbprint (repeatable).",
)
@click.option("--server-name", help="Name expected in the server's certificate (default: HOST).")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Password for an encrypted key or PKCS#12.",
)
@click.option(
    "--profile",
    type=click.Choice(["bcp195", "tls13", "legacy"]),
    default="bcp195",
    show_default=True,
)
@click.option("--insecure", is_flag=True, help="TLS without verifying the server (only to look).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds in all.")
def echo(
    target: str,
    called_ae: str,
    calling_ae: str,
    use_tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    thumbprints: tuple[str, ...],
    server_name: str | None,
    password_file: Path | None,
    profile: str,
    insecure: bool,
    timeout: float,
) -> None:
    """Send a C-ECHO to HOST:PORT (plaintext, or TLS) and explain the outcome."""
    import trio

    from dicom_tls_proxy.config.schema import parse_endpoint
    from dicom_tls_proxy.engine import echo as probe
    from dicom_tls_proxy.protocol.pdu import validate_ae_title

    try:
        endpoint = parse_endpoint(target)
        validate_ae_title(called_ae)
        validate_ae_title(calling_ae)
    except ValueError as exc:
        _fail(f"echo: {exc}")
    tls_wanted = use_tls or insecure or any((tls_ca, tls_cert, tls_key, thumbprints))
    table = None
    if tls_wanted:
        try:
            password = password_file.read_bytes().rstrip(b"\r\n") if password_file else None
            table = probe.client_table(
                tls_ca,
                tls_cert,
                tls_key,
                thumbprints=thumbprints,
                password=password,
                profile=cast(Profile, profile),
                insecure=insecure,
                server_name=server_name,
            )
        except probe.SetupError as exc:
            _fail(f"echo: {exc}")
    if table is not None and table.verify == "none":
        click.echo("warning: --insecure: the server's certificate is shown, not verified", err=True)
    result = trio.run(
        lambda: probe.echo(
            endpoint, called_ae, calling_ae, table, server_name=server_name, timeout=timeout
        )
    )
    click.echo(format_echo(result, endpoint, called_ae, calling_ae))
    sys.exit(EXIT_OK if result.ok else EXIT_FAILURE)


def format_echo(result: EchoResult, endpoint: object, called_ae: str, calling_ae: str) -> str:
    from dicom_tls_proxy.security import certnames, policy

    lines = []
    head = f"C-ECHO {calling_ae} -> {called_ae} at {endpoint}"
    if result.ok:
        ms = {k: f"{v * 1000:.1f} ms" for k, v in result.timings.items()}
        steps = ", ".join(
            f"{k} {ms[k]}" for k in ("connect", "tls", "associate", "echo") if k in ms
        )
        lines.append(f"{head}: success (status 0x0000)")
        lines.append(f"round trip: {ms.get('total', '?')} ({steps})")
    else:
        lines.append(f"{head}: FAILED")
        lines.append(f"cause: {result.cause}")
        lines.append(f"what to do: {result.advice}")
    if result.tls is not None:
        t = result.tls
        group = f"; key exchange {t.group}" if t.group else ""
        lines.append(
            f"TLS: {t.version}, {t.cipher} ({t.bits} bits; {t.encryption}, {t.mac}{group})"
        )
    if result.certificate is not None:
        d = policy.describe(result.certificate)
        lines.append("server certificate:")
        lines += [
            f"  subject: {d['subject']}",
            f"  issuer:  {d['issuer']}",
            f"  valid:   {d['not_before']} to {d['not_after']}",
            f"  names:   {', '.join(certnames.certificate_names(result.certificate)) or '-'}",
            f"  {d['sha256']}",
            f"  {d['sha1']}",
        ]
    return "\n".join(lines)


@main.command()
def demo() -> None:
    """Run the whole product once in a temporary folder: PKI, legacy device, proxy, TLS clients."""
    import trio

    from dicom_tls_proxy.demo import run_demo

    ok = trio.run(run_demo, click.echo)
    sys.exit(EXIT_OK if ok else EXIT_FAILURE)

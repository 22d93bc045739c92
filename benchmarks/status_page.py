"""How long /status and /status.json take to answer with many associations open (issue 15: under
50 ms with 500), against /metrics and the same pages with none open, in the same run.

One proxy process (`python -m dicom_tls_proxy run`, TLS listener with client certificates, plaintext
upstream), a device that answers every A-ASSOCIATE-RQ with an AC and then idles, and N clients that
associate over TLS and stay idle (the W4 parts of `idle_associations`). Each page is fetched
`--repeat` times one after the other on a fresh connection; the figures are wall time per request
as the client sees it, with the body size. With `--screenshot FILE` (and chromium installed) the
page with every association open is also drawn, to look at whether it stays readable.

    python3 benchmarks/status_page.py [--associations 500] [--repeat 50] [--screenshot page.png]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import idle_associations as idle

from dicom_tls_proxy.dev.pki import init_pki

PAGES = ("/status.json", "/status", "/metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def timed(port: int, path: str, repeat: int) -> dict[str, float]:
    took, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        took.append((time.perf_counter() - start) * 1000)
        assert response.status == 200, (path, response.status)
        size = len(body)
    took.sort()
    return {
        "median_ms": statistics.median(took),
        "p95_ms": took[int(len(took) * 0.95) - 1],
        "max_ms": took[-1],
        "kib": size / 1024,
    }


def open_count(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/status.json")
    doc = json.loads(conn.getresponse().read())
    conn.close()
    return len(doc["associations"])


async def associate(port: int, tls: ssl.SSLContext) -> idle.Association:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost"
    )
    writer.write(idle.associate_rq("CT"))
    await writer.drain()
    answer = await idle.read_pdu(reader)
    if answer[0] != 0x02:
        raise SystemExit(f"association refused: {answer[:10].hex()}")
    return idle.Association(reader, writer)


async def run(args: argparse.Namespace, folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    pki = folder / "pki"
    init_pki(pki)
    device_port, tls_port, web_port = free_port(), free_port(), free_port()
    config = folder / "proxy.toml"
    config.write_text(
        f"""[proxy]
log_format = "json"
log_level = "warning"
max_connections = {args.associations + 50}
[tls.in]
certificate = "{pki / "proxy.pem"}"
private_key = "{pki / "proxy.key"}"
ca = "{pki / "ca.pem"}"
[[listener]]
name = "tls"
bind = "127.0.0.1:{tls_port}"
tls = "in"
[[route]]
called_ae = "CT"
upstream = "127.0.0.1:{device_port}"
[metrics]
bind = "127.0.0.1:{web_port}"
"""
    )
    acceptor = idle.Acceptor()
    server = await asyncio.start_server(acceptor.handle, "127.0.0.1", device_port, backlog=1024)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "dicom_tls_proxy", "run", "-c", str(config)],
        stderr=open(folder / "proxy.log", "w"),  # noqa: SIM115
    )
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    tls.check_hostname = False
    tls.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    figures: dict[str, dict[str, dict[str, float]]] = {}
    try:
        async with server:
            await asyncio.to_thread(wait_port, web_port)
            await asyncio.to_thread(wait_port, tls_port)
            await idle.close_all([await associate(tls_port, tls)])  # warm-up
            await acceptor.wait_all_closed()
            figures["0"] = {
                p: await asyncio.to_thread(timed, web_port, p, args.repeat) for p in PAGES
            }
            gate = asyncio.Semaphore(idle.OPEN_CONCURRENCY)

            async def one() -> idle.Association:
                async with gate:
                    return await associate(tls_port, tls)

            opened = await asyncio.gather(*(one() for _ in range(args.associations)))
            try:
                shown = await asyncio.to_thread(open_count, web_port)
                assert shown == args.associations, f"/status.json shows {shown} associations"
                n = str(args.associations)
                figures[n] = {
                    p: await asyncio.to_thread(timed, web_port, p, args.repeat) for p in PAGES
                }
                if args.screenshot and (chromium := shutil.which("chromium")):
                    await asyncio.to_thread(
                        subprocess.run,
                        [
                            chromium,
                            "--headless",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--hide-scrollbars",
                            f"--user-data-dir={folder / 'chromium'}",
                            "--window-size=1500,1300",
                            f"--screenshot={Path(args.screenshot).resolve()}",
                            f"http://127.0.0.1:{web_port}/status",
                        ],
                        capture_output=True,
                        check=True,
                    )
            finally:
                await idle.close_all(list(opened))
    finally:
        proxy.terminate()
        proxy.wait(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--screenshot", help="draw /status with chromium into this PNG")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.associations * 3 + 200  # client, proxy (2 each) and device ends
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
        figures = asyncio.run(run(args, Path(tmp)))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"# {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# {args.repeat} sequential requests per page, each on a new connection")
    print(f"{'open':>5}  {'page':<13} {'median ms':>9} {'p95 ms':>7} {'max ms':>7} {'KiB':>7}")
    for count, pages in figures.items():
        for page, f in pages.items():
            print(
                f"{count:>5}  {page:<13} {f['median_ms']:9.1f} {f['p95_ms']:7.1f} "
                f"{f['max_ms']:7.1f} {f['kib']:7.1f}"
            )


if __name__ == "__main__":
    main()

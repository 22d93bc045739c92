"""The facts of the machine and software a benchmark ran on, printed beside every figure.

Ratios between the proxy and stunnel or HAProxy move with the processor (AES-NI, VAES and
VPCLMULQDQ decide how fast AES-GCM is), with each side's OpenSSL (the proxy links the one in
cryptography's wheel, stunnel and HAProxy Debian's) and with the kernel: a figure without them
is not a property of the product. Reading only: this module starts no server and changes nothing.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import procs

# CPU flags that decide TLS's cost: AES rounds, GHASH (carry-less multiply), their vector forms,
# SHA extensions (HKDF, certificate hashes), wide integer multiply (RSA: IFMA, BMI2/ADX; ECDHE)
CPU_FLAGS = (
    "aes",
    "pclmulqdq",
    "avx",
    "avx2",
    "avx512f",
    "avx512ifma",
    "vaes",
    "vpclmulqdq",
    "sha_ni",
    "bmi2",
    "adx",
)


def _output(argv: list[str]) -> list[str]:
    """The non-blank lines a command prints on stdout and stderr; [] when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            flags = [f for f in CPU_FLAGS if f in present]
            break
    return model, flags


def stunnel_version(exe: str | None) -> str | None:
    """`stunnel -version`: its own version, and the OpenSSL it was compiled with and runs with."""
    if exe is None:
        return None
    lines = _output([exe, "-version"])
    wanted = [x for x in lines if x.startswith("stunnel ") or "OpenSSL" in x]
    return "; ".join(" ".join(x.split()) for x in wanted) or "unknown"


def haproxy_version(exe: str | None) -> str | None:
    """`haproxy -vv`: its version and the OpenSSL it was built with and runs with."""
    if exe is None:
        return None
    lines = _output([exe, "-vv"])
    wanted = [
        x
        for x in lines
        if x.startswith("HAProxy version")
        or x.startswith(("Built with OpenSSL", "Running on OpenSSL"))
    ]
    return "; ".join(x.split(" - ")[0] for x in wanted) or "unknown"


def dcmtk_version(storescu: str) -> str:
    """DCMTK's version line and the OpenSSL it links (both from `storescu --version`)."""
    lines = _output([storescu, "--version"])
    version = lines[0].strip("$ ").removeprefix("dcmtk: ") if lines else "unknown"
    openssl = next((x.lstrip("- ") for x in lines if "OpenSSL" in x), None)
    return f"{version}; {openssl}" if openssl else version


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=procs.REPO)
    return done.stdout.strip()


def facts(
    *, storescu: str, stunnel: str | None, haproxy: str | None, started: float
) -> dict[str, Any]:
    """Everything a reader needs to say where a figure comes from (the JSON's `machine`), read
    when the measurements begin (`started`, time.time()); the caller adds
    `proxy_source_sha256`, the digest of the proxy's copied sources."""
    from cryptography.hazmat.backends.openssl import backend
    from OpenSSL import SSL

    model, flags = _cpuinfo()
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "kernel": platform.release(),
        "os": f"Debian {debian}" if debian else platform.platform(),
        "python": platform.python_version(),
        "proxy_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "proxy_openssl_cryptography": backend.openssl_version_text(),
        # "public" forces the proxy onto pyOpenSSL's public API (its `started` line says the path)
        "proxy_openssl_env": os.environ.get("DICOM_TLS_PROXY_OPENSSL"),
        "dcmtk": dcmtk_version(storescu),
        "stunnel": stunnel_version(stunnel),
        "haproxy": haproxy_version(haproxy),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "dicom_tls_proxy")),
        "proxy_source_sha256": None,  # filled in once the sources are copied
    }


def describe(m: dict[str, Any]) -> str:
    """The facts as the lines that head the printed table."""
    dirty = " (dicom_tls_proxy/ had uncommitted changes)" if m.get("git_dirty") else ""
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; flags {' '.join(m['cpu_flags']) or 'none'}",
        f"  {m['os']}, kernel {m['kernel']}, Python {m['python']}; {m['date']}",
        f"  proxy: {m['proxy_openssl']} (cryptography: {m['proxy_openssl_cryptography']}), "
        f"commit {m['git_commit'][:12]}{dirty}",
        f"  stunnel: {m['stunnel'] or 'not measured'}",
        f"  haproxy: {m['haproxy'] or 'not measured'}",
        f"  DCMTK: {m['dcmtk']}",
    ]
    return "\n".join(lines)

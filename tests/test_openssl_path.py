"""pyOpenSSL's private names and the public path: which one the proxy takes, and that the relay
works on both.

`dicom_tls_proxy.transport._openssl` decides at import. Each case runs in a fresh interpreter
(the choice is made once per process): the environment variable forcing the public path, the
private names gone or changed, a pyOpenSSL newer than the range the module was written for. On
every path TLS streams of both kinds (memory BIOs, and OpenSSL on its own socket) carry 3 MiB
each way, and the proxy relays a real association, TLS in and TLS out, with the path it took in
its `started` line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from pydicom import dcmread

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.transport import _openssl
from dicom_tls_proxy.transport.sockio import LeanStream
from dicom_tls_proxy.transport.tlscontext import client_context, server_context
from dicom_tls_proxy.transport.tlsstream import TlsStream
from tests.support import (
    TIMEOUT,
    make_dataset,
    proxy_config,
    tls_out,
    toml_dumps,
)
from tests.test_origination import chain, echo_and_store_over_tls, identities, pacs_and_proxy

__all__ = ["identities"]  # the module fixture, used by name

REPO = Path(__file__).resolve().parent.parent
ENV = _openssl.ENV
# What this installation takes by itself: the private path inside the range it was written for.
EXPECTED_AUTO = "public" if _openssl.outside_written_for() else "private"


def test_pyproject_pins_the_range_the_private_path_was_written_for() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name, _, spec = requirement.partition(">=")
        pins[name] = ">=" + spec
    for name, (lowest, too_new) in _openssl.WRITTEN_FOR.items():
        dotted = (".".join(map(str, lowest)), ".".join(map(str, too_new)))
        assert pins[name] == f">={dotted[0]},<{dotted[1]}", (name, pins[name])


def _in_fresh_interpreter(prelude: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """Import `_openssl` after `prelude` in a new interpreter; run `exchange` with the `extra`
    arguments if given. Returns PATH, WHY (and what `exchange` found)."""
    code = (
        f"{prelude}\n"
        "import json, sys\n"
        "from dicom_tls_proxy.transport import _openssl\n"
        "result = {'path': _openssl.PATH, 'why': _openssl.WHY}\n"
        "if len(sys.argv) > 1:\n"
        "    from tests.test_openssl_path import exchange\n"
        "    result.update(exchange(*sys.argv[1:]))\n"
        "print(json.dumps(result))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k != ENV}
    done = subprocess.run(
        [sys.executable, "-c", code, *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_installed_versions_are_inside_the_range_or_the_private_path_steps_aside() -> None:
    """Inside `WRITTEN_FOR` the private path must work (the pins promise it); outside it, a
    release that moved its internals must leave the proxy on the public path, not crash it."""
    chosen = _in_fresh_interpreter("", {})
    outside = _openssl.outside_written_for()
    if outside:
        assert chosen["path"] == "public" and outside[0] in chosen["why"], chosen
    else:
        assert chosen["path"] == "private", chosen
        for name, version in _openssl.INSTALLED.items():
            assert f"{name} {version}" in chosen["why"]


# pyOpenSSL keeps using its own `_util` (its functions hold their module's globals); what a later
# `from OpenSSL._util import ...` finds is a module without the names, or with a `lib` lacking them.
@pytest.mark.skipif(_openssl.PATH != "private", reason="OpenSSL's own words need the private path")
def test_public_verify_error_words_are_openssls() -> None:
    for errnum, words in _openssl._VERIFY_ERRORS.items():
        assert _openssl._private_verify_error_text(errnum).startswith(words), errnum
    assert _openssl._public_verify_error_text(1000) == "verification error 1000"


GONE = "import sys, types, OpenSSL\nsys.modules['OpenSSL._util'] = types.ModuleType('gone')"
CHANGED = (
    "import sys, types, OpenSSL._util as real\n"
    "stub = sys.modules['OpenSSL._util'] = types.ModuleType('changed')\n"
    "stub.ffi, stub.lib = real.ffi, types.SimpleNamespace()"
)
NEWER = "import OpenSSL\nOpenSSL.__version__ = '99.0.0'"


@pytest.mark.parametrize(
    ("prelude", "env", "path", "why"),
    [
        pytest.param("", {ENV: "public"}, "public", f"{ENV}=public", id="forced-public"),
        pytest.param(GONE, {}, "public", "OpenSSL._util cannot be imported", id="names-gone"),
        pytest.param(CHANGED, {}, "public", "OpenSSL._util.lib lacks SSL_read", id="lib-changed"),
        pytest.param(NEWER, {}, "public", "pyOpenSSL 99.0.0 is outside the range", id="newer"),
        pytest.param(NEWER, {ENV: "private"}, "private", f"{ENV}=private", id="newer-forced"),
        pytest.param(GONE, {ENV: "private"}, "public", "cannot be imported", id="gone-forced"),
        pytest.param("", {ENV: "fast"}, EXPECTED_AUTO, f"{ENV}='fast' ignored", id="unknown"),
    ],
)
def test_the_path_taken_and_tls_streams_on_it(
    tmp_path: Path, pki: Path, prelude: str, env: dict[str, str], path: str, why: str
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(toml_dumps(proxy_config(pki, "127.0.0.1:104", tls={"out": tls_out(pki)})))
    result = _in_fresh_interpreter(prelude, env, str(config), str(3 * 1024 * 1024))
    assert result["path"] == path and why in result["why"], result
    assert result["kinds"] == [
        ["MemoryTlsStream", "SocketTlsStream"],
        ["MemoryTlsStream", "MemoryTlsStream"],
    ]
    assert result["delivered"] == [True, True]


def exchange(config_path: str, size: str) -> dict[str, Any]:
    """In this process: a listener's stream and a client's over a socket pair, the client once
    over a `LeanStream` (OpenSSL on the socket) and once over a plain `trio.SocketStream` (memory
    BIOs); `size` random bytes each way at once, in uneven chunks. What kinds of stream were made,
    and whether every byte arrived in order."""
    config = load_config(config_path)
    server_ctx, client_ctx = server_context(config.tls["in"]), client_context(config.tls["out"])
    payloads = [random.Random(n).randbytes(int(size)) for n in (1, 2)]

    async def pump(stream: TlsStream, payload: bytes) -> bytes:
        received = bytearray()

        async def send() -> None:
            rnd = random.Random(len(payload))
            start = 0
            while start < len(payload):
                step = rnd.choice([1, 100, 16 * 1024, 70_000, 1024 * 1024])
                await stream.send_all(payload[start : start + step])
                start += step
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while data := await stream.receive_some(1024 * 1024):
                received += data
        return bytes(received)

    async def one(lean_client: bool) -> tuple[list[str], bool]:
        a, b = trio.socket.socketpair()
        server_side = LeanStream(trio.SocketStream(a))
        client_side: Any = trio.SocketStream(b)
        if lean_client:
            client_side = LeanStream(client_side)
        streams: dict[str, TlsStream] = {}

        async def accept() -> None:
            streams["server"] = await TlsStream.accept(server_side, server_ctx, config.tls["in"])

        async def connect() -> None:
            streams["client"] = await TlsStream.connect(
                client_side, client_ctx, config.tls["out"], "localhost"
            )

        got: dict[str, bytes] = {}

        async def run(side: str, payload: bytes) -> None:
            got[side] = await pump(streams[side], payload)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept)
                nursery.start_soon(connect)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "server", payloads[0])
                nursery.start_soon(run, "client", payloads[1])
            for stream in streams.values():
                await stream.aclose()
        kinds = [type(streams[side]).__name__ for side in ("server", "client")]
        return kinds, got["client"] == payloads[0] and got["server"] == payloads[1]

    async def both() -> dict[str, Any]:
        results = [await one(lean_client=True), await one(lean_client=False)]
        return {"kinds": [k for k, _ in results], "delivered": [ok for _, ok in results]}

    return trio.run(both)


@pytest.mark.dcmtk
@pytest.mark.parametrize("path", ["auto", "public"])
def test_relay_tls_in_and_out(
    tmp_path: Path, pki: Path, identities: dict[str, tuple[Path, Path]], path: str
) -> None:
    """pynetdicom over TLS to the proxy (memory BIOs), the proxy over TLS to DCMTK's storescp
    (OpenSSL on the socket): a C-ECHO and a 2 MiB C-STORE, the same bytes stored, with the path
    the proxy took in its `started` line."""
    ds = make_dataset(1024, 1024, seed=13)
    with pacs_and_proxy(
        tmp_path, pki, identities["pacs"], chain(pki), tls_in=True, env={ENV: path}
    ) as (proxy, out):
        started = proxy.wait_for(event="started")
        line, received = echo_and_store_over_tls(proxy, out, pki, ds)
    assert started["openssl_path"] == (EXPECTED_AUTO if path == "auto" else "public")
    if path == "public":
        assert started["openssl_why"].startswith(f"{ENV}=public")
    stored = dcmread(received[0])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
    assert line["outcome"] == "completed" and line["reason"] == "released"
    assert line["tls_version"] in ("TLSv1.3", "TLSv1.2")
    assert line["bytes_up"] > len(ds.PixelData) and line["bytes_down"] > 0

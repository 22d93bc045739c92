"""A bug of the proxy's own is reported as one, never blamed on the peer.

In-process: the proxy's engine runs in the test's trio loop on loopback, and one step of the
connection is made to fail as a bug would (an exception no code path expects)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from dicom_tls_proxy.config.load import load_config
from dicom_tls_proxy.engine import routing
from dicom_tls_proxy.engine.listener import serve
from dicom_tls_proxy.engine.proxy import Proxy
from dicom_tls_proxy.ops.process import bind_listeners
from dicom_tls_proxy.protocol import pdu
from tests.support import RawClient, build_rq, proxy_config, toml_dumps


def _simulated_bug(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("simulated bug in the routing decision")


async def test_an_internal_error_is_the_proxy_s_not_the_peer_s(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = proxy_config(
        pki,
        "127.0.0.1:9",
        listener=[{"name": "plain", "bind": "127.0.0.1:0"}],
        route=[{"called_ae": "CT", "upstream": "127.0.0.1:9", "listeners": ["plain"]}],
    )
    (tmp_path / "proxy.toml").write_text(toml_dumps(cfg))
    config = load_config(tmp_path / "proxy.toml")
    monkeypatch.setattr(routing, "decide", _simulated_bug)
    caplog.set_level(logging.INFO, logger="dicom_tls_proxy")
    proxy = Proxy(config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(serve, proxy, await bind_listeners(config))
        host, _, port = addresses[0].rpartition(":")

        def exchange() -> tuple[bytes, bytes]:
            client = RawClient((host, int(port)))
            try:
                client.send(build_rq("CT"))
                return client.read_pdu(), client.read_eof()
            finally:
                client.close()

        answer, rest = await trio.to_thread.run_sync(exchange)
        with trio.fail_after(10):
            while not [r for r in caplog.records if r.getMessage() == "association"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert answer == pdu.encode_abort(2, 0) and rest == b""  # an A-ABORT, not a bare close
    [line] = [r.fields for r in caplog.records if r.getMessage() == "association"]
    assert line["outcome"] == "aborted" and line["reason"] == "internal-error", line
    assert "simulated bug" in line["detail"]
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.fields["event"] == "internal-error" and error.exc_info is not None
    assert "simulated bug in the routing decision" in caplog.text  # the traceback

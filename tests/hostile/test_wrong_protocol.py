"""Wrong protocol on a port: plaintext DICOM to TLS, TLS to plaintext, the migration exception."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from dicom_tls_proxy.protocol import pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    RawClient,
    associate,
    build_rq,
    proxy_config,
    running_proxy,
)


def config(pki: Path, upstream: str, **listener: Any) -> dict[str, Any]:
    return proxy_config(
        pki,
        upstream,
        listener=[
            {"name": "tls", "bind": "127.0.0.1:0", "tls": "in", **listener},
            {"name": "plain", "bind": "127.0.0.1:0"},
        ],
        route=[{"called_ae": "CT", "upstream": upstream, "listeners": ["tls", "plain"]}],
    )


def test_plaintext_dicom_on_tls_listener_gets_a_plaintext_reject(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        client = RawClient(proxy.address("tls"))  # no TLS at all
        client.send(build_rq("CT", "OLD_US"))
        assert client.read_pdu() == pdu.encode_reject(1, 1, 1)
        assert client.read_clean_close() == b""
        client.close()
        line = proxy.association(reason="plaintext-on-tls")
    assert line["outcome"] == "rejected" and line["calling_ae"] == "OLD_US"
    assert (
        "plaintext DICOM received on TLS listener tls from Calling AE 'OLD_US' at 127.0.0.1"
        in line["detail"]
    )
    assert legacy.associations == 0


def test_allow_plaintext_from_needs_both_ae_and_source(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    senders = [
        {"calling_ae": "OLD_US", "source": "127.0.0.1/32"},
        {"calling_ae": "OTHER", "source": "10.9.9.9/32"},
    ]
    with running_proxy(
        tmp_path, config(pki, legacy.address, allow_plaintext_from=senders)
    ) as proxy:
        address = proxy.address("tls")
        assoc = associate(address, "CT", calling_ae="OLD_US")  # plaintext, named AE, named source
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        proxy.wait_for(event="plaintext-allowed", calling_ae="OLD_US")
        assert proxy.association(reason="released")["tls_version"] == "none (allow_plaintext_from)"

        other = RawClient(address)  # the AE is listed, this source is not
        other.send(build_rq("CT", "OTHER"))
        assert other.read_pdu() == pdu.encode_reject(1, 1, 1)
        other.close()
        proxy.association(reason="plaintext-on-tls", calling_ae="OTHER")


def test_tls_on_plaintext_listener_is_closed_and_logged(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        raw = socket.create_connection(proxy.address("plain"), timeout=TIMEOUT)
        try:
            ctx.wrap_socket(raw, server_hostname="localhost")
            raise AssertionError("the TLS handshake should not succeed")
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        finally:
            raw.close()
        line = proxy.association(reason="tls-on-plaintext")
    assert line["outcome"] == "refused"
    assert "TLS handshake received on plaintext listener plain" in line["detail"]


def test_plaintext_listener_still_serves_dicom(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        assoc = associate(proxy.address("plain"), "CT")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        proxy.association(reason="released")

"""Limits and floods: max_connections_per_ip, and log lines rate-limited per source."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from dicom_tls_proxy.protocol import pdu
from tests.support import (
    TIMEOUT,
    LegacyDevice,
    RawClient,
    build_rq,
    client_ssl_context,
    proxy_config,
    proxy_stats,
    running_proxy,
    wait_until,
)


def config(pki: Path, upstream: str, **proxy: Any) -> dict[str, Any]:
    return proxy_config(
        pki,
        upstream,
        proxy=proxy,
        listener=[{"name": "plain", "bind": "127.0.0.1:0"}],
        route=[{"called_ae": "CT", "upstream": upstream, "listeners": ["plain"]}],
    )


def test_max_connections_per_ip_closes_at_accept(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address, max_connections_per_ip=2)) as proxy:
        address = proxy.address("plain")
        held = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(2)]
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as third:
                assert third.recv(10) == b""  # closed at once, nothing sent
            line = proxy.association(reason="too-many-associations")
            assert line["outcome"] == "refused" and "max_connections_per_ip" in line["detail"]
        finally:
            for s in held:
                s.close()
        wait_until(
            lambda: len(proxy.find(event="association", reason="client-closed")) == 2,
            what="2 closed",
        )
        client = RawClient(address)  # the slots came back
        client.send(build_rq("CT"))
        assert client.read_pdu()[0] == 0x02
        client.close()


def test_refusal_flood_is_rate_limited_per_source(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        address = proxy.address("plain")
        for _ in range(60):
            client = RawClient(address)
            client.send(build_rq("NOWHERE"))
            assert client.read_pdu() == pdu.encode_reject(1, 1, 7)  # each one answered
            client.close()
        summary = proxy.wait_for(event="suppressed", reason="no-route")
        logged = len(proxy.find(event="association", reason="no-route"))
        assert logged + sum(x["count"] for x in proxy.find(event="suppressed")) == 60
        assert logged < 60 and summary["source"] == "127.0.0.1"


def test_refusal_log_lets_lines_through_again_after_each_interval(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    """Past the limiter's 1-s interval twice: a flood is summed up in `suppressed`; in the next
    interval the same source's refusals are logged again; a second flood is summed up again."""
    flood = 20

    def refuse(n: int) -> None:
        for _ in range(n):
            client = RawClient(address)
            client.send(build_rq("NOWHERE"))
            assert client.read_pdu()[0] == 0x03
            client.close()

    def logged() -> int:
        return len(proxy.find(event="association", reason="no-route"))

    def summed() -> int:
        return sum(x["count"] for x in proxy.find(event="suppressed", reason="no-route"))

    with running_proxy(tmp_path, config(pki, legacy.address)) as proxy:
        address = proxy.address("plain")
        refuse(flood)
        flooded = time.monotonic()
        proxy.wait_for(event="suppressed", reason="no-route")
        wait_until(lambda: logged() + summed() == flood, what="the first flood accounted for")
        first_lines, first_summaries = logged(), len(proxy.find(event="suppressed"))
        assert 5 <= first_lines < flood  # the burst, and maybe a second window's
        # The limiter's windows cannot be seen from outside while they hold nothing back: let the
        # last one the flood opened end, so that the next refusal falls in a new interval.
        time.sleep(max(0.0, flooded + 1.0 - time.monotonic()))
        refuse(1)
        wait_until(lambda: logged() + summed() == flood + 1, what="the single refusal")
        assert logged() == first_lines + 1  # let through, not held back for a summary
        refuse(flood)
        wait_until(
            lambda: len(proxy.find(event="suppressed")) > first_summaries,
            what="a second suppressed line",
        )
        wait_until(lambda: logged() + summed() == 2 * flood + 1, what="everything accounted for")
        assert logged() - first_lines >= 5  # the new interval's burst: the single one and 4 more
        for line in proxy.find(event="suppressed"):
            assert line["source"] == "127.0.0.1" and line["count"] >= 1, line
            assert line["msg"].startswith(f"{line['count']} more refusals like this")


def test_beyond_max_pending_connections_wait_in_the_backlog(
    tmp_path: Path, pki: Path, legacy: LegacyDevice
) -> None:
    """Two silent clients hold both pending slots; a third connects (the kernel queues it) but is
    not taken by the proxy until a slot frees, when the silent ones time out; then it is served."""
    cfg = config(pki, legacy.address, max_pending=2, handshake_timeout=5.0)
    cfg["listener"].append({"name": "tls", "bind": "127.0.0.1:0", "tls": "in"})
    cfg["route"][0]["listeners"] = ["plain", "tls"]
    with running_proxy(tmp_path, cfg) as proxy:
        address = proxy.address("tls")
        silent = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(2)]
        try:
            wait_until(lambda: proxy_stats(proxy)["connections"] == 2, what="both slots taken")
            third = socket.create_connection(address, timeout=TIMEOUT)  # the backlog takes it
            assert proxy_stats(proxy)["connections"] == 2  # the proxy does not, yet
            ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
            with ctx.wrap_socket(third) as tls:  # completes once a silent one timed out
                tls.sendall(build_rq("CT"))
                assert tls.recv(6)[0] == 0x02  # the A-ASSOCIATE-AC
            assert proxy.find(event="association", reason="handshake-timeout")
        finally:
            for s in silent:
                s.close()

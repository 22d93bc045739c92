"""Route health checks: a periodic C-ECHO per route, shown in /readyz and /metrics, never in the
/readyz status; with real proxy processes, a real pynetdicom device, a port nobody listens on and a
scripted server that accepts the association and then closes."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

from tests.support import (
    LegacyDevice,
    ProxyProcess,
    ScriptedUpstream,
    build_ac,
    free_port,
    proxy_config,
    running_proxy,
    toml_dumps,
    wait_until,
)
from tests.test_audit_metrics import get, metrics_address, scrape, value

INTERVAL = 0.5


def health_config(pki: Path, legacy: LegacyDevice, port: int) -> dict[str, Any]:
    check = {"health_check": True, "health_check_interval": INTERVAL, "health_check_timeout": 5}
    return proxy_config(
        pki,
        legacy.address,
        tls={
            "out": {
                "certificate": pki / "client.pem",
                "private_key": pki / "client.key",
                "ca": pki / "ca.pem",
                "server_name": "localhost",
            },
        },
        listener=[{"name": "tls", "bind": f"127.0.0.1:{port}", "tls": "in"}],
        metrics={"bind": "127.0.0.1:0"},
        route=[
            {"called_ae": "CT", "upstream": legacy.address, **check},
            # The proxy's own TLS listener, routed on to the device: a TLS upstream.
            {
                "called_ae": "VIA_TLS",
                "upstream": f"127.0.0.1:{port}",
                "upstream_tls": "out",
                "upstream_called_ae": "CT",
                **check,
            },
            {"called_ae": "DEAD", "upstream": f"127.0.0.1:{free_port()}", **check},
            {"called_ae": "UNCHECKED", "upstream": legacy.address},
        ],
    )


def readyz(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    status, _, body = get(metrics_address(proxy), "/readyz")
    return status, json.loads(body)


def checked(proxy: ProxyProcess, *names: str) -> dict[str, Any]:
    """The /readyz routes once every route named has a result."""

    def results() -> dict[str, Any] | None:
        status, body = readyz(proxy)
        assert status == 200  # a dead upstream never makes the proxy unready
        routes: dict[str, Any] = body["routes"]
        return routes if all(routes.get(n, {}).get("ok") is not None for n in names) else None

    return wait_until(results, what=f"health check results for {names}")  # type: ignore[no-any-return]


def test_live_and_dead_upstreams(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    with running_proxy(tmp_path, health_config(pki, legacy, free_port())) as proxy:
        routes = checked(proxy, "CT", "VIA_TLS", "DEAD")
        assert set(routes) == {"CT", "VIA_TLS", "DEAD"}  # not UNCHECKED
        for name in ("CT", "VIA_TLS"):
            assert routes[name]["ok"] is True and routes[name]["cause"] == "", routes[name]
            assert routes[name]["rtt_ms"] > 0 and routes[name]["checked_at"].endswith("+00:00")
        assert routes["DEAD"]["ok"] is False
        assert "connection refused" in routes["DEAD"]["cause"]
        down = proxy.wait_for(event="upstream-down", route="DEAD")
        assert "connection refused" in down["cause"]
        # The probe is a real association with the route's (rewritten) Called AE.
        assert "CT" in legacy.called_aes and "DICOM_TLS_PROXY" in legacy.calling_aes
        samples = scrape(metrics_address(proxy))
        assert value(samples, "dicom_tls_proxy_upstream_up", route="CT") == 1
        assert value(samples, "dicom_tls_proxy_upstream_up", route="VIA_TLS") == 1
        assert value(samples, "dicom_tls_proxy_upstream_up", route="DEAD") == 0
        assert ("dicom_tls_proxy_upstream_up", frozenset({("route", "UNCHECKED")})) not in samples
        assert value(samples, "dicom_tls_proxy_upstream_check_seconds", route="CT") > 0
        # The TLS probe went through the proxy's own listener, and checks keep coming.
        proxy.wait_for(event="association", calling_ae="DICOM_TLS_PROXY", outcome="completed")
        seen, checked_at = legacy.associations, routes["CT"]["checked_at"]
        wait_until(
            lambda: readyz(proxy)[1]["routes"]["CT"]["checked_at"] != checked_at, what="a recheck"
        )
        assert legacy.associations > seen


def test_checks_follow_a_reload(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> None:
    cfg = health_config(pki, legacy, free_port())
    with running_proxy(tmp_path, cfg) as proxy:
        checked(proxy, "CT", "DEAD")
        # DEAD's device comes up (it now points at the live one); CT is no longer checked.
        cfg["route"][0] = {"called_ae": "CT", "upstream": legacy.address}
        cfg["route"][2]["upstream"] = legacy.address
        proxy.config_path.write_text(toml_dumps(cfg))
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(event="reloaded")
        proxy.wait_for(event="upstream-up", route="DEAD")
        status, body = readyz(proxy)
        assert status == 200 and set(body["routes"]) == {"VIA_TLS", "DEAD"}
        assert body["routes"]["DEAD"]["ok"] is True
        samples = scrape(metrics_address(proxy))
        assert value(samples, "dicom_tls_proxy_upstream_up", route="DEAD") == 1
        assert ("dicom_tls_proxy_upstream_up", frozenset({("route", "CT")})) not in samples


def test_cause_in_words_when_the_upstream_accepts_and_closes(tmp_path: Path, pki: Path) -> None:
    """The recorded cause is the probe's sentence, not the name of an exception."""

    def accept_and_close(conn: socket.socket) -> None:
        conn.sendall(build_ac(upstream.read_pdu(conn)))

    upstream = ScriptedUpstream(accept_and_close)
    check = {"health_check": True, "health_check_interval": INTERVAL, "health_check_timeout": 5}
    cfg = proxy_config(
        pki,
        upstream.address,
        metrics={"bind": "127.0.0.1:0"},
        route=[{"called_ae": "CT", "upstream": upstream.address, **check}],
    )
    expected = (
        "the server accepted the association and then closed the connection without answering "
        "the C-ECHO"
    )
    try:
        with running_proxy(tmp_path, cfg) as proxy:
            route = checked(proxy, "CT")["CT"]
            assert route["ok"] is False and route["cause"].startswith(expected), route
            down = proxy.wait_for(event="upstream-down", route="CT")
            assert down["cause"].startswith(expected), down
            assert "Error" not in route["cause"] + down["cause"]
    finally:
        upstream.close()


def test_a_route_goes_up_down_and_up_again_without_a_reload(tmp_path: Path, pki: Path) -> None:
    """Past health_check_interval many times: the checks go on while the device is up, while it
    is down and after it came back on its port; each change of state is logged once, and only
    the changes are."""
    device = LegacyDevice()
    port, address = device.port, device.address
    check = {"health_check": True, "health_check_interval": INTERVAL, "health_check_timeout": 5}
    cfg = proxy_config(
        pki,
        address,
        metrics={"bind": "127.0.0.1:0"},
        route=[{"called_ae": "CT", "upstream": address, **check}],
    )

    def recheck(ok: bool, times: int) -> None:
        """Wait for `times` further checks of CT, each with this result."""
        seen: set[str] = set()

        def more() -> bool:
            route = readyz(proxy)[1]["routes"]["CT"]
            if route["ok"] is ok:
                seen.add(route["checked_at"])
            return len(seen) > times

        wait_until(more, what=f"{times} more checks with ok={ok}")

    try:
        with running_proxy(tmp_path, cfg) as proxy:
            proxy.wait_for(event="upstream-up", route="CT")
            wait_until(lambda: device.associations >= 4, what="4 checks of the live device")
            device.close()
            down = proxy.wait_for(event="upstream-down", route="CT")
            assert "connection refused" in down["cause"]
            recheck(False, 3)  # still checking the dead port
            device = LegacyDevice(port=port)  # the device is back, at the same address
            wait_until(
                lambda: len(proxy.find(event="upstream-up", route="CT")) == 2, what="up again"
            )
            recheck(True, 3)
            assert device.associations >= 3
            samples = scrape(metrics_address(proxy))
            assert value(samples, "dicom_tls_proxy_upstream_up", route="CT") == 1
            changes = [x["event"] for x in proxy.find() if x["event"].startswith("upstream-")]
            assert changes == ["upstream-up", "upstream-down", "upstream-up"]
            assert not proxy.find(event="reloaded")
    finally:
        device.close()

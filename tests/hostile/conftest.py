"""A proxy to attack: handshake_timeout 1 s, a legacy device behind it, and a stats baseline taken
after one warm-up association, so that a test can check that its attack cost no fd and no task."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.cases import Address, client_context, proxy_config
from tests.support import (
    LegacyDevice,
    ProxyProcess,
    associate,
    proxy_stats,
    running_proxy,
    wait_until,
)

HANDSHAKE_TIMEOUT = 1.0


@dataclass
class Target:
    proxy: ProxyProcess
    addresses: dict[str, Address]
    ctx: ssl.SSLContext
    legacy: LegacyDevice
    baseline: dict[str, int] = field(default_factory=dict)

    def echo(self) -> None:
        """A real pynetdicom C-ECHO through the TLS listener, and its `released` log line."""
        before = len(self.proxy.find(event="association", reason="released"))
        assoc = associate(self.addresses["tls"], "CT", ssl_context=self.ctx)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        wait_until(
            lambda: len(self.proxy.find(event="association", reason="released")) > before,
            what="the echo's log line",
        )

    def stats(self) -> dict[str, int]:
        return proxy_stats(self.proxy)

    def assert_nothing_leaked(self) -> None:
        """Back to the baseline: waits for it, since a connection is closed (and its task ends)
        just after its association line is logged."""
        seen: list[dict[str, int]] = []

        def settled() -> bool:
            seen.append(self.stats())
            return seen[-1] == self.baseline

        try:
            wait_until(settled, what="the proxy's stats back to the baseline")
        except AssertionError:
            raise AssertionError(f"stats {seen[-1]} != baseline {self.baseline}") from None


@contextmanager
def attack(
    tmp_path: Path, pki: Path, legacy: LegacyDevice, cfg: dict[str, Any]
) -> Iterator[Target]:
    """The proxy of `cfg` (route CT to `legacy`), warmed up, with its stats baseline."""
    with running_proxy(tmp_path, cfg) as proxy:
        addresses = {li["name"]: proxy.address(li["name"]) for li in cfg["listener"]}
        t = Target(proxy, addresses, client_context(pki), legacy)
        t.echo()  # warm-up: the first handshake and association allocate what they keep
        t.baseline = t.stats()
        yield t


@pytest.fixture
def target(tmp_path: Path, pki: Path, legacy: LegacyDevice) -> Iterator[Target]:
    cfg = proxy_config(pki, legacy.address, handshake_timeout=HANDSHAKE_TIMEOUT)
    with attack(tmp_path, pki, legacy, cfg) as t:
        yield t

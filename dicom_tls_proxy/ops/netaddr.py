"""Socket addresses as text, one spelling for every log line, audit message and metrics page.

Why this exists: the engine writes the peer's address in the association record, the metrics server
its bound addresses in its `metrics-listening` line, the syslog sink the peer's host in its Security
Alerts (and counts alerts by it). An operator or a SIEM rule must find the same node spelled the
same way everywhere: ``host:port``, an IPv6 host in brackets (``[::1]:104``), the host alone without
brackets. It sits below both the engine and the operations modules, so either may import it.

What it must never do: any I/O or name resolution (it is pure: text in, text out); raise on what a
socket or a record hands over (an address that is not a (host, port) tuple is written as ``str``).
"""

from __future__ import annotations


def format_address(addr: tuple[str, int] | tuple[str, int, int, int] | object) -> str:
    """``host:port`` of a socket address (IPv4 or IPv6 tuple), ``[host]:port`` for IPv6."""
    if isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


def host_of(address: str) -> str:
    """The host of a `format_address` text, without the port and the brackets; a text without a
    port is returned as it is."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or address

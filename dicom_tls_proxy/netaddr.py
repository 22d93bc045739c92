"""How the proxy writes a socket address, in one place: logs, /readyz and the audit trail must
spell `[::1]:2762` the same way. Pure; no sockets are opened here."""

from __future__ import annotations


def format_address(addr: tuple[str, int] | tuple[str, int, int, int] | object) -> str:
    """`host:port`, IPv6 in brackets; anything else (a Unix socket path) as it is."""
    if isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)

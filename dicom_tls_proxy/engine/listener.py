"""Accepting: one accept loop per listening socket, admission by `max_pending`, and the nursery that
holds every connection's task.

Why its own module: what a listener does before a connection is anyone's (waiting for room,
surviving EMFILE, closing when the proxy drains) is not what a connection does after. Nothing here
reads a byte from a peer: `connection` does, from the first one on.
"""

from __future__ import annotations

import errno
import logging

import trio

from dicom_tls_proxy.config.schema import Listener
from dicom_tls_proxy.engine.connection import handle
from dicom_tls_proxy.engine.proxy import Proxy, warn_insecure
from dicom_tls_proxy.ops.netaddr import format_address
from dicom_tls_proxy.ops.process import Bound

ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def serve(
    proxy: Proxy,
    bound: Bound,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every bound listener until the proxy drains; returns when every connection
    ended. Reports the listening addresses once accepting."""
    audit = proxy.audit
    addresses = []
    for li, sl in bound:
        address = format_address(sl.socket.getsockname())
        addresses.append(address)
        kind = f"tls:{li.tls}" if li.tls else "plaintext"
        audit.event("listening", listener=li.name, address=address, kind=kind)
    for name, table in proxy.gen.config.tls.items():
        warn_insecure(audit, table, tls=name)
    async with trio.open_nursery() as connections:
        proxy.connections = connections
        with proxy.accepting:
            async with trio.open_nursery() as accepting:
                for li, sl in bound:
                    accepting.start_soon(_accept_loop, proxy, li, sl, connections)
                task_status.started(addresses)
        for _, sl in bound:  # no new connections from here on
            await sl.aclose()
    proxy.connections = None


async def _accept_loop(
    proxy: Proxy, li: Listener, sl: trio.SocketListener, nursery: trio.Nursery
) -> None:
    async with sl:
        while True:
            await proxy.pending.room()  # beyond max_pending, clients wait in the backlog
            try:
                stream = await sl.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_ERRORS:
                    proxy.audit.event(
                        "accept-failed", logging.ERROR, listener=li.name, msg=str(exc)
                    )
                    await trio.sleep(0.1)
                    continue
                raise
            proxy.pending.used += 1
            nursery.start_soon(handle, proxy, li, stream)

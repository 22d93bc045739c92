"""The composition root: one proxy process put together from its config. It makes the `Audit`
(log, audit file, syslog collector, metrics) and the `Proxy`, binds or takes over the listening
sockets, and runs them in trio's structure: the syslog writer outlives the proxy's nursery, the
proxy's nursery holds the listeners, housekeeping, health checks, the watcher and the signals.

Why here and nowhere else: every other module gets what it needs passed in (no process-global
state), so a test or the demo can compose a proxy of its own from the same parts; this module is
the only one that decides which parts a process of `run` (or a worker of `workers = N`) has.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import trio

from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.engine.listener import serve
from dicom_tls_proxy.engine.proxy import Proxy
from dicom_tls_proxy.ops import audit as audit_log
from dicom_tls_proxy.ops.audit import Audit, event
from dicom_tls_proxy.ops.auditfile import AuditFile
from dicom_tls_proxy.ops.metrics import MULTIPROC_ENV, Metrics
from dicom_tls_proxy.ops.process import (
    Bound,
    StartError,
    bind_listeners,
    bind_metrics,
    ignore_until_handled,
    listeners_from_fds,
    pid_file,
    sd_notify,
    supervisor_gone,
    trim_heap,
)
from dicom_tls_proxy.ops.syslogsink import SyslogSink
from dicom_tls_proxy.ops.watch import watch_folders
from dicom_tls_proxy.transport import _openssl, sessions

Sinks = tuple[AuditFile | None, SyslogSink | None, Metrics | None]


def serve_forever(
    config: Config,
    *,
    listen: str | None = None,
    worker: int | None = None,
    lifeline: int | None = None,
) -> int:
    """Run one proxy process: the only one, or worker `worker` on sockets passed as `listen`,
    following its supervisor through the `lifeline` pipe (see `process`)."""
    ignore_until_handled()
    audit_log.setup_logging(config.proxy.log_format, config.proxy.log_level, worker=worker)
    if worker is None:
        for warning in config.warnings:
            event("config-warning", logging.WARNING, msg=warning)
    try:
        return trio.run(run, config, listen, worker, lifeline)
    except StartError as exc:
        event("start-failed", logging.ERROR, msg=str(exc))
        return 1


async def run(config: Config, listen: str | None, worker: int | None, lifeline: int | None) -> int:
    """The process's trio structure: an outer nursery for the syslog writer, which outlives the
    proxy's own nursery (`_serve`) so that the Application Stop, emitted once the proxy has
    stopped, still goes out; it gets CLOSE_TIMEOUT for what is queued, then is cancelled."""
    share = config.proxy.workers if worker is not None else 1
    proxy = Proxy(config, Audit(worker=worker), share=share)
    problems = proxy.forwarding.prepare(config)
    if problems:
        raise StartError("; ".join(problems))
    # Bound before any nursery opens, so that a port in use is a plain StartError.
    bound = listeners_from_fds(config, listen) if listen else await bind_listeners(config)
    trail, syslog, telemetry, metrics_sockets = await _open_sinks(config, proxy)
    code = 1
    async with trio.open_nursery() as outlives_proxy:
        if syslog is not None:
            await outlives_proxy.start(syslog.run)
            proxy.syslog = syslog
        try:
            code = await _serve(proxy, bound, (trail, syslog, telemetry), metrics_sockets, lifeline)
        finally:
            if syslog is not None:
                await syslog.finish()  # shielded, at most CLOSE_TIMEOUT
            outlives_proxy.cancel_scope.cancel()
    return code


async def _serve(
    proxy: Proxy,
    bound: Bound,
    sinks: Sinks,
    metrics_sockets: list[trio.SocketListener],
    lifeline: int | None,
) -> int:
    """The proxy's nursery: listeners, housekeeping, health checks, signals, and for a worker
    its supervisor's lifeline (the supervisor gone, the worker drains as on SIGTERM); ends
    drained."""
    config, audit = proxy.config, proxy.audit
    trail, _, telemetry = sinks
    code = 0
    with audit.attached(*sinks), pid_file(config.proxy.pid_file if proxy.worker is None else None):
        # Signals are caught before READY=1: a stop right after start drains like any other.
        signals_wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*signals_wanted) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_housekeeping, proxy)
                if trail is not None:
                    await nursery.start(trail.run)
                if telemetry is not None and telemetry.folder is None:
                    await nursery.start(telemetry.serve, metrics_sockets)
                elif telemetry is not None:  # a worker: the supervisor serves the pages
                    nursery.start_soon(telemetry.publish)
                addresses = await nursery.start(serve, proxy, bound)
                if telemetry is not None:
                    telemetry.listening = addresses
                    telemetry.changed()
                if proxy.worker in (None, 0):  # with workers = N, worker 0 checks for all
                    nursery.start_soon(proxy.health.run)
                nursery.start_soon(proxy.forwarding.run)  # one process per spool forwards

                def reload() -> None:  # SIGHUP and `watch = true` alike
                    proxy.reload(config.path)

                if proxy.worker is None:  # with workers = N, the parent watches for all
                    nursery.start_soon(watch_folders, lambda: proxy.gen.config, reload)

                def stop(cause: str, **why: str) -> None:
                    """The first stop request drains; a second one stops at once."""
                    nonlocal code
                    if not proxy.stopping:
                        audit.event(
                            "stopping",
                            logging.INFO,
                            cause=cause,
                            **why,
                            msg="draining; a second signal stops at once",
                        )
                        sd_notify("STOPPING=1")

                        async def drain_then_stop() -> None:
                            await proxy.drain()
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(drain_then_stop)
                    else:
                        audit.event("stopping-now", logging.WARNING, cause=cause, **why)
                        code = 1
                        nursery.cancel_scope.cancel()

                if lifeline is not None:

                    async def follow_the_supervisor(fd: int) -> None:
                        await supervisor_gone(fd)
                        stop(cause="supervisor-gone")

                    nursery.start_soon(follow_the_supervisor, lifeline)
                audit.event(
                    "started",
                    config=str(config.path),
                    listeners=addresses,
                    openssl_path=_openssl.PATH,
                    openssl_why=_openssl.WHY,
                    **_ticket_keys(config),
                )
                sd_notify("READY=1")
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGUSR1:
                        audit.event("stats", **proxy.stats())
                    elif signum == signal.SIGHUP:
                        reload()
                    else:
                        stop(cause="signal", signal=name)
        audit.event("stopped", code=code)  # still inside `attached`: the audit file gets it
    return code


def _ticket_keys(config: Config) -> dict[str, Any]:
    """How session tickets are keyed, for the "started" line, when a listener issues them."""
    if any(li.tls and config.tls[li.tls].session_tickets for li in config.listeners):
        return {"ticket_keys": sessions.TICKET_KEYS}
    return {}


async def _housekeeping(proxy: Proxy) -> None:
    """Once a second: report suppressed log lines; and when traffic has gone quiet, give freed
    memory back to the system (see `process.trim_heap`)."""
    moved, relayed, dirty = proxy.moved, proxy.relayed, False
    while True:
        await trio.sleep(proxy.audit.limiter.interval)
        proxy.audit.flush_suppressed()
        if (proxy.moved, proxy.relayed) != (moved, relayed):
            moved, relayed, dirty = proxy.moved, proxy.relayed, True
        elif dirty:
            dirty = False
            trim_heap()


async def _open_sinks(
    config: Config, proxy: Proxy
) -> tuple[AuditFile | None, SyslogSink | None, Metrics | None, list[trio.SocketListener]]:
    """The audit file, the syslog collector and the metrics server of `[audit]` and `[metrics]`,
    if configured."""
    trail = None
    if config.audit.file is not None:
        extra = {} if proxy.worker is None else {"worker": proxy.worker}
        trail = AuditFile(config.audit.file, extra=extra)
        trail.open()
    syslog = None  # its writer is started by `run`, in a nursery that outlives the proxy's
    if config.audit.syslog is not None and config.audit.syslog_tls is not None:
        name = config.audit.syslog_tls
        syslog = SyslogSink(
            config.audit.syslog, config.tls[name], context=proxy.gen.client_contexts[name]
        )
    if config.metrics.bind is None:
        return trail, syslog, None, []
    if proxy.worker is not None:  # the supervisor serves; this worker writes its share
        folder = os.environ.get(MULTIPROC_ENV)
        metrics = Metrics(proxy, trail, syslog, folder=Path(folder)) if folder else None
        return trail, syslog, metrics, []
    try:
        sockets = await bind_metrics(config)
    except StartError:
        if syslog is not None:
            syslog.close()
        raise
    return trail, syslog, Metrics(proxy, trail, syslog), sockets

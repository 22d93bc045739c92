"""`workers = N`: one parent binds every listening socket, N worker processes serve them.

Why processes: one trio process uses one core; a department gateway has several. Why the parent
binds: a second `run` on the same ports then fails clearly (EADDRINUSE) instead of silently sharing
them through SO_REUSEPORT, and every worker accepts from the same kernel queue. Workers are spawned
as fresh interpreters (`dicom-tls-proxy worker`), never forked from inside `trio.run`, and in their
own session, so a terminal's Ctrl-C reaches the parent only and is forwarded once. They follow the
parent through a lifeline pipe (see `process`): when the parent is gone, even by SIGKILL, they
drain and stop, and free the listening ports for the next parent. A worker that dies on its own
(any exit the parent did not ask for) is started again after a back-off (1 s, 2 s, 4 s ... 60 s);
one that keeps dying right after it starts makes the parent give up, stop the others and exit
non-zero.

With `[metrics]` the parent serves /metrics, /healthz and /readyz for all the workers (see
`workersmetrics`): they write to a private folder the parent makes and removes, and the parent
forgets a dead worker's live gauges before it starts the next one. With
`watch = true` the parent watches the folders once and reloads the workers as SIGHUP does.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from dicom_tls_proxy.config.load import ConfigError, load_config
from dicom_tls_proxy.config.schema import Config
from dicom_tls_proxy.ops import audit
from dicom_tls_proxy.ops.audit import event
from dicom_tls_proxy.ops.metrics import MULTIPROC_ENV
from dicom_tls_proxy.ops.netaddr import format_address
from dicom_tls_proxy.ops.process import (
    StartError,
    bind_listeners,
    bind_metrics,
    ignore_until_handled,
    lifeline,
    listeners_spec,
    open_fds,
    pid_file,
    sd_notify,
)
from dicom_tls_proxy.ops.watch import watch_folders
from dicom_tls_proxy.ops.workersmetrics import WorkersMetrics

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

FIRST_DELAY = 1.0  # seconds before the first restart; doubled on each further death
MAX_DELAY = 60.0
STABLE_AFTER = 60.0  # a worker that ran this long starts the back-off from FIRST_DELAY again
QUICK_DEATH = 10.0  # a worker that dies this soon after it started "died immediately"
QUICK_DEATHS = 5  # ... this many times in a row: the parent gives up


class Backoff:
    """When to restart one worker slot, or None once it keeps dying right after it starts."""

    def __init__(self) -> None:
        self.delay = FIRST_DELAY
        self.quick = 0

    def died(self, uptime: float) -> float | None:
        if uptime >= STABLE_AFTER:
            self.delay = FIRST_DELAY
        self.quick = self.quick + 1 if uptime < QUICK_DEATH else 0
        if self.quick >= QUICK_DEATHS:
            return None
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_DELAY)
        return delay


async def supervise(config: Config) -> int:
    try:
        bound = await bind_listeners(config)
    except StartError as exc:
        event("start-failed", logging.ERROR, msg=str(exc))
        return 1
    web_sockets: list[trio.SocketListener] = []
    if config.metrics.bind is not None:
        try:
            web_sockets = await bind_metrics(config)
        except StartError as exc:
            for _, sl in bound:
                sl.socket.close()
            event("start-failed", logging.ERROR, msg=str(exc))
            return 1
    spec, fds = listeners_spec(bound)
    workers: list[trio.Process] = []  # the current process of each worker slot
    # Only this process talks to systemd (NotifyAccess=main): workers get no NOTIFY_SOCKET.
    # The metrics folder is ours alone: never one inherited from the environment.
    worker_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", MULTIPROC_ENV, MULTIPROC_ENV.lower())
    }
    web: WorkersMetrics | None = None
    if web_sockets:
        folder = Path(tempfile.mkdtemp(prefix="dicom-tls-proxy-metrics-"))  # new, empty, 0700
        worker_env[MULTIPROC_ENV] = str(folder)
        web = WorkersMetrics(
            config,
            folder,
            [format_address(sl.socket.getsockname()) for _, sl in bound],
            lambda: [p.pid if p.returncode is None else None for p in workers],
        )
    failed = False
    stopping = False  # from here on, a worker's exit is one the parent asked for
    # Kept open (write end) for the parent's whole life: the workers stop when it is gone.
    follow, hold = lifeline()

    async def spawn(index: int) -> trio.Process:
        return await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "dicom_tls_proxy",
                "worker",
                "-c",
                str(config.path),
                "--index",
                str(index),
                "--listen",
                spec,
                "--lifeline",
                str(follow),
            ],
            pass_fds=[*fds, follow],
            start_new_session=True,
            env=worker_env,
        )

    # Signals are caught before any worker exists: a SIGTERM right after start must stop the
    # workers too, never kill the parent alone and leave them running.
    with trio.open_signal_receiver(*FORWARDED) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def keep(index: int) -> None:
                    """Watch worker `index`; start it again when it dies unless we are stopping."""
                    nonlocal failed
                    backoff = Backoff()
                    while True:
                        started = trio.current_time()
                        code = await workers[index].wait()
                        if web is not None:
                            web.worker_died(workers[index].pid)
                        if stopping:  # asked to: not a death, nothing to restart
                            event("worker-stopped", worker=index, code=code)
                            return
                        delay = backoff.died(trio.current_time() - started)
                        if delay is None:
                            failed = True
                            event(
                                "worker-exited",
                                logging.ERROR,
                                worker=index,
                                code=code,
                                msg=f"the worker died {QUICK_DEATHS} times in a row within "
                                f"{QUICK_DEATH:g}s of starting; stopping the others",
                            )
                            nursery.cancel_scope.cancel()
                            return
                        event(
                            "worker-exited",
                            logging.ERROR,
                            worker=index,
                            code=code,
                            msg=f"restarting it in {delay:g}s",
                        )
                        await trio.sleep(delay)
                        if stopping:
                            return
                        try:
                            proc = await spawn(index)
                        except OSError as exc:  # counts as one more death, right after the start
                            event("worker-start-failed", logging.ERROR, worker=index, msg=str(exc))
                            continue
                        workers[index] = proc
                        if stopping:  # the stop signal came while it was being started
                            proc.send_signal(signal.SIGTERM)
                        event(
                            "worker-restarted", worker=index, code=code, delay=delay, pid=proc.pid
                        )

                if web is not None:
                    await nursery.start(web.serve, web_sockets)
                for index in range(config.proxy.workers):
                    workers.append(await spawn(index))
                for index in range(config.proxy.workers):
                    nursery.start_soon(keep, index)
                watched = config  # the last config that loaded here: what `watch` looks at

                def forward(signum: int) -> None:
                    event(
                        "signal", signal=signal.Signals(signum).name, msg="forwarded to the workers"
                    )
                    for proc in workers:
                        if proc.returncode is None:
                            proc.send_signal(signum)

                def reload() -> None:
                    """SIGHUP and `watch = true` alike: the workers reload (and log the outcome);
                    the parent loads the config too, only to follow what `watch` looks at."""
                    nonlocal watched
                    if stopping:
                        return
                    forward(signal.SIGHUP)
                    try:
                        watched = load_config(config.path)
                    except ConfigError:
                        return  # the workers log why; keep watching what was watched
                    if web is not None:
                        web.config = watched  # metrics.allow_source follows, as in a worker

                nursery.start_soon(watch_folders, lambda: watched, reload)
                facts: dict[str, Any] = {"workers": len(workers), "pids": [p.pid for p in workers]}
                if web is not None:
                    facts["metrics_folder"] = str(web.folder)
                event("workers-started", **facts)
                sd_notify(
                    "READY=1"
                )  # the sockets are bound: connections queue until a worker accepts
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        reload()
                        continue
                    if signum == signal.SIGUSR1:  # each worker logs its own stats line
                        alive = [p.pid for p in workers if p.returncode is None]
                        event("stats", workers=len(alive), pids=alive, fds=open_fds())
                        forward(signum)
                        continue
                    stopping = True
                    if web is not None:
                        web.stopping = True  # /readyz: 503 while the workers drain
                    sd_notify("STOPPING=1")
                    forward(signum)
                    break
                with trio.move_on_after(60):
                    for index in range(len(workers)):
                        await workers[index].wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for proc in workers:
                    if proc.returncode is None:
                        proc.terminate()
                for proc in workers:
                    with trio.move_on_after(10):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
            for _, sl in bound:
                sl.socket.close()
            for sl in web_sockets:
                sl.socket.close()
            if web is not None:
                shutil.rmtree(web.folder, ignore_errors=True)
            os.close(follow)
            os.close(hold)
    return 1 if failed else 0


def run_supervisor(config: Config) -> int:
    ignore_until_handled()
    audit.setup_logging(config.proxy.log_format, config.proxy.log_level)
    for warning in config.warnings:
        event("config-warning", logging.WARNING, msg=warning)
    with pid_file(config.proxy.pid_file):
        return trio.run(supervise, config)

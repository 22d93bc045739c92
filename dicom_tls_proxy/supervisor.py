"""`workers = N`: one parent binds every listening socket, N worker processes serve them.

Why processes: one trio process uses one core; a department gateway has several. Why the parent
binds: a second `run` on the same ports then fails clearly (EADDRINUSE) instead of silently sharing
them through SO_REUSEPORT, and every worker accepts from the same kernel queue. Workers are spawned
as fresh interpreters (`dicom-tls-proxy worker`), never forked from inside `trio.run`, and in their
own session, so a terminal's Ctrl-C reaches the parent only and is forwarded once. If a worker dies
the parent stops the others and exits non-zero (restarting workers belongs to the operations work).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import trio

from dicom_tls_proxy import audit
from dicom_tls_proxy.audit import event
from dicom_tls_proxy.config import Config
from dicom_tls_proxy.server import StartError, bind_listeners, pid_file, sd_notify

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def supervise(config: Config) -> int:
    try:
        bound = await bind_listeners(config)
    except StartError as exc:
        event("start-failed", logging.ERROR, msg=str(exc))
        return 1
    spec = ",".join(f"{li.name}={sl.socket.fileno()}" for li, sl in bound)
    fds = [sl.socket.fileno() for _, sl in bound]
    workers: list[trio.Process] = []
    # Only this process talks to systemd (NotifyAccess=main): workers get no NOTIFY_SOCKET.
    worker_env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    failed = False
    stopping = False
    try:
        async with trio.open_nursery() as nursery:

            async def watch(index: int, proc: trio.Process) -> None:
                nonlocal failed
                code = await proc.wait()
                if not stopping:
                    failed = True
                    event(
                        "worker-exited",
                        logging.ERROR,
                        worker=index,
                        code=code,
                        msg="a worker died; stopping the others",
                    )
                    nursery.cancel_scope.cancel()

            for index in range(config.proxy.workers):
                proc = await trio.lowlevel.open_process(
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
                    ],
                    pass_fds=fds,
                    start_new_session=True,
                    env=worker_env,
                )
                workers.append(proc)
                nursery.start_soon(watch, index, proc)
            event("workers-started", workers=len(workers), pids=[p.pid for p in workers])
            sd_notify("READY=1")  # the sockets are bound: connections queue until a worker accepts
            with trio.open_signal_receiver(*FORWARDED) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum != signal.SIGHUP:
                        stopping = True
                        sd_notify("STOPPING=1")
                    event("signal", signal=name, msg="forwarded to the workers")
                    for proc in workers:
                        if proc.returncode is None:
                            proc.send_signal(signum)
                    if stopping:
                        break
            with trio.move_on_after(60):
                for proc in workers:
                    await proc.wait()
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
    return 1 if failed else 0


def run_supervisor(config: Config) -> int:
    audit.setup_logging(config.proxy.log_format, config.proxy.log_level)
    for warning in config.warnings:
        event("config-warning", logging.WARNING, msg=warning)
    with pid_file(config.proxy.pid_file):
        return trio.run(supervise, config)

"""`adept serve` starts a Ray of its own on this machine, and that Ray must live and die with it.

Ray's daemons (GCS, raylet, agents) share the process group of the process that starts them, so a signal
to `adept serve`'s group (Ctrl-C in a terminal, `kill -TERM -PGID`, `timeout`, a container runtime) would
hit them before the server could stop in order; Serve's controller then cannot answer and its shutdown
waits for nothing. So `adept serve` is a small supervisor: the server runs in a child process of a session
of its own (`supervise`), the supervisor passes each SIGINT or SIGTERM on to it once, and the child stops
at once (no grace) if the supervisor is gone (`watch_parent`: killed with SIGKILL, say). After a SIGKILL
of the server itself, Ray's agents outlive their raylet by up to a minute, holding ports: a reaper in a
session of its own notes every process the server started while it runs and kills those left once it is
gone (`start_reaper`; `psutil.Process.is_running` checks the start time, so a reused pid is never hit)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

CHILD_ENV = "ADEPT_SERVE_SUPERVISOR"  # set in the server child: its supervisor's pid


def supervise(argv: list[str]) -> int:
    """Run `python -m serving.cli *argv` as the server child; returns its exit code."""
    child = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *argv], env={**os.environ, CHILD_ENV: str(os.getpid())},
        start_new_session=True,
    )  # fmt: skip

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code


def supervisor() -> int | None:
    """In the server child: its supervisor's pid (None when the server runs without one)."""
    pid = os.environ.get(CHILD_ENV)
    return int(pid) if pid else None


def watch_parent(parent: int, gone: Callable[[], None], interval_s: float = 0.5) -> None:
    """Call `gone()` (from a thread) once process `parent` is no longer this process's parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        gone()

    threading.Thread(target=watch, name="watch-supervisor", daemon=True).start()


def start_reaper(pid: int) -> subprocess.Popen:
    """Watch process `pid` (the server) from a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "serving.deploy.local_ray", str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def reap(pid: int, interval_s: float = 0.5) -> int:
    """Until process `pid` ends, note its descendants every `interval_s`; then kill those left. Returns
    how many were killed."""
    started: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        server = psutil.Process(pid)
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            for p in server.children(recursive=True):
                started.setdefault(p.pid, p)
            time.sleep(interval_s)
    killed = 0
    for p in started.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running():
                p.kill()
                killed += 1
    return killed


if __name__ == "__main__":
    reap(int(sys.argv[1]))

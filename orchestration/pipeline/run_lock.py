"""RUN_DIR/.lock: which `pipeline run` drives a run directory, and whether it is still there.

The driver holds an exclusive flock on the file for the whole run (a second run on the directory
is refused), writes {"pid", "host", "started"} into it and refreshes its mtime every
HEARTBEAT_SECONDS (the heartbeat), and removes it when the run ends, however it ends short of a
kill. So a .lock left behind means the driver died (kill -9, OOM, a node lost): `pipeline status`
sees that from any process, on this host by the pid, elsewhere (a cluster's driver, the run
directory on shared storage) by a heartbeat older than HEARTBEAT_STALE seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import ConfigError

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_STALE = 120.0  # a driver silent this long is gone (clocks of two hosts may differ a little)


@dataclass(frozen=True)
class Driver:
    """The `pipeline run` a .lock names, as another process sees it."""

    pid: int | None
    host: str
    started: float | None
    heartbeat_age: float
    """Seconds since the driver last refreshed the lock."""
    alive: bool

    def describe(self) -> str:
        return f"pid {self.pid or '?'} on {self.host or 'an unknown host'}"


@contextmanager
def run_lock(run_dir: Path):
    """Hold RUN_DIR/.lock for the run: a second `pipeline run` on the same directory is refused."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read()).get("pid", "?")
            handle.close()
            raise ConfigError(f"{run_dir} is in use by another `hanyeong pipeline run` (pid {holder})") from None
        if _same_file(handle, path):
            break
        handle.close()  # the run before us removed the file between our open and our lock: again
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="hanyeong-run-heartbeat", daemon=True)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3)}))
        handle.flush()
        beat.start()
        yield
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        path.unlink(missing_ok=True)  # while still locked: a run that opens it now finds it gone
        handle.close()


def read_driver(run_dir: Path) -> Driver | None:
    """The driver RUN_DIR/.lock names, or None when no `pipeline run` holds the directory."""
    path = Path(run_dir) / LOCK_FILE
    try:
        text, mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except FileNotFoundError:
        return None
    info = _parse(text)
    pid, host = info.get("pid"), str(info.get("host", ""))
    age = max(0.0, time.time() - mtime)
    alive = age < HEARTBEAT_STALE
    if alive and host == socket.gethostname() and isinstance(pid, int):
        alive = _pid_alive(pid)
    return Driver(pid if isinstance(pid, int) else None, host, info.get("started"), round(age, 1), alive)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(path)
        except OSError:  # storage briefly away: the next beat tries again
            pass


def _parse(text: str) -> dict:
    text = text.strip()
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        info = None
    if isinstance(info, dict):
        return info
    return {"pid": int(text)} if text.isdigit() else {}  # a lock written before the heartbeat: a pid


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

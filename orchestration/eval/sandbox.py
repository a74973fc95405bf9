"""Running untrusted generated code (HumanEval completions) in a separate, limited process.

A program never runs in the evaluating process. Each runs as `python -I runner.py` in its own
temporary directory (removed afterwards), in its own session (its whole process group is killed
when it ends or overruns), with a wall-clock limit, and under these limits and guards:

- OS limits set by the runner before the program starts (resource.setrlimit): RLIMIT_AS (memory;
  an endless allocation raises MemoryError), RLIMIT_CPU (a CPU-bound loop is killed even if the
  wall clock is not checked), RLIMIT_NPROC 0 (no fork; NOTE: the kernel ignores it for root),
  RLIMIT_FSIZE (no file grows past it), RLIMIT_CORE 0.
- Namespaces where `unshare` works (probed once): a network namespace without interfaces, and a
  PID namespace whose processes all die with the program (`--kill-child`).
- Python-level guards installed by the runner (as human-eval's `reliability_guard`, stronger for
  root, which rlimits do not bind): socket creation, fork/exec/spawn/system/subprocess, kill,
  removing/renaming/chmod of files, and opening a file for writing outside the directory all
  raise PermissionError. A program that calls into C (ctypes) can get past these; the OS limits
  and the process-group kill still hold.
- The environment is emptied (no proxies, HOME and TMPDIR = the directory; `-I` ignores PYTHON*).

A program that exits 0 passed; anything else (an exception, a limit, a timeout) failed.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TIMEOUT_S = 10.0  # wall clock per program
MEMORY_MB = 1024  # address space per program
FILE_MB = 16  # largest file a program may write
OUTPUT_CHARS = 2000  # tail of stdout+stderr kept per program

RUNNER = r'''
import builtins, io, os, resource, sys
MEMORY, CPU, FILE = {memory}, {cpu}, {file}
for limit, value in ((resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CPU, CPU),
                     (resource.RLIMIT_FSIZE, FILE), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
HERE = os.path.realpath(os.getcwd())
real_open, real_os_open = builtins.open, os.open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True
    path = os.path.realpath(os.fspath(path))
    return path == HERE or path.startswith(HERE + os.sep)

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        raise PermissionError(f"sandbox: no writing outside {{HERE}}: {{file}}")
    return real_open(file, mode, *args, **kwargs)

def guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not inside(path):
        raise PermissionError(f"sandbox: no writing outside {{HERE}}: {{path}}")
    return real_os_open(path, flags, *args, **kwargs)

def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {{name}} is not allowed")
    return refused

builtins.open = io.open = guarded_open
os.open = guarded_os_open
for name in ("fork", "forkpty", "vfork", "system", "popen", "execl", "execle", "execlp", "execlpe",
             "execv", "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill",
             "killpg", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
             "truncate", "chmod", "chown", "lchown", "link", "symlink", "putenv", "unsetenv",
             "setuid", "setgid", "chroot", "chdir", "fchdir"):
    if hasattr(os, name):
        setattr(os, name, refuse("os." + name))
import _posixsubprocess, shutil, socket, subprocess
_posixsubprocess.fork_exec = refuse("subprocess")
subprocess.Popen = refuse("subprocess")
shutil.rmtree = shutil.move = shutil.chown = refuse("shutil")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = refuse("socket")
import _socket
_socket.socket = refuse("socket")
sys.argv = ["program.py"]
with real_open("program.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {{"__name__": "__main__", "__builtins__": builtins}})
'''


@dataclass(frozen=True)
class Outcome:
    """How one program ended."""

    passed: bool
    status: str
    """'passed', 'failed' (non-zero exit: an exception, a limit, a refused call) or 'timeout'."""
    seconds: float
    output: str
    """The tail of its stdout and stderr."""


@functools.cache
def unshare_prefix() -> tuple[str, ...]:
    """`unshare` with a fresh network and PID namespace, when this machine allows it; else ()."""
    command = shutil.which("unshare")
    if command is None:
        return ()
    prefix = (command, "--net", "--pid", "--fork", "--kill-child")
    if os.geteuid() != 0:
        prefix += ("--map-root-user",)
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else ()


def run_program(source: str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Outcome:
    """Run `source` as a Python program in a fresh temporary directory under the limits above."""
    runner = RUNNER.format(memory=memory_mb << 20, cpu=int(timeout) + 1, file=FILE_MB << 20)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hanyeong-sandbox-") as folder:
        for name, text in (("runner.py", runner), ("program.py", source)):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        env = {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
               "no_proxy": "*", "NO_PROXY": "*", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        process = subprocess.Popen([*unshare_prefix(), sys.executable, "-I", "-B", "runner.py"], cwd=folder,
                                   env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            output = b""
        finally:
            kill_group(process)
        if status == "timeout":
            output, _ = process.communicate()
    text = output.decode("utf-8", errors="replace")[-OUTPUT_CHARS:]
    return Outcome(status == "passed", status, round(time.perf_counter() - started, 3), text)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL everything left in the program's session (children it may have started)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_programs(sources: Sequence[str], timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
                 workers: int | None = None) -> list[Outcome]:  # fmt: skip
    """run_program on each source, a few at a time; outcomes in the sources' order."""
    workers = workers or max(1, min(4, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, memory_mb), sources))

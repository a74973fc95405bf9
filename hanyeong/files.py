"""Files written whole or not at all (a crash never leaves half a file), with the modes ordinary
files get: what the umask allows, so a run on a cluster's shared storage is readable by the group."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temporary name and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # open() creates 0666 less the umask, as any file
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path) -> None:
    """Give a file the mode open() would have: 0666 less the umask. Libraries that write through a
    private temporary file (safetensors does) leave 0600, which other users of shared storage
    cannot read. A hard link keeps its source's mode (the file may not be ours to change)."""
    info = path.stat()
    mode = 0o666 & ~umask()
    if info.st_nlink == 1 and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log (metrics.jsonl, eval.jsonl); none when it does not exist, and a
    line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_figure(path: Path, figure) -> Path:
    """A matplotlib figure saved as a PNG at `path`, whole or not at all (write_atomic)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)

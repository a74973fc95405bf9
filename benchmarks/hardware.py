"""What machine a benchmark ran on: the name its results files carry, and the CPU model.

Results are named by the kind of machine, not its (random, container) host name; set
HANYEONG_MACHINE to name them yourself.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def machine_name() -> str:
    """e.g. linux-x86_64-2cpu."""
    return os.environ.get("HANYEONG_MACHINE") or f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    return found.group(1) if found else platform.processor() or platform.machine()

"""What fits: checks made before memory is allocated, so a small file or a typo that asks for more
than the machine has is refused in one line instead of swapping, or dying, minutes later.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

MAX_IMAGES_PER_JOB = 10_000_000  # --num: far beyond any dataset, far below what a typo asks
MAX_SIDE = 4096  # data.image_size and --size: the largest image side ddpmkit makes or trains at


CGROUP = Path("/sys/fs/cgroup")
# (limit, usage) of a memory cgroup: v2, then v1
CGROUP_FILES = (("memory.max", "memory.current"),
                ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def available_memory() -> int:
    """Bytes this process may still allocate: the system's available memory (Linux, macOS), or
    unbounded where it cannot be read; less where a container's memory limit leaves less."""
    return min(_system_memory(), _cgroup_room())


def _system_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _cgroup_room() -> int:
    """What the memory cgroup this runs in (a container's limit) still allows, if it sets one."""
    for limit, usage in CGROUP_FILES:
        try:
            cap = (CGROUP / limit).read_text().strip()
            return 1 << 62 if cap == "max" else max(0, int(cap) - int((CGROUP / usage).read_text()))
        except (OSError, ValueError):
            continue
    return 1 << 62


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse an allocation of `nbytes` for `what` that the machine cannot hold now."""
    free = available_memory()
    if nbytes > free:
        raise UserError(f"{what} needs {gib(nbytes)} of memory and {gib(free)} is available: {fix}")


def check_count(value: int, limit: int, what: str) -> None:
    if value > limit:
        raise UserError(f"{what}={value:,} is more than ddpmkit's limit of {limit:,}")

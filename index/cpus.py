"""What CPU this is and how many of its cores this process may use (the default thread count of the
model runtime), read at run time, never assumed.

ONNX Runtime's own default is one thread per physical core of the machine, whatever the process may run
on. Under `taskset`, a cpuset or a container CPU quota that oversubscribes the cores it has: measured on
2 cores of an AMD EPYC, a text query pinned to one core took 7.1 ms with ONNX Runtime's default (2 threads)
and 2.4 ms with 1 thread. So the default is what the process is allowed, read at run time.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2 CPU quota: "max PERIOD" (no limit) or "QUOTA PERIOD" in microseconds (`docker run --cpus`)."""


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (rounded up), or None without a quota (or without cgroup v2)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(allowed, limit) if limit is not None else allowed)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where that file cannot be read, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

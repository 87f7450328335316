"""Resident memory of this process: now, and its high-water mark since the process image started.

The high-water mark is /proc's VmHWM, which belongs to the address space and so starts afresh in a spawned
process; getrusage's ru_maxrss survives fork + exec and would report the parent's peak in a child."""
from __future__ import annotations

import os


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

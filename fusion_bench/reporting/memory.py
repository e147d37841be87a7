"""Host memory as the kernel counts it: the resident set now and its peak so far (Linux; elsewhere peak only)."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

log = logging.getLogger("fusion_bench.memory")


def rss_gib() -> float | None:
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    import os

    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def peak_children_gib() -> float:
    """The largest peak of this process's finished child processes (worker processes)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def release() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps it otherwise, and the next stage's
    peak starts from there)."""
    import ctypes
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def log_memory(stage: str) -> float:
    """Log 'memory after <stage>: RSS x GiB, peak y GiB' and return the peak."""
    now, peak = rss_gib(), peak_rss_gib()
    log.info("memory after %s: RSS %s GiB, peak %.2f GiB", stage, "?" if now is None else f"{now:.2f}", peak)
    return peak

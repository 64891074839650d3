"""Measuring helpers shared by ``pyinfluence bench`` (:mod:`~pyinfluence.bench.runner`,
:mod:`~pyinfluence.bench.report`, :mod:`~pyinfluence.bench.scaling`) and the benchmark studies
(:mod:`pyinfluence.bench.studies`): peak memory of a call, timing several implementations
interleaved, and what the machine is.

Peak memory (Linux): garbage-collect, return freed heap to the kernel (``malloc_trim(0)``), reset the
resident high-water mark (``echo 5 > /proc/self/clear_refs``), read VmRSS, run, read VmHWM. It counts
every allocation (C++, BLAS, torch, numpy) and the result. Elsewhere :func:`tracemalloc_peak` sees
the Python heap (numpy's buffers) only.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "cpu_model",
    "hwm_supported",
    "interleaved",
    "malloc_trim",
    "reset_hwm",
    "rss_peak_delta",
    "status_kb",
    "tracemalloc_peak",
    "usable_cores",
]

_LIBC: Any = None


def malloc_trim() -> None:
    """Return glibc's freed heap to the kernel (no-op where there is no glibc)."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def status_kb(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...); -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return -1
    return int(m.group(1)) if m else -1


def reset_hwm() -> bool:
    """Reset the process's resident high-water mark (Linux ≥ 4.0); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_supported() -> bool:
    """Whether the resident high-water mark can be reset and read here."""
    return reset_hwm() and status_kb("VmHWM") > 0


def rss_peak_delta(fn: Callable[[], object]) -> int:
    """Bytes by which the resident peak (VmHWM) rose above the resident size during ``fn()``
    (its result included; dropped afterwards)."""
    gc.collect()
    malloc_trim()
    reset_hwm()
    base = status_kb("VmRSS")
    out = fn()
    peak = status_kb("VmHWM")
    del out
    return max(0, peak - base) * 1024


def tracemalloc_peak(fn: Callable[[], object]) -> int:
    """Peak bytes traced by tracemalloc during ``fn()`` (numpy registers its data buffers with
    tracemalloc; BLAS workspaces and C++ allocations are not seen)."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        tracemalloc.stop()
    return max(0, peak - base)


def interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    *,
    budget_s: Optional[float] = None,
    min_repeats: int = 5,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Time implementations side by side: ``warmup`` untimed calls of each, then ``repeats``
    rounds in which every implementation runs once, the order alternating between rounds, with
    the garbage collector off and each result dropped before the next call. With ``budget_s``,
    rounds stop once that many seconds have passed (warm-up included) and ``min_repeats`` rounds
    are done. Returns {name: (wall seconds, CPU seconds)} per round."""
    names = list(fns)
    t_begin = time.perf_counter()
    for _ in range(warmup):
        for nm in names:
            out = fns[nm]()
            del out
    wall: Dict[str, List[float]] = {nm: [] for nm in names}
    cpu: Dict[str, List[float]] = {nm: [] for nm in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            if budget_s is not None and r >= min_repeats and time.perf_counter() - t_begin > budget_s:
                break
            for nm in names if r % 2 == 0 else names[::-1]:
                t, c = time.perf_counter(), time.process_time()
                out = fns[nm]()
                wall[nm].append(time.perf_counter() - t)
                cpu[nm].append(time.process_time() - c)
                del out
    finally:
        gc.enable()
    return {nm: (np.asarray(wall[nm]), np.asarray(cpu[nm])) for nm in names}


def cpu_model() -> Optional[str]:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def usable_cores() -> Optional[int]:
    """CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()

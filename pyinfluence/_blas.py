"""Load the BLAS and the compiled core so that their thread pools stay polite on small machines.

Location. The extension's RUNPATH points at ``site-packages/scipy_openblas32/lib``; when the package lives
elsewhere (editable installs, unusual layouts) we load the library first with ``RTLD_LOCAL`` so the dynamic
loader finds it by soname. Never ``RTLD_GLOBAL``: that would let other extensions (scipy) bind to our copy.

Thread pools. numpy's OpenBLAS, our OpenBLAS, OpenMP (ours and torch's) share the cores. After each call an
OpenBLAS worker spins for 2**28 cycles (~0.1 s) by default before sleeping, so interleaved small calls from two
libraries slow each other several-fold (measured in bench/RESULTS.md). OpenBLAS and libgomp read their
settings once, when they are loaded; we set a short spin (``OPENBLAS_THREAD_TIMEOUT=16``: 2**16 cycles;
``GOMP_SPINCOUNT``) only while *our* copies load, then restore the environment, so no other library is affected.
A value the user set in the environment always wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

_POLITE_THREADS = {"OPENBLAS_THREAD_TIMEOUT": "16", "GOMP_SPINCOUNT": "20000"}


@contextlib.contextmanager
def polite_thread_pools() -> Iterator[None]:
    """Temporarily set short thread-spin settings for libraries loaded inside the block."""
    added = []
    for name, value in _POLITE_THREADS.items():
        if name == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ:
            continue
        if name not in os.environ:
            os.environ[name] = value
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def preload_scipy_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # built with PYINFLUENCE_BLAS=system/none, or the wheel is missing
        return
    libdir = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()
    for candidate in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        path = os.path.join(libdir, candidate)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
            return

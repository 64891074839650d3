"""Locate the BLAS the compiled core was linked against (PyPI wheel ``scipy-openblas32``).

The extension's RUNPATH points at ``site-packages/scipy_openblas32/lib``; when the package lives elsewhere
(editable installs, unusual layouts) we load the library first with ``RTLD_LOCAL`` so the dynamic loader
finds it by soname. Never ``RTLD_GLOBAL``: that would let other extensions (scipy) bind to our copy.
"""

from __future__ import annotations

import ctypes
import os


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
            ctypes.CDLL(path, mode=os.RTLD_LOCAL if hasattr(os, "RTLD_LOCAL") else 0)
            return

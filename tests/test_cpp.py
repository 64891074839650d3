"""The C++ core as a C++ library, run from pytest so that CI (`pytest -q tests`) builds and checks it every time.

One session-scoped build of the CMake project with PYINFLUENCE_PYTHON=OFF (no Python involved in the build; Eigen
from the `cmeel-eigen` wheel of the `test` extra, CMake and Ninja from PyPI too), Release, shared by:

- the ctest suite: tests/cpp unit tests (Cholesky residuals, Newton optimality, Hessian vs finite differences, batched
  scores vs naive loops, streaming top-k vs a full sort, status codes and misuse, the CUDA kernels on the host
  emulator) and the in-tree install + consumer check;
- an install into a temporary prefix, checked file by file, and the consumer project tests/cpp/consumer configured
  against it with find_package(pyinfluence) exactly as a user would, built and run through ctest.

These tests never skip for a missing tool: cmake and ninja are in the `test` extra, so a missing one is a broken test
environment and fails with the command that installs it. For quick Python-only iterations a developer may set
PYINFLUENCE_SKIP_CPP=1 (CI never does: .ci/run unsets it). PYINFLUENCE_CPP_BUILD_DIR=<dir> reuses a build directory
between runs instead of a fresh temporary one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1800  # seconds per command; the first build of the core takes about 2 minutes on 2 cores

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("PYINFLUENCE_SKIP_CPP", "") not in ("", "0"),
        reason="PYINFLUENCE_SKIP_CPP is set (C++ build and ctest skipped on request)",
    ),
]


def tool(name: str) -> str:
    """An executable from this Python environment (where the `test` extra installs cmake and ninja), else PATH."""
    bindir = Path(sys.executable).parent
    for candidate in (bindir / name, bindir / f"{name}.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` not found; install the test requirements: pip install '.[test]'", pytrace=False
        )
    return found


def eigen_prefix() -> str:
    """The CMake prefix of Eigen: the cmeel-eigen wheel on sys.path (as CMakeLists.txt finds it with Python on)."""
    for entry in sys.path:
        prefix = Path(entry) / "cmeel.prefix"
        if (prefix / "share" / "eigen3" / "cmake" / "Eigen3Config.cmake").is_file():
            return str(prefix)
    pytest.fail("Eigen (the cmeel-eigen wheel) not found on sys.path; pip install '.[test]'", pytrace=False)


def run(cmd: list, what: str, cwd: Path = ROOT) -> str:
    """Runs a command; on failure the test fails with its output (the tail, where the error is)."""
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    env.setdefault("CTEST_PARALLEL_LEVEL", "1")
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-150:])
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}", pytrace=False
        )
    return proc.stdout


def configure_args(build: Path, **defines: str) -> list:
    args = [
        tool("cmake"),
        "-S",
        ROOT,
        "-B",
        build,
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={eigen_prefix()}",
        "-DPYINFLUENCE_PYTHON=OFF",
    ]
    return args + [f"-D{k}={v}" for k, v in defines.items()]


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    """Configure and build the core and tests/cpp once per session (no Python in the build)."""
    build = Path(os.environ.get("PYINFLUENCE_CPP_BUILD_DIR") or tmp_path_factory.mktemp("cpp") / "build")
    out = run(configure_args(build, PYINFLUENCE_BUILD_TESTS="ON"), "cmake configure")
    assert "pyinfluence: BLAS=none" in out, "with PYINFLUENCE_PYTHON=OFF the default BLAS must be Eigen's own"
    run([tool("cmake"), "--build", build], "cmake --build")
    return build


def test_ctest(cpp_build: Path) -> None:
    """All of tests/cpp through ctest: the unit tests, then install_core and the consumer (label `install`)."""
    out = run([tool("ctest"), "--test-dir", cpp_build, "--output-on-failure", "--timeout", "900"], "ctest")
    for name in (
        "test_cholesky",
        "test_objective",
        "test_engine",
        "test_status",
        "test_cuda_emulated",
        "install_core",
        "consumer",
    ):
        assert f" {name} " in out and "Passed" in out, f"ctest did not run {name}:\n{out}"
    assert "100% tests passed" in out, out
    assert "Not Run" not in out and "***Skipped" not in out, out


def test_install_and_consumer(cpp_build: Path, tmp_path: Path) -> None:
    """cmake --install into a fresh prefix gives a package another project finds and links (tests/cpp/consumer)."""
    prefix = tmp_path / "prefix"
    run([tool("cmake"), "--install", cpp_build, "--prefix", prefix], "cmake --install")
    headers = [
        "pyinfluence.hpp",
        "types.hpp",
        "families.hpp",
        "objective.hpp",
        "cholesky.hpp",
        "engine.hpp",
        "newton.hpp",
        "status.hpp",
        "threads.hpp",
    ]
    for h in headers:
        assert (prefix / "include" / "pyinfluence" / h).is_file(), f"{h} not installed"
    files = {p.name for p in prefix.rglob("*") if p.is_file()}
    for f in ("pyinfluenceConfig.cmake", "pyinfluenceConfigVersion.cmake", "pyinfluenceTargets.cmake"):
        assert f in files, f"{f} not installed: {sorted(files)}"
    assert any(f.startswith("libpyinfluence_core") or f == "pyinfluence_core.lib" for f in files), sorted(
        files
    )
    assert not any(".so" in f or f.endswith(".pyd") for f in files), (
        f"Python modules in the C++ install: {files}"
    )
    # The wheel installs only the `python` component: in this build there is none, so it installs nothing.
    python_only = tmp_path / "python-only"
    run(
        [tool("cmake"), "--install", cpp_build, "--prefix", python_only, "--component", "python"],
        "install python",
    )
    assert not python_only.exists() or not any(p.is_file() for p in python_only.rglob("*"))

    consumer = tmp_path / "consumer"
    run(
        [
            tool("cmake"),
            "-S",
            ROOT / "tests" / "cpp" / "consumer",
            "-B",
            consumer,
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={prefix};{eigen_prefix()}",
        ],
        "consumer configure",
    )
    run([tool("cmake"), "--build", consumer], "consumer build")
    out = run([tool("ctest"), "--test-dir", consumer, "--output-on-failure", "-V"], "consumer ctest")
    assert "100% tests passed" in out and "0 failures" in out, out


def find_nvcc() -> Optional[str]:
    """nvcc as CMake would find it: $CUDACXX, PATH, then the default toolkit location."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.cuda
def test_cuda_build_compiles(tmp_path: Path) -> None:
    """PYINFLUENCE_CUDA=ON compiles the kernels (csrc/cuda) and links them (cuda_smoke), on every change.

    Only the CUDA library and a small program that links it are built, not the core or the Python module. Runs
    wherever nvcc is installed, GPU or not (the GPU comparisons are in test_cuda.py); skipped without nvcc.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip(
            "nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin): the CUDA build cannot be compiled here"
        )
    build = tmp_path / "cuda"
    out = run(
        configure_args(build, PYINFLUENCE_CUDA="ON", PYINFLUENCE_BUILD_TESTS="ON", CMAKE_CUDA_COMPILER=nvcc),
        "cmake configure (CUDA)",
    )
    assert "pyinfluence: CUDA kernels=ON" in out, f"nvcc is at {nvcc} but CMake did not enable CUDA:\n{out}"
    run([tool("cmake"), "--build", build, "--target", "pyinfluence_cuda", "cuda_smoke"], "CUDA build")
    out = run([build / "tests" / "cpp" / "cuda_smoke"], "cuda_smoke")
    assert "pyinfluence::cuda:" in out and "device(s)" in out, out

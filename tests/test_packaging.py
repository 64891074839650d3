"""Packaging: torch is optional for the linear path, one version everywhere, the README's commands and the extras.

The no-torch tests run a fresh interpreter whose first meta-path finder refuses ``torch`` and ``torch.*`` (as if torch
were not installed: ModuleNotFoundError), then run the README's example, the linear command line and the torch
path's imports there. CI also checks this on a real install without torch (.ci/no-torch).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pyinfluence
from pyinfluence import _core

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXTRA_HINT = "pip install 'pyinfluence[torch]'"

# Prepended to every no-torch script: the interpreter behaves as if torch were not installed.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def run_without_torch(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` after BLOCK_TORCH in a fresh interpreter. The cwd is outside the repository: ``python -c``
    puts it first on sys.path, and the source tree's pyinfluence/ must not shadow the installed package."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def readme_block(after: str, lang: str) -> str:
    """The first ```lang block of README.md after the line ``after``."""
    tail = README.split(after, 1)
    assert len(tail) == 2, f"README.md has no {after!r}"
    m = re.search(rf"^```{lang}\n(.*?)^```", tail[1], re.S | re.M)
    assert m, f"README.md has no ```{lang} block after {after!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=60) > 0).astype(int)
    path = tmp_path_factory.mktemp("data") / "data.csv"
    lines = ["a,b,c,y"] + [",".join(f"{v:.6f}" for v in row) + f",{label}" for row, label in zip(X, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# torch is optional
# ------------------------------------------------------------------------------------------------
def test_blocking_works(tmp_path):
    proc = run_without_torch("import torch", tmp_path)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_readme_example_runs_without_torch(tmp_path):
    example = readme_block("## Example", "python")
    assert "import pyinfluence" in example
    out = ok(
        run_without_torch(example + "\nassert 'torch' not in sys.modules, 'torch was imported'\n", tmp_path)
    )
    assert "helpful:" in out and "predicted loss change if removed:" in out


def test_linear_package_imports_without_torch(tmp_path):
    code = """
    import pyinfluence
    import pyinfluence.applications
    import pyinfluence.cli
    import pyinfluence.linear
    from pyinfluence import *  # noqa: F403  (__all__ lists the torch path only where torch is installed)

    assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    assert "TorchInfluence" not in pyinfluence.__all__
    print(pyinfluence.__version__)
    """
    assert ok(run_without_torch(code, tmp_path)).strip() == pyinfluence.__version__


def test_no_module_of_the_linear_path_imports_torch(tmp_path):
    # every module but the torch path, the benchmark and the demo (which need torch and say so), in one process
    code = """
    import importlib
    import pkgutil

    import pyinfluence

    NEEDS_TORCH = ("pyinfluence.torch", "pyinfluence.bench", "pyinfluence.cli.demo")
    names = [m.name for m in pkgutil.walk_packages(pyinfluence.__path__, "pyinfluence.")]
    linear = [n for n in names if not n.startswith(NEEDS_TORCH) and n != "pyinfluence.__main__"]
    for name in linear:
        importlib.import_module(name)
        assert "torch" not in sys.modules, f"importing {name} imported torch"
    print(len(linear))
    """
    assert int(ok(run_without_torch(code, tmp_path)).strip()) > 10


@pytest.mark.parametrize(
    "statement",
    [
        "pyinfluence.TorchInfluence",
        "pyinfluence.BlockCG",
        "import pyinfluence.torch",
        "from pyinfluence.torch import TorchInfluence",
        "import pyinfluence.bench",
    ],
)
def test_torch_path_without_torch_names_the_extra(tmp_path, statement):
    code = f"""
    import pyinfluence

    try:
        {statement}
    except ImportError as exc:
        print(type(exc).__name__, exc)
    else:
        raise SystemExit("no ImportError")
    """
    out = ok(run_without_torch(code, tmp_path))
    assert out.startswith("ImportError ") and EXTRA_HINT in out and "needs PyTorch" in out, out


def test_command_line_explain_and_mislabels_without_torch(tmp_path, small_csv):
    # python -m pyinfluence, as `python -m` runs it (run_module with alter_sys), after the blocker
    code = f"""
    import runpy

    def cli(*args):
        sys.argv = ["pyinfluence", *args]
        try:
            runpy.run_module("pyinfluence", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            return exc.code
        return 0

    data = {str(small_csv)!r}
    assert cli("explain", data, "--label", "y", "--test-indices", "0,5,10-12", "-k", "3", "--out", "explain") == 0
    assert cli("mislabels", data, "--label", "y", "--out", "mislabels") == 0
    assert "torch" not in sys.modules, "the linear command line imported torch"
    print("demo exit", cli("demo", "--quick", "--out", "demo"))
    print("bench exit", cli("bench", "--quick", "--out", "bench"))
    """
    proc = run_without_torch(code, tmp_path)
    out = ok(proc)
    assert "test point 0" in out and "ranked by |self-influence|" in out, out
    for name in ("explain", "mislabels"):
        assert (tmp_path / name / f"{name}.csv").stat().st_size > 0
        assert (tmp_path / name / f"{name}.json").stat().st_size > 0
    # the demo and the benchmark need torch: exit 1 and a one-line error naming the extra
    assert "demo exit 1" in out and "bench exit 1" in out, out
    for command in ("demo", "bench"):
        line = next(ln for ln in proc.stderr.splitlines() if ln.startswith(f"pyinfluence {command}: error:"))
        assert EXTRA_HINT in line, proc.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / "bench").exists()


# ------------------------------------------------------------------------------------------------
# one version
# ------------------------------------------------------------------------------------------------
def test_versions_agree():
    from pyinfluence._version import __version__ as source

    assert pyinfluence.__version__ == source
    assert _core.__version__ == source, "the compiled core is stale: reinstall (pip install -e .)"
    assert importlib.metadata.version("pyinfluence") == source, "the installed metadata is stale: reinstall"
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d+)*", source), source


def test_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=", pyproject, re.M), "a static version in pyproject.toml"
    assert 'input = "pyinfluence/_version.py"' in pyproject
    assert "pyinfluence/_version.py" in cmake
    assert not re.search(r"project\(pyinfluence VERSION \d", cmake), "a literal version in CMakeLists.txt"


# ------------------------------------------------------------------------------------------------
# licence, extras and the README's commands
# ------------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_file_matches_the_declared_licence():
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License") and "the pyinfluence developers" in text
    assert "Neither the name of the copyright holder" in text


def test_torch_is_an_extra_not_a_dependency():
    project = _pyproject()["project"]
    assert not any(re.match(r"torch\b", d) for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.1,<2.15"]
    for name in ("test", "demo", "bench"):
        assert "pyinfluence[torch]" in extras[name], name
    lint = " ".join(extras["lint"])
    assert "ruff" in lint and "mypy" in lint and "pyinfluence[lint]" in extras["test"]


@pytest.mark.parametrize("after", ["<!-- test-command -->", "## Quick start"])
def test_readme_commands_pin_torch_first_and_install_the_torch_extra(after):
    cmd = readme_block(after, "bash").strip()
    extras = _pyproject()["project"]["optional-dependencies"]
    torch_at = cmd.index("pip install torch==2.13.0")
    m = re.search(r'pip install "\.\[([a-z,]+)\]"', cmd)
    assert m and m.start() > torch_at, cmd
    named = m.group(1).split(",")
    assert "torch" in named and all(n in extras for n in named), cmd
    if after == "<!-- test-command -->":
        assert cmd.endswith("bash .ci/check") and (ROOT / ".ci" / "check").is_file()
        check = (ROOT / ".ci" / "check").read_text()
        lint = [check.index(c) for c in ("ruff check .", "ruff format --check .", "run mypy")]
        assert max(lint) < check.index("run pytest -q tests"), "lint and types run before the tests"

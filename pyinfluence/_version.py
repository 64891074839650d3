"""The version of pyinfluence: the one place it is written.

pyproject.toml reads it (scikit-build-core's regex metadata provider), CMakeLists.txt parses it for
``project(VERSION)``, the C++ package's config-version file and ``pyinfluence._core.__version__``, and
``pyinfluence.__version__`` is this string.
"""

__version__ = "0.1.0"

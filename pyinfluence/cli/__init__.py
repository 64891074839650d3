"""The user-facing programs: the ``pyinfluence`` command line (:mod:`pyinfluence.cli.commands`), the demo
(:mod:`pyinfluence.cli.demo`), the HTML reports (:mod:`pyinfluence.cli.report`) and the reader of users'
data files (:mod:`pyinfluence.cli.userdata`)."""

from pyinfluence.cli.commands import main

__all__ = ["main"]

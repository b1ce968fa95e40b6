"""The ``bnadapt`` command line: ``main`` is the console script (``bnadapt = "bnadapt.cli:main"``).

One module per subcommand group (``adapt``: adapt and corrupt; ``bench``: bench, sweep and analyze; ``bank``;
``demo``; ``report``), the flag groups and argument types they share in ``args``, and the parser and the
dispatch in ``app`` (not ``main``: the function re-exported here would shadow a submodule of that name). The
submodules never import this package's ``__init__``: it imports them, so that would be a cycle.

Example:
    >>> from bnadapt.cli import main
    >>> main(["report", "no-such-folder"])  # doctest: +SKIP
    2
"""

from __future__ import annotations

from ..errors import USER_ERRORS
from .app import build_parser, main

__all__ = ["USER_ERRORS", "build_parser", "main"]

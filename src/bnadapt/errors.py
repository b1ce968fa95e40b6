"""The error types that mean "the input or the options are wrong", shared by the library, the CLI and torchrun ranks.

Library code raises the built-in types with an "expected X, got Y" message; the CLI turns any of
:data:`USER_ERRORS` into a one-line message and exit code 2. Anything else is a bug and keeps its traceback.

Example:
    >>> isinstance(ValueError("expected a positive n, got 0"), USER_ERRORS)
    True
"""

from __future__ import annotations

__all__ = ["EXIT_USAGE", "USER_ERRORS"]

EXIT_USAGE = 2

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

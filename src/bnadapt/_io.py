"""Small file helpers shared by every module that writes outputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or error half-way leaves no truncated file under the final name. The file gets the permissions the
    user's umask gives a new file (0644 under umask 022), not the temporary file's 0600.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"expected an existing directory for the output {path}, got none at {path.parent}; create it first"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; an output is as readable as any file the user creates (0644 under umask 022).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    # Reading the umask means setting it: put it straight back. Not cached, so a changed umask is followed.
    mask = os.umask(0o077)  # the brief window errs on the private side for files other threads create
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> write_text(pathlib.Path(tempfile.mkdtemp()) / "out.md", "# done\\n").read_text()
        '# done\\n'
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

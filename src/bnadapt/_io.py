"""Small file helpers shared by every module that writes outputs: atomic writes, their temporaries, and the disk-full
errors of the libraries that write for us."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "no_space_error", "remove_stale_temporaries", "temporary_sibling", "write_text"]

# Our temporaries are named ".<final name>.<pid>-<token>.tmp": the pid says whether the writer is still alive, so a
# later run can remove what a killed one left without touching what a running one is writing.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-\w+\.tmp$")


def temporary_sibling(path: str | os.PathLike[str], token: str = "part") -> Path:
    """The name a temporary for ``path`` gets (``.<name>.<pid>-<token>.tmp`` beside it), which
    :func:`remove_stale_temporaries` removes once this process is gone.

    Example:
        >>> temporary_sibling("out/3").name == f".3.{os.getpid()}-part.tmp"
        True
    """
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{token}.tmp"


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries (files or folders) that a killed bnadapt process left in ``folder``: only entries named
    as :func:`temporary_sibling` and :func:`atomic_path` name them, whose process is no longer running, and, with
    ``names``, only those of these final names. Returns what was removed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / ".a.npy.999999999-x1.tmp").write_text("left by a killed run")
        >>> [p.name for p in remove_stale_temporaries(d)]
        ['.a.npy.999999999-x1.tmp']
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        found = _TEMPORARY.match(entry.name)
        if not found or (wanted is not None and found["name"] not in wanted) or pid_alive(int(found["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` is running (on this machine).

    Example:
        >>> pid_alive(os.getpid())
        True
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # alive but someone else's; or not a pid at all (kept, to be safe)
        return True
    return True


def no_space_error(e: BaseException, path: str | os.PathLike[str]) -> OSError | None:
    """``e`` as an ``OSError(ENOSPC or EDQUOT)`` naming ``path`` when it says the disk or quota is full, else None.

    numpy (``"1000 requested and 496 written"``, no errno), torch (``inline_container.cc ... unexpected pos``) and
    safetensors (``SafetensorError ... os error 28``) report a full disk in their own ways; the command line knows
    only the errno.

    Example:
        >>> no_space_error(OSError("1000 requested and 496 written"), "a.npy").errno == errno.ENOSPC
        True
    """
    text = str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        code = e.errno
    elif "os error 122" in text or "Disk quota exceeded" in text:
        code = errno.EDQUOT
    elif (
        "os error 28" in text
        or "No space left on device" in text
        or (isinstance(e, OSError) and e.errno is None and re.search(r"\d+ requested and \d+ written", text))
        # torch's zip writer checks its position after each write: a short write (a full disk) fails that check.
        or ("inline_container" in text and ("unexpected pos" in text or "write failed" in text))
    ):
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or error half-way leaves no truncated file under the final name; a full disk is an
    ``OSError(ENOSPC)`` naming ``path`` whatever library was writing (:func:`no_space_error`). Temporaries that a
    killed process left for the same ``path`` are removed first. The file gets the permissions the user's umask gives
    a new file (0644 under umask 022), not the temporary file's 0600.

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
    remove_stale_temporaries(path.parent, [path.name])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; an output is as readable as any file the user creates (0644 under umask 022).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        full = no_space_error(e, path)
        if full is None:
            raise
        raise full from e
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

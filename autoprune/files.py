"""Writing files safely: whole-or-nothing replacement, and names that stay one path component.

Every file the package replaces is first written to a fresh temporary file
beside it (``tempfile.mkstemp``: a new name nobody can predict, created
exclusively, so a symbolic link planted beside the target is never followed),
then renamed over the target with ``os.replace``; on failure the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AutopruneError

OUT_FIX = "free some space or choose another --out"  # what a report's or export's failed write tells the user


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it, which is not thread-safe


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (``torch.save``, ``fig.savefig``); on success it
    replaces ``path``, on any failure it is removed. The suffix is kept (``savefig`` reads the format from it)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def output_path(path: str | os.PathLike, fix: str = OUT_FIX) -> Iterator[Path]:
    """:func:`atomic_path` whose ``OSError`` (a full disk, a folder in the way) is one
    :class:`AutopruneError` line naming the file and ``fix``."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise AutopruneError(f"cannot write {path}: {exc.strerror or exc}; {fix}") from None


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (str as UTF-8), whole or not at all; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def safe_name(name: str) -> str:
    """``name`` as one harmless path component (a study's folder under ``reports/``).

    Letters, digits, ``.``, ``_`` and ``-`` are kept, anything else becomes ``_``,
    leading dots too (never ``.``, ``..``, hidden or empty); a name that had to
    change gets 8 hex digits of its sha256, so two names never share a folder.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    safe = "_" * (len(safe) - len(safe.lstrip("."))) + safe.lstrip(".")
    if safe == name and safe:
        return safe
    return f"{safe or 'study'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of the file at ``path``, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replace_marked(path: str | os.PathLike, start: str, end: str, block: str) -> bool:
    """Replace what lies between the marker lines ``start`` and ``end`` of a text file with ``block``.

    How benchmarks rewrite their figures in README.md; False (nothing written) when a marker is missing.
    """
    path = Path(path)
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write(path, head + start + "\n" + block + end + tail)
    return True

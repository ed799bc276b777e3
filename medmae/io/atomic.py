"""Temporary files for atomic writes, with the permissions an ordinary ``open`` would give.

``tempfile.mkstemp`` creates files readable by their owner only (0600) and ignores the umask, so every
output written through it (and renamed into place) would be unreadable to colleagues sharing a cache or a
results folder. :func:`temporary_beside` gives the temporary file ``0o666 & ~umask`` instead, as ``open``
does. Files that must stay private (the salt of the archive scan) are written with their own mode.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def temporary_beside(path: Path, prefix: str | None = None, suffix: str = "") -> tuple[int, str]:
    """``(fd, name)`` of a new hidden file in ``path``'s folder (``.PREFIX.<8 random characters>SUFFIX``), mode
    ``0o666 & ~umask``; the caller writes it and renames it over ``path`` (``os.replace``)."""
    stem = path.name if prefix is None else prefix
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp

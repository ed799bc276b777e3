"""Turning expected failures into one readable line instead of a traceback."""

from __future__ import annotations

import os
import sys

# what one bad scan raises (unreadable, no signal, bad label, too big for memory): a command over many scans
# skips that scan and reports it; anything else is a real crash
SCAN_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)


def report_error(error: BaseException) -> int:
    """Print ``error`` as ``medmae: error: ...`` on stderr and return exit code 2.

    Set ``MEDMAE_DEBUG=1`` to see the traceback instead.
    """
    if os.environ.get("MEDMAE_DEBUG"):
        raise error
    print(f"medmae: error: {error}", file=sys.stderr)
    return 2


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI wraps transform errors in ``RuntimeError``)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The first line of the innermost exception's message (its type name when it has none)."""
    text = str(root_cause(error)).strip()
    return text.splitlines()[0] if text else type(root_cause(error)).__name__

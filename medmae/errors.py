"""Turning expected failures into one readable line instead of a traceback."""

from __future__ import annotations

import os
import sys


def report_error(error: BaseException) -> int:
    """Print ``error`` as ``medmae: error: ...`` on stderr and return exit code 2.

    Set ``MEDMAE_DEBUG=1`` to see the traceback instead.
    """
    if os.environ.get("MEDMAE_DEBUG"):
        raise error
    print(f"medmae: error: {error}", file=sys.stderr)
    return 2

"""What every command-line tool of the project shares: how it names itself in its usage line, and
how it answers a user's mistake."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def prog(module: str, script: str) -> str:
    """``script`` (e.g. ``cnn-score``) when run as that console script, else ``python -m module``;
    argparse's own default would be the file name, ``__main__.py``."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def run(
    main: Callable[[argparse.Namespace], object],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    mistakes: tuple[type[Exception], ...] = (ValueError, OSError, LookupError),
) -> int:
    """Parse ``argv`` and run ``main``: exit status 0, or 2 with one line on stderr for a user's
    mistake (``mistakes``: a bad value, a missing file, an unknown model), never a traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except mistakes as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

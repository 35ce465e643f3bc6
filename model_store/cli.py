"""What every command-line tool of the project shares: how it names itself in its usage line, and
how it answers a user's mistake."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from model_store.errors import UsageError

USAGE_EXIT = 2  # argparse's own status for a bad command line


def prog(module: str, script: str) -> str:
    """``script`` (e.g. ``cnn-score``) when run as that console script, else ``python -m module``;
    argparse's own default would be the file name, ``__main__.py``."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def run(
    main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> int:
    """Parse ``argv`` and run ``main``: exit status 0, or 2 with one line on stderr for a
    :class:`UsageError` (a bad value, a file that is missing or is not what it should be, an
    unknown model). Nothing else is caught: a bug, or the machine failing, keeps its traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    return 0

"""What every command-line tool of the project shares: how it names itself in its usage line."""

from __future__ import annotations

import sys
from pathlib import Path


def prog(module: str, script: str) -> str:
    """``script`` (e.g. ``cnn-score``) when run as that console script, else ``python -m module``;
    argparse's own default would be the file name, ``batch.py`` or ``__main__.py``."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"

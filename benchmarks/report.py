"""Writing a benchmark's table into BENCHMARKS.md: each script owns the text between its markers."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from model_store.files import atomic_output


def write_section(path: Path, name: str, text: str, heading: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``, or append
    ``heading`` and the marked text when the file has no such markers yet. The file is replaced in
    one rename, so an interrupted run leaves the old one whole."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    document = path.read_text() if path.exists() else ""
    if start in document and end in document:
        before, rest = document.split(start, 1)
        document = f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}"
    else:
        document = f"{document.rstrip()}\n\n{heading}\n\n{start}\n{text}\n{end}\n"
    with atomic_output(path, "w") as f:
        f.write(document)


def publish(text: str, path: Path | None, name: str, heading: str) -> None:
    """Print a benchmark's section, and write it into ``path`` (:func:`write_section`) when given."""
    print(text)
    if path is not None:
        write_section(path, name, text, heading)


def device() -> str:
    """The CPU the figures were measured on, for a section's "Device:" line."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        if names:
            return f"CPU {names[0]}, {os.cpu_count()} cores"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"

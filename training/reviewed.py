"""A reviewed set: the labelled captures that ``python -m model_store captures export`` wrote, as a
fine-tune reads them.

    reviewed/<class>/<sha256>.<ext>      images labelled with one of the parent model's classes
                                         (named by ``model_store.captures.folder_name``)
    reviewed/not_in_domain/<sha256>.*    images that are no class at all
    reviewed/manifest.parquet            every capture's row and label (optional here)

Each image is held out of training or not by its SHA-256 (``model_store.captures.is_held_out``),
the rule the service's rollout also uses to score both models on labelled captures neither trained
on. A file not named by its SHA-256 (a folder a person put together) is hashed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from model_store.captures import NOT_IN_DOMAIN, SHA, folder_name, is_held_out
from model_store.errors import UsageError
from model_store.files import file_sha256
from training.folder import IMAGE_SUFFIXES, Items

MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class ReviewedSet:
    train: Items  # (file, class index of the parent's card)
    held_out: Items  # the same, kept out of training: the validation of the field
    outside: list[Path]  # labelled not_in_domain: never a class, only the OOD head's concern
    digest: str  # SHA-256 of the sorted "sha256 label" lines: which images, labelled how

    def counts(self, class_names: tuple[str, ...]) -> dict:
        """Images per class name, for the card's lineage and the log."""

        def per_class(items: Items) -> dict[str, int]:
            found: dict[str, int] = {}
            for _, label in items:
                found[class_names[label]] = found.get(class_names[label], 0) + 1
            return dict(sorted(found.items()))

        return {"train": per_class(self.train), "held_out": per_class(self.held_out), NOT_IN_DOMAIN: len(self.outside)}


def read_reviewed(root: Path, class_names: tuple[str, ...]) -> ReviewedSet:
    """The reviewed set in ``root``, its class folders mapped to ``class_names`` (the parent model's);
    a folder named otherwise is a UsageError naming it and the classes allowed."""
    if not root.is_dir():
        raise UsageError(f"--reviewed {root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if unquote(p.name) not in class_names and p.name != NOT_IN_DOMAIN]
    if unknown:
        raise UsageError(
            f"--reviewed {root} has folder(s) {unknown} that are not classes of the model; "
            f"allowed: {', '.join(map(folder_name, class_names))}, {NOT_IN_DOMAIN}"
        )
    train: Items = []
    held: Items = []
    outside: list[Path] = []
    lines = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            sha = path.stem if SHA.fullmatch(path.stem) else file_sha256(path)
            lines.append(f"{sha} {folder.name}\n")
            if folder.name == NOT_IN_DOMAIN:
                outside.append(path)
            else:
                (held if is_held_out(sha) else train).append((path, class_names.index(unquote(folder.name))))
    if not train:
        raise UsageError(
            f"--reviewed {root} has no labelled images to train on (class folders: "
            f"{[p.name for p in folders if p.name != NOT_IN_DOMAIN] or 'none'})"
        )
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    return ReviewedSet(train, held, outside, digest)

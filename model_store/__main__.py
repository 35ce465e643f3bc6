"""python -m model_store register FILE --name NAME | register-default | list | show TAG | captures ..."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model_store.cli import prog, run
from model_store.errors import UsageError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("model_store", "cnn-store"), description="Exported models in BentoML's model store."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser(
        "register",
        help="add an exported .onnx file (written by `python -m export`) once its graph agrees with its card",
    )
    register.add_argument("onnx", type=Path, help="the .onnx file")
    register.add_argument("--name", required=True, help="model name, e.g. fashion-lenet; the version is the file hash")
    register.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the training checkpoint the graph was exported from, kept beside it for fine-tuning (default: none)",
    )
    commands.add_parser(
        "register-default", help="add the models this repository ships (fashion-lenet, fashion-resnet20)"
    )
    commands.add_parser("list", help="list stored models with their architecture, classes and accuracy")
    show = commands.add_parser("show", help="print a stored model's card as JSON")
    show.add_argument("tag", help="NAME:VERSION or NAME (the latest)")
    add_captures_parser(commands)
    return parser


def add_captures_parser(commands) -> None:
    captures = commands.add_parser(
        "captures", help="what a service captured (SERVING_CAPTURE): list, label, delete, export, import"
    )
    actions = captures.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help)
        parser.add_argument("--store", required=True, help="the capture store: a folder or s3://bucket/prefix")
        parser.add_argument("--model", required=True, help="the model's name, e.g. fashion-lenet")
        return parser

    listed = action("list", help="counts, and the captures waiting for a label, most useful first")
    listed.add_argument("--limit", type=int, default=20, help="captures to list (default: 20)")
    label = action("label", help="label a capture: a class name of the model, or not_in_domain")
    label.add_argument("id", help="the capture's id (its SHA-256)")
    label.add_argument("label")
    label.add_argument("--by", default=os.environ.get("USER", "cli"), help="who labels (default: $USER)")
    delete = action("delete", help="remove a capture: its image and its row")
    delete.add_argument("id", help="the capture's id (its SHA-256)")
    export = action(
        "export", help="the labelled captures as an image folder that training reads, and a Parquet manifest"
    )
    export.add_argument("--output", type=Path, required=True, help="the folder to write")
    imported = action("import", help="labels from a CSV (path or sha256, label) or Label Studio's JSON export")
    imported.add_argument("file", type=Path, help="a .csv, or a .json exported by Label Studio")
    imported.add_argument("--by", default=None, help="who labelled (default: the file's name)")
    action("repair", help="remove images without a row and temp files that a killed writer left")


def captures(args: argparse.Namespace) -> None:
    from model_store.captures import (
        CaptureStore,
        check_model,
        counts,
        export_folder,
        label_rows,
        margin,
        read_csv_labels,
        read_label_studio,
        review_order,
    )

    store, model = CaptureStore(args.store), check_model(args.model)
    if args.action == "list":
        rows, labels = store.rows(model), store.labels(model)
        print(json.dumps(counts(rows, labels)))
        for row in review_order(rows, labels)[: args.limit]:
            print(
                f"{row['sha256']}  {row['reason']:<19}  {row['label']} {row['probability']:.3f}  margin {margin(row):.3f}"
            )
    elif args.action == "delete":
        if store.remove(model, args.id) is None:
            raise UsageError(f"no capture {args.id} of model {model} in {args.store}")
        print(f"removed {args.id}")
    elif args.action == "repair":
        print(f"removed {store.repair(model, grace_s=0)} files")
    elif args.action == "export":
        written = export_folder(store, model, args.output)
        print(
            f"wrote {sum(written.values())} images to {args.output}: "
            + ", ".join(f"{k} {v}" for k, v in written.items())
        )
    else:
        if args.action == "label":
            pairs, by = [(args.id, args.label)], args.by
        else:
            if not args.file.is_file():
                raise UsageError(f"{args.file} does not exist or is not a file")
            read = read_csv_labels if args.file.suffix.lower() == ".csv" else read_label_studio
            pairs, by = read(args.file.read_text(encoding="utf-8")), args.by or args.file.name
        from model_store.store import card_of, open_model

        classes = card_of(open_model(model)).class_names
        missing = [sha for sha, _ in pairs if store.row(model, sha) is None]
        if missing:
            raise UsageError(
                f"no capture {missing[0]} of model {model} in {args.store} ({len(missing)} of {len(pairs)} missing)"
            )
        store.add_labels(model, label_rows([s for s, _ in pairs], [label for _, label in pairs], by, classes))
        print(f"labelled {len(pairs)} captures of {model}")


def main(args: argparse.Namespace) -> None:
    import bentoml

    from model_store.store import card_of, open_model, register, register_shipped

    if args.command == "captures":
        return captures(args)
    if args.command in ("register", "register-default"):
        registered = [register(args.onnx, args.name, args.checkpoint)] if args.command == "register" else None
        for model in registered or register_shipped():
            print(f"registered {model.tag} at {model.path}")
    elif args.command == "show":
        print(json.dumps(card_of(open_model(args.tag)).to_dict(), indent=2))
    else:
        rows = [("TAG", "ARCH", "INPUT", "CLASSES", "TEST ACC")]
        for model in bentoml.models.list():
            try:
                card = card_of(model)
            except ValueError:
                rows.append((str(model.tag), "(no card: not registered by model_store)", "", "", ""))
                continue
            acc = card.metrics.get("test_acc")
            size = f"{card.in_channels}x{card.height}x{card.width}"
            rows.append((str(model.tag), card.arch, size, str(card.num_classes), f"{acc:.4f}" if acc else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cli(argv: list[str] | None = None) -> int:
    return run(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

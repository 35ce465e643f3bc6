"""python -m model_store register FILE --name NAME | register-default | list | show TAG"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_store.cli import prog, run


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
    commands.add_parser(
        "register-default", help="add the models this repository ships (fashion-lenet, fashion-resnet20)"
    )
    commands.add_parser("list", help="list stored models with their architecture, classes and accuracy")
    show = commands.add_parser("show", help="print a stored model's card as JSON")
    show.add_argument("tag", help="NAME:VERSION or NAME (the latest)")
    return parser


def main(args: argparse.Namespace) -> None:
    import bentoml

    from model_store.store import card_of, open_model, register, register_shipped

    if args.command in ("register", "register-default"):
        for model in [register(args.onnx, args.name)] if args.command == "register" else register_shipped():
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

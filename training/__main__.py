"""python -m training train | finetune | models | summary | evaluate: see each module's docstring."""

import argparse
import sys

from model_store.cli import prog, run
from training.extras import exit_if_missing_extra

try:
    from training import evaluate, field, summary, train
except ModuleNotFoundError as err:  # a serving install, without torch: say how to get it
    exit_if_missing_extra(err, "training")
    raise


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("training", "cnn-train"), description="Train, inspect and evaluate the classic CNNs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_arguments(
        commands.add_parser("train", help="train a model (Fashion-MNIST, an image folder, or synthetic data)")
    )
    field.add_arguments(
        commands.add_parser(
            "finetune",
            help="fine-tune a stored model on reviewed captures mixed with a replay of its own training images",
        )
    )
    commands.add_parser("models", help="list the registered models with their input size and parameters")
    summary.add_arguments(commands.add_parser("summary", help="layer-by-layer output shapes, parameters, mult-adds"))
    evaluate.add_arguments(commands.add_parser("evaluate", help="per-class accuracy and a confusion matrix"))
    return parser


COMMANDS = {
    "train": train.main,
    "finetune": field.main,
    "models": summary.print_models,
    "summary": summary.print_summary,
    "evaluate": evaluate.main,
}


def cli(argv: list[str] | None = None) -> int:
    try:
        return run(lambda args: COMMANDS[args.command](args), get_args_parser(), argv)
    except ModuleNotFoundError as err:  # one imported only when needed, e.g. torchvision to download
        exit_if_missing_extra(err, "training")
        raise


if __name__ == "__main__":
    sys.exit(cli())

"""Generated from the registry: every model builds, runs, learns, and can be summarized."""

import functools

import pytest
import torch
from torch import nn

from model_store import ModelCard
from training.__main__ import cli
from training.models import build_model, default_size, get_model, list_models
from training.summary import layer_table, smallest_input

MODELS = list_models()
# VGG at an eighth of its convolutions' width (a builder argument the course uses): the same graph,
# without the half gigabyte of weights that made each VGG's step, summary and export take seconds.
ARCH_ARGS = {name: {"width_divisor": 8} for name in MODELS if name.startswith("vgg")}


@functools.cache
def small_size(name: str) -> int:
    """Where the input size is not the point: the smallest input the network runs on, from 32 up."""
    size = default_size(name)
    return max(32, smallest_input(get_model(name, 1, 2), 1, size)) if size > 32 else size


@pytest.mark.parametrize("name", MODELS)
def test_forward_at_the_default_size(name):
    torch.manual_seed(0)
    size = default_size(name)
    model = get_model(name, in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_rgb_input_and_gradients_reach_every_parameter(name):
    size = small_size(name)  # first: the first call builds a model, which draws from the generator
    torch.manual_seed(0)
    model = get_model(name, in_channels=3, num_classes=4, **ARCH_ARGS.get(name, {})).train()
    nn.CrossEntropyLoss()(model(torch.randn(2, 3, size, size)), torch.tensor([0, 3])).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()
    ]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_a_few_steps_on_synthetic_data_reduce_the_loss(name):
    from training.synthetic import SyntheticShapes

    size = small_size(name)  # first: the first call builds a model, which draws from the generator
    torch.manual_seed(0)
    card = ModelCard(
        arch=name,
        arch_args=ARCH_ARGS.get(name, {}),
        class_names=[f"c{i}" for i in range(4)],
        in_channels=1,
        height=size,
        width=size,
        mean=(0.2,),
        std=(0.3,),
    )
    data = SyntheticShapes(16, card, seed=0)
    pixels, labels = torch.stack([data[i][0] for i in range(16)]), torch.tensor([data[i][1] for i in range(16)])
    model = build_model(card).train()
    # Plain SGD: an optimizer step over the parameters of VGG's fully connected head is the costly part.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def objective() -> float:
        """The batch's loss as training sees it (BatchNorm on the batch), without dropout's noise, which
        moved a VGG's loss more than five small steps do and made the comparison a coin toss."""
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        for m in dropouts:
            m.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(pixels), labels).item()
        for m in dropouts:
            m.train()
        return loss

    before = objective()
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert objective() < before


@pytest.mark.parametrize("name", MODELS)
def test_summary_walks_every_block_to_the_logits(name):
    model = get_model(name, 1, 10, **ARCH_ARGS.get(name, {}))
    rows = layer_table(model, small_size(name), 1)
    assert rows[-1]["shape"][-1] == 10 or rows[-1]["shape"] == (1, 10)
    assert all(row["shape"] is not None for row in rows)
    assert sum(row["params"] for row in rows) == sum(p.numel() for p in model.parameters())
    assert sum(row["macs"] for row in rows) > 0


def test_summary_reports_a_too_small_input_and_the_models_list(capsys):
    # The entry point in this process: test_console_scripts runs each tool as a process of its own.
    assert cli(["summary", "--model", "alexnet", "--size", "64"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: a 64x64 input is too small for this network: it fails at 12 (MaxPool2d)")
    assert cli(["models"]) == 0
    listing = capsys.readouterr().out
    for name in MODELS:
        assert name in listing
    assert "11,175,370" in listing  # resnet18 for one channel and ten classes


def test_lenet_macs_match_the_hand_count():
    rows = {row["name"]: row for row in layer_table(get_model("lenet", 1, 10), 28, 1)}
    assert rows["0"]["macs"] == 6 * 28 * 28 * 25 and rows["3"]["macs"] == 16 * 10 * 10 * 6 * 25
    assert rows["0"]["shape"] == (1, 6, 28, 28) and rows["5"]["shape"] == (1, 16, 5, 5)

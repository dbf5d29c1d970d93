"""``cli.py space MODEL``: print the search space a search of MODEL would use, to read or edit."""

from __future__ import annotations

import argparse

from rich.console import Console

from search.cli.options import positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "print the search space (TOML) of a model: its file in spaces/, or the one derived from its modules"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a torchvision CNN name (cli.py models lists them) or package.module:function")
    parser.add_argument("--input-size", type=positive_int, default=224, help="input height and width (default 224)")
    parser.add_argument("--classes", type=positive_int, default=1000, help="number of classes (default 1000)")


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from search.measuring.preflight import check_searchable
    from search.models.build import build_model, check_model_name
    from search.pruning.auto_space import space_for

    check_model_name(args.model)
    example = torch.zeros(1, 3, args.input_size, args.input_size)
    model = build_model(args.model, args.classes)
    space = space_for(args.model, None, args.classes, example, model=model)
    check_searchable(args.model, model, space, example)
    console.print(f"# {space.path}", markup=False, highlight=False)
    console.print(space.text.rstrip(), markup=False, highlight=False, soft_wrap=True)
    return 0

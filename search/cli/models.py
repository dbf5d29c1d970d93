"""``cli.py models``: the models ``--model`` takes, by family, with the space each one searches."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

__all__ = ["HELP", "add_arguments", "run"]

HELP = "list the torchvision CNNs --model takes by name, and the families refused with the reason"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="list only this family (resnet, regnet, efficientnet, ...)")


def run(args: argparse.Namespace, console: Console) -> int:
    from search.errors import UsageError
    from search.models.build import KNOWN_MODELS
    from search.models.families import CNN_FAMILIES, REFUSED_FAMILIES
    from search.pruning.space import shipped_space_path

    if args.family is not None and args.family not in CNN_FAMILIES:
        raise UsageError(f"unknown family {args.family!r}; families: {', '.join(CNN_FAMILIES)}")
    table = Table(title="--model NAME (torchvision classification CNNs)", title_justify="left")
    for column in ("family", "models", "small-input variants (NAME_cifar)", "space"):
        table.add_column(column, overflow="fold")
    for family in CNN_FAMILIES:
        if args.family not in (None, family):
            continue
        full = [n for n, s in KNOWN_MODELS.items() if s.family == family and not s.small_input]
        small = [n for n, s in KNOWN_MODELS.items() if s.family == family and s.small_input]
        files = [n for n in full + small if shipped_space_path(n) or shipped_space_path(KNOWN_MODELS[n].arch)]
        space = f"a file in spaces/ for {', '.join(files)}; derived for the rest" if files else "derived"
        table.add_row(family, " ".join(full), " ".join(small) or "-", space)
    console.print(table)
    if args.family is None:
        for family, (prefixes, reason) in REFUSED_FAMILIES.items():
            console.print(f"[bold]refused[/]: {family} ({', '.join(p + '*' for p in prefixes)}): {reason}")
        console.print(
            "A derived space has one stage per run of blocks at one resolution, named by module: "
            "`cli.py space NAME` prints it. Any other CNN: --model package.module:function."
        )
    return 0

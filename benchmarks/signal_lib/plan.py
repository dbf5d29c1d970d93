"""What ``benchmarks/signal_fidelity.py`` runs: budgets, candidates, the fidelities (rungs) and the reference."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

TRAIN_IMAGES = 45_000
"""Training images of the shared CIFAR-10 (one epoch)."""


@dataclass(frozen=True)
class Chain:
    """Brief fine-tunes continued rung after rung from the weights the previous rung left, as promotion would.

    Each rung after the first trains ``steps - previous steps`` more steps with a schedule of its own
    (warm-up, cosine to zero): a promoted trial is fine-tuned further, never from scratch.
    """

    name: str
    rungs: tuple[int, ...]
    """Cumulative fine-tune steps at each rung (0: BatchNorm recalibration alone)."""
    lr: float
    distill: float

    def label(self, steps: int, epoch_steps: int) -> str:
        what = "BN recalibration alone" if steps == 0 else ("1 epoch" if steps == epoch_steps else f"{steps} steps")
        extra = {"plain": "", "distill": f", distillation {self.distill:g}", "lr": f", lr {self.lr:g}"}[self.name]
        return what + extra

    def fidelity(self, steps: int) -> str:
        """The fidelity's key in the cache and the JSON, e.g. ``plain 100``."""
        return f"{self.name} {steps}"


@dataclass(frozen=True)
class Plan:
    model: str
    budgets: tuple[float, ...]
    candidates: dict[float, int]
    """Candidates per budget (fraction of the baseline's latency)."""
    search_best: int
    """At most this many of the search's best trials per budget (where a study exists in allocation's cache)."""
    batch: int
    """Brief fine-tune batch (the allocation benchmark's trials: 64)."""
    lr: float
    """The search's default brief learning rate."""
    second_lr: float
    distill: float
    """Distillation weight of the distilled chain (allocation's searches ran 0.5)."""
    rungs: tuple[int, ...]
    """Cumulative steps of the plain chain; the last is one epoch."""
    variant_rungs: tuple[int, ...]
    """Cumulative steps of the distilled and second-lr chains."""
    bn_batches: int
    reference_epochs: float
    reference_batch: int
    reference_lr: float
    reference_distill: float
    seeds: tuple[int, ...]
    """Reference seeds; the brief fidelities run with the first."""
    search_images: int
    """The validation subset the search reads (--val-images)."""
    subsets: tuple[int, ...]
    """Validation subset sizes whose sampling spread the noise floor reports."""
    bootstrap: int
    val_limit: int | None = None
    """Read every fidelity on this many validation images (None: all 5,000)."""
    test_limit: int | None = None
    """Read the reference on this many test images (None: all 10,000)."""
    quick: bool = False

    @property
    def epoch_steps(self) -> int:
        return self.rungs[-1]

    @property
    def reference_steps(self) -> int:
        return max(1, round(self.reference_epochs * math.ceil(TRAIN_IMAGES / self.reference_batch)))

    def chains(self) -> tuple[Chain, ...]:
        return (
            Chain("plain", (0, *self.rungs), self.lr, 0.0),
            Chain("distill", self.variant_rungs, self.lr, self.distill),
            Chain("lr", self.variant_rungs, self.second_lr, 0.0),
        )

    @staticmethod
    def of(args: argparse.Namespace, model: str) -> Plan:
        if args.quick:
            return Plan(
                model=model,
                budgets=(0.5,),
                candidates={0.5: 4},
                search_best=1,
                batch=32,
                lr=args.lr,
                second_lr=args.second_lr,
                distill=0.5,
                rungs=(2, 4, 8, 12),
                variant_rungs=(2, 4),
                bn_batches=2,
                reference_epochs=0.01,
                reference_batch=32,
                reference_lr=0.01,
                reference_distill=0.5,
                seeds=(0, 1),
                search_images=150,
                subsets=(150, 300),
                bootstrap=50,
                val_limit=300,
                test_limit=300,
                quick=True,
            )
        epoch = math.ceil(TRAIN_IMAGES / args.batch)
        budgets = tuple(args.budgets)
        counts = {f: (args.candidates if f <= 0.25 else args.candidates_loose) for f in budgets}
        return Plan(
            model=model,
            budgets=budgets,
            candidates=counts,
            search_best=args.search_best,
            batch=args.batch,
            lr=args.lr,
            second_lr=args.second_lr,
            distill=args.distill,
            rungs=(30, 100, 300, epoch),
            variant_rungs=(30, 100),
            bn_batches=8,
            reference_epochs=args.reference_epochs,
            reference_batch=32,
            reference_lr=0.01,
            reference_distill=0.5,
            seeds=tuple(args.seeds),
            search_images=2000,
            subsets=(2000, 5000),
            bootstrap=args.bootstrap,
        )

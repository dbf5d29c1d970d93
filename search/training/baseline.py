"""The unpruned model every policy starts from: the user's weights, or one trained here.

Without ``--weights`` the tool trains the baseline itself on the training split and caches
the checkpoint under ``studies/cache/``, keyed by model, data, epochs and seed, so later runs
(and resumed studies) reuse it instead of training again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from search.data.dataset import Dataset
from search.models.build import build_model
from search.models.checkpoint import file_sha256, save_checkpoint
from search.models.weights import load_weights
from search.progress import NullReporter, Reporter
from search.training.finetune import TrainSettings, train

__all__ = ["Baseline", "baseline_cache_path", "prepare_baseline"]


@dataclass
class Baseline:
    model: nn.Module
    model_name: str
    weights: str
    """The file the weights came from (or ``imagenet``)."""
    sha256: str | None
    """Hash of that file; ``export`` refuses to rebuild from a baseline that changed."""
    trained_here: bool


def baseline_cache_path(cache_dir: Path, model_name: str, data: Dataset, epochs: int, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return cache_dir / f"baseline-{safe}-{data.name}-{data.fingerprint}-e{epochs}-s{seed}.pt"


def kept_baseline_path(path: Path, sha256: str) -> Path:
    """Where a cached baseline goes when a study from another machine puts its own in ``path``."""
    return path.with_name(f"{path.stem}-{sha256[:12]}{path.suffix}")


def prepare_baseline(
    model_name: str,
    weights: str | None,
    data: Dataset,
    *,
    cache_dir: Path,
    epochs: int,
    seed: int = 0,
    reporter: Reporter | None = None,
    device: str = "cpu",
    sha256: str | None = None,
) -> Baseline:
    """Build the baseline model with the given weights, or train (or reuse) one here.

    ``sha256``: the baseline a resumed study was made with, used from where :func:`kept_baseline_path` put it
    when the cache's file has since been replaced by another study's."""
    reporter = reporter or NullReporter()
    with torch.random.fork_rng():  # the same seed gives the same initial weights, so the same baseline
        torch.manual_seed(seed)
        model = build_model(model_name, data.num_classes)
    if weights is not None:
        loaded = load_weights(model, weights, model_name=model_name, reporter=reporter)
        model.eval()
        return Baseline(model, model_name, weights, loaded.sha256, trained_here=False)
    path = baseline_cache_path(cache_dir, model_name, data, epochs, seed)
    if (
        sha256 is not None
        and kept_baseline_path(path, sha256).exists()
        and (not path.exists() or file_sha256(path) != sha256)
    ):
        path = kept_baseline_path(path, sha256)
    if path.exists():
        loaded = load_weights(model, str(path), model_name=model_name)
        reporter.info(f"Baseline: reusing {path} (trained earlier on this data)")
        model.eval()
        return Baseline(model, model_name, str(path), loaded.sha256, trained_here=True)
    batch_size = 32
    steps = epochs * math.ceil(len(data.train) / batch_size)
    reporter.info(
        f"Baseline: no --weights given, training {model_name} from scratch for {epochs} epochs "
        f"({steps} steps) on {len(data.train)} {data.name} images"
    )
    settings = TrainSettings(
        steps=steps, batch_size=batch_size, lr=0.05, seed=seed, warmup_fraction=0.15, device=device
    )
    result = train(model, data, settings, reporter=reporter, description="train baseline")
    sha = save_checkpoint(
        path,
        model,
        model_name=model_name,
        num_classes=data.num_classes,
        meta={
            "epochs": epochs,
            "seed": seed,
            "data": data.name,
            "data_fingerprint": data.fingerprint,
            "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
            "device": device,
        },
    )
    reporter.info(f"Baseline: trained in {result.seconds:.0f} s, saved to {path}")
    model.eval()
    return Baseline(model, model_name, str(path), sha, trained_here=True)

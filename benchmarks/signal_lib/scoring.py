"""Scoring candidates: each fidelity of a chain (promotion continues from the previous rung's weights), and the
reference (a long fine-tune from the pruned model, per seed, on the test images).

Every result is one entry of the cache, keyed by budget, candidate, fidelity and seed. The weights a
chain's latest rung left are kept beside the cache, so a rerun continues the chain where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.allocation import log
from benchmarks.signal_lib.bench import Bench
from benchmarks.signal_lib.plan import Chain, Plan
from search.pruning.channels import prune_copy
from search.pruning.policy import Policy
from search.study.uncertainty import pack_correct
from search.training.evaluate import top1_correct
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train

__all__ = ["reference", "reference_key", "run_chain", "score_key"]


def score_key(plan: Plan, tag: str, cid: str, chain: Chain, steps: int, seed: int) -> str:
    """The cache key of one fidelity's score: what decides it is in the key, so changed settings never reuse it."""
    read = plan.val_limit or "all"
    return (
        f"score {tag} {cid} {chain.fidelity(steps)} seed {seed} "
        f"(batch {plan.batch}, lr {chain.lr:g}, distill {chain.distill:g}, bn {plan.bn_batches}, val {read})"
    )


def reference_key(plan: Plan, tag: str, cid: str, seed: int) -> str:
    read = plan.test_limit or "all"
    return (
        f"reference {tag} {cid} epochs {plan.reference_epochs:g} seed {seed} (batch {plan.reference_batch}, "
        f"lr {plan.reference_lr:g}, distill {plan.reference_distill:g}, bn {plan.bn_batches}, test {read})"
    )


def _pruned(bench: Bench, candidate: dict[str, Any]) -> nn.Module:
    """The candidate's pruned copy of the baseline (deterministic: the same channels on every call)."""
    policy = Policy.from_dict(candidate["policy"])
    return prune_copy(bench.baseline, policy, bench.space, bench.data, seed=0).model


def _recalibrated(bench: Bench, plan: Plan, candidate: dict[str, Any], seed: int) -> tuple[nn.Module, float]:
    started = time.perf_counter()
    model = _pruned(bench, candidate)
    recalibrate_batchnorm(model, bench.data, batches=plan.bn_batches, batch_size=32, seed=seed)
    return model, time.perf_counter() - started


def _read(bench: Bench, model: nn.Module, split: str, limit: int | None) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    correct = top1_correct(model, bench.data, split, limit=limit)
    seconds = time.perf_counter() - started
    record = {"images": len(correct), "top1": float(correct.mean()), "per_image": pack_correct(correct.tolist())}
    return record, seconds


def run_chain(bench: Bench, plan: Plan, tag: str, candidate: dict[str, Any], chain: Chain, seed: int) -> None:
    """Every rung of ``chain`` for ``candidate``, each continued from the previous rung's weights (cached)."""
    folder = bench.work / "weights" / tag / candidate["id"]
    model: nn.Module | None = None
    previous: tuple[int, Path] | None = None
    for steps in chain.rungs:
        key = score_key(plan, tag, candidate["id"], chain, steps, seed)
        path = folder / f"{chain.name}-{steps}-seed{seed}.pt"
        if bench.has(key):
            bench.cached(key, lambda: None)  # logs the reuse
            model, previous = None, (steps, path)
            continue
        if model is None:
            model = _resume(bench, plan, candidate, chain, seed, previous)
        record = _rung(bench, plan, candidate, chain, seed, steps, previous, model)
        if steps > 0 and steps != chain.rungs[-1]:  # the weights a later rung (or a rerun) continues from
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        bench.cached(key, lambda record=record: record)
        if previous is not None and previous[1] != path:
            previous[1].unlink(missing_ok=True)
        previous = (steps, path)


def _resume(
    bench: Bench, plan: Plan, candidate: dict[str, Any], chain: Chain, seed: int, previous: tuple[int, Path] | None
) -> nn.Module:
    """The model as the previous rung left it (its kept weights, or the chain replayed up to it); without a
    previous rung, the pruned model, which :func:`_rung` recalibrates first."""
    model = _pruned(bench, candidate)
    if previous is None:
        return model
    recalibrate_batchnorm(model, bench.data, batches=plan.bn_batches, batch_size=32, seed=seed)
    steps, path = previous
    if steps == 0:
        return model
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"{candidate['id']} {chain.name}: continuing from the kept weights of {steps} steps")
        return model
    log(f"{candidate['id']} {chain.name}: the weights of {steps} steps are gone; replaying the chain up to them")
    done = 0
    for rung in chain.rungs:
        if 0 < rung <= steps:
            train(model, bench.data, _settings(plan, chain, seed, rung - done, done), teacher=bench.baseline)
            done = rung
    return model


def _settings(plan: Plan, chain: Chain, seed: int, steps: int, done: int) -> TrainSettings:
    """A rung's own schedule of ``steps`` more steps; its batches follow the ones before (seed moved on)."""
    return TrainSettings(
        steps=steps, batch_size=plan.batch, lr=chain.lr, distill=chain.distill, seed=seed * 100_003 + done
    )


def _rung(
    bench: Bench,
    plan: Plan,
    candidate: dict[str, Any],
    chain: Chain,
    seed: int,
    steps: int,
    previous: tuple[int, Path] | None,
    model: nn.Module,
) -> dict[str, Any]:
    """Train ``model`` in place from the previous rung to ``steps`` (recalibrating first if it is the chain's
    first rung) and read it on the validation images."""
    done = 0 if previous is None else previous[0]
    bn_seconds = train_seconds = 0.0
    if previous is None:
        started = time.perf_counter()
        recalibrate_batchnorm(model, bench.data, batches=plan.bn_batches, batch_size=32, seed=seed)
        bn_seconds = time.perf_counter() - started
    if steps > done:
        result = train(model, bench.data, _settings(plan, chain, seed, steps - done, done), teacher=bench.baseline)
        train_seconds = result.seconds
    record, eval_seconds = _read(bench, model, "val", plan.val_limit)
    log(
        f"{candidate['id']} {chain.label(steps, plan.epoch_steps)}: val top-1 {100 * record['top1']:.2f}% "
        f"({record['images']} images); trained {train_seconds:.1f} s, read {eval_seconds:.1f} s"
    )
    return {
        **record,
        "steps": steps,
        "train_images": (steps - done) * plan.batch,
        "train_seconds": round(train_seconds, 2),
        "bn_seconds": round(bn_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "finished": bench.stamp(),
    }


def reference(bench: Bench, plan: Plan, tag: str, candidate: dict[str, Any], seed: int) -> dict[str, Any]:
    """The candidate fine-tuned as export does (``reference_epochs``, distillation), read on the test images."""
    key = reference_key(plan, tag, candidate["id"], seed)

    def run() -> dict[str, Any]:
        model, bn_seconds = _recalibrated(bench, plan, candidate, seed)
        settings = TrainSettings(
            steps=plan.reference_steps,
            batch_size=plan.reference_batch,
            lr=plan.reference_lr,
            distill=plan.reference_distill,
            seed=seed,
        )
        state = bench.work / "checkpoints" / tag / f"{candidate['id']}-seed{seed}.pt"
        epoch = max(1, plan.reference_steps // max(1, round(plan.reference_epochs)))
        log(f"{candidate['id']} reference seed {seed}: {settings.steps} steps of batch {settings.batch_size}")
        result = train(model, bench.data, settings, teacher=bench.baseline, steps_per_epoch=epoch, checkpoint=state)
        record, eval_seconds = _read(bench, model, "test", plan.test_limit)
        state.unlink(missing_ok=True)
        log(f"{candidate['id']} reference seed {seed}: test top-1 {100 * record['top1']:.2f}% ({result.seconds:.0f} s)")
        return {
            **record,
            "steps": settings.steps,
            "train_images": settings.steps * settings.batch_size,
            "train_seconds": round(result.seconds, 2),
            "bn_seconds": round(bn_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "finished": bench.stamp(),
        }

    return bench.cached(key, run)

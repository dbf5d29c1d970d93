"""Measuring the tables of the latency-aware recipe: each stage pruned alone, timed and scored.

For every stage the space lets vary, a copy of the baseline has only that stage pruned (the space's
uniform criterion) at its full level and, where that can inform the allocation, at its middle one
(:func:`search.pruning.latency_aware.probe_stages`). Each is timed through the study's
:class:`~search.measuring.candidate.CandidateMeter` (interleaved with the unpruned model,
drift-corrected, as every candidate, with fewer rounds: :data:`PROBE_TIMING`) and, after
BatchNorm recalibration and no fine-tune, scored on at most :data:`PROBE_VAL_IMAGES` of the
validation images the trials use. A probe reads a fixed shuffled subset of those images and stops once its
drop against the baseline, paired image by image, is known to :data:`PROBE_RELATIVE_ERROR` of itself (one
standard error), after at least :data:`PROBE_MIN_IMAGES` (:func:`read_drop`): a stage that costs 20 pp or more
is ranked on a few hundred images as well as on 1,000, one that costs 1 pp needs them all (a probe that reads
the whole split in its own order, where classes may come in turn, reads all of it). Where the timed file is
ONNX and the study trains on the CPU, the probes are scored by whichever engine is cheaper here, measured at
the start (:func:`scoring_engine`): the timed file itself in ONNX Runtime (the same FP32 arithmetic up to
rounding; at batch 1 twice as fast as PyTorch on the CIFAR MobileNetV2 here, slower on the CIFAR ResNet-18
and DenseNet-121) or the pruned model in PyTorch; where the study trains in bf16 on the CPU (native bf16), also
PyTorch under bf16 autocast (:data:`BF16_PROBES`): their BatchNorm recalibration too, and they pair with a bf16
read of the baseline. The baseline's reads of the probes' images come from the
study's evaluation of the baseline where that read them (:func:`baseline_on_probe_images`), else from one
read of its own. These numbers only rank where channels cost least; no trial's latency or accuracy comes
from them. The allocation itself is :mod:`search.pruning.latency_aware`; the study stores the tables
(``latency_aware`` user attribute).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from search.data.dataset import Dataset
from search.measuring.candidate import CandidateMeter
from search.measuring.hardware import OnThisMachine, supports_bf16
from search.measuring.onnx_export import export_onnx
from search.measuring.runtimes.registry import get_runtime
from search.progress import Reporter
from search.pruning.channels import prune_copy
from search.pruning.latency_aware import Probe, SensitivityTable, probe_stages, stage_fractions, tunable_stages
from search.pruning.policy import Policy
from search.pruning.space import SearchSpace
from search.study.uncertainty import SPLIT_ORDER, unpack_correct
from search.training.evaluate import (
    BF16_ENGINE,
    onnx_correct_batches,
    onnx_top1_correct,
    read_top1_correct,
    reads_whole_split,
    top1_correct,
    top1_correct_batches,
)
from search.training.finetune import arithmetic, recalibrate_batchnorm

__all__ = [
    "BF16_PROBES",
    "PROBE_MIN_IMAGES",
    "PROBE_RELATIVE_ERROR",
    "PROBE_TIMING",
    "PROBE_VAL_IMAGES",
    "baseline_on_probe_images",
    "engine_line",
    "measure_sensitivity",
    "probe_meter",
    "probe_record_of",
    "probes_engine",
    "read_drop",
    "read_engine",
    "scored_in",
    "scores_in_onnx_runtime",
    "scoring_engine",
    "tables_line",
]

PROBE_VAL_IMAGES = 1000
"""A probe's top-1 is read on at most this many validation images (a fixed subset): it ranks stages, whose
drops at their full level differ by far more than the sampling error of 1,000 images (about 1 pp)."""

PROBE_MIN_IMAGES = 250
"""A probe reads at least this many images before it may stop (:func:`read_drop`)."""

PROBE_RELATIVE_ERROR = 0.1
"""A probe stops once the standard error of its paired drop is at most this fraction of the drop: the tables
rank stages by drop per millisecond, so a drop known to 10% ranks as well as one known exactly."""

PROBE_TIMING = {"warmup": 3, "min_rounds": 2, "tolerance": 0.05, "min_seconds": 0.0, "max_seconds": 5.0}
"""How a probe is timed on this machine (the trials' timing: 10 warm-up runs, 3 rounds or more, 2%, at
least 1 s, up to 30 s). A probe only ranks stages; a busy machine spent up to 30 s on each at the trials'
settings, and the 1 s floor would add a second to each of a table's probes."""


def probe_meter(meter: CandidateMeter) -> CandidateMeter:
    """``meter`` timing with :data:`PROBE_TIMING` where it times on this machine (a latency target keeps its own)."""
    if not isinstance(meter.timer, OnThisMachine):
        return meter
    quick = copy.copy(meter)
    quick.timer = meter.timer.with_settings(dataclasses.replace(meter.timer.settings, **PROBE_TIMING))
    return quick


def probe_record_of(meter: CandidateMeter) -> Callable[[Policy], dict[str, Any]] | None:
    """A quick latency record of a policy (:func:`probe_meter`'s), or None where ``meter`` keeps its own timing
    (a latency target): what the budget searches probe with before they time their answer in full."""
    quick = probe_meter(meter)
    return None if quick is meter else quick.record


def scores_in_onnx_runtime(meter: CandidateMeter, device: str | torch.device) -> bool:
    """Whether a probe is scored by running its timed file in ONNX Runtime: the file is ONNX (ONNX Runtime and
    OpenVINO time ONNX; ExecuTorch a ``.pte``) and the study trains on the CPU (a GPU scores faster in PyTorch)."""
    return get_runtime(meter.runtime).info.file_format == "onnx" and torch.device(device).type == "cpu"


ENGINE_TEST_IMAGES = (8, 72)
"""Each engine reads the baseline on this many images, timed, after a warm-up read: the difference is its cost per
image, the rest its cost per read (a session, moving the weights), to choose the cheaper engine. ONNX Runtime's
export, the rest of its cost per read, is timed apart, once: inside the difference, its run-to-run variation alone
moved the estimate for 2,000 images by seconds (3.5 s to 8.6 s for a read that took 3.5 s)."""

BF16_PROBES = BF16_ENGINE
"""The probes' engine where the study trains in bf16 on the CPU and that reads cheapest: PyTorch under bf16
autocast, the trials' fine-tuning arithmetic, for their BatchNorm recalibration and their reads. A CPU with native
bf16 (AVX-512 BF16, AMX) runs the CIFAR ResNet-18 about twice as fast so; BENCHMARKS "Latency-aware tables: reading
the probes" measured the drops and allocations it gives against FP32 (the same allocations at 25% and 50% on the
CIFAR ResNet-18 and MobileNetV2). Only the probes: the baseline's reported top-1 and every trial's stay FP32."""


def scoring_engine(
    meter: CandidateMeter,
    baseline: nn.Module,
    device: str | torch.device,
    images: int | None = None,
    *,
    bf16: bool = False,
) -> tuple[str, dict[str, float]]:
    """``"onnxruntime"`` or ``"pytorch"``: which reads ``images`` validation images (the split's size by default)
    in less time on this machine, with what each would take (ms): the engine of the study's reads at creation, the
    baseline's and the probes' (``read_engine``). Both read the baseline
    (:func:`~search.training.evaluate.read_top1_correct`; ONNX Runtime exports anew for each read, timed apart); each
    on :data:`ENGINE_TEST_IMAGES` images, timed after a warm-up read, gives its cost per image and per read. Where
    ONNX Runtime cannot score (:func:`scores_in_onnx_runtime`), PyTorch, not measured. ``bf16`` (the study trains
    in bf16 on the CPU): :data:`BF16_PROBES` is timed as well, for the probes (:func:`read_engine`); it is never
    the answer, which reads the baseline's reported top-1 in FP32."""
    engines = ["onnxruntime", "pytorch"] if scores_in_onnx_runtime(meter, device) else []
    if bf16 and torch.device(device).type == "cpu":
        engines = (engines or ["pytorch"]) + [BF16_PROBES]
    if not engines:
        return "pytorch", {}
    data = meter.data
    small, large = (min(n, len(data.val)) for n in ENGINE_TEST_IMAGES)
    read_images = min(images or len(data.val), len(data.val))

    def ms_per_read(engine: str) -> float:
        exported, export_seconds = None, 0.0
        if engine == "onnxruntime":  # exported once, timed apart (read_top1_correct exports for each read)
            started = time.perf_counter()
            exported = export_onnx(baseline, data.example_input(), dynamic_batch=True)
            export_seconds = time.perf_counter() - started

        def seconds(n: int) -> float:
            started = time.perf_counter()
            if exported is not None:
                onnx_top1_correct(exported, data, "val", limit=n)
            else:
                read_top1_correct(baseline, data, "val", limit=n, device=device, engine=engine)
            return time.perf_counter() - started

        seconds(min(4, small))  # warm-up: first calls allocate and choose kernels
        at_small, at_large = seconds(small), seconds(large)
        per_image = max(at_large - at_small, 0.0) / max(large - small, 1)
        per_read = max(at_small - small * per_image, 0.0) + export_seconds
        return 1000 * (per_read + per_image * read_images)

    costs = {engine: ms_per_read(engine) for engine in engines}
    fp32 = [engine for engine in costs if engine != BF16_PROBES]
    return min(fp32, key=lambda engine: costs[engine]), costs


def read_engine(
    meter: CandidateMeter,
    baseline: nn.Module,
    device: str | torch.device,
    images: int | None = None,
    *,
    bf16: bool = False,
) -> dict[str, Any]:
    """:func:`scoring_engine` as a study records it (``read_engine``): the engine, and where engines were timed,
    what a read of ``images`` validation images took each (ms) and, where that differs from the engine, the
    probes' engine (``probes``: the cheapest timed, :data:`BF16_PROBES` included where ``bf16``)."""
    engine, costs = scoring_engine(meter, baseline, device, images, bf16=bf16)
    record: dict[str, Any] = {"engine": engine}
    if costs:
        record["ms_per_read"] = {k: round(v, 1) for k, v in costs.items()}
        record["images"] = min(images or len(meter.data.val), len(meter.data.val))
        cheapest = min(costs, key=lambda name: costs[name])
        if cheapest != engine:
            record["probes"] = cheapest
    return record


def probes_engine(scoring: dict[str, Any], meter: CandidateMeter, device: str | torch.device) -> str:
    """The engine the probes read in, from the study's ``read_engine`` record, where this worker can use it
    (a study's creation resumed on another machine may not: then PyTorch in FP32)."""
    engine = str(scoring.get("probes", scoring["engine"]))
    if engine == "onnxruntime" and not scores_in_onnx_runtime(meter, device):
        return "pytorch"
    if engine == BF16_PROBES and not (torch.device(device).type == "cpu" and supports_bf16()):
        return "pytorch"
    return engine


def tables_line(table: SensitivityTable) -> str:
    """What the creation log says of the tables once measured: probes, images read, engine, seconds, skips."""
    probes = [p for stage in table.stages.values() for p in stage]
    read = sum(p.images or table.val_images or 0 for p in probes)
    return (
        f"Latency-aware tables: {len(probes)} prunings of one stage each ({len(table.stages)} stages), timed"
        f" and scored (BatchNorm recalibrated, no fine-tune, up to {table.val_images} images each, each read"
        f" until its drop was known to {PROBE_RELATIVE_ERROR:.0%} or all were read: {read:,} in all"
        f"{scored_in(table)}) in {table.seconds:.0f} s"
        + (f"; at the full level only: {'; '.join(table.skipped)}" if table.skipped else "")
    )


def scored_in(table: SensitivityTable) -> str:
    """``, in ONNX Runtime``: the engine that scored the probes."""
    if not table.scoring:
        return ""
    engine = str(table.scoring.get("probes", table.scoring["engine"]))
    return f", in {ENGINE_NAMES.get(engine, engine)}"


ENGINE_NAMES = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch", BF16_PROBES: "PyTorch under bf16 autocast"}


def engine_line(engine: dict[str, Any]) -> str:
    """What reads the validation images at creation, and why: ``The baseline and the tables read validation images in
    ONNX Runtime (2,000 images: 1.4 s; PyTorch 2.7 s); trials in PyTorch``, or, where the probes read in another
    engine, ``The baseline reads ... in PyTorch (...); the tables' probes in PyTorch under bf16 autocast (...)``."""
    name, costs = engine["engine"], engine.get("ms_per_read", {})
    probes = engine.get("probes", name)

    def timed(engine_name: str) -> str:
        return f"{ENGINE_NAMES.get(engine_name, engine_name)} {costs[engine_name] / 1000:.1f} s"

    if name not in costs or len(costs) < 2:
        said = ENGINE_NAMES.get(name, name)
    else:
        said = (
            f"{ENGINE_NAMES[name]} ({engine['images']:,} images: "
            + "; ".join([f"{costs[name] / 1000:.1f} s"] + [timed(k) for k in costs if k != name])
            + ")"
        )
    if probes == name:
        return f"The baseline and the tables read validation images in {said}; trials in PyTorch"
    return (
        f"The baseline reads validation images in {said}; the tables' probes in {ENGINE_NAMES.get(probes, probes)};"
        " trials in PyTorch"
    )


def baseline_on_probe_images(record: dict[str, Any] | None, data: Dataset, limit: int) -> np.ndarray | None:
    """The baseline's per-image correctness on the probes' ``limit`` validation images, in the order the probes read
    them, from the study's evaluation of the baseline (its ``baseline_record``); None where that did not read them.

    The probes read the first ``limit`` images of the split's fixed shuffled order
    (:meth:`~search.data.dataset.Dataset.shuffled_order`), or the whole split in its own order where ``limit``
    covers it (:func:`search.training.evaluate.subset_limit`). A record of a shuffled subset (no ``order``) holds
    the first images of that same order; a record of the whole split in its own order (``order`` ``"split"``)
    holds every image, taken in the probes' order. A record of the whole split without the mark is ambiguous
    (older studies read it shuffled, some in its own order) and is not used."""
    split_size = len(data.val)
    if not record or "per_image" not in record:
        return None
    images, order = int(record.get("images", 0)), record.get("order")
    if order == SPLIT_ORDER and images == split_size:
        correct = np.asarray(unpack_correct(record["per_image"], images), dtype=bool)
        return correct if reads_whole_split(data, limit) else correct[data.shuffled_order("val", limit).numpy()]
    if order is None and limit <= images < split_size and not reads_whole_split(data, limit):
        return np.asarray(unpack_correct(record["per_image"], images)[:limit], dtype=bool)
    return None


def read_drop(
    batches: Iterable[np.ndarray],
    baseline: np.ndarray,
    *,
    min_images: int | None = None,
    relative_error: float = PROBE_RELATIVE_ERROR,
) -> tuple[float, int]:
    """A probe's top-1 drop against the baseline and the images it was read on: ``batches`` (the probe's per-image
    correctness, in the order of ``baseline``'s) are read until the paired drop's standard error is at most
    ``relative_error`` (:data:`PROBE_RELATIVE_ERROR`) of the drop, after ``min_images`` (:data:`PROBE_MIN_IMAGES`)
    images at least, or to the end of ``baseline``. The rest of ``batches`` is not read (closed, where it can be)."""
    floor = PROBE_MIN_IMAGES if min_images is None else min_images
    hits: list[np.ndarray] = []
    seen = 0
    stream = iter(batches)
    try:
        for batch in stream:
            hits.append(batch[: len(baseline) - seen])
            seen += len(hits[-1])
            if seen >= len(baseline):
                break
            if seen >= floor:
                drop, error = _paired_drop(baseline[:seen], np.concatenate(hits))
                if drop > 0 and error <= relative_error * drop:
                    break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if seen == 0:
        raise ValueError("a probe read no images")
    drop, _ = _paired_drop(baseline[:seen], np.concatenate(hits))
    return drop, seen


def _paired_drop(baseline: np.ndarray, probe: np.ndarray) -> tuple[float, float]:
    """Mean of baseline-right minus probe-right over the same images, and its standard error."""
    diff = baseline.astype(np.int8) - probe.astype(np.int8)
    n = len(diff)
    spread = float(diff.std(ddof=1)) if n > 1 else math.inf
    return float(diff.mean()), spread / math.sqrt(n)


def measure_sensitivity(
    space: SearchSpace,
    baseline: nn.Module,
    meter: CandidateMeter,
    *,
    bn_batches: int,
    val_images: int | None,
    device: str | torch.device,
    reporter: Reporter,
    baseline_record: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
) -> SensitivityTable:
    """The per-stage latency and accuracy tables (``meter.baseline_ms`` must be set).

    ``baseline_record``: the study's evaluation of the baseline (per image), which spares a second read of the
    probes' images where it covers them (:func:`baseline_on_probe_images`). ``engine``: the study's read engine as
    :func:`read_engine` records it (measured here on the probes' images when not given)."""
    if meter.baseline_ms is None:
        raise ValueError("the study's baseline latency is not known yet: call time_baseline first")
    started = time.perf_counter()
    data = meter.data
    stages = tunable_stages(space)
    criterion = space.uniform_criterion
    quick = probe_meter(meter)
    limit = min(val_images or len(data.val), PROBE_VAL_IMAGES, len(data.val))
    in_split_order = reads_whole_split(data, limit)  # classes may come in turn: no stopping early
    scoring = dict(engine) if engine is not None else read_engine(meter, baseline, device, limit)
    engine_name = probes_engine(scoring, meter, device)
    scoring["probes" if "probes" in scoring else "engine"] = engine_name
    autocast = torch.bfloat16 if engine_name == BF16_PROBES else None
    # the baseline image by image on the probes' images: from the study's FP32 read, else once (bf16 probes: in bf16)
    on_baseline = None if autocast is not None else baseline_on_probe_images(baseline_record, data, limit)
    if on_baseline is None:
        on_baseline = top1_correct(baseline, data, "val", limit=limit, device=device, autocast=autocast)
    baseline_accuracy = float(on_baseline.mean())
    with reporter.task("latency-aware tables: each stage pruned alone", 2 * len(stages)) as task:

        def probe(name: str, level: float) -> Probe:
            policy = space.allocated(stage_fractions(space, {name: level}), criterion, "fp32")
            model = prune_copy(baseline, policy, space, data).model
            with arithmetic(device, autocast):  # bf16 probes: their BatchNorm statistics too (BENCHMARKS)
                recalibrate_batchnorm(model, data, batches=bn_batches, seed=0, device=device)
            timed = quick.candidate_onnx(model, "fp32")  # after recalibration: the file that is timed is scored
            latency_ms = quick.record_of(quick.time_onnx(timed), "fp32")["corrected_ms"]
            batches: Iterator[np.ndarray] = (
                onnx_correct_batches(timed, data, "val", limit=limit)
                if engine_name == "onnxruntime"
                else top1_correct_batches(model, data, "val", limit=limit, device=device, autocast=autocast)
            )
            drop, images = read_drop(batches, on_baseline, min_images=limit if in_split_order else None)
            task.advance(1, stage=name, level=level)
            return Probe(level, latency_ms, baseline_accuracy - drop, images)

        probes, skipped = probe_stages(
            stages, probe, baseline_ms=meter.baseline_ms, baseline_accuracy=baseline_accuracy, val_images=limit
        )
    return SensitivityTable(
        baseline_ms=meter.baseline_ms,
        baseline_accuracy=baseline_accuracy,
        stages=probes,
        criterion=criterion,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        val_images=limit,
        scoring=scoring,
    )

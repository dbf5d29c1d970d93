"""Benchmark: how the latency-aware tables' probes can be read for less without changing the allocation (issue #25).

The tables (:mod:`search.study.sensitivity`) prune each stage alone, time it and read its top-1 drop on up to
1,000 validation images; on the CIFAR ResNet-18 those reads were three quarters of the tables' minute. This
script measures every probe once, completely: each stage at the middle and full level, timed twice (two quick
probe timings, as the study's), and read image by image on the same 1,000 images in FP32 and under bf16
autocast, each read timed. Each reading rule is then replayed on those per-image reads exactly as
:func:`~search.study.sensitivity.read_drop` reads (the same images, the same order, the same stop), the tables
it gives are built by the product's :func:`~search.pruning.latency_aware.probe_stages`, and their allocations at
25% and 50% of the baseline's latency (the first point of the product's allocation path estimated within the
budget) are compared with the reference: every probe read in FP32 on all 1,000 images. The noise floor is the
reference's own allocation with the probes' second timing: a rule whose allocations move less than that
changes nothing the latency probes did not already change.

    nice python benchmarks/probe_reads.py            # ~5 min per model on 2 cores; cached in benchmarks/probe_reads
    python benchmarks/probe_reads.py --render        # rewrite the section from probe_reads.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.sections import write_section  # noqa: E402
from benchmarks.signal_lib.bench import load_data  # noqa: E402
from search.measuring.candidate import CandidateMeter, LocalTimer  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.models.weights import load_weights  # noqa: E402
from search.pruning.auto_space import space_for  # noqa: E402
from search.pruning.channels import prune_copy  # noqa: E402
from search.pruning.latency_aware import (  # noqa: E402
    FULL_LEVEL,
    MID_LEVEL,
    Probe,
    SensitivityTable,
    allocation_path,
    probe_stages,
    stage_fractions,
    tunable_stages,
)
from search.study.sensitivity import PROBE_VAL_IMAGES, probe_meter, read_drop  # noqa: E402
from search.study.uncertainty import pack_correct, unpack_correct  # noqa: E402
from search.training.evaluate import top1_correct  # noqa: E402
from search.training.finetune import arithmetic, recalibrate_batchnorm  # noqa: E402

SHARED = ROOT.parent / "shared"
MODELS = {
    "resnet18_cifar": SHARED / "models" / "cifar10_resnet18.pth",
    "mobilenet_v2_cifar": ROOT / "benchmarks" / "allocation" / "mobilenet_v2_cifar-15ep.pth",
}
WORK = ROOT / "benchmarks" / "probe_reads"
"""Every probe's per-image reads and timings, committed (small): a later rule is replayed without measuring again."""
RESULT = ROOT / "benchmarks" / "probe_reads.json"
BN_BATCHES = 8
BATCH = 64
"""The study reads its probes 64 images a batch (a stop is decided between batches)."""
BUDGETS = (0.25, 0.5)
RULES = {
    "fp32, all 1,000 (reference)": ("fp32", None),
    "fp32, to 10% (before)": ("fp32", 0.1),
    "bf16, all 1,000": ("bf16", None),
    "bf16, to 10%, BatchNorm recalibrated in FP32": ("bf16", 0.1),
    "bf16, to 20%": ("bf16", 0.2),
    "bf16, to 30%": ("bf16", 0.3),
    "bf16, to 10%, BatchNorm recalibrated in bf16 (now)": ("bf16_recalibrated", 0.1),
}
"""Reading rules: the arithmetic of the reads, and the relative error a probe is read to (None: every image)."""
REFERENCE = "fp32, all 1,000 (reference)"


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def timed_read(model: torch.nn.Module, data: Any, dtype: torch.dtype | None) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    correct = top1_correct(model, data, "val", batch_size=BATCH, limit=PROBE_VAL_IMAGES, autocast=dtype)
    return correct, time.perf_counter() - started


def reads_of(model: torch.nn.Module, data: Any) -> dict[str, Any]:
    """FP32 and bf16 per-image reads of ``model`` on the probes' images, each timed (a warm-up read first)."""
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        top1_correct(model, data, "val", batch_size=BATCH, limit=2 * BATCH, autocast=dtype)  # kernels chosen
        correct, seconds = timed_read(model, data, dtype)
        out[name] = {"per_image": pack_correct(correct), "seconds": round(seconds, 3)}
    return out


def measure(model_name: str, data: Any) -> dict[str, Any]:
    """Every probe of ``model_name``'s tables measured completely (cached in WORK, resumable probe by probe)."""
    cache_path = WORK / f"{model_name}.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def save() -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_path)

    net = build_model(model_name, data.num_classes)
    load_weights(net, str(MODELS[model_name]), model_name=model_name)
    baseline = net.eval()
    space = space_for(model_name, None, data.num_classes, data.example_input())
    assert space is not None
    meter = CandidateMeter(baseline, data, space=space, timer=LocalTimer(LatencySettings(threads=1)))
    if "baseline" not in cache:
        meter.baseline_ms = meter.time_baseline().median_ms
        cache["baseline"] = {"ms": meter.baseline_ms, **reads_of(baseline, data)}
        save()
    meter.baseline_ms = cache["baseline"]["ms"]
    quick = probe_meter(meter)
    probes = cache.setdefault("probes", {})
    for stage in tunable_stages(space):
        for level in (MID_LEVEL, FULL_LEVEL):
            key = f"{stage}@{level}"
            if key in probes:
                continue
            policy = space.allocated(stage_fractions(space, {stage: level}), space.uniform_criterion, "fp32")
            model = prune_copy(baseline, policy, space, data).model
            recalibrate_batchnorm(model, data, batches=BN_BATCHES, seed=0)
            timed = quick.candidate_onnx(model, "fp32")
            latencies = [quick.record_of(quick.time_onnx(timed), "fp32")["corrected_ms"] for _ in range(2)]
            probes[key] = {"latency_ms": latencies, **reads_of(model, data)}
            save()
            log(
                f"{model_name} {key}: {latencies[0]:.3f}/{latencies[1]:.3f} ms, reads {probes[key]['fp32']['seconds']}"
                f" s fp32, {probes[key]['bf16']['seconds']} s bf16"
            )
    for key, entry in probes.items():  # BatchNorm recalibrated under bf16 autocast too (added later: its own pass)
        if "bf16_recalibrated" in entry:
            continue
        stage, level = key.rsplit("@", 1)
        policy = space.allocated(stage_fractions(space, {stage: float(level)}), space.uniform_criterion, "fp32")
        seconds = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            model = prune_copy(baseline, policy, space, data).model
            started = time.perf_counter()
            with arithmetic("cpu", dtype):
                recalibrate_batchnorm(model, data, batches=BN_BATCHES, seed=0)
            seconds[name] = round(time.perf_counter() - started, 3)
        correct, read_seconds = timed_read(model, data, torch.bfloat16)
        entry["recalibration_seconds"] = seconds
        entry["bf16_recalibrated"] = {"per_image": pack_correct(correct), "seconds": round(read_seconds, 3)}
        save()
        log(f"{model_name} {key}: recalibration {seconds['fp32']} s fp32, {seconds['bf16']} s bf16")
    cache["criterion"] = space.uniform_criterion
    cache["stages"] = tunable_stages(space)
    save()
    return cache


def batches(correct: np.ndarray) -> list[np.ndarray]:
    return [correct[i : i + BATCH] for i in range(0, len(correct), BATCH)]


def replay(cache: dict[str, Any], arithmetic: str, relative_error: float | None, timing: int) -> dict[str, Any]:
    """The table one rule gives (the product's probe_stages and read_drop on the cached reads), its allocations,
    the images it read and what its reads would have cost (each probe's measured seconds per image)."""
    base = cache["baseline"]
    n = PROBE_VAL_IMAGES
    baseline_arithmetic = "bf16" if arithmetic == "bf16_recalibrated" else arithmetic
    on_baseline = np.asarray(unpack_correct(base[baseline_arithmetic]["per_image"], n), dtype=bool)
    accuracy = float(on_baseline.mean())
    spent = {"images": 0, "seconds": 0.0, "recalibration": 0.0}

    def probe(stage: str, level: float) -> Probe:
        entry = cache["probes"][f"{stage}@{level}"]
        correct = np.asarray(unpack_correct(entry[arithmetic]["per_image"], n), dtype=bool)
        if relative_error is None:
            drop, images = float(on_baseline.mean() - correct.mean()), n
        else:
            drop, images = read_drop(batches(correct), on_baseline, relative_error=relative_error)
        spent["images"] += images
        spent["seconds"] += entry[arithmetic]["seconds"] * images / n
        recalibration = entry["recalibration_seconds"]
        spent["recalibration"] += recalibration["bf16" if arithmetic == "bf16_recalibrated" else "fp32"]
        return Probe(level, entry["latency_ms"][timing], accuracy - drop, images)

    stages, skipped = probe_stages(
        cache["stages"], probe, baseline_ms=base["ms"], baseline_accuracy=accuracy, val_images=n
    )
    table = SensitivityTable(base["ms"], accuracy, stages, criterion=cache["criterion"], skipped=skipped)
    path = allocation_path(table)
    allocations = {}
    for fraction in BUDGETS:
        point = next((p for p in path if p.estimated_ms <= fraction * base["ms"]), path[-1])
        allocations[str(fraction)] = {k: round(v, 4) for k, v in point.levels.items()}
    if baseline_arithmetic == "bf16":
        spent["seconds"] += base["bf16"]["seconds"]  # the baseline read once more in the probes' arithmetic
    drops = {f"{stage}@{p.level}": round(100 * (accuracy - p.accuracy), 2) for stage, ps in stages.items() for p in ps}
    return {
        "images": spent["images"],
        "read_seconds": round(spent["seconds"], 1),
        "recalibration_seconds": round(spent["recalibration"], 1),
        "allocations": allocations,
        "drops_pp": drops,
    }


def steps_apart(a: dict[str, float], b: dict[str, float]) -> int:
    """Level steps (1/6 of a stage's ranges) between two allocations, summed over the stages."""
    return sum(round(abs(a.get(k, 0.0) - b.get(k, 0.0)) * 6) for k in set(a) | set(b))


def analyse(cache: dict[str, Any]) -> dict[str, Any]:
    reference = replay(cache, "fp32", None, 0)
    floor = replay(cache, "fp32", None, 1)
    rows = {}
    for name, (reads, error) in RULES.items():
        got = replay(cache, reads, error, 0)
        got["steps_from_reference"] = {
            f: steps_apart(got["allocations"][f], reference["allocations"][f]) for f in reference["allocations"]
        }
        shared = set(got["drops_pp"]) & set(reference["drops_pp"])
        got["max_drop_difference_pp"] = round(
            max(abs(got["drops_pp"][k] - reference["drops_pp"][k]) for k in shared), 2
        )
        rows[name] = got
    fp32, bf16 = (
        np.asarray(unpack_correct(cache["baseline"][a]["per_image"], PROBE_VAL_IMAGES), dtype=bool)
        for a in ("fp32", "bf16")
    )
    return {
        "baseline_ms": cache["baseline"]["ms"],
        "baseline_top1": {"fp32": float(fp32.mean()), "bf16": float(bf16.mean())},
        "noise_floor_steps": {
            f: steps_apart(floor["allocations"][f], reference["allocations"][f]) for f in reference["allocations"]
        },
        "rules": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"`python benchmarks/probe_reads.py` on {result['cpu']} ({result['date']}, commit {result['commit'][:7]};"
        " background exports paused). Every probe of the latency-aware tables (each stage alone at its middle and"
        f" full level, {BN_BATCHES} BatchNorm batches, no fine-tune) read on the same {PROBE_VAL_IMAGES:,}"
        " validation images in FP32 and under bf16 autocast, each read timed, and timed twice by quick probe"
        " timings. Each rule is replayed on those reads as the product reads (`read_drop`, 64 images a batch),"
        " its tables built by `probe_stages`, and its allocation at 25% and 50% of the baseline's latency"
        " (the first point of `allocation_path` estimated within the budget) compared with the reference's,"
        " in level steps (1/6 of a stage's ranges) summed over the stages. *Noise floor*: the reference's"
        " own allocation with the probes' second timing. Read seconds: each probe's measured read time per"
        " image times the images the rule read (bf16 rules include reading the baseline once more in bf16).",
        "",
    ]
    for model, r in result["models"].items():
        floor = r["noise_floor_steps"]
        lines += [
            f"### {model} (baseline {r['baseline_ms']:.2f} ms; top-1 on the probes' images: FP32"
            f" {100 * r['baseline_top1']['fp32']:.1f}%, bf16 {100 * r['baseline_top1']['bf16']:.1f}%)",
            "",
            "| rule | images read | read s | recalibration s | largest drop change pp | steps from reference at 25%"
            " | at 50% |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in r["rules"].items():
            steps = row["steps_from_reference"]
            lines.append(
                f"| {name} | {row['images']:,} | {row['read_seconds']:.1f} | {row['recalibration_seconds']:.1f}"
                f" | {row['max_drop_difference_pp']:.2f}"
                f" | {steps['0.25']} | {steps['0.5']} |"
            )
        lines += ["", f"Noise floor (second timing): {floor['0.25']} steps at 25%, {floor['0.5']} at 50%.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.render:
        result = json.loads(RESULT.read_text())
    else:
        missing = [str(p) for m, p in MODELS.items() if m in args.models and not p.exists()]
        if missing or not (SHARED / "data" / "cifar10").exists():
            sys.exit(f"probe_reads: needs ../shared's CIFAR-10 and the weights {missing or list(MODELS.values())}")
        torch.manual_seed(0)
        data = load_data()
        hw = fingerprint(1)
        result = {
            "date": f"{datetime.date.today()}",
            "commit": git_revision(),
            "cpu": f"{hw['cpu']} ({', '.join(hw.get('cpu_flags', []))}; {hw.get('logical_cpus', '?')} logical CPUs)",
            "models": {m: analyse(measure(m, data)) for m in args.models},
        }
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
    write_section("Latency-aware tables: reading the probes", render(result))
    print(render(result))


if __name__ == "__main__":
    main()

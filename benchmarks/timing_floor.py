"""Benchmark: how a minimum timed duration steadies the latency ratio of sub-millisecond models (issue #27).

The search judges a candidate by its median latency over the unpruned model's, timed interleaved
(``search/measuring/timing.py``). It stops once the running median ratio moves by less than 2% between
rounds of 10 runs, after at least 3 rounds. A 0.4 ms model meets that in about 40 ms of timing, shorter
than one scheduler time slice of a busy machine, so one preemption can decide its ratio: in the runtimes
benchmark, two benches of the same MobileNetV2 CIFAR file were up to 11% apart.

This script times the same pairs again and again (candidate against the unpruned model, interleaved),
each timing in a fresh process as ``cli.py bench`` runs, each repeat trying every ``min_seconds``
setting in turn so that all of them see the same machine state.
It reports, per runtime, model pair and setting, the spread of the ratios across repeats and the seconds
each timing took. The models are built here (untrained; weights do not change latency), so the script
needs nothing but the package and the runtimes that are installed.

    python benchmarks/timing_floor.py            # writes benchmarks/timing_floor.json and a BENCHMARKS.md section
    python benchmarks/timing_floor.py --quick    # a smoke run; writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.measuring.timing import LatencySettings, measure  # noqa: E402  (the timing child needs no torch)

SECTION = "Timing floor"
OUT = ROOT / "benchmarks" / "timing_floor.json"
PAIRS = [("mobilenet_v2_cifar", 0.5, "fp32"), ("mobilenet_v2_cifar", 0.5, "int8"), ("resnet18_cifar", 0.5, "fp32")]
"""(model, uniform ratio, precision): the candidate timed against its unpruned FP32 model at 32 px."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def files(model_name: str, ratio: float, precision: str, runtime: str) -> tuple[bytes, bytes, tuple[int, ...]]:
    """The candidate's and the unpruned model's files in ``runtime``, and the input shape."""
    import torch

    from search.data.loading import load_dataset
    from search.data.spec import DataSpec
    from search.measuring.candidate import CandidateMeter, LocalTimer
    from search.measuring.quantize import QuantizeSettings
    from search.models.build import build_model
    from search.pruning.auto_space import space_for
    from search.pruning.channels import prune_copy

    torch.manual_seed(0)
    data = load_dataset(DataSpec("digits", input_size=32))
    base = build_model(model_name, data.num_classes).eval()
    space = space_for(model_name, None, data.num_classes, data.example_input())
    meter = CandidateMeter(
        base, data, space=space, timer=LocalTimer(LatencySettings(runtime=runtime)),
        quantize=QuantizeSettings(calibration_images=32),
    )  # fmt: skip
    model = prune_copy(base, space.uniform(ratio), space, data).model
    return meter.candidate_onnx(model, precision), meter.baseline_onnx, tuple(data.example_input().shape)


def timed_in_child(candidate: Path, reference: Path, shape: tuple[int, ...], settings: LatencySettings) -> dict:
    """One timing in a fresh process, as ``cli.py bench`` times a shipped file (and a search its candidates)."""
    spec = json.dumps({"candidate": str(candidate), "reference": str(reference), "shape": shape,
                       "runtime": settings.runtime, "min_seconds": settings.min_seconds})  # fmt: skip
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    s = json.loads(spec)
    settings = LatencySettings(threads=1, runtime=s["runtime"], min_seconds=s["min_seconds"])
    started = time.perf_counter()
    timed = measure(s["candidate"], tuple(s["shape"]), settings, reference=s["reference"])
    print(json.dumps({"ratio": timed.ratio, "median_ms": timed.median_ms, "seconds": time.perf_counter() - started}))


def summary(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {
        "mean": round(mean, 5),
        "spread": round((max(values) - min(values)) / mean, 4),
        "cv": round(statistics.pstdev(values) / mean, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repeats of one pair; writes nothing")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--settings", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="min_seconds to compare")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    from search.measuring.hardware import cpu_model, git_revision, package_versions
    from search.measuring.runtimes.registry import RUNTIME_NAMES, get_runtime

    runtimes = [r for r in RUNTIME_NAMES if get_runtime(r).unavailable() is None]
    pairs = PAIRS[:1] if args.quick else PAIRS
    repeats = 2 if args.quick else args.repeats
    log(f"CPU: {cpu_model()}; runtimes {', '.join(runtimes)}; min_seconds {args.settings}; {repeats} repeats")
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="timing-floor-"))
    for model_name, ratio, precision in pairs:
        for runtime in runtimes:
            made = files(model_name, ratio, precision, runtime)
            shape = made[2]
            candidate, reference = folder / f"candidate-{runtime}", folder / f"reference-{runtime}"
            candidate.write_bytes(made[0])
            reference.write_bytes(made[1])
            base = LatencySettings(threads=1, runtime=runtime)
            ratios: dict[float, list[float]] = {s: [] for s in args.settings}
            seconds: dict[float, list[float]] = {s: [] for s in args.settings}
            medians: dict[float, list[float]] = {s: [] for s in args.settings}
            for _ in range(repeats):
                for setting in args.settings:  # every setting in turn: the same machine state for each
                    timed = timed_in_child(candidate, reference, shape, replace(base, min_seconds=setting))
                    seconds[setting].append(timed["seconds"])
                    ratios[setting].append(timed["ratio"])
                    medians[setting].append(timed["median_ms"])
            for setting in args.settings:
                row = {
                    "model": model_name, "candidate": f"uniform {ratio:g}", "precision": precision,
                    "runtime": runtime, "min_seconds": setting, "ratios": [round(r, 5) for r in ratios[setting]],
                    "ratio": summary(ratios[setting]), "median_ms": round(statistics.fmean(medians[setting]), 4),
                    "seconds": round(statistics.fmean(seconds[setting]), 2),
                }  # fmt: skip
                results.append(row)
                log(
                    f"{model_name} {precision} {runtime} min_seconds {setting:g}: ratio {row['ratio']['mean']:.3f}, "
                    f"spread {row['ratio']['spread']:.1%}, cv {row['ratio']['cv']:.1%}, "
                    f"{row['median_ms']:.3f} ms, {row['seconds']:.2f} s per timing"
                )
    log(f"done in {time.perf_counter() - started:.0f} s")
    text = table(results)
    print(text)
    if args.quick:
        return
    OUT.write_text(
        json.dumps(
            {
                "results": results,
                "repeats": repeats,
                "cpu": cpu_model(),
                "date": time.strftime("%Y-%m-%d"),
                "git_revision": git_revision(),
                "versions": package_versions(),
            },
            indent=1,
        )
        + "\n"
    )
    from benchmarks.sections import write_section

    write_section(
        SECTION,
        f"`benchmarks/timing_floor.py` on {cpu_model()}, {time.strftime('%Y-%m-%d')} (1 thread, batch 1, 32 px): "
        f"each candidate timed {repeats} times against its unpruned FP32 model, interleaved, every `min_seconds` "
        "setting in turn per repeat. Spread: (max - min) / mean of the repeats' ratios; cv: their standard "
        f"deviation over the mean.\n\n{text}\n\nNumbers: `benchmarks/timing_floor.json`.",
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | precision | runtime | min_seconds | candidate ms | ratio (mean) | spread | cv | s per timing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} {r['candidate']} | {r['precision']} | {r['runtime']} | {r['min_seconds']:g} | "
            f"{r['median_ms']:.3f} | {r['ratio']['mean']:.3f} | {r['ratio']['spread']:.1%} | {r['ratio']['cv']:.1%} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

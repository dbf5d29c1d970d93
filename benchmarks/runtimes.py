"""Benchmark: the same candidates in ONNX Runtime, OpenVINO and ExecuTorch, in one interleaved run.

For ResNet-18 and MobileNetV2 at 224 px and the CIFAR models (``resnet18_cifar``,
``mobilenet_v2_cifar``) at 32 px: the unpruned model, uniform pruning at two ratios and the
fastest policy of each space, FP32 and INT8, each timed in every runtime against that runtime's
own unpruned FP32 model (batch 1, 1 thread, rounds until the median is stable). Candidates are
visited in turn and, for each, the runtimes in turn, so all runtimes see the same machine state.
Reported: ms and the ratio to each runtime's unpruned model, and the rank agreement (Kendall tau)
of the candidates' ratios between each pair of runtimes, per model and over all models.

Latency does not depend on the weights, so the models are untrained (seeded); INT8 models are
calibrated on digits images of the model's input size, as a search calibrates on its data.

    python benchmarks/runtimes.py            > benchmarks/runtimes.log   # on a quiet machine
    python benchmarks/runtimes.py --quick    # smoke run: one CIFAR model, short timings, nothing written

Writes ``benchmarks/runtimes.json`` (cached per timing: a rerun resumes) and the "Runtimes" section
of BENCHMARKS.md. ``--quick`` writes neither. Needs ``pip install -e ".[openvino,executorch]"``;
a runtime that is missing is left out and the log says so.

Then one short search per runtime at 50% of its baseline, its front exported and the shipped files
timed with ``bench --runtime`` (:mod:`benchmarks.runtimes_search`); ``--grid-only`` skips it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.measuring.candidate import CandidateMeter, LocalTimer  # noqa: E402
from search.measuring.hardware import cpu_model, git_revision, package_versions  # noqa: E402
from search.measuring.quantize import QuantizeSettings  # noqa: E402
from search.measuring.runtimes.registry import RUNTIME_NAMES, get_runtime  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.pruning.auto_space import space_for  # noqa: E402
from search.pruning.channels import prune_copy  # noqa: E402

SECTION = "Runtimes"
OUT = ROOT / "benchmarks" / "runtimes.json"
MODELS = [("resnet18", 224), ("mobilenet_v2", 224), ("resnet18_cifar", 32), ("mobilenet_v2_cifar", 32)]
RATIOS = (0.3, 0.6)
TIMING = LatencySettings(threads=1, max_seconds=20.0)
QUICK_TIMING = LatencySettings(threads=1, warmup=3, round_size=5, min_rounds=2, max_seconds=4.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return cpu_model()


def candidates(model_name: str, ratios: tuple[float, ...], data: Any) -> tuple[dict[str, Any], Any]:
    """Name -> policy: unpruned, uniform at each ratio, and the fastest policy of the space a search would use."""
    space = space_for(model_name, None, data.num_classes, data.example_input())
    chosen = {"unpruned": space.unpruned(), **{f"uniform {r:g}": space.uniform(r) for r in ratios}}
    chosen["fastest"] = space.fastest_policies()[0]
    return chosen, space


def bench_model(
    model_name: str, size: int, runtimes: list[str], timing: LatencySettings, ratios: tuple[float, ...], cache: dict
) -> None:
    torch.manual_seed(0)
    data = load_dataset(DataSpec("digits", input_size=size))
    base = build_model(model_name, data.num_classes).eval()
    policies, space = candidates(model_name, ratios, data)
    entry = cache.setdefault(f"{model_name}@{size}", {})
    wanted = [f"{n} {p} {r}" for n, p, r in itertools.product(policies, ("fp32", "int8"), runtimes)]
    if all(key in entry for key in wanted):  # a resumed run: no baseline files to make, no models to prune
        log(f"{model_name}@{size}: all {len(wanted)} timings reused from {OUT.name}")
        return
    quantize = QuantizeSettings(calibration_images=32)
    meters = {}
    for runtime in runtimes:
        started = time.perf_counter()
        meters[runtime] = CandidateMeter(
            base, data, space=space, timer=LocalTimer(replace(timing, runtime=runtime)), quantize=quantize
        )
        log(f"{model_name}@{size}: {runtime} baseline file made in {time.perf_counter() - started:.1f} s")
    models = {name: prune_copy(base, policy, space, data).model for name, policy in policies.items()}
    for name, precision in itertools.product(models, ("fp32", "int8")):
        for runtime in runtimes:  # one candidate in every runtime in turn: the same machine state
            key = f"{name} {precision} {runtime}"
            if key in entry:
                continue
            meter = meters[runtime]
            started = time.perf_counter()
            file = meter.candidate_onnx(models[name], precision)
            made = time.perf_counter() - started
            timed = meter.time_onnx(file)
            entry[key] = {
                "candidate": name,
                "precision": precision,
                "runtime": runtime,
                "median_ms": round(timed.median_ms, 4),
                "p90_ms": round(timed.p90_ms, 4),
                "baseline_median_ms": round(timed.reference_median_ms or 0.0, 4),
                "ratio": round(timed.ratio or 0.0, 5),
                "stable": timed.stable,
                "runs": timed.runs,
                "file_seconds": round(made, 2),
            }
            log(f"{model_name}@{size} {key}: {timed.median_ms:.3f} ms, ratio {timed.ratio:.3f} (file {made:.1f} s)")
            _save(cache)


def _save(cache: dict[str, Any]) -> None:
    if cache.get("_path"):
        Path(cache["_path"]).write_text(json.dumps({k: v for k, v in cache.items() if k != "_path"}, indent=1))


def agreement(entries: dict[str, dict[str, Any]], runtimes: list[str]) -> dict[str, float | None]:
    """Kendall tau of the candidates' ratios between each pair of runtimes."""
    taus: dict[str, float | None] = {}
    for a, b in itertools.combinations(runtimes, 2):
        keys = sorted({(e["candidate"], e["precision"]) for e in entries.values()})
        pairs = [
            (entries[f"{c} {p} {a}"]["ratio"], entries[f"{c} {p} {b}"]["ratio"])
            for c, p in keys
            if f"{c} {p} {a}" in entries and f"{c} {p} {b}" in entries
        ]
        tau = kendalltau(*zip(*pairs, strict=True)).statistic if len(pairs) >= 3 else None
        taus[f"{a}/{b}"] = None if tau is None else round(float(tau), 3)
    return taus


def table(results: dict[str, Any], runtimes: list[str]) -> str:
    lines = [
        "| model | candidate | precision | " + " | ".join(f"{r} ms (ratio)" for r in runtimes) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in runtimes) + " |",
    ]
    for model, entries in results.items():
        for c, p in dict.fromkeys((e["candidate"], e["precision"]) for e in entries.values()):
            cells = []
            for r in runtimes:
                e = entries.get(f"{c} {p} {r}")
                cells.append("-" if e is None else f"{e['median_ms']:.2f} ({e['ratio']:.2f})")
            lines.append(f"| {model} | {c} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one CIFAR model, short timings; writes nothing")
    parser.add_argument("--grid-only", action="store_true", help="only the latency grid, no searches")
    args = parser.parse_args()
    runtimes = []
    for name in RUNTIME_NAMES:
        problem = get_runtime(name).unavailable()
        if problem is None:
            runtimes.append(name)
        else:
            log(f'{name} left out: {problem} (pip install -e ".[{name}]")')
    log(f"CPU: {cpu_model()}; runtimes: {', '.join(runtimes)}; versions {package_versions()}")
    models = [("resnet18_cifar", 32)] if args.quick else MODELS
    timing = QUICK_TIMING if args.quick else TIMING
    ratios = (0.5,) if args.quick else RATIOS
    cache: dict[str, Any] = {}
    if not args.quick:
        if OUT.exists():  # resume: the timings and searches already done (the summaries are computed again)
            cache = {k: v for k, v in json.loads(OUT.read_text()).items() if not k.startswith("_") or k == "_searches"}
        cache["_path"] = str(OUT)
    started = time.perf_counter()
    for model_name, size in models:
        bench_model(model_name, size, runtimes, timing, ratios, cache)
    results = {k: v for k, v in cache.items() if not k.startswith("_")}
    taus = {model: agreement(entries, runtimes) for model, entries in results.items()}
    merged = [{**e, "candidate": f"{m} {e['candidate']}"} for m, entries in results.items() for e in entries.values()]
    pooled = agreement({f"{e['candidate']} {e['precision']} {e['runtime']}": e for e in merged}, runtimes)
    searches: dict[str, Any] | None = None
    if not args.grid_only:
        from benchmarks.runtimes_search import render_all, run_all

        searches = cache.setdefault("_searches", {})
        searches = run_all(runtimes, args.quick, searches, lambda: _save(cache))
    log(f"done in {time.perf_counter() - started:.0f} s")
    print(table(results, runtimes))
    if searches is not None:
        print(render_all(searches, runtimes))
    print(json.dumps({"kendall_tau": taus, "kendall_tau_all_models": pooled}, indent=1))
    if args.quick:
        log("--quick: smoke run on a possibly busy machine; nothing written")
        return
    meta = {"cpu": lscpu(), "versions": package_versions(), "git_revision": git_revision(), "timing": str(TIMING)}
    extra = {} if searches is None else {"_searches": searches}
    OUT.write_text(
        json.dumps({**results, **extra, "_kendall_tau": taus, "_kendall_tau_all": pooled, "_meta": meta}, indent=1)
    )
    from benchmarks.sections import write_section

    body = (
        f"`benchmarks/runtimes.py` on {cpu_model()} (1 thread, batch 1; every candidate timed against its own "
        "runtime's unpruned FP32 model, all runtimes in turn per candidate). ms (ratio to that runtime's unpruned "
        f"model):\n\n{table(results, runtimes)}\n\nKendall tau of the candidates' ratios between runtimes, per model: "
        f"{json.dumps(taus)}; over all models: {json.dumps(pooled)}. Numbers: `benchmarks/runtimes.json`."
    )
    if searches is not None:
        body += "\n\n" + render_all(searches, runtimes)
    write_section(SECTION, body)


if __name__ == "__main__":
    main()

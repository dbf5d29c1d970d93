"""The search part of ``benchmarks/runtimes.py``: one short search per runtime, its front checked on the shipped files.

For each runtime: ``cli.py search --runtime R`` (the same model, data, budget fraction, seed and
trials in every runtime, so the runtimes differ only in the latencies the search sees), then
``cli.py export --runtime R`` of the front, then ``cli.py bench --runtime R`` of each shipped file
interleaved with the unpruned model lowered for the same runtime. Reported:

* each runtime's front and recommendation, and whether the runtimes picked different policies;
* the recommendation of each runtime timed in every other runtime (ratio to that runtime's own
  unpruned model), to show what a front measured in the wrong runtime would promise;
* for every exported front member, the ratio the search recorded against the ratio ``bench``
  measures on the shipped file (the issue's target: within 3%).

Everything is cached in the JSON of ``benchmarks/runtimes.py`` under ``_searches`` (a rerun resumes
per runtime and step); the studies and exports live under ``benchmarks/.runtimes/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from search.data.loading import load_dataset
from search.data.spec import DataSpec
from search.measuring.candidate import CandidateMeter, LocalTimer
from search.measuring.quantize import QuantizeSettings
from search.measuring.runtimes.lowering import timed_file
from search.measuring.runtimes.registry import get_runtime
from search.measuring.timing import LatencySettings, default_min_seconds
from search.models.build import build_model
from search.pruning.auto_space import space_for
from search.pruning.channels import prune_copy
from search.pruning.policy import Policy
from search.study.front import pareto_front, recommended, rows

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".runtimes"
FULL = {  # the models searched in every runtime, in turn (each cached on its own)
    "mobilenet_v2_cifar": {"model": "mobilenet_v2_cifar", "size": 32, "trials": 8, "steps": 10, "exports": 3,
                           "fraction": 0.5, "baseline_epochs": 3, "export_epochs": 1, "confirm": 3},
    # a 12 ms baseline: the shipped files' latencies read against a smaller run-to-run spread than sub-ms models
    "resnet18_cifar": {"model": "resnet18_cifar", "size": 32, "trials": 6, "steps": 10, "exports": 2,
                       "fraction": 0.5, "baseline_epochs": 3, "export_epochs": 1, "pruned_fp32": True, "confirm": 3},
}  # fmt: skip
"""``confirm``: the search's --confirm-repeats (its front timed again in fresh processes; entries without it, from
before that existed, are kept under ``<model>@one-timing`` and rendered beside the new ones)."""
QUICK = {"model": "resnet18_cifar", "size": 32, "trials": 3, "steps": 2, "exports": 1, "fraction": 0.5,
         "baseline_epochs": 2, "export_epochs": 0.5, "confirm": 2}  # fmt: skip
TARGET = 0.03
BENCHES = 3
"""Benches of each shipped file, in fresh processes: their mean is compared, their spread is the noise."""
"""The issue's target: bench's ratio on the shipped file within 3% of the ratio the search recorded."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"cli.py {' '.join(args[:1])} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}"
        )
    return done


def _search(runtime: str, sizes: dict[str, Any], studies: Path) -> dict[str, Any]:
    name = f"runtimes-{runtime}"
    started = time.perf_counter()
    _cli(
        "search", "--model", sizes["model"], "--data", "digits", "--input-size", str(sizes["size"]),
        "--budget-fraction", str(sizes["fraction"]), "--runtime", runtime, "--seed", "0",
        "--trials", str(sizes["trials"]), "--finetune-steps", str(sizes["steps"]), "--baseline-epochs", str(sizes["baseline_epochs"]),
        "--no-promotion", "--studies-dir", str(studies), "--study", name, "-q",
        "--confirm-repeats", str(sizes.get("confirm", 0)),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    all_rows = rows(study)
    pick = recommended(all_rows)
    front = pareto_front(all_rows)

    def row(r: Any) -> dict[str, Any]:
        return {"trial": r.number, "ms": round(r.latency_ms, 4), "ratio": round(r.ratio, 5), "accuracy": r.accuracy,
                "policy": r.policy.to_dict(), "repeats": list(r.latency_repeats)}  # fmt: skip

    return {
        "study": name,
        "seconds": round(seconds, 1),
        "baseline_ms": round(study.user_attrs["baseline_latency_ms"], 4),
        "budget_ms": study.user_attrs["budget_ms"],
        "trials": sum(1 for r in all_rows if r.accuracy is not None),
        "front": [row(r) for r in front],
        "pick": None if pick is None else row(pick),
    }


def _reference(runtime: str, study_name: str, studies: Path) -> Path:
    """The study's unpruned baseline as ``runtime`` times it: the file the search's ratios are relative to."""
    from search.shipping.rebuild import load_study_baseline

    suffix = ".pte" if get_runtime(runtime).info.file_format == "pte" else ".onnx"
    path = studies / f"unpruned-{runtime}{suffix}"
    if not path.exists():
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{studies}/{study_name}.db")
        baseline = load_study_baseline(study)
        path.write_bytes(timed_file(runtime, baseline.model.eval(), baseline.data, "fp32", QuantizeSettings()))
    return path


def _best_pruned_fp32(result: dict[str, Any], studies: Path) -> dict[str, Any] | None:
    """The most accurate pruned FP32 trial within the budget, as the front's rows are recorded."""
    study = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{studies}/{result['study']}.db")
    found = [
        r for r in rows(study)
        if r.feasible and r.accuracy is not None and r.policy.precision == "fp32" and not r.policy.is_unpruned
    ]  # fmt: skip
    if not found:
        return None
    r = max(found, key=lambda r: r.accuracy or 0.0)
    return {"trial": r.number, "ms": round(r.latency_ms, 4), "ratio": round(r.ratio, 5), "accuracy": r.accuracy,
            "policy": r.policy.to_dict(), "repeats": list(r.latency_repeats)}  # fmt: skip


def _export_and_bench(
    runtime: str, result: dict[str, Any], sizes: dict[str, Any], studies: Path
) -> list[dict[str, Any]]:
    """Export up to ``exports`` front members (the pick first) and bench each shipped file against the unpruned one."""
    members = [result["pick"], *[r for r in result["front"] if r["trial"] != result["pick"]["trial"]]][
        : sizes["exports"]
    ]
    if sizes.get("pruned_fp32"):  # a front of the unpruned INT8 model alone checks no pruned shape: add one
        members += [
            m for m in [_best_pruned_fp32(result, studies)] if m and m["trial"] not in {x["trial"] for x in members}
        ]
    out = studies / "exports" / runtime
    reference = _reference(runtime, result["study"], studies)
    checks = []
    for member in members:
        folder = out / f"trial-{member['trial']}"
        if not folder.exists():
            try:
                _cli(
                    "export", "--trial", str(member["trial"]), "--epochs", str(sizes["export_epochs"]),
                    "--runtime", runtime, "--studies-dir", str(studies), "--study", result["study"],
                    "--out", str(folder), "--force", "-q",
                )  # fmt: skip
            except RuntimeError as exc:  # a refused export (e.g. INT8 agreement) is a result too
                reason = str(exc).strip().splitlines()[-1]
                checks.append({"trial": member["trial"], "exported": False, "reason": reason})
                log(f"{runtime} trial {member['trial']}: not exported: {reason}")
                continue
        info = get_runtime(runtime).info
        precision = member["policy"].get("precision", "fp32")
        candidates = sorted(folder.rglob(info.int8_file if precision == "int8" else info.fp32_file))
        if not candidates:
            raise RuntimeError(
                f"export of trial {member['trial']} shipped no {precision} file for {runtime} in {folder}"
            )
        benches = [
            json.loads(
                _cli(
                    "bench", str(candidates[0]), "--runtime", runtime, "--reference", str(reference), "--format", "json"
                ).stdout
            )
            for _ in range(BENCHES)
        ]  # several benches: their spread is the timing noise the difference is read against
        measured = {
            "ratio": sum(b["ratio"] for b in benches) / len(benches),
            "median_ms": sum(b["median_ms"] for b in benches) / len(benches),
        }
        difference = measured["ratio"] / member["ratio"] - 1  # the mean of the two benches
        checks.append({
            "trial": member["trial"], "precision": precision, "file": str(candidates[0].relative_to(ROOT)),
            "search_ratio": member["ratio"], "search_repeats": member.get("repeats", []),
            "bench_ratio": round(measured["ratio"], 5),
            "bench_ratios": [round(b["ratio"], 5) for b in benches],
            "bench_ms": round(measured["median_ms"], 4), "difference": round(difference, 4),
            "within_target": abs(difference) <= TARGET,
        })  # fmt: skip
        log(f"{runtime} trial {member['trial']} ({precision}): search ratio {member['ratio']:.3f}, "
            f"bench on the shipped file {measured['ratio']:.3f} ({difference:+.1%})")  # fmt: skip
    return checks


def _cross(picks: dict[str, dict[str, Any]], runtimes: list[str], sizes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each runtime's pick timed in every runtime, as the ratio to that runtime's unpruned model."""
    data = load_dataset(DataSpec("digits", input_size=sizes["size"]))
    torch.manual_seed(0)
    base = build_model(sizes["model"], data.num_classes).eval()
    space = space_for(sizes["model"], None, data.num_classes, data.example_input())
    meters = {
        r: CandidateMeter(base, data, space=space, timer=LocalTimer(LatencySettings(threads=1, max_seconds=20.0, runtime=r)),
                          quantize=QuantizeSettings(calibration_images=32))
        for r in runtimes
    }  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for picked_in, pick in picks.items():
        policy = Policy.from_dict(pick["policy"])
        model = prune_copy(base, policy, space, data).model
        for r in runtimes:  # the same candidate in every runtime in turn
            timed = meters[r].time_onnx(meters[r].candidate_onnx(model, policy.precision))
            table.setdefault(picked_in, {})[r] = round(timed.ratio or 0.0, 5)
            log(f"{picked_in}'s pick in {r}: ratio {timed.ratio:.3f}")
    return table


def run_all(runtimes: list[str], quick: bool, cache: dict[str, Any], save: Any) -> dict[str, Any]:
    """The ``_searches`` entry: model -> :func:`run_searches`'s cache (an entry of one model, as an older run
    wrote it, is kept as that model's)."""
    if "settings" in cache:
        old = dict(cache)
        cache.clear()
        cache[old["settings"]["model"]] = old
    if quick:
        cache[QUICK["model"]] = run_searches(runtimes, QUICK, WORK / "quick", cache.get(QUICK["model"], {}), save)
        return cache
    for model, sizes in FULL.items():
        if model in cache and cache[model].get("settings", {}).get("confirm") != sizes.get("confirm"):
            cache[f"{model}@one-timing"] = cache.pop(model)  # from before the front was timed again: kept, not reused
        studies = WORK / ("studies" if model == "mobilenet_v2_cifar" else f"studies-{model}")
        if sizes.get("confirm"):
            studies = studies.with_name(studies.name + "-confirm")
        cache[model] = run_searches(runtimes, sizes, studies, cache.setdefault(model, {}), save)
        save()
    return cache


def render_all(cache: dict[str, Any], runtimes: list[str]) -> str:
    return "\n\n".join(render(entry, runtimes) for entry in cache.values() if "settings" in entry)


def run_searches(
    runtimes: list[str], sizes: dict[str, Any], studies: Path, cache: dict[str, Any], save: Any
) -> dict[str, Any]:
    """Fill ``cache`` (one model's entry) runtime by runtime, saving after each step; return it."""
    quick = sizes is QUICK
    if quick:  # a smoke run starts afresh
        shutil.rmtree(studies, ignore_errors=True)
    studies.mkdir(parents=True, exist_ok=True)
    if "settings" not in cache:  # a fresh entry: its timings have today's floor (older entries had none)
        cache["min_timing_s"] = default_min_seconds()
        cache["isolated"] = True  # the search, export and bench time in a child process (search/measuring/isolated.py)
        cache["started"] = time.strftime("%Y-%m-%d %H:%M")
    cache.setdefault("settings", sizes)
    for runtime in runtimes:
        entry = cache.setdefault(runtime, {})
        if "search" not in entry:
            log(f"search in {runtime}: {sizes}")
            entry["search"] = _search(runtime, sizes, studies)
            save()
        if entry["search"]["pick"] is not None and "checks" not in entry:
            entry["checks"] = _export_and_bench(runtime, entry["search"], sizes, studies)
            save()
    picks = {r: cache[r]["search"]["pick"] for r in runtimes if cache[r]["search"]["pick"] is not None}
    if "cross" not in cache and picks:
        cache["cross"] = _cross(picks, runtimes, sizes)
        save()
    keys = {r: json.dumps(p["policy"], sort_keys=True) for r, p in picks.items()}
    cache["different_picks"] = len(set(keys.values())) > 1
    return cache


def render(cache: dict[str, Any], runtimes: list[str]) -> str:
    sizes = cache["settings"]
    lines = [
        (f"**{cache['label']}.** " if cache.get("label") else "")
        + f"A short search in each runtime ({sizes['model']} on digits at {sizes['size']} px, budget "
        f"{sizes['fraction']:g} of each runtime's own baseline, {sizes['trials']} trials of {sizes['steps']} steps, "
        "seed 0, no promotion"
        + (
            f"; its front timed again in {sizes['confirm']} fresh processes, `--confirm-repeats {sizes['confirm']}`"
            if sizes.get("confirm")
            else "; one timing per trial, before `--confirm-repeats` existed"
        )
        + "), its front exported and the shipped files timed with `bench --runtime`"
        + (
            f" (every timing at least {cache['min_timing_s']:g} s"
            + (", each in a timing process of its own" if cache.get("isolated") else "")
            + ")"
            if cache.get("min_timing_s")
            else " (timed before the 1 s floor: each timing stopped once its median was stable)"
        )
        + ":",
        "",
        "| runtime | baseline ms | budget ms | front (trial: ratio) | pick | pick's ratio in "
        + " / ".join(runtimes)
        + " |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runtimes:
        s = cache[r]["search"]
        front = ", ".join(f"{f['trial']}: {f['ratio']:.3f}" for f in s["front"])
        pick = (
            "-" if s["pick"] is None else f"trial {s['pick']['trial']} ({s['pick']['policy'].get('precision', 'fp32')})"
        )
        cross = cache.get("cross", {}).get(r, {})
        lines.append(f"| {r} | {s['baseline_ms']:.3f} | {s['budget_ms']:.3f} | {front} | {pick} | "
                     + " / ".join(f"{cross[q]:.3f}" if q in cross else "-" for q in runtimes) + " |")  # fmt: skip
    lines += ["", "| runtime | trial | precision | search's ratio | bench on the shipped file (mean; each) | difference |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in runtimes:
        for c in cache[r].get("checks", []):
            if c.get("exported") is False:
                lines.append(f"| {r} | {c['trial']} | - | - | not exported: {c['reason']} | - |")
                continue
            again = f" (x{len(c['search_repeats'])})" if c.get("search_repeats") else ""
            lines.append(f"| {r} | {c['trial']} | {c['precision']} | {c['search_ratio']:.3f}{again} | {c['bench_ratio']:.3f} ("
                         f"{', '.join(f'{b:.3f}' for b in c.get('bench_ratios', []))}) "
                         f"| {c['difference']:+.1%}{'' if c['within_target'] else ' (over 3%)'} |")  # fmt: skip
    lines.append("")
    lines.append(
        f"The runtimes' recommendations are {'different' if cache.get('different_picks') else 'the same'} policies."
    )
    return "\n".join(lines)

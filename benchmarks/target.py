"""Benchmark: timing through a latency target (``cli.py target``) against timing locally, in one run.

1. **Per-candidate overhead and agreement.** The baseline ResNet-18 (digits, 224 px, the default
   run's setting) and uniform prunings of it, each timed interleaved with the baseline, once
   locally and once through a target process on loopback, alternately: the wall time per
   candidate (upload, HTTP, queue) and the ratios of the same models.
2. **A search timed on a target against the same search timed locally.** The target is pinned to
   CPU 1 and the search to CPU 0 (``--cpus 0``), so training never shares a core with the timing;
   the local search is pinned to CPU 0 too. Same baseline, settings and seed. Compared: the
   latency of every recipe the two studies share, and the two fronts.

Writes ``benchmarks/target.json`` and the "Latency target" section of BENCHMARKS.md.

    python benchmarks/target.py            # about 15 minutes on the 2-core dev machine
    python benchmarks/target.py --smoke    # a minute or two: checks the script, writes nothing
    python benchmarks/target.py --render   # rewrite the section from target.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.latency_service.client import RemoteTimer  # noqa: E402
from search.measuring.candidate import LocalTimer  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision  # noqa: E402
from search.measuring.onnx_export import export_onnx  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.pruning.channels import apply_policy  # noqa: E402
from search.pruning.space import SPACES_DIR, load_space  # noqa: E402
from search.study.front import pareto_front, rows  # noqa: E402
from search.training.baseline import prepare_baseline  # noqa: E402

SECTION = "Latency target"
OUT = ROOT / "benchmarks" / "target.json"
FULL = {"input_size": 224, "ratios": (0.2, 0.35, 0.5, 0.7), "repeats": 2, "search_input": 64, "trials": 8, "steps": 30}
SMOKE = {"input_size": 32, "ratios": (0.5,), "repeats": 1, "search_input": 32, "trials": 4, "steps": 2}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def start_target(token_file: Path, cpu: int) -> tuple[subprocess.Popen[str], str]:
    command = ["taskset", "-c", str(cpu), sys.executable, "-m", "search.latency_service", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--token-file", str(token_file)], cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    match = re.search(r"listening on (http://\S+?)/ ", first)
    if match is None:
        raise RuntimeError(f"the target did not start: {first}")
    return process, match.group(1)


def overhead(sizes: dict[str, Any], url: str, token: str) -> dict[str, Any]:
    """Each candidate timed locally and through the target, alternately; wall seconds and ratios."""
    data = load_dataset(DataSpec("digits", input_size=sizes["input_size"]))
    baseline = build_model("resnet18", data.num_classes).eval()  # latency does not depend on the weights
    space = load_space(SPACES_DIR / "resnet18.toml")
    example = data.example_input()
    models = {"unpruned": export_onnx(baseline, example)}
    for ratio in sizes["ratios"]:
        pruned = apply_policy(copy.deepcopy(baseline), space.uniform(ratio), space, example)
        models[f"uniform {ratio:g}"] = export_onnx(pruned.model, example)
    shape = tuple(example.shape)
    local, remote = LocalTimer(LatencySettings(threads=1)), RemoteTimer(url, token)
    rows_: list[dict[str, Any]] = []
    for repeat in range(sizes["repeats"]):
        for name, onnx_model in models.items():
            entry: dict[str, Any] = {"model": name, "repeat": repeat, "mb": round(len(onnx_model) / 1e6, 1)}
            for where, timer in (("local", local), ("target", remote)):
                started = time.perf_counter()
                latency = timer.time(onnx_model, shape, reference=models["unpruned"])
                entry[f"{where}_s"] = round(time.perf_counter() - started, 3)
                entry[f"{where}_ratio"] = round(latency.ratio or 0.0, 4)
                entry[f"{where}_median_ms"] = round(latency.median_ms, 3)
            log(f"{name} (repeat {repeat}): local {entry['local_s']} s ratio {entry['local_ratio']}, "
                f"target {entry['target_s']} s ratio {entry['target_ratio']}")  # fmt: skip
            rows_.append(entry)
    first = [r for r in rows_ if r["repeat"] == 0]
    later = [r for r in rows_ if r["repeat"] > 0] or first
    pruned_rows = [r for r in rows_ if r["model"] != "unpruned"]
    return {
        "input_size": sizes["input_size"],
        "rows": rows_,
        "overhead_first_s": round(statistics.median(r["target_s"] - r["local_s"] for r in first), 3),
        "overhead_again_s": round(statistics.median(r["target_s"] - r["local_s"] for r in later), 3),
        "ratio_difference_max": round(max(abs(r["target_ratio"] - r["local_ratio"]) for r in pruned_rows), 4),
        "ratio_difference_median": round(statistics.median(abs(r["target_ratio"] - r["local_ratio"]) for r in pruned_rows), 4),
    }  # fmt: skip


def search(sizes: dict[str, Any], studies: Path, name: str, extra: list[str]) -> dict[str, Any]:
    command = [
        sys.executable, "cli.py", "search",
        "--budget-fraction", "0.5", "--input-size", str(sizes["search_input"]), "--precision", "fp32",
        "--trials", str(sizes["trials"]), "--finetune-steps", str(sizes["steps"]), "--baseline-epochs", "1",
        "--studies-dir", str(studies), "--study", name, "--cpus", "0", "-q", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"search {name} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    all_rows = rows(study)
    recipes = {r.recipe: {"ms": round(r.latency_ms, 3), "ratio": round(r.ratio, 4)} for r in all_rows if r.recipe}
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    latency_s = sum(t.user_attrs.get("seconds", {}).get("latency", 0.0) for t in trials)
    return {
        "seconds": round(seconds, 1),
        "latency_seconds_in_trials": round(latency_s, 1),
        "trained_baseline": "trained" in done.stdout.split("Baseline latency")[0].lower(),
        "baseline_ms": round(study.user_attrs["baseline_latency_ms"], 3),
        "budget_ms": study.user_attrs["budget_ms"],
        "measured_on": study.user_attrs.get("latency_measured_on"),
        "recipes": recipes,
        "front": [[round(r.latency_ms, 3), round(r.accuracy or 0.0, 4)] for r in pareto_front(all_rows)],
    }


def compare(local: dict[str, Any], remote: dict[str, Any]) -> dict[str, Any]:
    shared = sorted(set(local["recipes"]) & set(remote["recipes"]))
    ratios = {k: round(remote["recipes"][k]["ratio"] / local["recipes"][k]["ratio"] - 1, 4) for k in shared}
    ms = {k: round(remote["recipes"][k]["ms"] / local["recipes"][k]["ms"] - 1, 4) for k in shared}
    return {"shared_recipes": shared, "ratio_difference": ratios, "ms_difference": ms}


def render(result: dict[str, Any]) -> str:
    o, s = result["overhead"], result["searches"]
    lines = [
        f"`python benchmarks/target.py`, {result['date']}, git {str(result['git_revision'])[:10]}; "
        f"{result['hardware']['cpu']}, {result['hardware']['logical_cpus']} logical CPUs. The target is a "
        "`python -m search.latency_service` process on loopback, pinned to CPU 1 (`taskset`), timing with 1 thread "
        "exactly as the search does; so this measures the service's cost and agreement, not a second device.",
        "",
        f"### Per candidate: timing through the target against timing here ({o['input_size']}x{o['input_size']} "
        "ResNet-18, interleaved with the unpruned model)",
        "",
        "| model | ONNX MB | repeat | local s | target s | local ratio | target ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in o["rows"]:
        lines.append(
            f"| {r['model']} | {r['mb']} | {r['repeat']} | {r['local_s']} | {r['target_s']} | "
            f"{r['local_ratio']:.3f} | {r['target_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Overhead per candidate (median, target minus local wall time): {o['overhead_first_s']} s the first "
        f"time a model is sent (its upload), {o['overhead_again_s']} s for a model the target already holds. "
        f"Ratios of the same pruned models: median difference {o['ratio_difference_median']:.4f}, largest "
        f"{o['ratio_difference_max']:.4f}.",
        "",
        f"### A search timed on the target against the same search timed here ({s['settings']})",
        "",
        "| | timed here | timed on the target |",
        "| --- | --- | --- |",
        f"| wall time | {s['local']['seconds']} s | {s['target']['seconds']} s |",
        f"| latency phase of the trials | {s['local']['latency_seconds_in_trials']} s | "
        f"{s['target']['latency_seconds_in_trials']} s |",
        f"| baseline latency | {s['local']['baseline_ms']} ms | {s['target']['baseline_ms']} ms |",
        f"| budget (0.5 of it) | {s['local']['budget_ms']} ms | {s['target']['budget_ms']} ms |",
        f"| front (latency ms, top-1) | {s['local']['front']} | {s['target']['front']} |",
    ]
    lines += [
        "",
        "The recipes both studies ran, as drift-corrected latency and as the ratio to the interleaved baseline "
        "(what the budget is judged on):",
        "",
        "| recipe | here: ms, ratio | on the target: ms, ratio | ratio difference |",
        "| --- | --- | --- | --- |",
    ]
    comparison = s["comparison"]
    for k in comparison["shared_recipes"]:
        here, there = s["local"]["recipes"][k], s["target"]["recipes"][k]
        lines.append(
            f"| {k} | {here['ms']} ms, {here['ratio']:.3f} | {there['ms']} ms, {there['ratio']:.3f} | "
            f"{comparison['ratio_difference'][k]:+.1%} |"
        )
    worst = max(abs(v) for v in comparison["ratio_difference"].values())
    drift = s["target"]["baseline_ms"] / s["local"]["baseline_ms"] - 1
    lines += [
        "",
        f"The two studies' baselines, each measured once when its study was created, differ by {drift:+.1%}: the "
        "drift of this shared machine between two runs minutes apart, which moves every corrected latency of a "
        f"study with it. The ratios, timed interleaved, agree within {worst:.1%}. Both timers are this machine "
        "here; on a real target device the fronts differ by what the device differs, which is the point of "
        "timing there.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.render:
        write_section(SECTION, render(json.loads(OUT.read_text())))
        return
    sizes = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="target-bench-") as tmp:
        work = Path(tmp)
        token_file = work / "token"
        process, url = start_target(token_file, cpu=1)
        try:
            token = token_file.read_text().strip()
            log(f"target at {url}")
            measured = overhead(sizes, url, token)
            studies = work / "studies"
            log("training the searches' baseline once, so neither search's wall time includes it")
            data = load_dataset(DataSpec("digits", input_size=sizes["search_input"]))
            prepare_baseline("resnet18", None, data, cache_dir=studies / "cache", epochs=1, seed=0)
            target_args = ["--target", url, "--target-token-file", str(token_file)]
            log("search timed on the target")
            remote = search(sizes, studies, "on-target", target_args)
            log("the same search timed here")
            local = search(sizes, studies, "local", [])
        finally:
            process.terminate()
            process.wait(timeout=30)
    settings = (
        f"digits at {sizes['search_input']} px, budget 0.5 of the baseline, {sizes['trials']} trials, "
        f"{sizes['steps']} fine-tune steps, search pinned to CPU 0"
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "overhead": measured,
        "searches": {"settings": settings, "local": local, "target": remote, "comparison": compare(local, remote)},
    }
    print(json.dumps(result["overhead"], indent=1)[:2000])
    if args.smoke:
        log("smoke run: nothing written")
        return
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    write_section(SECTION, render(result))
    log(f"wrote {OUT} and the {SECTION!r} section of BENCHMARKS.md")


if __name__ == "__main__":
    main()

"""Benchmark: what export's recovery options buy at a tight budget (issue #26).

Setting: the shared CIFAR-10 and the studies of ``benchmarks/allocation.py`` (its committed
MobileNetV2 baseline, its searches with the same settings; reused from its working folder
``--allocation-work`` when they are there, run into it otherwise). Tracks:

* MobileNetV2 for small inputs at 25% of the baseline's latency: the allocation study's
  recommendation, exported with today's export (one-shot pruning, logit distillation), with
  ``--prune-steps K`` for every ``--steps``, with ``--feature-distill W`` for every
  ``--feature-weights``, and with the best combination of those (the best K and the best W, each
  kept only if its row beat today's mean); every row at the same ``--epochs`` total, once per
  ``--seeds``, top-1 on the 10,000 test images (mean and spread) with its fine-tune time. Today's
  export and the best combination again at ``--long-epochs`` (``--long-seeds``).
* INT8 at the same budget: a search of INT8 policies (``--precision int8``, otherwise as the
  allocation study), its recommendation exported with ``--quantization ptq`` and ``qat`` (export's
  flag from the quantization-aware-training part of the issue; skipped with a note while export
  has no such flag), each with the best combination: INT8 top-1, FP32 top-1 of the same export,
  agreement with FP32, and latency timed interleaved with the baseline.
* The shared ResNet-18 at 25%: today's export and MobileNetV2's best combination.

    python benchmarks/recovery.py > benchmarks/recovery.log 2>&1     # the full run (hours here)
    python benchmarks/recovery.py --quick                           # a smoke run (numbers meaningless)

Every export and latency is cached in ``benchmarks/.recovery/results.json`` (``--work``) and
reused when the script runs again, so an interrupted run resumes. The working folders are ignored
and vanish with the machine, and the full run takes several sessions, so what a later session needs
is also kept in tracked files: the results in ``benchmarks/recovery_results.json`` and each finished
search's database (small: no weights) in ``benchmarks/recovery/studies/`` (the INT8 search) and
``benchmarks/searches/`` (today's searches, shared with equal_compute.py's arm a), put back into the working
folders when they are missing there (a search found there only resumes, adding no trial). Writes
``benchmarks/recovery.json`` and the "Recovery" section of BENCHMARKS.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from benchmarks import allocation  # noqa: E402
from benchmarks.carry import ResultsCache, carry_study  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.measuring.isolated import IsolatedTimer  # noqa: E402
from search.study.front import recommended, rows  # noqa: E402

SECTION = "Recovery"
log, cpu_label = allocation.log, allocation.cpu_label
LATENCY_PASSES = 3


@dataclass(frozen=True)
class Recipe:
    """How a row is exported: export's recovery flags."""

    label: str
    prune_steps: int = 1
    feature_distill: float = 0.0
    quantization: str | None = None
    """export's ``--quantization ptq|qat`` (INT8 rows); None: export's default."""
    qat_epochs: float | None = None
    """export's ``--qat-epochs`` (QAT rows), passed and keyed explicitly: export's default may change."""

    def args(self) -> list[str]:
        out = ["--prune-steps", str(self.prune_steps), "--feature-distill", f"{self.feature_distill:g}"]
        out += ["--quantization", self.quantization] if self.quantization else []
        return out + (["--qat-epochs", f"{self.qat_epochs:g}"] if self.qat_epochs is not None else [])

    def key(self) -> str:
        key = f"K{self.prune_steps} W{self.feature_distill:g}" + (f" {self.quantization}" if self.quantization else "")
        return key + (f" {self.qat_epochs:g}ep" if self.qat_epochs is not None else "")


TODAY = Recipe("today's export (one shot, logit distillation)")


@dataclass(frozen=True)
class Plan:
    fraction: float = 0.25
    epochs: float = 3
    seeds: tuple[int, ...] = (0, 1)
    steps: tuple[int, ...] = (2, 4)
    feature_weights: tuple[float, ...] = (1.0, 3.0)
    long_epochs: float = 10
    long_seeds: tuple[int, ...] = (0,)
    int8_seeds: tuple[int, ...] = (0, 1, 2)
    """The INT8 rows' seeds: a third, since PTQ's two seeds ended 3.1 pp apart (2026-12-06), beyond any difference
    QAT could make."""
    qat_epochs: float = 1.0
    """Of each QAT row's ``epochs``, the last ones trained with fake quantization."""
    resnet: bool = True
    int8: bool = True
    test_images: int | None = None
    """Score on a fixed random subset of the test split (``--quick``); None: all 10,000."""


def allocation_plan(quick: bool) -> allocation.Plan:
    """The allocation benchmark's plan with its own defaults (its studies are the ones reused)."""
    defaults = dict(mobilenet_budgets=[0.5, 0.25], resnet_budgets=[0.25], baseline_epochs=15, trials=30)
    defaults |= dict(trial_steps=30, trial_batch=64, bn_batches=8, val_images=2000, epochs=1, seeds=[0, 1])
    args = argparse.Namespace(quick=quick, random=8, wide_budgets=[0.25], **defaults)
    return allocation.Plan.of(args)


MIRROR = ROOT / "benchmarks" / "recovery_results.json"
"""A tracked copy of the results cache, carried between machines (not with ``--quick``)."""
STUDIES_MIRROR = ROOT / "benchmarks" / "recovery" / "studies"
"""Tracked copies of the searches' databases (not with ``--quick``)."""


class Bench:
    def __init__(self, plan: Plan, work: Path, studies: allocation.Bench, carry: bool = True) -> None:
        self.plan, self.work, self.alloc = plan, work, studies
        self.store = ResultsCache(work, MIRROR if carry else None)
        self.cache: dict[str, Any] = self.store.data
        self.studies_mirror = STUDIES_MIRROR if carry else None
        self.reused: list[str] = []
        self.quantization_flag = "--quantization" in _run(["export", "--help"]).stdout

    def cached(self, key: str, compute: Any, wait: bool = True) -> Any:
        """The cached result of ``key``, or computed; None without ``wait`` while another run computes it."""
        self.store.refresh()
        if key not in self.cache:
            with self.store.claim(key, wait) as held:
                if not held:
                    return None
                if key not in self.cache:  # (unless the run that held it has just written it)
                    self.cache[key] = compute()
                    self.store.save()
                    return self.cache[key]
        if key not in self.reused:
            self.reused.append(key)
            log(f"reused from an earlier run: {key}")
        return self.cache[key]

    def int8_study(self, model: str) -> tuple[Path, str]:
        """A search of INT8 policies at the budget, with the allocation study's settings."""
        name = f"{model}-{self.plan.fraction:g}x-int8"
        studies = self.work / "studies"

        def run() -> dict[str, Any]:
            args = self.alloc.search_args(model, self.plan.fraction, name, self.alloc.plan.trials)
            args[args.index("--precision") + 1] = "int8"
            args[args.index("--studies-dir") + 1] = str(studies)
            allocation.cli("search", *args, "--no-promotion")  # as allocation.py's own searches
            return {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}

        carry_study(studies, name, self.studies_mirror)  # back from the tracked copy, if the work folder lost it
        self.cached(f"search {name} trials {self.alloc.plan.trials}", run)
        carry_study(studies, name, self.studies_mirror)
        return studies, name

    def export(
        self, where: tuple[Path, str], number: int, recipe: Recipe, seed: int, epochs: float, wait: bool = True
    ) -> dict[str, Any] | None:
        studies, study = where
        key = f"export {study} {number} {recipe.key()} seed {seed} epochs {epochs:g}"

        def run() -> dict[str, Any]:
            out = self.work / "exports" / study / recipe.key().replace(" ", "-") / f"seed-{seed}-{epochs:g}ep"
            args = ["export", "--study", study, "--studies-dir", str(studies), "--trial", str(number)]
            args += ["--epochs", f"{epochs:g}", "--seed", str(seed), "--out", str(out), "--force", "--quiet"]
            args += ["--test-images", str(self.plan.test_images)] if self.plan.test_images else []
            started = time.perf_counter()
            done = _run([*args, *recipe.args()], echo=True)
            if done.returncode == 2:  # export refused the combination (a one-line error): a row of its own
                return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
            if done.returncode != 0:  # a crash or a kill (out of memory, say) is not a result: a rerun tries again
                raise RuntimeError(f"cli.py export failed with status {done.returncode}: {key}")
            card = json.loads((out / f"trial-{number}" / "card.json").read_text())
            int8 = card.get("int8") or {}
            folder = out / f"trial-{number}"
            return {
                "top1": int8.get("top1", card["accuracy"]["after_finetune"]),
                "fp32_top1": card["accuracy"]["after_finetune"],
                "int8_agreement": int8.get("top1_agreement_with_fp32"),
                "quantization": card.get("quantization") or int8.get("mode"),
                "qat_check": int8.get("qat"),  # the INT8 model against the fake-quantized one (QAT exports)
                "finetune_seconds": card["finetune"]["seconds"],
                "export_seconds": round(time.perf_counter() - started, 1),
                "schedule": [s["total_channels"] for s in card.get("pruning_schedule", {}).get("steps", [])],
                "feature_distill": card.get("feature_distill"),
                "onnx": str(folder / ("model.int8.onnx" if int8 else "model.onnx")),
                "fp32_onnx": str(folder / "model.onnx"),
            }

        return self.cached(key, run, wait)

    def prefetch(
        self, where: tuple[Path, str], number: int, recipes: list[Recipe], seeds: tuple, epochs: float
    ) -> None:
        """Export what no other run has taken yet, so that two runs sharing the work folder split the rows."""
        for recipe in recipes:
            for seed in seeds:
                self.export(where, number, recipe, seed, epochs, wait=False)

    def row(self, where: tuple[Path, str], number: int, recipe: Recipe, seeds: tuple[int, ...], epochs: float) -> dict:
        first = {seed: self.export(where, number, recipe, seed, epochs, wait=False) for seed in seeds}
        runs = [got or self.export(where, number, recipe, seed, epochs) for seed, got in first.items()]
        failed = [r["error"] for r in runs if "error" in r]
        out: dict[str, Any] = {"row": recipe.label, "recipe": asdict(recipe), "epochs": epochs, "seeds": list(seeds)}
        if failed:
            return {**out, "error": failed[0]}
        tops = [r["top1"] for r in runs]
        return {
            **out,
            "top1": tops,
            "mean": statistics.fmean(tops),
            "spread": max(tops) - min(tops),
            "finetune_seconds": statistics.fmean(r["finetune_seconds"] for r in runs),
            "runs": runs,
        }


def _run(args: list[str], echo: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "cli.py", *args]
    if echo:
        log("$ " + " ".join(shlex.quote(a) for a in command[1:]))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if echo and done.returncode != 0:
        log(f"failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done


def best_combination(today: dict[str, Any], rows_: list[dict[str, Any]]) -> Recipe:
    """The best K and the best W, each only where its row beat today's mean."""
    good = [r for r in rows_ if "mean" in r and r["mean"] > today.get("mean", 1.0)]
    k_rows = [r for r in good if r["recipe"]["prune_steps"] > 1]
    w_rows = [r for r in good if r["recipe"]["feature_distill"] > 0]
    k = max(k_rows, key=lambda r: r["mean"])["recipe"]["prune_steps"] if k_rows else 1
    w = max(w_rows, key=lambda r: r["mean"])["recipe"]["feature_distill"] if w_rows else 0.0
    return Recipe(f"best combination (--prune-steps {k} --feature-distill {w:g})", k, w)


def mobilenet_track(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    where = _searched(bench, allocation.MOBILENET)
    number = recommended(rows(_study(where))).number
    result: dict[str, Any] = {"model": allocation.MOBILENET, "fraction": plan.fraction, "trial": number, "rows": []}
    result["studies"], result["study"] = str(where[0]), where[1]
    today = bench.row(where, number, TODAY, plan.seeds, plan.epochs)
    candidates = [Recipe(f"iterative, --prune-steps {k}", prune_steps=k) for k in plan.steps]
    candidates += [
        Recipe(f"feature distillation, --feature-distill {w:g}", feature_distill=w) for w in plan.feature_weights
    ]
    bench.prefetch(where, number, candidates, plan.seeds, plan.epochs)
    result["rows"] = [today] + [bench.row(where, number, r, plan.seeds, plan.epochs) for r in candidates]
    best = best_combination(today, result["rows"][1:])
    result["best"] = asdict(best)
    if best.key() != TODAY.key() and best.key() not in {r.key() for r in candidates}:
        result["rows"].append(bench.row(where, number, best, plan.seeds, plan.epochs))
    return result


def long_rows(bench: Bench, track: dict[str, Any], best: Recipe) -> None:
    """Today's export and the best combination at ``--long-epochs``: the last rows run (one seed each, the
    longest exports), so that two runs sharing the work folder each take one."""
    where, plan = (Path(track["studies"]), track["study"]), bench.plan
    if plan.long_epochs <= 0:
        track["long_note"] = "the longer rows were not run this time (`--long-epochs 0`)"
        return
    recipes = [TODAY, best] if best.key() != TODAY.key() else [TODAY]
    bench.prefetch(where, track["trial"], recipes, plan.long_seeds, plan.long_epochs)
    track["rows"] += [bench.row(where, track["trial"], r, plan.long_seeds, plan.long_epochs) for r in recipes]


def int8_track(bench: Bench, best: Recipe) -> dict[str, Any]:
    model = allocation.MOBILENET
    result: dict[str, Any] = {"model": model, "fraction": bench.plan.fraction, "precision": "int8", "rows": []}
    if not bench.quantization_flag:
        result["note"] = "skipped: export has no --quantization flag yet (the QAT part of issue #26)"
        return result
    where = bench.int8_study(model)
    chosen = recommended(rows(_study(where)))
    result["trial"], result["policy"] = chosen.number, chosen.policy.describe()
    result["studies"], result["study"] = str(where[0]), where[1]
    recipes = []
    for mode in ("ptq", "qat"):
        qat_epochs = bench.plan.qat_epochs if mode == "qat" else None
        recipes.append(replace(best, label=f"{mode.upper()}, {best.label}", quantization=mode, qat_epochs=qat_epochs))
    seeds = bench.plan.int8_seeds
    bench.prefetch(where, chosen.number, recipes, seeds, bench.plan.epochs)
    result["rows"] = [bench.row(where, chosen.number, r, seeds, bench.plan.epochs) for r in recipes]
    return result


def resnet_track(bench: Bench, best: Recipe) -> dict[str, Any]:
    where = _searched(bench, allocation.RESNET)
    number = recommended(rows(_study(where))).number
    result: dict[str, Any] = {"model": allocation.RESNET, "fraction": bench.plan.fraction, "trial": number}
    result["studies"], result["study"] = str(where[0]), where[1]
    recipes = [TODAY] + ([best] if best.key() != TODAY.key() else [])
    bench.prefetch(where, number, recipes, bench.plan.seeds, bench.plan.epochs)
    result["rows"] = [bench.row(where, number, r, bench.plan.seeds, bench.plan.epochs) for r in recipes]
    return result


def _track(model: str, plan: Plan) -> dict[str, Any]:
    return {"model": model, "fraction": plan.fraction, "rows": []}


def _searched(bench: Bench, model: str) -> tuple[Path, str]:
    bench.alloc.search(model, bench.plan.fraction)  # its database carried as the allocation bench's mirror says
    return bench.alloc.studies, bench.alloc.study_name(model, bench.plan.fraction)


def _study(where: tuple[Path, str]) -> optuna.Study:
    studies, name = where
    return optuna.load_study(study_name=name, storage=f"sqlite:///{studies / name}.db")


def measure_latencies(bench: Bench, tracks: list[dict[str, Any]]) -> None:
    """Each track's first FP32 export and every INT8 export, interleaved with the baseline, in passes."""
    # In a process of its own, as search, export and bench time: this process holds torch and PyTorch's threads,
    # and timed the 0.43 ms INT8 model at 0.63 ms (0.276 of the baseline, against bench's 0.43 ms) on 2026-12-06.
    todo = []
    for track in tracks:
        for r in track["rows"]:
            if "runs" in r and (r["recipe"]["quantization"] or r is track["rows"][0]):
                todo.append((track["model"], r, track))
    with IsolatedTimer(allocation.FINAL_TIMING) as timer:
        _measure(bench, timer, todo)


def _measure(bench: Bench, timer: IsolatedTimer, todo: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    for model, r, track in todo:
        meter = bench.alloc.meter(model)
        key = f"latency passes {r['runs'][0]['onnx']}"
        if key not in bench.cache:  # an export finished on an earlier machine: its file went with it
            onnx, r["stand_in"] = allocation.timed_file(
                bench.work, Path(track["studies"]), track["study"], track["trial"], r["runs"][0]["onnx"]
            )
        else:
            onnx = r["runs"][0]["onnx"]
        got = bench.cached(key, lambda meter=meter, f=onnx: [_timed(timer, meter, f) for _ in range(LATENCY_PASSES)])
        r["latency_ms"] = statistics.median(g["median_ms"] for g in got)
        r["latency_fraction"] = statistics.median(g["ratio"] for g in got)


def _timed(timer: IsolatedTimer, meter: Any, onnx: str) -> dict[str, float]:
    got = timer.time(onnx, meter.input_shape, reference=meter.baseline_onnx)
    return {"median_ms": got.median_ms, "ratio": got.ratio or 0.0, "baseline_ms": got.reference_median_ms or 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (numbers meaningless)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".recovery"), help="working folder (resumable)")
    parser.add_argument("--allocation-work", default=str(ROOT / "benchmarks" / ".allocation"))
    parser.add_argument("--epochs", type=float, default=Plan.epochs, help="total fine-tune epochs of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Plan.seeds))
    parser.add_argument("--steps", type=int, nargs="+", default=list(Plan.steps), help="values of --prune-steps")
    parser.add_argument("--feature-weights", type=float, nargs="+", default=list(Plan.feature_weights))
    parser.add_argument(
        "--long-epochs",
        type=float,
        default=Plan.long_epochs,
        help="0: leave the longer rows out (say so in the section)",
    )
    parser.add_argument("--long-seeds", type=int, nargs="+", default=list(Plan.long_seeds))
    parser.add_argument("--int8-seeds", type=int, nargs="+", default=list(Plan.int8_seeds))
    parser.add_argument("--no-resnet", action="store_true")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--shared", default=str(allocation.SHARED), help="the shared CIFAR-10 material's folder")
    parser.add_argument(
        "--so-far",
        action="store_true",
        help="run nothing: write the exports finished so far (the results cache) as the BENCHMARKS.md section",
    )
    parser.add_argument("--note", default="", help="with --so-far: how the machine was shared while they ran")
    parser.add_argument(
        "--helper",
        action="store_true",
        help="a second run beside the main one, sharing its work folder (one core each): it takes the exports "
        "the main run has not taken, and stops before timing latency (which needs a quiet machine)",
    )
    parser.add_argument(
        "--searches-only",
        action="store_true",
        help="run (or reuse) the searches and stop: they time latency, run them quiet",
    )
    args = parser.parse_args()
    if args.so_far:
        cache = json.loads(MIRROR.read_text()) if MIRROR.is_file() else {}
        write_section(SECTION, render_so_far(cache, fingerprint(1), args.note))
        return
    allocation.DATA = Path(args.shared) / "data" / "cifar10"  # (a worktree elsewhere points at the same material)
    allocation.RESNET_WEIGHTS = Path(args.shared) / "models" / "cifar10_resnet18.pth"
    if not allocation.DATA.is_dir() or not allocation.RESNET_WEIGHTS.is_file():
        sys.exit(f"error: this benchmark needs {allocation.DATA} and {allocation.RESNET_WEIGHTS}; not found")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = Plan(
        epochs=args.epochs,
        seeds=tuple(args.seeds),
        steps=tuple(args.steps),
        feature_weights=tuple(args.feature_weights),
        long_epochs=args.long_epochs,
        long_seeds=tuple(args.long_seeds),
        int8_seeds=tuple(args.int8_seeds),
        resnet=not args.no_resnet,
        int8=not args.no_int8,
    )
    work, alloc_work = Path(args.work), Path(args.allocation_work)
    if args.quick:
        plan = replace(
            plan, epochs=0.01, seeds=(0,), int8_seeds=(0,), steps=(2,), long_epochs=0.02, resnet=False, test_images=300
        )
        work = work.with_name(".recovery-quick")
        alloc_work = work / "allocation"
    started = time.perf_counter()
    carry = not args.quick
    studies = allocation.Bench(
        allocation_plan(args.quick), alloc_work, studies_mirror=allocation.SEARCHES_MIRROR if carry else None
    )
    bench = Bench(plan, work, studies, carry=carry)
    log(f"plan {plan}; export takes --quantization: {bench.quantization_flag}")
    if args.searches_only:
        searches = [_searched(bench, allocation.MOBILENET)] + (
            [_searched(bench, allocation.RESNET)] if plan.resnet else []
        )
        searches += [bench.int8_study(allocation.MOBILENET)] if plan.int8 and bench.quantization_flag else []
        log(f"searches ready: {', '.join(name for _, name in searches)}")
        return
    tracks = [mobilenet_track(bench)]
    best = Recipe(**tracks[0]["best"])
    left_out = "not run this time (`{}`): its rows come with a run without that flag"
    if plan.int8:
        tracks.append(int8_track(bench, best))
    else:
        tracks.append({**_track(allocation.MOBILENET, plan), "precision": "int8", "note": left_out.format("--no-int8")})
    if plan.resnet:
        tracks.append(resnet_track(bench, best))
    else:
        tracks.append({**_track(allocation.RESNET, plan), "note": left_out.format("--no-resnet")})
    long_rows(bench, tracks[0], best)
    if args.helper:
        log(f"helper done in {(time.perf_counter() - started) / 60:.1f} min: every export of the plan is cached")
        return
    measure_latencies(bench, tracks)
    result = {
        "plan": asdict(plan),
        "tracks": tracks,
        "seconds": round(time.perf_counter() - started, 1),
        "reused": bench.reused,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
    }
    body = render(result)
    log(f"done in {result['seconds'] / 60:.1f} min")
    if args.quick:
        print(body)
        return
    (ROOT / "benchmarks" / "recovery.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, body)


def render(result: dict[str, Any]) -> str:
    lines = [
        f"`benchmarks/recovery.py`, {result['date']}, commit `{(result['git_revision'] or '')[:10]}`, "
        f"{cpu_label(result['hardware'])}; test top-1 on CIFAR-10 (mean over seeds, spread = max - min).",
        "",
    ]
    for track in result["tracks"]:
        title = f"{track['model']} at {track['fraction']:.0%}" + (", INT8" if track.get("precision") else "")
        lines += [f"**{title}**" + (f" (trial {track['trial']})" if "trial" in track else ""), ""]
        if track.get("note"):
            lines += [track["note"], ""]
            continue
        base = track["rows"][0].get("mean") if track["rows"] else None
        lines += ["| row | epochs | seeds | top-1 | spread | vs first row | fine-tune | extra |", "|---" * 8 + "|"]
        for r in track["rows"]:
            if "error" in r:
                lines.append(f"| {r['row']} | {r['epochs']:g} | {len(r['seeds'])} | refused: {r['error']} | | | | |")
                continue
            delta = f"{100 * (r['mean'] - base):+.2f} pp" if base is not None else ""
            extra = []
            first = r["runs"][0]
            if first.get("int8_agreement") is not None:
                extra.append(f"FP32 {100 * first['fp32_top1']:.2f}%, agreement {first['int8_agreement']:.3f}")
            if "latency_ms" in r:
                stand_in = ", an architecture-identical stand-in" if r.get("stand_in") else ""
                extra.append(f"{r['latency_ms']:.2f} ms ({r['latency_fraction']:.3f} of baseline{stand_in})")
            lines.append(
                f"| {r['row']} | {r['epochs']:g} | {len(r['seeds'])} | {100 * r['mean']:.2f}% | "
                f"{100 * r['spread']:.2f} pp | {delta} | {r['finetune_seconds'] / 60:.1f} min | {'; '.join(extra)} |"
            )
        lines += ["", f"({track['long_note']})", ""] if track.get("long_note") else [""]
    return "\n".join([*lines, "Targets of issue #26:", "", *(f"- {v}" for v in verdicts(result["tracks"]))])


def render_so_far(cache: dict[str, Any], hardware: dict[str, Any], note: str = "") -> str:
    """The exports finished so far, one line each (the full run's rows and verdicts replace this)."""
    done = {k: v for k, v in cache.items() if k.startswith("export ") and "top1" in v}
    refused = {k: v["error"] for k, v in cache.items() if k.startswith("export ") and "error" in v}
    lines = [
        f"**Partial** ({time.strftime('%Y-%m-%d')}): the full run has not finished; these are the exports done so "
        f"far ({len(done)}), each one seed of a row, test top-1 on the 10,000 CIFAR-10 test images, fine-tune "
        f"minutes on {cpu_label(hardware)}{f' ({note})' if note else ''}. The rows, their means and spreads, "
        "the latencies and the issue's verdicts come with the full run.",
        "",
        "| export (study, trial, recipe K / W, seed, epochs) | top-1 | FP32 top-1 | fine-tune |",
        "| --- | --- | --- | --- |",
    ]
    for key, r in sorted(done.items()):
        fp32 = f"{100 * r['fp32_top1']:.2f}%" if r.get("int8_agreement") is not None else "-"
        lines.append(
            f"| {key.removeprefix('export ')} | {100 * r['top1']:.2f}% | {fp32} | {r['finetune_seconds'] / 60:.1f} min |"
        )
    lines += [f"| {key.removeprefix('export ')} | refused: {why} | | |" for key, why in sorted(refused.items())]
    return "\n".join([*lines, "", *rows_so_far(done)])


def rows_so_far(done: dict[str, Any]) -> list[str]:
    """The finished exports grouped into rows (one per study, recipe and epochs): mean, spread, and
    the difference from today's export (K1 W0) of the same study and epochs, with both spreads."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for key, r in done.items():
        got = re.fullmatch(r"export (\S+ \d+) (.+) seed \d+ epochs (\S+)", key)
        if got:
            groups.setdefault((got[1], got[2], got[3]), []).append(r["top1"])
    lines = [
        "Rows so far (seeds finished of each; spread = max - min; vs today's: the difference of the means):",
        "",
        "| study, trial | recipe K / W | epochs | seeds | top-1 | spread | vs today's export |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (study, recipe, epochs), tops in sorted(groups.items()):
        today = groups.get((study, "K1 W0", epochs))
        delta = f"{100 * (statistics.fmean(tops) - statistics.fmean(today)):+.2f} pp" if today else "-"
        lines.append(
            f"| {study} | {recipe} | {epochs} | {len(tops)} | {100 * statistics.fmean(tops):.2f}% | "
            f"{100 * (max(tops) - min(tops)):.2f} pp | {delta} |"
        )
    return lines


def verdicts(tracks: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each met or missed by the measured rows."""
    out = []
    for track in tracks:
        scored = [r for r in track["rows"] if "mean" in r]
        if not scored:
            continue
        first, name = scored[0], f"{track['model']} at {track['fraction']:.0%}"
        if track.get("precision") == "int8":
            by_mode = {r["recipe"]["quantization"]: r for r in scored}
            if {"ptq", "qat"} <= set(by_mode):
                ptq, qat = by_mode["ptq"], by_mode["qat"]
                # The FP32 export's top-1 is PTQ's FP32 model (the whole fine-tune in FP32); QAT's own FP32
                # top-1 is of the weights after training with fake quantization, another model.
                fp32 = statistics.fmean(run["fp32_top1"] for run in ptq["runs"])
                ptq_loss, qat_loss = fp32 - ptq["mean"], fp32 - qat["mean"]
                met = qat["mean"] >= ptq["mean"] and (ptq_loss <= 0.003 or qat_loss <= 0.003)
                # Also seed by seed: a QAT run shares its PTQ twin's seed (initial data order and augmentation),
                # though not its schedule (its FP32 epochs end earlier), which the seeds' spread can hide in means.
                paired = [
                    f"{100 * (q['top1'] - p['top1']):+.2f}"
                    for q, p in zip(qat["runs"], ptq["runs"], strict=True)
                    if "top1" in q and "top1" in p
                ]
                out.append(
                    f"{name}, INT8: PTQ {100 * ptq_loss:+.2f} pp and QAT {100 * qat_loss:+.2f} pp below the FP32 "
                    f"export's top-1 (QAT - PTQ seed by seed: {', '.join(paired)} pp); "
                    f"{'met' if met else 'missed'} (QAT within 0.3 pp where PTQ loses more, never below PTQ)"
                )
            continue
        same = [r for r in scored[1:] if r["epochs"] == first["epochs"]]
        if not same:
            continue
        best = max(same, key=lambda r: r["mean"])
        gain, spread = best["mean"] - first["mean"], max(best["spread"], first["spread"])
        if track["model"] == allocation.RESNET:
            met = gain >= -spread
            goal = "no worse than today's beyond the seed spread"
        else:
            met = gain >= 0.01 and gain > spread
            goal = "at least 1 pp above today's and above the seed spread"
        out.append(
            f"{name}: {best['row']} {100 * gain:+.2f} pp against today's export (seed spread {100 * spread:.2f} pp); "
            f"{'met' if met else 'missed'} ({goal})"
        )
        out += lasting(name, first, scored)
    return out


def lasting(name: str, first: dict[str, Any], scored: list[dict[str, Any]]) -> list[str]:
    """Whether the gain lasts: the rows at longer epochs, each against today's export at those epochs."""
    out = []
    for epochs in sorted({r["epochs"] for r in scored if r["epochs"] != first["epochs"]}):
        longer = [r for r in scored if r["epochs"] == epochs]
        today = next((r for r in longer if Recipe(**r["recipe"]).key() == TODAY.key()), None)
        for r in longer:
            if today is not None and r is not today:
                seeds = f"{len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''}"
                out.append(
                    f"{name} at {epochs:g} epochs: {r['row']} {100 * (r['mean'] - today['mean']):+.2f} pp against "
                    f"today's export ({seeds}; {100 * today['mean']:.2f}% and {100 * r['mean']:.2f}%)"
                )
    return out


if __name__ == "__main__":
    main()

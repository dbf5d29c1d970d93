"""Benchmark: where a searched channel allocation pays, against the classical recipes and random allocations.

Setting: the shared CIFAR-10 (``../shared/data/cifar10``, train/val/test JPEG folders) through the
tool's own options, ONNX Runtime, one thread, batch 1, FP32 only. Tracks (budgets are fractions of
the unpruned model's latency, which each study measures itself):

* MobileNetV2 for small inputs (``--model mobilenet_v2_cifar``) at 50% and 25%. Its baseline is
  trained here once (one-cycle SGD, padded crop and flip, ``--baseline-epochs``), cached in the
  working folder (git-ignored) and then loaded through ``--weights`` as a user's file;
* the shared ResNet-18 (``../shared/models/cifar10_resnet18.pth``) at 25%: the check that the search
  does no harm where allocation matters little.

Rows per track, every one fine-tuned alike by ``cli.py export`` (``--epochs`` full epochs of the 45,000
training images, distillation 0.5 from the unpruned model, once per ``--seeds``; mean and spread on
the 10,000 test images): the tool's recommendation after ``cli.py search``; the study's own recipes
at the budget (uniform L1, torch-pruning's global magnitude, latency-aware); the best of
``--random`` random allocations at the budget (each stage's ratios drawn uniformly in the space,
fitted to the budget by measured bisection, brief-fine-tuned as trials of a study of their own,
the best by brief accuracy exported, as a user with a random search would); the unpruned baseline
with the same fine-tune. Every row's latency is measured at the end of the run, interleaved with
its baseline. From each study's front: the latency at which it first reaches the best classical
recipe's brief accuracy, as a fraction of that recipe's latency.

A last track searches MobileNetV2 at 25% again in a widened space
(``benchmarks/mobilenet_v2_cifar-wide.toml``, ``--wide-budgets``): with the shipped ranges the
recommendation there sits at the top of most of them. It exports the recommendation and the
latency-aware recipe of that study, and compares them with the shipped-space track's uniform,
global and random rows at the same budget.

    python benchmarks/allocation.py > benchmarks/allocation.log 2>&1     # the full run (hours here)
    python benchmarks/allocation.py --quick                             # a smoke run in minutes

Every finished piece (the baseline, each search, each export, each latency) is kept in
``benchmarks/.allocation/results.json`` (``--work``) and reused when the script runs again, so an
interrupted run resumes; the log and ``reused`` say what was reused. Writes
``benchmarks/allocation.json`` and the "Allocation" section of BENCHMARKS.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from benchmarks.carry import ResultsCache, carry_study  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from search.cli.console import RichReporter  # noqa: E402
from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.measuring.candidate import CandidateMeter, LocalTimer  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.measuring.isolated import IsolatedTimer  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.models.weights import load_weights  # noqa: E402
from search.pruning.auto_space import space_for  # noqa: E402
from search.pruning.budget_fit import fit_to_budget  # noqa: E402
from search.pruning.latency_aware import tunable_stages  # noqa: E402
from search.study.claims import CLAIM_PREFIX  # noqa: E402
from search.study.front import Row, recommended, rows  # noqa: E402
from search.study.origin import LATENCY_AT_CREATION  # noqa: E402
from search.study.rungs import RUNG_PREFIX, stored_rungs  # noqa: E402
from search.training.evaluate import top1  # noqa: E402
from search.training.finetune import TrainSettings, train  # noqa: E402

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "cifar10"
RESNET_WEIGHTS = SHARED / "models" / "cifar10_resnet18.pth"
COMMITTED = ROOT / "benchmarks" / "allocation"
"""The trained MobileNetV2 baseline is committed here (weights and its record), so a new machine has it."""
MOBILENET = "mobilenet_v2_cifar"
RESNET = "resnet18_cifar"
MEAN, STD = "0.4914,0.4822,0.4465", "0.2470,0.2435,0.2616"
SECTION = "Allocation"
WIDE_SPACE = ROOT / "benchmarks" / "mobilenet_v2_cifar-wide.toml"
"""The widened MobileNetV2 space of the last track."""
TARGET_BASELINE_TOP1 = 0.85
"""The MobileNetV2 baseline should reach this test top-1 (issue #17); the log warns when it does not."""
CLASSICAL = ("uniform", "global")
"""Recipe labels that start so are the classical recipes the front is measured against."""


@dataclass(frozen=True)
class Plan:
    tracks: tuple[tuple[str, float], ...]
    baseline_epochs: float
    trials: int
    trial_steps: int
    trial_batch: int
    bn_batches: int
    val_images: int
    epochs: float
    seeds: tuple[int, ...]
    random: int
    test_images: int | None = None
    """Score every row on a fixed random subset of the test split (``--quick``); None: all 10,000."""
    wide: tuple[float, ...] = ()
    """MobileNetV2 budgets searched again in the widened space (each needs its shipped-space track)."""

    @staticmethod
    def of(args: argparse.Namespace) -> Plan:
        if args.quick:
            return Plan(((MOBILENET, 0.5),), 0.02, 8, 2, 32, 2, 200, 0.004, (0,), 2, test_images=300, wide=(0.5,))
        tracks = tuple((MOBILENET, f) for f in args.mobilenet_budgets) + tuple((RESNET, f) for f in args.resnet_budgets)
        return Plan(
            tracks,
            args.baseline_epochs,
            args.trials,
            args.trial_steps,
            args.trial_batch,
            args.bn_batches,
            args.val_images,
            args.epochs,
            tuple(args.seeds),
            args.random,
            wide=tuple(args.wide_budgets),
        )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli(*args: str) -> None:
    """Run ``python cli.py ARGS`` as a user would; its output goes to this script's log."""
    command = [sys.executable, "cli.py", *args]
    log("$ " + " ".join(shlex.quote(a) for a in command[1:]))
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"cli.py {args[0]} failed with status {done.returncode}")


class Bench:
    def __init__(self, plan: Plan, work: Path, mirror: Path | None = None, studies_mirror: Path | None = None) -> None:
        """``mirror`` and ``studies_mirror``: tracked copies of the results and of the searches' databases, which
        a run that takes several sessions carries between machines (:mod:`benchmarks.carry`)."""
        self.plan = plan
        self.work = work
        self.studies = work / "studies"
        self.store = ResultsCache(work, mirror)
        self.cache: dict[str, Any] = self.store.data
        self.studies_mirror = studies_mirror
        self.computed: list[str] = []
        self.reused: list[str] = []
        mean, std = (tuple(float(v) for v in s.split(",")) for s in (MEAN, STD))
        self.data = load_dataset(DataSpec(f"imagefolder:{DATA}", input_size=32, mean=mean, std=std))
        self.meters: dict[str, CandidateMeter] = {}

    def cached(self, key: str, compute: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
            self.computed.append(key)
            self.store.save()
        elif key not in self.computed and key not in self.reused:
            self.reused.append(key)
            log(f"reused from an earlier run: {key}")
        return self.cache[key]

    # ---- the baselines -----------------------------------------------------------------------
    def weights(self, model: str) -> Path:
        if model == RESNET:
            return RESNET_WEIGHTS
        name = f"{MOBILENET}-{self.plan.baseline_epochs:g}ep"
        key = f"baseline {MOBILENET} {self.plan.baseline_epochs:g} epochs"
        if self.plan.test_images:  # --quick: a throwaway baseline in the working folder
            path = self.work / f"{name}.pth"
            self.cached(key, lambda: self._train_mobilenet(path))
            return path
        path, record = COMMITTED / f"{name}.pth", COMMITTED / f"{name}.json"
        if path.is_file() and record.is_file():  # committed beside the benchmark: a new machine has it
            if key not in self.cache:
                self.cache[key] = json.loads(record.read_text())
                log(f"loaded the committed baseline {path.relative_to(ROOT)}")
            return path
        got = self._train_mobilenet(path)
        record.write_text(json.dumps(got, indent=1) + "\n")
        self.cache[key] = got
        self.store.save()
        return path

    def _train_mobilenet(self, path: Path) -> dict[str, Any]:
        """One-cycle SGD (warm-up, then cosine to zero) with padded crop and flip; resumes from its checkpoint."""
        torch.manual_seed(0)
        model = build_model(MOBILENET, self.data.num_classes)
        batch = 128
        steps_per_epoch = math.ceil(len(self.data.train) / batch)
        settings = TrainSettings(
            steps=max(1, round(self.plan.baseline_epochs * steps_per_epoch)),
            batch_size=batch,
            lr=0.1,
            weight_decay=5e-4,
            warmup_fraction=0.15,
        )
        state = self.work / f"{path.stem}-state.pt"
        log(f"training the {MOBILENET} baseline: {settings.steps} steps of batch {batch}")

        def after_epoch(epoch: int, net: torch.nn.Module) -> None:
            log(f"baseline epoch {epoch}: val top-1 {top1(net, self.data, 'val', limit=2000):.2%} (2,000 images)")

        with RichReporter(Console(), log_every=60) as reporter:
            result = train(
                model,
                self.data,
                settings,
                reporter=reporter,
                description="train baseline",
                steps_per_epoch=steps_per_epoch,
                checkpoint=state,
                after_epoch=after_epoch,
            )
        torch.save(model.state_dict(), path)
        state.unlink(missing_ok=True)
        got = {
            "test_top1": top1(model, self.data, "test", limit=self.plan.test_images),
            "trained_on": fingerprint(1).get("cpu", "unknown"),
            "date": time.strftime("%Y-%m-%d"),
            "val_top1": top1(model, self.data, "val"),
            "seconds": round(result.seconds, 1),
            "images_per_second": round(result.images_per_second, 1),
            "steps": settings.steps,
            "batch": batch,
        }
        log(f"{MOBILENET} baseline: {got}")
        if got["test_top1"] < TARGET_BASELINE_TOP1 and not self.plan.test_images:
            log(f"warning: below the issue's {TARGET_BASELINE_TOP1:.0%} test top-1; rerun with more --baseline-epochs")
        return got

    def meter(self, model: str) -> CandidateMeter:
        if model not in self.meters:
            net = build_model(model, self.data.num_classes)
            load_weights(net, str(self.weights(model)), model_name=model)
            space = space_for(model, None, self.data.num_classes, self.data.example_input())
            timer = LocalTimer(LatencySettings(threads=1))
            self.meters[model] = CandidateMeter(net.eval(), self.data, space=space, timer=timer)
        return self.meters[model]

    # ---- searches and exports, through the CLI -------------------------------------------
    def study_name(self, model: str, fraction: float, variant: str = "") -> str:
        return f"{model}-{fraction:g}x" + (f"-{variant}" if variant else "")

    def search_args(self, model: str, fraction: float, study: str, trials: int) -> list[str]:
        plan = self.plan
        return [
            *("--model", model, "--weights", str(self.weights(model)), "--budget-fraction", f"{fraction:g}"),
            *("--data", f"imagefolder:{DATA}", "--input-size", "32", "--mean", MEAN, "--std", STD),
            *("--precision", "fp32", "--trials", str(trials), "--finetune-steps", str(plan.trial_steps)),
            *("--finetune-batch", str(plan.trial_batch), "--bn-batches", str(plan.bn_batches)),
            *("--val-images", str(plan.val_images), "--fit-budget", "--distill", "0.5"),
            *("--study", study, "--studies-dir", str(self.studies), "--quiet"),
        ]

    def search(
        self, model: str, fraction: float, space: Path | None = None, variant: str = "", mirror: Path | None = None
    ) -> dict[str, Any]:
        """Today's search (``--no-promotion``) of ``model`` at ``fraction``; ``mirror``: where its database is kept
        tracked, if not this bench's (recovery.py and equal_compute.py share theirs: :data:`SEARCHES_MIRROR`)."""
        name = self.study_name(model, fraction, variant)

        def run() -> dict[str, Any]:
            extra = ("--space", str(space)) if space else ()
            # Without promotion, as its recorded numbers were searched (before promotion existed): this benchmark
            # compares allocations chosen on the brief fine-tune; equal_compute.py measures promotion.
            cli("search", *self.search_args(model, fraction, name, self.plan.trials), "--no-promotion", *extra)
            return {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}  # its time is read from the study (study_seconds)

        return self.searched(name, lambda: self.cached(f"search {name} trials {self.plan.trials}", run), mirror)

    def searched(self, name: str, search: Any, mirror: Path | None = None) -> Any:
        """``search()`` of study ``name``, its database first put back from the tracked copy (``mirror``, default
        this bench's) if the work folder lost it (the search then only resumes), and copied there after."""
        mirror = mirror or self.studies_mirror
        carry_study(self.studies, name, mirror)
        done = search()
        carry_study(self.studies, name, mirror)
        return done

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{self.studies / name}.db")

    def export(
        self, study: str, number: int, seed: int, unpruned: bool = False, epochs: float | None = None
    ) -> dict[str, Any]:
        """Trial ``number`` exported with ``epochs`` (default: the plan's) of fine-tuning, one seed."""
        epochs = self.plan.epochs if epochs is None else epochs

        def run() -> dict[str, Any]:
            suffix = "" if epochs == self.plan.epochs else f"-{epochs:g}ep"
            out = self.work / "exports" / study / f"seed-{seed}{suffix}"
            cli(
                "export",
                *("--study", study, "--studies-dir", str(self.studies), "--trial", str(number)),
                *("--epochs", f"{epochs:g}", "--seed", str(seed), "--out", str(out), "--force", "--quiet"),
                *(("--test-images", str(self.plan.test_images)) if self.plan.test_images else ()),
                *(("--finetune-unpruned",) if unpruned else ()),
            )
            card = json.loads((out / f"trial-{number}" / "card.json").read_text())
            return {
                "top1": card["accuracy"]["after_finetune"],
                "finetune_seconds": card["finetune"]["seconds"],
                "macs": card["macs"],
                "params": card["params"],
                "onnx": str(out / f"trial-{number}" / "model.onnx"),
            }

        return self.cached(f"export {study} {number} seed {seed} epochs {epochs:g}", run)

    # ---- random allocations at the budget, as trials of a study of their own -----------------
    def random_study(
        self,
        model: str,
        fraction: float,
        count: int | None = None,
        source: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> str:
        """``count`` (default ``--random``) random allocations fitted to the budget of study ``source`` (default:
        the track's), brief-fine-tuned exactly as the search's trials (``extra``: more ``search`` options)."""
        main = source or self.study_name(model, fraction)
        name = f"{main}-random"
        count = self.plan.random if count is None else count

        def run() -> dict[str, Any]:
            started = time.perf_counter()  # fitting the allocations to the budget is part of their cost
            created = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # this study's own start, not its source's
            source = self.study(main)
            meter = self.meter(model)
            meter.baseline_ms = float(source.user_attrs["baseline_latency_ms"])
            space, budget = meter.space, float(source.user_attrs["budget_ms"])
            assert space is not None
            rng = random.Random(f"{main} random")
            storage = f"sqlite:///{self.studies / name}.db"
            try:  # a run interrupted before this study's trials finished starts it again
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:
                pass
            target = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
            for key, value in {**study_settings(source.user_attrs), "created": created}.items():
                target.set_user_attr(key, value)
            fitted = 0
            for attempt in range(4 * count):
                if fitted == count:
                    break
                fractions = {
                    s.name: (rng.uniform(s.stream.low, s.stream.high), rng.uniform(s.inner.low, s.inner.high))
                    for s in space.stages
                    if s.name in tunable_stages(space)
                }
                fit = fit_to_budget(space.allocated(fractions, "l1"), space, budget, meter.baseline_ms, meter.record)
                if fit is None:
                    log(f"random allocation {attempt}: no strength meets the budget; drawn again")
                    continue
                fitted += 1
                attrs = {"recipe": f"random allocation {fitted}", LATENCY_AT_CREATION: fit.latency}
                target.enqueue_trial(space.params_for(fit.policy), user_attrs=attrs)
                log(f"random allocation {fitted}: {fit.policy.describe()} at {fit.latency['ratio']:.3f}")
            cli("search", *self.search_args(model, fraction, name, fitted), *extra)
            return {"allocations": fitted, "seconds": round(time.perf_counter() - started, 1)}

        self.searched(
            name, lambda: self.cached(f"random {name} {count}" + (f" {' '.join(extra)}" if extra else ""), run)
        )
        return name


def study_settings(attrs: dict[str, Any]) -> dict[str, Any]:
    """A study's user attributes that another study of the same track shares: its baseline, settings, budget and
    hardware, but not its latency-aware tables nor its promotions, neither their records nor their claims (a
    copied claim, marked done, would keep the new study from ever promoting its trial of the same number)."""
    return {k: v for k, v in attrs.items() if k != "latency_aware" and not k.startswith((RUNG_PREFIX, CLAIM_PREFIX))}


# ---- the run -------------------------------------------------------------------------------
def row(name: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    tops = [r["top1"] for r in runs]
    return {
        "row": name,
        "top1": tops,
        "mean": statistics.fmean(tops),
        "spread": max(tops) - min(tops),
        "macs": runs[0]["macs"],
        "params": runs[0]["params"],
        "onnx": runs[0]["onnx"],
        "finetune_seconds": statistics.fmean(r["finetune_seconds"] for r in runs),
        **extra,
    }


def study_seconds(study: optuna.Study) -> float:
    """From the study's creation (after its baseline was timed) to its last finished trial or promotion, by its
    own records: the promotions a search makes after its last trial count (before 2026-12-07 they did not, which
    left 58 s of GPSampler's arm e and 122 s of MobileNetV2 at 50%'s arm b out of their search times).

    (The cached search time of a run that trained the MobileNetV2 baseline first included that training.)
    """
    created = datetime.datetime.strptime(study.user_attrs["created"], "%Y-%m-%dT%H:%M:%S%z")
    trials = study.get_trials(deepcopy=False)
    ends = [t.datetime_complete.astimezone().timestamp() for t in trials if t.datetime_complete is not None]
    ends += [
        float(r["finished_at"]) for t in trials for r in stored_rungs(study.user_attrs, t.number) if "finished_at" in r
    ]
    return max(ends) - created.timestamp()  # optuna records local time without a zone: astimezone() reads it so


def front_fraction(all_rows: list[Row]) -> dict[str, Any] | None:
    """The latency at which the study's other trials first reach the best classical recipe's brief accuracy."""
    feasible = [r for r in all_rows if r.feasible and r.accuracy is not None]
    classical = [r for r in feasible if r.recipe and r.recipe.startswith(CLASSICAL) and not r.policy.is_unpruned]
    if not classical:
        return None
    best = max(classical, key=lambda r: r.accuracy or 0.0)
    others = [r for r in feasible if r not in classical and (r.accuracy or 0.0) >= (best.accuracy or 0.0)]
    reached = min(others, key=lambda r: r.latency_ms, default=None)
    return {
        "classical": best.recipe,
        "classical_accuracy": best.accuracy,
        "classical_ms": best.latency_ms,
        "reached_by": None if reached is None else (reached.recipe or f"trial {reached.number}"),
        "fraction": None if reached is None else reached.latency_ms / best.latency_ms,
    }


def study_summary(study: optuna.Study, all_rows: list[Row]) -> dict[str, Any]:
    """What a track reports of its study: budget, baseline, search time, trials, hardware and front."""
    return {
        "budget_ms": float(study.user_attrs["budget_ms"]),
        "study_baseline_ms": float(study.user_attrs["baseline_latency_ms"]),
        "search_seconds": study_seconds(study),
        "trials": len(study.trials),
        "latency_aware_table_seconds": (study.user_attrs.get("latency_aware") or {}).get("seconds"),
        "study_hardware": study.user_attrs.get("hardware"),  # sessions may differ in CPU; the study says its own
        "front": front_fraction(all_rows),
    }


def trial_row(bench: Bench, study: str, label: str, kind: str, trial: Row) -> dict[str, Any]:
    """A pruned trial exported once per seed, as a table row with its brief accuracy and study latency."""
    runs = [bench.export(study, trial.number, seed) for seed in bench.plan.seeds]
    return row(
        label,
        runs,
        kind=kind,
        brief_val=trial.accuracy,
        study_fraction=trial.ratio,
        policy=trial.policy.describe(),
    )


def run_track(bench: Bench, model: str, fraction: float) -> dict[str, Any]:
    plan = bench.plan
    bench.search(model, fraction)
    name = bench.study_name(model, fraction)
    study = bench.study(name)
    all_rows = rows(study)
    result: dict[str, Any] = {"model": model, "fraction": fraction, "study": name, "rows": []}
    result.update(study_summary(study, all_rows))
    best = recommended(all_rows)
    chosen: list[tuple[str, str, Row | None]] = [("searched", "recommendation after the search", best)]
    for kind, prefix in (("uniform", "uniform"), ("global", "global"), ("latency-aware", "latency-aware")):
        found = next(
            (r for r in all_rows if r.recipe and r.recipe.startswith(prefix) and "at the budget" in r.recipe), None
        )
        chosen.append((kind, found.recipe if found else f"{prefix} at the budget", found))
    for kind, label, r in chosen:
        if r is None:
            result["rows"].append({"row": f"{label}: none within the budget", "kind": kind})
            continue
        result["rows"].append(trial_row(bench, name, f"{label} (trial {r.number})", kind, r))
    random_name = bench.random_study(model, fraction)
    random_rows = [r for r in rows(bench.study(random_name)) if r.feasible and r.accuracy is not None]
    if random_rows:
        pick = max(random_rows, key=lambda r: r.accuracy or 0.0)
        label = f"best of {len(random_rows)} random allocations by brief accuracy ({pick.recipe})"
        result["rows"].append(trial_row(bench, random_name, label, "random", pick))
    unpruned = next(r for r in all_rows if r.policy.is_unpruned and r.recipe == "unpruned")
    runs = [bench.export(name, unpruned.number, seed, unpruned=True) for seed in plan.seeds]
    result["rows"].append(
        row("unpruned baseline, same fine-tune", runs, kind="baseline", study_fraction=unpruned.ratio)
    )
    return result


def run_wide_track(bench: Bench, fraction: float, shipped: dict[str, Any]) -> dict[str, Any]:
    """MobileNetV2 searched again at ``fraction`` in the widened space; the recommendation and that study's
    latency-aware recipe, beside the shipped-space track's uniform, global, random and baseline rows."""
    bench.search(MOBILENET, fraction, WIDE_SPACE, "wide")
    name = bench.study_name(MOBILENET, fraction, "wide")
    study = bench.study(name)
    all_rows = rows(study)
    result: dict[str, Any] = {"model": MOBILENET, "fraction": fraction, "study": name, "variant": "wide"}
    result["space"] = WIDE_SPACE.relative_to(ROOT).as_posix()
    result.update(study_summary(study, all_rows))
    best = recommended(all_rows)
    aware = next((r for r in all_rows if r.recipe and r.recipe.startswith("latency-aware")), None)
    result["rows"] = []
    for kind, label, r in (("searched", "recommendation, widened space", best), ("latency-aware", "", aware)):
        if r is None:
            result["rows"].append({"row": f"{label or kind}: none within the budget", "kind": kind})
            continue
        label = label or f"{r.recipe}, widened space"
        result["rows"].append(trial_row(bench, name, f"{label} (trial {r.number})", kind, r))
    for r in shipped["rows"]:  # the same models as in the shipped-space track (their latencies timed once)
        if r["kind"] in ("uniform", "global", "random", "baseline") and "mean" in r:
            result["rows"].append({**r, "row": f"{r['row']}, shipped space"})
    return result


SEARCHES_MIRROR = ROOT / "benchmarks" / "searches"
"""Tracked databases of today's searches (this benchmark's settings, ``--no-promotion``) that other benchmarks
share: recovery.py's studies and equal_compute.py's arm a are the same searches, run once."""
FINAL_TIMING = LatencySettings(threads=1, warmup=50, round_size=50, min_rounds=10, max_seconds=60)
"""The final measurement of each row: at least 500 timed runs, each beside a run of its baseline."""
FINAL_PASSES = 5
"""Passes over all rows (alternately in reverse order); a row's latency is its median over the passes."""


def timed_file(work: Path, studies: Path, study: str, number: int, onnx: str) -> tuple[str, bool]:
    """``onnx`` when it is on disk, else an architecture-identical stand-in; and whether it is one.

    The exports' folders are ignored by git and vanish with the machine, while their results are carried
    to the next session: a run whose exports finished on an earlier machine would otherwise fail at the
    latency pass. Latency depends on the architecture, not on the weights, so trial ``number`` is exported
    again without fine-tuning (``--epochs 0``, a minute) into ``work/stand-ins`` and that file is timed
    (an INT8 row's stand-in is quantized post-training, whatever its row's quantization was: the same graph).
    """
    if Path(onnx).is_file():
        return onnx, False
    out = work / "stand-ins" / study
    folder = out / f"trial-{number}"
    name = Path(onnx).name
    if not (folder / name).is_file():
        log(f"{onnx} is gone (an earlier machine's); timing an architecture-identical stand-in of trial {number}")
        cli(
            "export",
            *("--study", study, "--studies-dir", str(studies), "--trial", str(number), "--epochs", "0"),
            *("--out", str(out), "--force", "--quiet"),
        )
    if not (folder / name).is_file():
        raise RuntimeError(f"the stand-in export of {study} trial {number} wrote no {name}")
    return str(folder / name), True


def measure_latencies(bench: Bench, tracks: list[dict[str, Any]]) -> None:
    """Every row's exported ONNX, timed interleaved with its baseline, in passes over all rows at the end.

    One short measurement per row, right after the exports, once put two of them 15% above what the
    study and a rerun measured; the medians of several longer passes are not moved by such a moment.
    """
    log(f"measuring every row's latency side by side with its baseline ({FINAL_PASSES} passes)")
    # In a process of its own, as search, export and bench time (recovery.py's in-process passes once put a 0.43 ms
    # INT8 model at 0.63 ms, 0.276 of its baseline against 0.233 when isolated).
    with IsolatedTimer(FINAL_TIMING) as timer:
        _passes(bench, tracks, timer)


def _passes(bench: Bench, tracks: list[dict[str, Any]], timer: IsolatedTimer) -> None:
    models = {(t["model"], r["onnx"]) for t in tracks for r in t["rows"] if "onnx" in r}  # a model in two tracks: once
    order = sorted(models)
    passes: dict[tuple[str, str], list[Any]] = {key: [] for key in order}
    for number in range(FINAL_PASSES):
        for model, onnx in order if number % 2 == 0 else reversed(order):
            meter = bench.meter(model)
            passes[(model, onnx)].append(timer.time(onnx, meter.input_shape, reference=meter.baseline_onnx))
        log(f"latency pass {number + 1}/{FINAL_PASSES} done")
    for track in tracks:
        for r in track["rows"]:
            if "onnx" in r:
                got = passes[(track["model"], r["onnx"])]
                r["latency_ms"] = statistics.median(g.median_ms for g in got)
                r["latency_fraction"] = statistics.median(g.ratio for g in got)
                r["baseline_ms"] = statistics.median(g.reference_median_ms for g in got)
                r["latency_fraction_passes"] = [round(g.ratio, 4) for g in got]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in minutes (numbers meaningless)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".allocation"), help="working folder (resumable)")
    parser.add_argument("--mobilenet-budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--resnet-budgets", type=float, nargs="*", default=[0.25])
    parser.add_argument("--baseline-epochs", type=float, default=15, help="epochs of the MobileNetV2 baseline")
    parser.add_argument(
        "--baseline-only", action="store_true", help="only train (or load) the MobileNetV2 baseline and stop"
    )
    parser.add_argument("--trials", type=int, default=30, help="trials per study")
    parser.add_argument("--trial-steps", type=int, default=30, help="brief fine-tune steps per trial")
    parser.add_argument("--trial-batch", type=int, default=64)
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--val-images", type=int, default=2000, help="val images each trial is evaluated on")
    parser.add_argument("--epochs", type=float, default=1, help="final fine-tune epochs of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--random", type=int, default=8, help="random allocations per budget")
    parser.add_argument(
        "--wide-budgets", type=float, nargs="*", default=[0.25], help="MobileNetV2 budgets searched again, widened"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the section from benchmarks/allocation.json"
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads((ROOT / "benchmarks" / "allocation.json").read_text())
        write_section(SECTION, render(result, plot_tracks(result["tracks"])))
        return
    if not DATA.is_dir() or not RESNET_WEIGHTS.is_file():
        sys.exit(f"error: this benchmark needs {DATA} and {RESNET_WEIGHTS} (the shared CIFAR-10 material); not found")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = Plan.of(args)
    if args.baseline_only:
        Bench(plan, Path(args.work)).weights(MOBILENET)
        return
    work = Path(args.work if not args.quick else str(Path(args.work).with_name(".allocation-quick")))
    started = time.perf_counter()
    bench = Bench(plan, work)
    log(f"plan {plan}")
    tracks = [run_track(bench, model, fraction) for model, fraction in plan.tracks]
    for fraction in plan.wide:
        shipped = next((t for t in tracks if (t["model"], t["fraction"]) == (MOBILENET, fraction)), None)
        if shipped is None:
            log(f"widened space at {fraction:g}: skipped, it needs the shipped-space MobileNetV2 track at that budget")
            continue
        tracks.append(run_wide_track(bench, fraction, shipped))
    measure_latencies(bench, tracks)
    result = {
        "plan": asdict(plan),
        "mobilenet_baseline": bench.cache.get(f"baseline {MOBILENET} {plan.baseline_epochs:g} epochs"),
        "tracks": tracks,
        "seconds": time.perf_counter() - started,
        "compute_minutes": compute_minutes(bench.cache, tracks),
        "computed": bench.computed,
        "reused": bench.reused,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
    }
    log(f"done in {result['seconds'] / 60:.1f} min; reused {len(bench.reused)} cached results: {bench.reused}")
    if args.quick:
        print(json.dumps(result, indent=1, default=str))
        return
    (ROOT / "benchmarks" / "allocation.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, render(result, plot_tracks(result["tracks"])))


KIND_STYLE = {
    "searched": ("tab:red", "o"),
    "latency-aware": ("tab:purple", "D"),
    "random": ("tab:gray", "v"),
    "uniform": ("tab:blue", "s"),
    "global": ("tab:green", "^"),
    "baseline": ("black", "*"),
}


def plot_tracks(tracks: list[dict[str, Any]]) -> list[Path]:
    """One PNG per track: each row's test top-1 (mean, bar from min to max over seeds) at its measured latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for t in tracks:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        shown = [r for r in t["rows"] if "mean" in r and "latency_fraction" in r and r["kind"] != "baseline"]
        for r in shown:
            color, marker = KIND_STYLE.get(r["kind"], ("tab:orange", "x"))
            low, high = 100 * min(r["top1"]), 100 * max(r["top1"])
            mean = 100 * r["mean"]
            ax.errorbar(
                [r["latency_fraction"]],
                [mean],
                yerr=[[mean - low], [high - mean]],
                fmt=marker,
                color=color,
                capsize=4,
                markersize=8,
                label=r["kind"],
            )
        ax.axvline(t["fraction"], color="tab:red", linestyle="--", linewidth=1, label="budget")
        base = next((r for r in t["rows"] if r["kind"] == "baseline" and "mean" in r), None)
        unpruned = f"; unpruned, same fine-tune: {100 * base['mean']:.2f}%" if base else ""
        ax.set_xlabel("latency, fraction of the unpruned baseline timed beside it")
        ax.set_ylabel("test top-1 % (mean; bar: min to max over seeds)")
        ax.set_title(f"{t['model']} at {100 * t['fraction']:g}% of the baseline's latency{unpruned}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = ROOT / "benchmarks" / "allocation" / f"{t['study']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def compute_minutes(cache: dict[str, Any], tracks: list[dict[str, Any]]) -> dict[str, float]:
    """What the pieces cost when they ran (over every run that made them), in minutes; the searches by
    their studies' own records."""
    spent = {"baseline": 0.0, "searches": 0.0, "random allocations": 0.0, "final fine-tunes": 0.0}
    spent["searches"] = sum(t["search_seconds"] for t in tracks)
    for key, value in cache.items():
        kind = key.split(" ", 1)[0]
        if kind == "baseline":
            spent["baseline"] += value.get("seconds", 0.0)
        elif kind == "random":
            spent["random allocations"] += value.get("seconds", 0.0)
        elif kind == "export":
            spent["final fine-tunes"] += value.get("finetune_seconds", 0.0)
    return {k: round(v / 60, 1) for k, v in spent.items()}


def render(result: dict[str, Any], plots: list[Path]) -> str:
    plan, hw, base = result["plan"], result["hardware"], result["mobilenet_baseline"] or {}
    lines = [
        f"`python benchmarks/allocation.py` on {result['date']}, commit `{result['git_revision']}`, {cpu_label(hw)}, "
        "one ONNX Runtime thread, batch 1 (the latencies in the tables: each the median of "
        f"{FINAL_PASSES} passes of at least {FINAL_TIMING.min_rounds * FINAL_TIMING.round_size} timed runs, "
        "interleaved with its baseline; each search timed on the CPU it names); "
        f"this run {result['seconds'] / 60:.0f} min "
        f"({len(result['reused'])} results cached by earlier runs reused); the pieces took "
        + ", ".join(f"{k} {v:.0f} min" for k, v in (result.get("compute_minutes") or {}).items())
        + ". MobileNetV2 (small inputs) baseline trained here: "
        f"{plan['baseline_epochs']:g} epochs one-cycle, test top-1 {pct(base.get('test_top1', float('nan')))}% in "
        f"{base.get('seconds', 0) / 60:.0f} min. Every row exported with {plan['epochs']:g} epochs of fine-tuning "
        f"(distillation 0.5) per seed ({', '.join(map(str, plan['seeds']))}); top-1 on the test images, mean ± "
        f"spread (max - min). Trials: {plan['trials']} per study, {plan['trial_steps']} steps of batch "
        f"{plan['trial_batch']}, --fit-budget, {plan['val_images']} val images.",
        "",
    ]
    moved = [
        max(r["latency_fraction_passes"]) - min(r["latency_fraction_passes"])
        for t in result["tracks"]
        for r in t["rows"]
        if r.get("latency_fraction_passes")
    ]
    if moved:
        lines += [
            "Columns: *of baseline* is the median over the final passes (their range in brackets); *in its study* "
            "is what the trial measured when its search ran, which is what each row was fitted to the budget on. "
            f"From pass to pass a row's fraction moved by up to {max(moved):.3f} (median {statistics.median(moved):.3f}): "
            "the ratio of a sub-millisecond model to its baseline follows the state of this shared machine, "
            "although the two are timed interleaved.",
            "",
        ]
    ran = {(t["model"], t["fraction"]) for t in result["tracks"] if not t.get("variant")}
    missing = [f"{model} at {100 * f:g}%" for model, f in ISSUE_TRACKS if (model, f) not in ran]
    if missing:
        lines += [f"Not in this run: {', '.join(missing)} (a track of the issue; the default arguments run it).", ""]
    for t in result["tracks"]:
        front = t["front"] or {}
        reached = front.get("fraction")
        lines += [
            f"### {t['model']}, budget {100 * t['fraction']:g}% ({t['budget_ms']:.2f} ms of {t['study_baseline_ms']:.2f})"
            + (f", widened space (`{t['space']}`)" if t.get("variant") == "wide" else ""),
            "",
            "| row | test top-1 % | latency ms | of baseline (passes) | in its study | MACs M | brief val % |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in t["rows"]:
            if "mean" not in r:
                lines.append(f"| {r['row']} | | | | | | |")
                continue
            brief = pct(r["brief_val"]) if r.get("brief_val") is not None else ""
            passes = r.get("latency_fraction_passes") or []
            spread = f" ({min(passes):.3f}–{max(passes):.3f})" if passes else ""
            study = f"{r['study_fraction']:.3f}" if r.get("study_fraction") is not None else ""
            lines.append(
                f"| {r['row']} | {pct(r['mean'])} ± {pct(r['spread'])} | {r.get('latency_ms', float('nan')):.2f} "
                f"| {r.get('latency_fraction', float('nan')):.3f}{spread} | {study} | {r['macs'] / 1e6:.1f} | {brief} |"
            )
        lines += [
            "",
            f"Search {t['search_seconds'] / 60:.1f} min on {cpu_label(t.get('study_hardware') or {})} "
            f"({t['trials']} trials; latency-aware tables "
            f"{t['latency_aware_table_seconds'] or 0:.0f} s). Front: the best classical recipe's brief accuracy "
            f"({front.get('classical')}) first reached at "
            + (f"**{reached:.2f}** of its latency ({front.get('reached_by')})." if reached else "no lower latency."),
            "",
            *verdict(t),
            "",
        ]
        tau = brief_fidelity(t)
        if tau is not None:
            lines += [
                f"Brief accuracy (the search's {plan['trial_steps']} steps) against final top-1 over the "
                f"{tau[1]} pruned rows: Kendall τ {tau[0]:+.2f} (1: the same order; 0: none).",
                "",
            ]
        plot = next((p for p in plots if p.stem == t["study"]), None)
        if plot is not None:
            lines += [f"![{t['study']}]({plot.relative_to(ROOT).as_posix()})", ""]
    return "\n".join(lines)


ISSUE_TRACKS = ((MOBILENET, 0.5), (MOBILENET, 0.25), (RESNET, 0.25))
"""Issue #17's tracks: the model and the budget as a fraction of its latency."""
TARGET_GAIN = {(MOBILENET, 0.25): 0.015, (MOBILENET, 0.5): 0.005}
"""Issue #17: how much the recommendation must beat the best of uniform, global and random by (top-1)."""
TARGET_FRONT = 0.8
"""Issue #17: the front reaches the best classical recipe's accuracy at this fraction of its latency or less."""


def verdict(track: dict[str, Any]) -> list[str]:
    """The issue's targets for this track, met or missed, from the rows' means and seed spreads."""
    by_kind = {r["kind"]: r for r in track["rows"] if "mean" in r}
    searched = by_kind.get("searched")
    if searched is None:
        return ["Target: no recommendation within the budget to judge."]
    key = (track["model"], track["fraction"])
    kinds = ("uniform", "global", "random") if key in TARGET_GAIN else ("uniform", "global", "latency-aware", "random")
    others = [by_kind[k] for k in kinds if k in by_kind]
    if not others:
        return ["Target: no other recipe within the budget to compare with."]
    best = max(others, key=lambda r: r["mean"])
    gain, spread = searched["mean"] - best["mean"], max(searched["spread"], best["spread"])
    deltas = [
        f"{kind} {100 * (searched['mean'] - by_kind[kind]['mean']):+.2f}"
        for kind in ("uniform", "global", "latency-aware", "random")
        if kind in by_kind and by_kind[kind]["onnx"] != searched["onnx"]
    ]
    out = [f"Recommendation minus each row (pp of test top-1): {', '.join(deltas)}."] if deltas else []
    if key in TARGET_GAIN:
        need = TARGET_GAIN[key]
        met = gain >= need and gain > spread
        out.append(
            f"Target (recommendation at least {100 * need:g} pp above the best of {', '.join(kinds)}, and by more "
            f"than the seed spread): {'**met**' if met else '**missed**'}: {100 * gain:+.2f} pp against "
            f"{best['row']}, spread {100 * spread:.2f} pp."
        )
    else:
        met = gain >= -spread
        out.append(
            f"Target (recommendation not worse than the best recipe by more than the spread): "
            f"{'**met**' if met else '**missed**'}: {100 * gain:+.2f} pp against {best['row']}, "
            f"spread {100 * spread:.2f} pp."
        )
    if track["model"] == MOBILENET:
        reached = (track.get("front") or {}).get("fraction")
        ok = reached is not None and reached <= TARGET_FRONT
        shown = f"{reached:.2f}" if reached is not None else "never"
        out.append(
            f"Target (front reaches the best classical recipe's accuracy at {TARGET_FRONT:.0%} of its latency or "
            f"less): {'**met**' if ok else '**missed**'} ({shown})."
        )
    return out


def brief_fidelity(track: dict[str, Any]) -> tuple[float, int] | None:
    """Kendall's tau between the pruned rows' brief accuracy and their final top-1 (distinct models once)."""
    models = {r["onnx"]: (r["brief_val"], r["mean"]) for r in track["rows"] if r.get("brief_val") is not None}
    if len(models) < 2:
        return None
    brief, final = zip(*models.values(), strict=True)
    return float(kendalltau(brief, final).statistic), len(models)


def cpu_label(hw: dict[str, Any]) -> str:
    """The CPU and the features that decide its speeds, e.g. "AMD EPYC (AVX-512, VNNI, BF16)"."""
    flags = set(hw.get("cpu_flags") or ())
    named = [("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "BF16")]
    features = [label for flag, label in named if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    return f"{hw.get('cpu', 'unknown CPU')} ({', '.join(features) or 'no AVX2'})"


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


if __name__ == "__main__":
    main()

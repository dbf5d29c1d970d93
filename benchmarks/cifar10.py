"""Benchmark: searched policies against the usual pruning recipes on real CIFAR-10, in one run.

Setting: the shared CIFAR-10 ResNet-18 (``../shared/models/cifar10_resnet18.pth``, a plain
state_dict of torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool) on
``../shared/data/cifar10`` (train/val/test JPEG folders), loaded through the tool's own
``--model resnet18_cifar --weights --data imagefolder:`` options. ONNX Runtime, one thread, batch 1.

Tracks (budgets are fractions of the unpruned model's latency, which every study measures itself):

* pruning (FP32): budgets 50% and 25%. Per budget: ``cli.py search --budget-fraction``, then
  ``cli.py export --best`` of the recommended policy; the same fine-tune (steps, lr, distillation,
  seeds) applied to the unpruned baseline, to uniform L1 pruning of every stage, and to
  torch-pruning's global magnitude pruning, each at the smallest ratio (grid step 0.05) whose
  measured latency meets the budget.
* joint (FP32 or INT8): budgets 15% and 8%; the recipes are INT8 models of the uniform and global
  recipes at the ratio whose INT8 latency meets the budget; INT8 of the unpruned baseline is
  reported beside them.
* INT8-alone check: a joint search at the budget where INT8 alone just fits (30% where INT8 runs
  at about 30% of FP32 as the issue assumes; else the next 5% step above INT8 alone's measured
  latency plus 10%), its recommended policy exported, compared with INT8 alone.
* fidelity: at least six feasible policies of the pruning studies, spanning their fronts, fully
  fine-tuned: Kendall tau between each trial's brief accuracy (val) and its final accuracy (test).

Every final row is fine-tuned with each of ``--seeds`` and reported as mean and spread; all
latencies in the tables are measured at the end of the run, each model interleaved with the
unpruned baseline, as ms and as a fraction of it.

    python benchmarks/cifar10.py > benchmarks/cifar10.log 2>&1        # the full run (< 2 h here)
    python benchmarks/cifar10.py --quick                               # a smoke run in minutes

Work is kept in ``benchmarks/.cifar10`` (git-ignored; ``--work``) and reused when the script is
run again, so an interrupted run resumes. Writes ``benchmarks/cifar10.json``, the Pareto plots in
``benchmarks/cifar10/`` and the "CIFAR-10" section of BENCHMARKS.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.sections import write_section  # noqa: E402
from search.cli.plot import plot_front  # noqa: E402
from search.data.dataset import Dataset  # noqa: E402
from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.measuring.candidate import CandidateMeter, LocalTimer  # noqa: E402
from search.measuring.complexity import macs_and_params  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.measuring.onnx_export import export_onnx, fix_batch  # noqa: E402
from search.measuring.quantize import QuantizeSettings, quantize_model  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.models.build import build_model  # noqa: E402
from search.models.weights import load_weights  # noqa: E402
from search.pruning.channels import apply_policy  # noqa: E402
from search.pruning.space import load_space  # noqa: E402
from search.shipping.settings import ExportSettings  # noqa: E402
from search.study.front import recommended, rows  # noqa: E402
from search.training.evaluate import onnx_top1, top1  # noqa: E402
from search.training.finetune import TrainSettings, recalibrate_batchnorm, train  # noqa: E402

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "cifar10"
WEIGHTS = SHARED / "models" / "cifar10_resnet18.pth"
MODEL = "resnet18_cifar"
MEAN, STD = "0.4914,0.4822,0.4465", "0.2470,0.2435,0.2616"
SECTION = "CIFAR-10"
WIDE_SPACE_BELOW = 0.1
"""Budgets below this fraction search spaces/resnet18.toml with every range widened from 0.7 to 0.85."""
RATIO_GRID = [round(0.05 * i, 2) for i in range(1, 19)]
RECIPES = (("uniform", "uniform L1"), ("global", "global magnitude (torch-pruning)"))
"""The usual recipes every budget is compared with: (kind for ``Bench.pruned``, label)."""


@dataclass(frozen=True)
class Plan:
    pruning_budgets: tuple[float, ...]
    joint_budgets: tuple[float, ...]
    trials: int
    trial_steps: int
    trial_batch: int
    bn_batches: int
    val_images: int
    epochs: float
    seeds: tuple[int, ...]
    fidelity: int
    test_images: int | None = None
    """Score every row on a fixed random subset of the test split (``--quick``); None: all 10,000."""
    int8_check: bool = True
    """Also search at the budget where INT8 alone just fits, and compare with INT8 alone."""

    @property
    def test_key(self) -> str:
        return f" test {self.test_images}" if self.test_images else ""

    @staticmethod
    def of(args: argparse.Namespace) -> Plan:
        if args.quick:
            return Plan((0.5,), (0.15,), 6, 5, 32, 2, 200, 0.01, (0, 1), 3, test_images=500, int8_check=False)
        return Plan(
            tuple(args.pruning_budgets),
            tuple(args.joint_budgets),
            args.trials,
            args.trial_steps,
            args.trial_batch,
            args.bn_batches,
            args.val_images,
            args.epochs,
            tuple(args.seeds),
            args.fidelity,
        )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli(*args: str) -> None:
    """Run ``python cli.py ARGS`` as a user would; its output goes to this script's log."""
    command = [sys.executable, "cli.py", *args]
    log("$ " + " ".join(shlex.quote(a) for a in command[1:]))
    sys.stdout.flush()
    done = subprocess.run(command, cwd=ROOT)  # its output goes straight to this script's log
    if done.returncode != 0:
        raise RuntimeError(f"cli.py {args[0]} failed with status {done.returncode}")


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.studies = work / "studies"
        work.mkdir(parents=True, exist_ok=True)
        self.cache_path = work / "results.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        self.computed: list[str] = []
        """Cache keys computed in this run."""
        self.reused: list[str] = []
        """Cache keys this run read from an earlier run's cache."""
        self.data: Dataset = load_dataset(
            DataSpec(
                f"imagefolder:{DATA}",
                input_size=32,
                mean=tuple(float(v) for v in MEAN.split(",")),
                std=tuple(float(v) for v in STD.split(",")),
            )
        )
        self.baseline = build_model(MODEL, self.data.num_classes)
        load_weights(self.baseline, str(WEIGHTS), model_name=MODEL)
        self.baseline.eval()
        self.example = self.data.example_input()
        self.shape = tuple(self.example.shape)
        self.meter = CandidateMeter(self.baseline, self.data, timer=LocalTimer(LatencySettings(threads=1)))
        recipe_space = work / "resnet18-recipes.toml"  # the uniform recipe is not limited to the search's 0.7
        recipe_space.write_text((ROOT / "spaces" / "resnet18.toml").read_text().replace("[0.0, 0.7]", "[0.0, 0.9]"))
        self.space = load_space(recipe_space)
        steps_per_epoch = math.ceil(len(self.data.train) / ExportSettings().batch_size)
        self.finetune_steps = max(1, round(plan.epochs * steps_per_epoch))

    def save(self) -> None:
        self.cache_path.write_text(json.dumps(self.cache, indent=1))

    def cached(self, key: str, compute: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
            self.computed.append(key)
            self.save()
        elif key not in self.computed and key not in self.reused:
            self.reused.append(key)
        return self.cache[key]

    # ---- searches and exports, through the CLI -------------------------------------------
    def study_name(self, track: str, fraction: float) -> str:
        return f"cifar10-{track}-{fraction:g}x"

    def search(self, track: str, fraction: float) -> dict[str, Any]:
        name = self.study_name(track, fraction)

        space: list[str] = []
        if fraction < WIDE_SPACE_BELOW:  # the default space's fastest policy (ratio 0.7, INT8) is about 8.3%
            wide = self.work / "resnet18-wide.toml"
            wide.write_text((ROOT / "spaces" / "resnet18.toml").read_text().replace("[0.0, 0.7]", "[0.0, 0.85]"))
            space = ["--space", str(wide)]

        def run() -> dict[str, Any]:
            started = time.perf_counter()
            cli(
                "search",
                *space,
                *("--budget-fraction", f"{fraction:g}", "--model", MODEL, "--weights", str(WEIGHTS)),
                *("--data", f"imagefolder:{DATA}", "--input-size", "32", "--mean", MEAN, "--std", STD),
                *("--precision", "fp32" if track == "pruning" else "fp32,int8"),
                *("--trials", str(self.plan.trials), "--finetune-steps", str(self.plan.trial_steps)),
                *("--finetune-batch", str(self.plan.trial_batch), "--bn-batches", str(self.plan.bn_batches)),
                *("--val-images", str(self.plan.val_images), "--fit-budget"),
                *("--distill", "0.5", "--study", name, "--studies-dir", str(self.studies), "--quiet"),
            )
            return {"seconds": time.perf_counter() - started}

        return self.cached(f"search {name}", run)

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{self.studies / name}.db")

    def export(self, name: str, number: int, seed: int) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            out = self.work / "exports" / name / f"seed-{seed}"
            cli(
                "export",
                *("--study", name, "--studies-dir", str(self.studies), "--trial", str(number)),
                *("--epochs", f"{self.plan.epochs:g}", "--seed", str(seed), "--out", str(out), "--force", "--quiet"),
                *(("--test-images", str(self.plan.test_images)) if self.plan.test_images else ()),
            )
            card = json.loads((out / f"trial-{number}" / "card.json").read_text())
            int8 = card.get("int8")
            shipped = out / f"trial-{number}" / ("model.int8.onnx" if int8 else "model.onnx")
            return {
                "top1": int8["top1"] if int8 else card["accuracy"]["after_finetune"],
                "fp32_top1": card["accuracy"]["after_finetune"],
                "finetune_seconds": card["finetune"]["seconds"],
                "macs": card["macs"],
                "params": card["params"],
                "onnx": str(shipped),
                "precision": card["precision"],
            }

        return self.cached(f"export {name} {number} seed {seed}", run)

    # ---- recipes, built here with the same fine-tune as the export ---------------------------
    def pruned(self, kind: str, ratio: float, drop: tuple[str, ...] = ()) -> nn.Module:
        """The baseline pruned by a recipe; ``drop`` names stages whose second block is removed first."""
        model = copy.deepcopy(self.baseline)
        for stage in drop:  # the block after the stage's first is residual: removing it leaves an identity
            getattr(model, stage)[1] = nn.Identity()
        if kind == "uniform":
            apply_policy(model, self.space.uniform(ratio, "l1"), self.space, self.example)
        elif kind == "global":
            pruner = tp.pruner.MagnitudePruner(
                model,
                self.example,
                importance=tp.importance.MagnitudeImportance(p=2),
                global_pruning=True,
                pruning_ratio=ratio,
                max_pruning_ratio=0.9,
                ignored_layers=[model.fc],
                round_to=8,
            )
            pruner.step()
        elif kind != "unpruned":
            raise ValueError(kind)
        return model.eval()

    def ratio_latency(self, kind: str, ratio: float, precision: str, drop: tuple[str, ...] = ()) -> float:
        """The recipe's latency as a fraction of the interleaved baseline (cached per run)."""

        def run() -> float:
            model = self.pruned(kind, ratio, drop)
            return float(self.meter.time_onnx(self.meter.candidate_onnx(model, precision)).ratio)

        return self.cached(f"latency {kind} {ratio:g} {precision}{dropped_key(drop)}", run)

    def ratio_meeting(self, kind: str, fraction: float, precision: str, drop: tuple[str, ...] = ()) -> float | None:
        """The smallest ratio of the grid whose latency meets ``fraction`` (None: none up to 0.9)."""
        grid = [0.0, *RATIO_GRID] if drop else RATIO_GRID  # with blocks removed, no channel pruning may do
        for ratio in grid:
            got = self.ratio_latency(kind, ratio, precision, drop)
            log(
                f"{kind}{dropped_key(drop)} {precision} ratio {ratio:g}: {got:.3f} of the baseline (budget {fraction:g})"
            )
            if got <= fraction:
                return ratio
        return None

    def recipe(self, kind: str, ratio: float, precision: str, seed: int, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            model = self.pruned(kind, ratio, drop)
            if kind != "unpruned":
                recalibrate_batchnorm(model, self.data, batches=8, seed=seed)
            defaults = ExportSettings()
            settings = TrainSettings(
                steps=self.finetune_steps,
                batch_size=defaults.batch_size,
                lr=defaults.lr,
                distill=defaults.distill,
                seed=seed,
            )
            described = f"{kind} {ratio:g}{dropped_key(drop)}"
            result = train(model, self.data, settings, teacher=self.baseline, description=described)
            fp32_top1 = top1(model, self.data, "test", limit=self.plan.test_images)
            macs, params = macs_and_params(model, self.data.input_size)
            path = self.work / "recipes" / f"{kind}-{ratio:g}-{precision}{dropped_key(drop, '-')}-seed{seed}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            shipped = fp32_top1
            if precision == "int8":
                quantized = quantize_model(model, self.data, QuantizeSettings())
                path.write_bytes(fix_batch(quantized.int8_onnx))
                shipped = onnx_top1(quantized.int8_onnx, self.data, "test", limit=self.plan.test_images)
            else:
                path.write_bytes(export_onnx(model, self.example))
            log(f"{described} {precision} seed {seed}: test top-1 {shipped:.4f} ({result.seconds:.0f} s)")
            return {
                "top1": shipped,
                "fp32_top1": fp32_top1,
                "finetune_seconds": round(result.seconds, 1),
                "macs": macs,
                "params": params,
                "onnx": str(path),
                "precision": precision,
            }

        key = f"recipe {kind} {ratio:g} {precision}{dropped_key(drop)} seed {seed} epochs {self.plan.epochs:g}"
        key += self.plan.test_key
        return self.cached(key, run)

    def int8_alone(self) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            quantized = quantize_model(self.baseline, self.data, QuantizeSettings())
            path = self.work / "recipes" / "unpruned-int8.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(fix_batch(quantized.int8_onnx))
            macs, params = macs_and_params(self.baseline, self.data.input_size)
            top = onnx_top1(quantized.int8_onnx, self.data, "test", limit=self.plan.test_images)
            return {"top1": top, "macs": macs, "params": params, "onnx": str(path), "precision": "int8"}

        return self.cached("int8 alone" + self.plan.test_key, run)

    def baseline_test(self) -> float:
        return self.cached(
            "baseline test top-1" + self.plan.test_key,
            lambda: top1(self.baseline, self.data, "test", limit=self.plan.test_images),
        )


def dropped_key(drop: tuple[str, ...], sep: str = " ") -> str:
    """How removed blocks show in cache keys and file names ("" when none, so older keys still match)."""
    return f"{sep}drop{sep}{'+'.join(drop)}" if drop else ""


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
        "precision": runs[0]["precision"],
        "finetune_seconds": statistics.fmean(r.get("finetune_seconds", 0.0) for r in runs),
        **extra,
    }


def int8_check_fraction(bench: Bench) -> float:
    """The budget of the INT8-alone check: 30% as the issue has it, where INT8 alone fits in 30% with 10% to spare.

    The issue assumes INT8 alone runs at about 30% of FP32, as on CPUs with VNNI. Where it runs slower
    (0.48 on this AVX2-only machine), a 30% budget cannot hold INT8 alone, and the question the check
    asks (when quantizing alone meets the budget, does the search do at least as well?) moves to the
    smallest 5% step that holds INT8 alone's measured latency with 10% to spare.
    """
    alone = bench.ratio_latency("unpruned", 0.0, "int8")
    if alone * 1.1 <= 0.3:
        return 0.3
    return round(math.ceil(alone * 1.1 / 0.05 - 1e-9) * 0.05, 2)


def run_track(bench: Bench, track: str, fraction: float) -> dict[str, Any]:
    plan = bench.plan
    precision = "fp32" if track == "pruning" else "int8"
    search = bench.search(track, fraction)
    name = bench.study_name(track, fraction)
    study = bench.study(name)
    best = recommended(rows(study))
    result: dict[str, Any] = {"track": track, "fraction": fraction, "study": name, "rows": []}
    result["budget_ms"] = float(study.user_attrs["budget_ms"])
    result["study_baseline_ms"] = float(study.user_attrs["baseline_latency_ms"])
    result["search_seconds"] = search["seconds"]
    result["trials"] = len(study.trials)
    trained = [t for t in study.trials if t.user_attrs.get("fine_tuned")]
    result["fine_tuned_trials"] = len(trained)
    result["seconds_per_fine_tuned_trial"] = (
        statistics.fmean(sum(t.user_attrs["seconds"].values()) for t in trained) if trained else None
    )
    if best is None:
        log(f"{name}: no policy within the budget")
    else:
        runs = [bench.export(name, best.number, seed) for seed in plan.seeds]
        result["rows"].append(
            row(
                f"searched (trial {best.number}, {best.policy.precision})",
                runs,
                kind="searched",
                brief_val=best.accuracy,
                policy=best.policy.describe(),
                search_seconds=search["seconds"],
            )
        )
    if track == "int8-check":  # compared with INT8 alone only (reported beside the tracks)
        result["int8_alone_fraction"] = bench.ratio_latency("unpruned", 0.0, "int8")
        return result
    for kind, label in RECIPES:
        ratio = bench.ratio_meeting(kind, fraction, precision)
        if ratio is None:
            result["rows"].append({"row": f"{label}: no ratio up to 0.9 meets the budget", "kind": kind})
            continue
        runs = [bench.recipe(kind, ratio, precision, seed) for seed in plan.seeds]
        result["rows"].append(row(f"{label} r={ratio:g}{' INT8' if precision == 'int8' else ''}", runs, kind=kind))
    return result


def fidelity(bench: Bench, studies: list[str]) -> dict[str, Any]:
    """Brief (trial, val) against full (export, test) accuracy over policies spanning the fronts."""
    candidates = []
    for name in studies:
        for r in rows(bench.study(name)):
            if r.feasible and r.accuracy is not None and not r.policy.is_unpruned:
                candidates.append((name, r))
    candidates.sort(key=lambda c: c[1].latency_ms)
    want = bench.plan.fidelity
    if len(candidates) > want:  # evenly spaced in latency order, so the set spans the fronts
        step = (len(candidates) - 1) / (want - 1)
        candidates = [candidates[round(i * step)] for i in range(want)]
    points = []
    for name, r in candidates:
        final = bench.export(name, r.number, bench.plan.seeds[0])
        points.append(
            {
                "study": name,
                "trial": r.number,
                "latency_ms": r.latency_ms,
                "brief_val": r.accuracy,
                "final_test": final["fp32_top1"],
            }
        )
    tau = kendalltau([p["brief_val"] for p in points], [p["final_test"] for p in points]).statistic
    return {"points": points, "kendall_tau": float(tau)}


def measure_latencies(bench: Bench, tracks: list[dict[str, Any]], extra: list[dict[str, Any]]) -> None:
    """Every row's shipped ONNX, timed interleaved with the baseline, one after another, nothing else running."""
    log("measuring every row's latency side by side with the baseline")
    for r in [row for t in tracks for row in t["rows"]] + extra:
        if "onnx" not in r:
            continue
        got = bench.meter.time_onnx(r["onnx"])
        r["latency_ms"], r["latency_fraction"] = got.median_ms, got.ratio
        r["baseline_ms"] = got.reference_median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in minutes (numbers meaningless)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cifar10"), help="working folder (resumable)")
    parser.add_argument("--pruning-budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--joint-budgets", type=float, nargs="+", default=[0.15, 0.08])
    parser.add_argument("--trials", type=int, default=16, help="trials per study")
    parser.add_argument("--trial-steps", type=int, default=30, help="brief fine-tune steps per trial")
    parser.add_argument("--trial-batch", type=int, default=64)
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--val-images", type=int, default=5000, help="val images each trial is evaluated on")
    parser.add_argument("--epochs", type=float, default=0.1, help="final fine-tune epochs of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fidelity", type=int, default=6, help="policies in the fidelity check")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from benchmarks/cifar10.json")
    args = parser.parse_args()
    if args.render:
        result = json.loads((ROOT / "benchmarks" / "cifar10.json").read_text())
        write_section(SECTION, render(result, sorted((ROOT / "benchmarks" / "cifar10").glob("*.png"))))
        return
    if not DATA.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"error: this benchmark needs {DATA} and {WEIGHTS} (the shared CIFAR-10 material); not found")
    plan = Plan.of(args)
    work = Path(args.work if not args.quick else str(Path(args.work).with_name(".cifar10-quick")))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    bench = Bench(plan, work)
    log(f"plan {plan}; final fine-tune {bench.finetune_steps} steps of batch {ExportSettings().batch_size}")
    tracks = [run_track(bench, "pruning", f) for f in plan.pruning_budgets]
    baseline_runs = [bench.recipe("unpruned", 0.0, "fp32", seed) for seed in plan.seeds]
    extra = [row("unpruned baseline, same fine-tune", baseline_runs, kind="baseline")]
    alone = bench.int8_alone()
    extra.append(
        {
            "row": "unpruned INT8 (no fine-tune)",
            "kind": "int8 alone",
            "top1": [alone["top1"]],
            "mean": alone["top1"],
            "spread": 0.0,
            **{k: alone[k] for k in ("macs", "params", "onnx")},
            "precision": "int8",
        }
    )
    tracks += [run_track(bench, "joint", f) for f in plan.joint_budgets]
    if plan.int8_check:
        tracks.append(run_track(bench, "int8-check", int8_check_fraction(bench)))
    fid = fidelity(bench, [t["study"] for t in tracks if t["track"] == "pruning"])
    measure_latencies(bench, tracks, extra)
    plots = []
    for t in tracks:
        study = bench.study(t["study"])
        path = ROOT / "benchmarks" / "cifar10" / f"{t['study']}.png"
        if not args.quick:
            plot_front(rows(study), t["budget_ms"], path, title=f"{t['study']}: accuracy (val, brief) vs latency")
            plots.append(path)
    result = {
        "plan": plan.__dict__,
        "finetune_steps": bench.finetune_steps,
        "baseline_test_top1": bench.baseline_test(),
        "tracks": tracks,
        "reference_rows": extra,
        "fidelity": fid,
        "seconds": time.perf_counter() - started,
        "computed": bench.computed,
        "reused": bench.reused,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
    }
    log(json.dumps({"fidelity_tau": fid["kendall_tau"], "minutes": result["seconds"] / 60}))
    if args.quick:
        print(json.dumps(result, indent=1, default=str))
        return
    (ROOT / "benchmarks" / "cifar10.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, render(result, plots))


def render(result: dict[str, Any], plots: list[Path]) -> str:
    base = next(r for r in result["reference_rows"] if r["kind"] == "baseline")
    alone = next(r for r in result["reference_rows"] if r["kind"] == "int8 alone")
    seeds = ", ".join(str(s) for s in result["plan"]["seeds"])
    hw = result["hardware"]
    lines = [
        f"`python benchmarks/cifar10.py` on {result['date']}, commit `{result['git_revision']}`, "
        f"{hw.get('cpu')} ({hw.get('logical_cpus', '?')} logical CPUs), one ONNX Runtime thread, batch 1; whole run "
        f"{result['seconds'] / 60:.0f} min{reuse_note(result)}. Baseline: the shared ResNet-18 (CIFAR stem), test top-1 "
        f"{pct(result['baseline_test_top1'])}% as shipped. Every final row is fine-tuned "
        f"{result['plan']['epochs']:g} epochs ({result['finetune_steps']} SGD steps of batch 32, distillation 0.5 "
        f"from the unpruned model) once per seed ({seeds}); top-1 is on the 10,000 test images (mean ± spread = "
        f"max - min over seeds). Latencies were all measured at the end of the run, each model interleaved with "
        f"the unpruned baseline; the fraction is of that interleaved baseline. Trials: "
        f"{result['plan']['trials']} per study, brief fine-tune {result['plan']['trial_steps']} steps of batch "
        f"{result['plan']['trial_batch']} (distillation 0.5) after BatchNorm recalibration on "
        f"{result['plan']['bn_batches']} batches, accuracy on a fixed random {result['plan']['val_images']} of the "
        f"5,000 val images.",
        "",
    ]
    for t in result["tracks"]:
        title = "INT8-alone check" if t["track"] == "int8-check" else f"{t['track'].capitalize()} track"
        lines += [
            f"### {title}, budget {100 * t['fraction']:g}% "
            f"({t['budget_ms']:.2f} ms of the study's {t['study_baseline_ms']:.2f} ms)",
            *(
                [
                    "",
                    "(The issue asks for this check at 30%, where it expects INT8 alone to run. Here INT8 alone "
                    f"ran at {t['int8_alone_fraction']:.3f} of FP32 when this budget was chosen, so the check runs "
                    "at the smallest 5% step that holds it with 10% to spare: a joint search, FP32 and INT8 "
                    "allowed, compared with INT8 alone.)",
                ]
                if t["track"] == "int8-check" and t["fraction"] != 0.3
                else []
            ),
            *(
                [
                    "",
                    "(Searched in `spaces/resnet18.toml` with every ratio range widened to 0.85: the default "
                    "space's fastest policy, INT8 at ratio 0.7, is about 8.3% of the baseline here.)",
                ]
                if t["fraction"] < WIDE_SPACE_BELOW
                else []
            ),
            "",
            "| row | test top-1 % (mean ± spread) | latency ms | of baseline | MACs M | params M | search s "
            "| fine-tune s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        shown = list(t["rows"]) + ([base] if t["track"] == "pruning" else [alone])
        for r in shown:
            if "mean" not in r:
                lines.append(f"| {r['row']} | | | | | | | |")
                continue
            search_s = f"{r['search_seconds']:.0f}" if "search_seconds" in r else ""
            lines.append(
                f"| {r['row']} | {pct(r['mean'])} ± {pct(r['spread'])} | {r.get('latency_ms', float('nan')):.2f} "
                f"| {r.get('latency_fraction', float('nan')):.3f} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e6:.2f} "
                f"| {search_s} | {r.get('finetune_seconds', 0):.0f} |"
            )
        per_trial = t.get("seconds_per_fine_tuned_trial")
        lines += [
            "",
            f"Search: {t['trials']} trials ({t['fine_tuned_trials']} within the budget and fine-tuned, "
            f"{per_trial or 0:.0f} s each), {t['search_seconds'] / 60:.1f} min in all. " + verdict(t, base, alone),
            "",
        ]
    fid = result["fidelity"]
    lines += [
        "### Fidelity of the trials' brief accuracy",
        "",
        "| study | trial | latency ms | brief (val) % | final (test) % |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {p['study']} | {p['trial']} | {p['latency_ms']:.2f} | {pct(p['brief_val'])} | {pct(p['final_test'])} |"
            for p in fid["points"]
        ],
        "",
        f"Kendall τ over {len(fid['points'])} policies: **{fid['kendall_tau']:.2f}** (target ≥ 0.7).",
        "",
        *[f"![{p.stem}](benchmarks/cifar10/{p.name})" for p in plots],
    ]
    notes = ROOT / "benchmarks" / "cifar10_notes.md"  # the reading of the numbers, written by a person
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines)


def reuse_note(result: dict[str, Any]) -> str:
    """What a resumed run took from the cache, so its wall time is read right."""
    reused = [k for k in result.get("reused", []) if not k.startswith("latency ")]
    if not reused:
        return ""
    searches = sum(k.startswith("search ") for k in reused)
    fine_tunes = sum(k.startswith(("export ", "recipe ")) for k in reused)
    return (
        f", resuming an earlier run's cache ({searches} searches and {fine_tunes} final fine-tunes reused, "
        f"{sum(not k.startswith('latency ') for k in result['computed'])} results computed in this run; "
        "every latency in the tables was measured again in this run)"
    )


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def verdict(track: dict[str, Any], base: dict[str, Any], alone: dict[str, Any]) -> str:
    searched = next((r for r in track["rows"] if r.get("kind") == "searched"), None)
    if track["track"] == "int8-check":
        if searched is None:
            return "No comparison: the search found nothing within the budget."
        diff = 100 * (searched["mean"] - alone["mean"])
        return (
            f"Searched − INT8 alone: **{diff:+.2f} pp** (target: within 0.2 pp, i.e. ≥ −0.2 pp): "
            f"{'met' if diff >= -0.2 else 'missed'}."
        )
    recipes = [r for r in track["rows"] if r.get("kind") in ("uniform", "global") and "mean" in r]
    if searched is None or not recipes:
        return "No comparison: the search or the recipes found nothing within the budget."
    best = max(recipes, key=lambda r: r["mean"])
    gain = 100 * (searched["mean"] - best["mean"])
    noise = 100 * max(searched["spread"], best["spread"])
    target = {0.5: 1.5, 0.25: 2.0}.get(track["fraction"], 1.5)
    parts = [
        f"Searched − best recipe ({best['row']}): **{gain:+.2f} pp** (target ≥ +{target:g} pp; "
        f"seed spread up to {noise:.2f} pp): {'met' if gain >= target and gain > noise else 'missed'}."
    ]
    if track["track"] == "joint":
        parts.append(
            f"INT8 alone runs at {alone.get('latency_fraction', float('nan')):.2f} of the FP32 baseline here, "
            f"at {pct(alone['mean'])}% top-1."
        )
    if track["track"] == "pruning" and track["fraction"] == 0.5:
        loss = 100 * (base["mean"] - searched["mean"])
        parts.append(
            f"Against the equally fine-tuned baseline: {-loss:+.2f} pp (target ≥ −1 pp): "
            f"{'met' if loss <= 1 else 'missed'}."
        )
    return " ".join(parts)


if __name__ == "__main__":
    main()

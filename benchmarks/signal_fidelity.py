"""Benchmark: how well each cheap fidelity ranks pruned candidates, against a long fine-tune (issue #25).

On MobileNetV2 for small inputs (``mobilenet_v2_cifar``) at 25% and 50% of its baseline's latency, on the
shared CIFAR-10 (``../shared/data/cifar10``): candidates fitted to the budget (the study's recipes and the
search's best trials where ``benchmarks/allocation.py`` left its studies in ``benchmarks/.allocation``,
random shapes fitted by measured bisection for the rest; see ``signal_lib/candidates.py``), each scored at
several fidelities: BatchNorm recalibration alone; 30, 100 and 300 steps; one epoch, each rung *continued
from the previous rung's weights* with a schedule of its own, as promotion would continue a trial; and at
30 and 100 steps with distillation and with a second learning rate (chains of their own, continued the
same way). The reference fine-tunes every candidate from its pruned model as export does (2 epochs,
distillation 0.5), with 2 seeds, read on the 10,000 test images. Per fidelity: Kendall τ against the
reference, the regret of picking its best, its cost in seconds; the noise floor: τ between the reference
seeds and the spread of reading 2,000 or 5,000 images (bootstrap of the per-image correctness).

    python benchmarks/signal_fidelity.py > benchmarks/signal.log 2>&1   # the full run: hours (estimate below)
    python benchmarks/signal_fidelity.py --quick                        # a smoke run in minutes

(Not ``signal.py``: in ``benchmarks/``, the folder Python puts first on the path of every script there, that
name would shadow the standard library's ``signal`` and break every script that imports ``subprocess``.)

It needs the MobileNetV2 baseline committed at ``benchmarks/allocation/mobilenet_v2_cifar-15ep.pth``
(``benchmarks/allocation.py --baseline-only`` trains it) and says so, exiting 1, when it is missing;
``--quick`` trains a throwaway baseline of a few steps instead. Every result (the candidates of a budget;
each candidate's score per fidelity and seed; each reference per seed) is kept in
``benchmarks/.signal/results.json`` (``--work``) and reused by a rerun, with the weights of each chain's
latest rung, so an interrupted run resumes. The results (not the weights) are also written to the tracked
``benchmarks/signal_results.json``: commit it when a session ends, and a new machine carries on from it. Writes ``benchmarks/signal.json`` and the "Signal" section of
BENCHMARKS.md (not with ``--quick``, which prints its JSON).

How long the full run takes (20 candidates; each trains about 238,000 images, three quarters of them in its
two reference fine-tunes, and reads 65,000): ``--quick`` prints an estimate from its own seconds per trained
and per read image. On 2026-12-05 on the 2-core AMD EPYC (AVX-512, BF16) of the development machine, nice'd
at 1 PyTorch thread under load averages of 10 to 19 (17-22 trained and 67-69 read images a second, reads
including the loader's start), two runs estimated 66 and 82 hours. The allocation benchmark trained the
unpruned MobileNetV2 at 127 images a second on the same machine with both cores, at which rate the training
alone takes about 10 hours: plan on 11-12 hours on a quiet machine, and let it resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import time
from dataclasses import asdict, replace
from typing import Any

import optuna
import torch

from benchmarks.allocation import COMMITTED, MOBILENET, ROOT, SHARED, cpu_label, log
from benchmarks.sections import write_section
from benchmarks.signal_lib.analysis import analyse
from benchmarks.signal_lib.bench import Bench, load_data
from benchmarks.signal_lib.candidates import candidates
from benchmarks.signal_lib.plan import Plan
from benchmarks.signal_lib.render import choose_rungs, render
from benchmarks.signal_lib.scoring import reference, reference_key, run_chain, score_key
from search.measuring.hardware import fingerprint, git_revision, package_versions
from search.measuring.timing import LatencySettings
from search.models.build import build_model
from search.training.finetune import TrainSettings, train

SECTION = "Signal"
INTERIM_SECTION = "Signal: interim"
MIRROR = Path(__file__).resolve().parent / "signal_results.json"
"""Every result so far, tracked: commit it between sessions so the next machine resumes (Bench.mirror)."""
BASELINE = COMMITTED / f"{MOBILENET}-15ep.pth"
"""The MobileNetV2 baseline of the allocation benchmark, committed beside it."""
QUICK_BASELINE_STEPS = 20
QUICK_TIMING = LatencySettings(threads=1, warmup=3, round_size=5, min_rounds=2, max_seconds=3)
TIMING = LatencySettings(threads=1)
"""What fits candidates to the budget (as a study measures them)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run in minutes (numbers meaningless)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / ".signal"), help="working folder (resumable)")
    p.add_argument(
        "--allocation-work", default=str(ROOT / "benchmarks" / ".allocation"), help="allocation.py's working folder"
    )
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="fractions of the baseline's latency")
    p.add_argument("--candidates", type=int, default=12, help="candidates at budgets of 25%% or less")
    p.add_argument("--candidates-loose", type=int, default=8, help="candidates at looser budgets")
    p.add_argument("--search-best", type=int, default=4, help="at most this many of a study's best trials")
    p.add_argument("--batch", type=int, default=64, help="brief fine-tune batch")
    p.add_argument("--lr", type=float, default=0.01, help="brief fine-tune peak learning rate (the search's)")
    p.add_argument("--second-lr", type=float, default=0.05, help="the second learning rate tried at 30 and 100 steps")
    p.add_argument("--distill", type=float, default=0.5, help="distillation of the distilled chain")
    p.add_argument("--reference-epochs", type=float, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="reference seeds (fidelities: the first)")
    p.add_argument("--bootstrap", type=int, default=300, help="bootstrap draws of the noise floor")
    p.add_argument("--shared", default=str(shared()), help="the shared material's folder (CIFAR-10 under data/cifar10)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="PyTorch threads (default: PyTorch's; --quick: 1, since on a shared machine spinning threads stall)",
    )
    p.add_argument("--render", action="store_true", help="only rewrite the section from benchmarks/signal.json")
    p.add_argument(
        "--interim",
        action="store_true",
        help="analyse what the cache holds so far (against the references of the first seed where the second is "
        "missing), computing nothing: prints it and writes benchmarks/signal.interim.json; safe beside a running run",
    )
    p.add_argument(
        "--write-interim",
        action="store_true",
        help="with --interim: also write the interim numbers as the 'Signal: interim' section of BENCHMARKS.md",
    )
    return p


def shared() -> Path:
    """The shared material: beside the repository (``../shared``, allocation.py's) or inside it (``shared/``)."""
    return next((p for p in (SHARED, ROOT / "shared") if p.is_dir()), SHARED)


def quick_baseline(work: Path, data: Any) -> Path:
    """A throwaway MobileNetV2 of a few steps (``--quick`` only: it checks the plumbing, not the numbers)."""
    path = work / f"{MOBILENET}-quick.pth"
    if not path.is_file():
        torch.manual_seed(0)
        model = build_model(MOBILENET, data.num_classes)
        log(f"--quick: training a throwaway {MOBILENET} baseline of {QUICK_BASELINE_STEPS} steps")
        train(model, data, TrainSettings(steps=QUICK_BASELINE_STEPS, batch_size=64, lr=0.05))
        work.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def run_budget(bench: Bench, plan: Plan, fraction: float, allocation_work: Path) -> dict[str, Any]:
    count = plan.candidates[fraction]
    budget = candidates(bench, fraction, count, plan.search_best, allocation_work)
    bench.meter.baseline_ms = budget["baseline_ms"]
    found = budget["candidates"]
    log(f"budget {fraction:g}: {len(found)} candidates ({budget['budget_ms']:.3f} ms of {budget['baseline_ms']:.3f})")
    tag = f"{fraction:g}"
    first = plan.seeds[0]
    for c in found:
        log(f"{c['id']} {c['label']}")
        for chain in plan.chains():
            run_chain(bench, plan, tag, c, chain, first)
    for seed in plan.seeds:
        for c in found:
            reference(bench, plan, tag, c, seed)
    scores: dict[str, dict[str, Any]] = {}
    for chain in plan.chains():
        for steps in chain.rungs:
            fidelity = chain.fidelity(steps)
            scores[fidelity] = {c["id"]: bench.cache[score_key(plan, tag, c["id"], chain, steps, first)] for c in found}
    refs = {c["id"]: [bench.cache[reference_key(plan, tag, c["id"], s)] for s in plan.seeds] for c in found}
    return {
        "fraction": fraction,
        **{k: v for k, v in budget.items() if k != "candidates"},
        "candidates": [
            {**c, "reference": [r["top1"] for r in refs[c["id"]]], **{f: s[c["id"]]["top1"] for f, s in scores.items()}}
            for c in found
        ],
        "analysis": analyse(plan, budget, scores, refs),
    }


def spent(cache: dict[str, Any]) -> tuple[float, float, float, float, float]:
    """Seconds and images the cached pieces took: (train s, train images, read s, read images, fitting s)."""
    train_s = train_images = read_s = read_images = fit_s = 0.0
    for key, value in cache.items():
        if key.startswith(("score ", "reference ")):
            train_s += value["train_seconds"] + value["bn_seconds"]
            train_images += value["train_images"]
            read_s += value["eval_seconds"]
            read_images += value["images"]
        elif key.startswith("candidates "):
            fit_s += value["seconds"]
    return train_s, train_images, read_s, read_images, fit_s


def estimate(cache: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The full run's hours on this CPU, from this run's seconds per trained and per read image."""
    train_s, train_images, read_s, read_images, fit_s = spent(cache)
    fits = sum(len(v["candidates"]) for k, v in cache.items() if k.startswith("candidates "))
    full = Plan.of(replace_quick(args), MOBILENET)
    per_train, per_read = train_s / max(train_images, 1), read_s / max(read_images, 1)
    chains = full.chains()
    images = (
        sum(max(c.rungs) * full.batch for c in chains) + len(full.seeds) * full.reference_steps * full.reference_batch
    )
    reads = sum(len(c.rungs) for c in chains) * 5000 + len(full.seeds) * 10_000
    count = sum(full.candidates.values())
    seconds = count * (images * per_train + reads * per_read + fit_s / max(fits, 1))
    return {
        "seconds_per_trained_image": per_train,
        "seconds_per_read_image": per_read,
        "fit_seconds_per_candidate": fit_s / max(fits, 1),
        "candidates": count,
        "trained_images_per_candidate": images,
        "read_images_per_candidate": reads,
        "full_run_hours": seconds / 3600,
    }


def replace_quick(args: argparse.Namespace) -> argparse.Namespace:
    defaults = parser().parse_args([])
    return argparse.Namespace(**{**vars(defaults), "quick": False})


def interim(args: argparse.Namespace) -> dict[str, Any]:
    """The analysis of what is cached so far, per budget, without training or timing anything.

    Candidates whose first-seed reference is done are ranked against it alone (the plan's seeds reduced to
    the first), so the numbers can be read while the second seed's references still run; the seed-to-seed
    noise floor waits for them. Reads ``results.json`` of ``--work`` (or the tracked mirror) and writes nothing
    there."""
    work = Path(args.work)
    cache_path = work / "results.json"
    cache = json.loads((cache_path if cache_path.is_file() else MIRROR).read_text())
    plan = Plan.of(args, MOBILENET)
    first = plan.seeds[0]
    one_seed = replace(plan, seeds=(first,))
    budgets = []
    for fraction in plan.budgets:
        key = f"candidates {MOBILENET} {fraction:g} count {plan.candidates[fraction]}"
        if key not in cache:
            continue
        budget, tag = cache[key], f"{fraction:g}"
        found = budget["candidates"]
        refs = {
            c["id"]: [cache[reference_key(plan, tag, c["id"], first)]]
            for c in found
            if reference_key(plan, tag, c["id"], first) in cache
        }
        scores: dict[str, dict[str, Any]] = {}
        for chain in plan.chains():
            for steps in chain.rungs:
                by_id = {
                    c["id"]: cache[score_key(plan, tag, c["id"], chain, steps, first)]
                    for c in found
                    if score_key(plan, tag, c["id"], chain, steps, first) in cache
                }
                scores[chain.fidelity(steps)] = by_id
        both = sum(all(reference_key(plan, tag, c["id"], s) in cache for s in plan.seeds) for c in found)
        analysis = analyse(one_seed, budget, scores, refs)
        budgets.append(
            {
                "fraction": fraction,
                "candidates": len(found),
                "first_seed_references": len(refs),
                "all_seed_references": both,
                "analysis": analysis,
            }
        )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "seed": first,
        "labels": {c.fidelity(s): c.label(s, plan.epoch_steps) for c in plan.chains() for s in c.rungs},
        "budgets": budgets,
    }
    (ROOT / "benchmarks" / "signal.interim.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.write_interim and budgets:
        write_section(INTERIM_SECTION, render_interim(result))
    for b in budgets:
        log(
            f"budget {b['fraction']:g}: {b['first_seed_references']} of {b['candidates']} candidates have the "
            f"seed-{first} reference ({b['all_seed_references']} have every seed's)"
        )
        for f in b["analysis"]["fidelities"]:
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in f.items() if k != "fidelity"}
            log(f"  {f['fidelity']}: {shown}")
    return result


def render_interim(result: dict[str, Any]) -> str:
    """The interim section: per budget, τ and regret of each fidelity against the first seed's references."""
    labels = result["labels"]
    lines = [
        f"`python benchmarks/signal_fidelity.py --interim --write-interim` on {result['date']}, commit "
        f"`{result['git_revision']}`, {cpu_label(result['hardware'])}: **interim**, while the full run goes on. Each "
        f"candidate's reference here is one fine-tune (seed {result['seed']}; 2 epochs, distillation 0.5, 10,000 "
        "test images), not the mean of two seeds, and there is no seed-to-seed noise floor yet; the full run's "
        'section ("Signal") replaces these numbers. τ: Kendall τ of the fidelity\'s validation top-1 against the '
        "reference's test top-1; regret: the reference top-1 of the truly best candidate minus that of the "
        "fidelity's pick; cost: seconds per candidate to reach the fidelity along its chain.",
    ]
    for b in result["budgets"]:
        a = b["analysis"]
        refs = sorted(r["mean"] for r in a["reference"].values())
        spread = f"{100 * refs[0]:.2f}-{100 * refs[-1]:.2f}%" if refs else "-"
        lines += [
            "",
            f"**{100 * b['fraction']:.0f}% of the baseline's latency**: {b['first_seed_references']} of "
            f"{b['candidates']} candidates have their reference (test top-1 {spread}).",
            "",
            "| fidelity | τ (2,000 val images) | τ (all val) | regret (pp, 2,000 / all) | best kept in top third | "
            "cost (s) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in a["fidelities"]:
            lines.append(
                f"| {labels.get(f['fidelity'], f['fidelity'])} | {_tau(f['tau_search_images'])} | "
                f"{_tau(f['tau_all_val'])} | {100 * f['regret_search_images']:.2f} / {100 * f['regret_all_val']:.2f} | "
                f"{'yes' if f['best_in_top_third'] else 'no'} | {f['cumulative_seconds']:.0f} |"
            )
    return "\n".join(lines)


def _tau(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def main() -> None:
    args = parser().parse_args()
    if args.interim:
        interim(args)
        return
    if args.render:
        result = json.loads((ROOT / "benchmarks" / "signal.json").read_text())
        write_section(SECTION, render(result))
        return
    folder = Path(args.shared) / "data" / "cifar10"
    if not folder.is_dir():
        sys.exit(f"error: this benchmark needs the shared CIFAR-10 at {folder}; not found (pass --shared FOLDER)")
    work = Path(args.work if not args.quick else str(Path(args.work).with_name(".signal-quick")))
    if not args.quick and not BASELINE.is_file():
        sys.exit(
            f"error: the MobileNetV2 baseline {BASELINE.relative_to(ROOT)} is missing; train it with "
            "`python benchmarks/allocation.py --baseline-only` (or merge the commit that adds it), or run --quick"
        )
    torch.set_num_threads(args.threads or (1 if args.quick else torch.get_num_threads()))
    data = load_data(folder)
    weights = quick_baseline(work, data) if args.quick else BASELINE
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = Plan.of(args, MOBILENET)
    started = time.perf_counter()
    bench = Bench(
        work, MOBILENET, weights, QUICK_TIMING if args.quick else TIMING, data, None if args.quick else MIRROR
    )
    hardware = fingerprint(1)
    log(f"on {cpu_label(hardware)}, {torch.get_num_threads()} PyTorch threads; plan {plan}")
    budgets = [run_budget(bench, plan, f, Path(args.allocation_work)) for f in plan.budgets]
    train_s, _, read_s, _, fit_s = spent(bench.cache)
    record = COMMITTED / f"{MOBILENET}-15ep.json"
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "weights": str(Path(weights).resolve().relative_to(ROOT))
        if Path(weights).resolve().is_relative_to(ROOT)
        else str(weights),
        "baseline": json.loads(record.read_text()) if record.is_file() and not args.quick else None,
        "budgets": budgets,
        "labels": {c.fidelity(s): c.label(s, plan.epoch_steps) for c in plan.chains() for s in c.rungs},
        "test_images": budgets[0]["analysis"]["noise"].get("test_images") if budgets else None,
        "seconds": time.perf_counter() - started,
        "compute_minutes": (train_s + read_s + fit_s) / 60,
        "computed": bench.computed,
        "reused": bench.reused,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": hardware,
        "versions": package_versions(),
    }
    result["rungs"] = choose_rungs(result)
    result["estimate"] = estimate(bench.cache, args) if args.quick else None
    log(f"done in {result['seconds'] / 60:.1f} min; reused {len(bench.reused)} cached results")
    if args.quick:
        print(json.dumps(result, indent=1, default=str))
        print(render(result))
        est = result["estimate"]
        log(f"estimate of the full run on this CPU: {est['full_run_hours']:.1f} h ({est})")
        return
    (ROOT / "benchmarks" / "signal.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, render(result))


if __name__ == "__main__":
    main()

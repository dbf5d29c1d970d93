"""Benchmark: the search with promotion against its alternatives at equal training compute (issue #25).

On the shared CIFAR-10, for MobileNetV2 for small inputs at 25% and 50% of its baseline's latency and the
shared ResNet-18 at 25% (the tracks, baselines and search settings of ``benchmarks/allocation.py``, whose
``Bench`` this reuses), four arms:

* a) today's search without promotion (``--no-promotion``): every trial gets the brief fine-tune only (allocation.py's
  search, its database shared with recovery.py through ``benchmarks/searches/``, so each track searches it once);
* b) the search with promotion (the default rungs): the best trials are fine-tuned on and read on all of val;
* c) random allocations fitted to the budget, as many as b trained, with the same promotion: a search with
  the same compute that chooses no allocation (``--trials``, fitted by measured bisection as allocation.py's);
* d) uniform L1 at the budget (the study's own recipe trial), with b's whole search compute added to its final
  fine-tune as extra epochs (b's training images over the 45,000 training images);
* e) and f): b with ``--sampler gp`` (Optuna's GPSampler) and ``--sampler random``, the same trials and promotion
  (``--samplers`` picks them; on the first ``--sampler-tracks`` tracks, by default MobileNetV2 at 25% only), so
  the default sampler is chosen by measurement;
* g) (not an arm of the issue) b's pick with d's epochs: d beat b's pick at 2 epochs on MobileNetV2 at 25%,
  so g tells whether the allocation still wins once both get the same long fine-tune (needs d).

Each arm's pick (a: its recommendation; b and c: their recommendation at the highest rung each trial
reached; d: the uniform trial) is exported with the same final fine-tune (``--epochs``, distillation 0.5,
``--seeds``), read on the 10,000 test images, and every row's latency is timed at the end in passes
interleaved with its baseline (allocation.py's ``measure_latencies``; an export finished on an earlier machine,
whose file is gone, is timed as an architecture-identical stand-in exported without fine-tuning, and its row says
so). Compute is counted in training
images (each trial's steps at its highest rung times the trial batch) and in seconds (the study's own
span). Then the issue's targets: the recommendation within the seed spread of the best row; at 25% on
MobileNetV2, b beats c by 0.5 pp and d by 1 pp, each by more than the spread; on ResNet-18 at 25%, b no
worse than the best arm by more than the spread.

    python benchmarks/equal_compute.py > benchmarks/equal_compute.log 2>&1   # the full run: many hours here
    python benchmarks/equal_compute.py --quick                                # a smoke run in minutes
    python benchmarks/equal_compute.py --searches-only   # only the searches, which time latency (a quiet machine)
    python benchmarks/equal_compute.py --exports-only    # the exports too (they only train), no latency passes

Every search runs before any export: the searches time latency and need the machine to themselves, while the
exports only train and may share it (with another benchmark's training, say).

Every search, export and latency is cached in ``benchmarks/.equal-compute/results.json`` (``--work``) and
reused by a rerun, as in allocation.py; the cache and the arms' study databases are also kept in tracked
files (``benchmarks/equal_compute_results.json``, ``benchmarks/equal_compute/studies/``) that a new machine
starts from, since the full run takes several sessions. Writes ``benchmarks/equal_compute.json`` and the "Equal compute"
section of BENCHMARKS.md (not with ``--quick``, which prints its JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import subprocess
import time
from dataclasses import asdict, replace
from typing import Any

import optuna

from benchmarks.allocation import (
    DATA,
    MOBILENET,
    RESNET_WEIGHTS,
    ROOT,
    SEARCHES_MIRROR,
    Bench,
    Plan,
    cpu_label,
    log,
    measure_latencies,
    row,
    study_seconds,
    timed_file,
)
from benchmarks.sections import write_section
from search.measuring.hardware import fingerprint, git_revision, package_versions
from search.study.front import Row, recommended, rows
from search.study.rungs import highest_rung

SECTION = "Equal compute"
ARMS = {
    "a": "today's search (no promotion)",
    "b": "the search with promotion",
    "c": "random allocations at the budget, same promotion and compute as b",
    "d": "uniform L1 at the budget, b's search compute added to its fine-tune",
    "e": "the search with promotion, GPSampler (--sampler gp)",
    "f": "the search with promotion, random sampling (--sampler random)",
    "g": "b's pick with d's fine-tune epochs (not an arm of the issue: allocation against uniform at equal epochs)",
}
MIRROR = ROOT / "benchmarks" / "equal_compute_results.json"
"""A tracked copy of the results cache (:mod:`benchmarks.carry`), carried between machines."""
STUDIES_MIRROR = ROOT / "benchmarks" / "equal_compute" / "studies"
"""Tracked copies of the arms' study databases."""
SAMPLER_ARMS = {"gp": "e", "random": "f"}
"""b searches with TPE (the default); these arms are b with another ``--sampler``, to decide the default."""


def plan_of(args: argparse.Namespace) -> Plan:
    """allocation.py's plan (its tracks, baseline and trial settings), without its random and widened tracks."""
    plan = Plan.of(argparse.Namespace(**vars(args), baseline_epochs=15, random=0, wide_budgets=[]))
    return replace(plan, trials=6, random=0, wide=()) if args.quick else plan


def compute(study: optuna.Study, batch: int) -> dict[str, Any]:
    """The training a study did: images (steps at each trial's highest rung times the batch) and seconds."""
    steps = 0
    trained = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        top = highest_rung(t, study.user_attrs)
        if top is not None and top.steps:
            steps += top.steps
            trained += 1
    return {
        "train_images": steps * batch,
        "trained_trials": trained,
        "seconds": round(study_seconds(study), 1),
        "revision": study.user_attrs.get("git_revision"),
        "promote_fraction": (study.user_attrs.get("settings") or {}).get("promote_fraction"),  # None: no promotion
    }


LEARNS_HIGHEST_RUNG = "761e3b7"
"""The commit since which the sampler learns from each trial's highest rung on rung 0's scale (before: rung 0)."""


def sampler_learned(revision: str | None) -> str:
    """What the sampler of a search made at ``revision`` learned from, in words."""
    if not revision:
        return "unknown (the study records no revision)"
    found = subprocess.run(
        ["git", "merge-base", "--is-ancestor", LEARNS_HIGHEST_RUNG, revision], cwd=ROOT, capture_output=True
    )
    if found.returncode not in (0, 1):
        return f"unknown (revision {revision[:7]} is not in this clone)"
    if found.returncode == 0:
        return f"each trial's highest rung on rung 0's scale (revision {revision[:7]})"
    return f"rung 0 alone (revision {revision[:7]}, before {LEARNS_HIGHEST_RUNG})"


def search_arm(bench: Bench, model: str, fraction: float, arm: str, extra: tuple[str, ...]) -> str:
    name = f"{bench.study_name(model, fraction)}-{arm}"

    def run() -> dict[str, Any]:
        from benchmarks.allocation import cli

        cli("search", *bench.search_args(model, fraction, name, bench.plan.trials), *extra)
        return {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}

    bench.searched(
        name, lambda: bench.cached(f"search {name} trials {bench.plan.trials} {' '.join(extra)}".strip(), run)
    )
    return name


def final_row(bench: Bench, study: str, arm: str, pick: Row, epochs: float | None = None) -> dict[str, Any]:
    runs = [bench.export(study, pick.number, seed, epochs=epochs) for seed in bench.plan.seeds]
    return row(
        f"{arm}) {ARMS[arm]}: trial {pick.number}" + (f", {epochs:g} epochs" if epochs is not None else ""),
        runs,
        kind=arm,
        policy=pick.policy.describe(),
        study=study,
        trial=pick.number,
        search_val=pick.accuracy,
        search_rung=pick.rung,
        study_fraction=pick.ratio,
    )


def search_track(bench: Bench, model: str, fraction: float, samplers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every arm's search of one track (each times latency: run them on a quiet machine), and what each trained."""
    plan = bench.plan
    track: dict[str, Any] = {"model": model, "fraction": fraction, "rows": [], "compute": {}}
    # a is allocation.py's search with its settings: the same study recovery.py exports from, run once for both
    bench.search(model, fraction, mirror=SEARCHES_MIRROR if bench.studies_mirror else None)  # not --quick's
    studies = {"a": bench.study_name(model, fraction), "b": search_arm(bench, model, fraction, "b", ())}
    for kind in samplers:
        studies[SAMPLER_ARMS[kind]] = search_arm(bench, model, fraction, SAMPLER_ARMS[kind], ("--sampler", kind))
    for arm in studies:
        track["compute"][arm] = compute(bench.study(studies[arm]), plan.trial_batch)
    b_trained = track["compute"]["b"]["trained_trials"]
    studies["c"] = bench.random_study(model, fraction, count=b_trained, source=studies["b"])
    track["compute"]["c"] = compute(bench.study(studies["c"]), plan.trial_batch)
    track["studies"] = studies
    return track


def export_track(bench: Bench, track: dict[str, Any], arms: str = "".join(ARMS)) -> dict[str, Any]:
    """Every arm's pick of one searched track (of ``arms``) through the same final fine-tune (no latency timed)."""
    plan, studies = bench.plan, track["studies"]
    for arm in sorted(a for a in studies if a in arms):
        feasible = [r for r in rows(bench.study(studies[arm])) if r.feasible and r.accuracy is not None]
        pick = recommended(feasible) if arm != "c" else recommended([r for r in feasible if r.recipe])
        if pick is None:
            track["rows"].append({"row": f"{arm}) {ARMS[arm]}: nothing within the budget", "kind": arm})
            continue
        track["rows"].append(final_row(bench, studies[arm], arm, pick))
    if "d" not in arms:
        return track
    b_rows = rows(bench.study(studies["b"]))
    uniform = next(
        (r for r in b_rows if r.recipe and r.recipe.startswith("uniform") and "at the budget" in r.recipe), None
    )
    if uniform is None:
        track["rows"].append({"row": f"d) {ARMS['d']}: no uniform trial within the budget", "kind": "d"})
    else:
        train_images = len(bench.data.train)
        extra = track["compute"]["b"]["train_images"] / train_images
        track["compute"]["d"] = {"extra_epochs": round(extra, 3), "train_images": track["compute"]["b"]["train_images"]}
        epochs = round(plan.epochs + extra, 3)
        track["rows"].append(final_row(bench, studies["b"], "d", uniform, epochs=epochs))
        b_pick = recommended([r for r in b_rows if r.feasible and r.accuracy is not None])
        if "g" in arms and b_pick is not None:
            track["rows"].append(final_row(bench, studies["b"], "g", b_pick, epochs=epochs))
    return track


def verdicts(track: dict[str, Any]) -> list[str]:
    done = {r["kind"]: r for r in track["rows"] if "mean" in r}
    out: list[str] = []
    b = done.get("b")
    if b is None:
        return ["b has no row: no verdict"]
    best = max((r for k, r in done.items() if k != "g"), key=lambda r: r["mean"])  # g is b's own pick
    noise = max(r["spread"] for r in done.values())
    gap = best["mean"] - b["mean"]
    out.append(
        f"the recommendation (b) is {gap * 100:.2f} pp below the best row ({best['kind']}); seed spread up to "
        f"{noise * 100:.2f} pp: {'within' if gap <= noise else 'outside'} it"
    )
    tried = [k for k in ("b", "e", "f") if k in done]
    if len(tried) > 1:
        ranked = sorted(tried, key=lambda k: -done[k]["mean"])
        lead = done[ranked[0]]["mean"] - done[ranked[1]]["mean"]
        spread = max(done[k]["spread"] for k in tried)
        names = {"b": "TPE", "e": "GPSampler", "f": "random"}
        means = ", ".join(f"{names[k]} {done[k]['mean'] * 100:.2f}%" for k in ranked)
        out.append(
            f"samplers with promotion: {means}; {names[ranked[0]]} leads by {lead * 100:.2f} pp, "
            f"{'beyond' if lead > spread else 'within'} the seed spread ({spread * 100:.2f} pp)"
        )
    over = [
        f"{k} ({r['latency_fraction']:.3f})"
        for k, r in done.items()
        if r.get("latency_fraction", 0) > track["fraction"]
    ]
    if over:
        out.append(
            f"timed above the budget ({track['fraction']:.2f} of the baseline) in the final passes, though within it "
            f"when its search timed it: {', '.join(over)}"
        )
    a_s, b_s = (track["compute"].get(k, {}).get("seconds") for k in ("a", "b"))
    if a_s and b_s:
        out.append(
            f"b's search took {b_s / a_s:.2f}x today's (a) for the same number of trials "
            f"({b_s:.0f} s against {a_s:.0f} s; the issue: at most 2x): {'met' if b_s <= 2 * a_s else 'missed'}"
        )
    if track["model"] == MOBILENET and track["fraction"] <= 0.25:
        signal = _signal_tau(track["fraction"])
        if signal is not None:
            out.append(signal)
        for other, need in (("c", 0.005), ("d", 0.01)):
            if other in done:
                diff = b["mean"] - done[other]["mean"]
                spread = max(b["spread"], done[other]["spread"])
                met = diff >= need and diff > spread
                out.append(
                    f"b - {other}: {diff * 100:+.2f} pp (target +{need * 100:.1f} pp, beyond the spread "
                    f"{spread * 100:.2f} pp): {'met' if met else 'missed'}"
                )
    if "g" in done and "d" in done:
        diff, spread = done["g"]["mean"] - done["d"]["mean"], max(done["g"]["spread"], done["d"]["spread"])
        out.append(
            f"at d's epochs, b's pick against uniform L1 (g - d): {diff * 100:+.2f} pp, "
            f"{'beyond' if abs(diff) > spread else 'within'} the seed spread ({spread * 100:.2f} pp)"
        )
    return out


def _signal_tau(fraction: float) -> str | None:
    """The issue's signal target (tau >= 0.6 at 25%), read from the signal benchmark for the rung b ranks on."""
    path = ROOT / "benchmarks" / "signal.json"
    if not path.is_file():
        return None
    signal = json.loads(path.read_text())
    final = (signal.get("rungs") or {}).get("final")
    for budget in signal.get("budgets", []):
        if abs(budget.get("fraction", -1) - fraction) > 1e-9:
            continue
        fidelities = (budget.get("analysis") or {}).get("fidelities", [])
        got = next((f for f in fidelities if f.get("fidelity") == final), None)
        if got is None or got.get("tau_all_val") is None:
            return None
        tau = got["tau_all_val"]
        return (
            f"the signal b recommends on (its rung, {final}) has tau {tau:+.2f} against the reference at "
            f"{fraction:.0%} (the issue: at least +0.60; signal benchmark): {'met' if tau >= 0.6 else 'missed'}"
        )
    return None


def render(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = [
        f"`benchmarks/equal_compute.py` on {cpu_label(result['hardware'])}, {result['date']}: {plan['trials']} "
        f"trials per search ({plan['trial_steps']} brief steps of batch {plan['trial_batch']}, the default promotion "
        f"of their day in b and c, see each track), every pick exported with {plan['epochs']:g} epochs (d: more, see its row) and seeds "
        f"{', '.join(map(str, plan['seeds']))}, test top-1 on 10,000 images (sampling error about ±0.7 pp at "
        "85%); latencies timed at the end, interleaved with the baseline. Numbers: `benchmarks/equal_compute.json`."
    ]
    for t in result["tracks"]:
        lines += [
            "",
            f"**{t['model']} at {t['fraction']:.0%}**",
            "",
            "| arm | policy | latency (of baseline) | test top-1 (mean, spread) | search train images | search s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in t["rows"]:
            c = t["compute"].get(r["kind"], {})
            if "mean" not in r:
                lines.append(f"| {r['row']} | - | - | - | - | - |")
                continue
            lines.append(
                f"| {r['row']} | {r.get('policy', '-')} | {r.get('latency_fraction', float('nan')):.3f}"
                f"{' (stand-in)' if r.get('stand_in') else ''} | "
                f"{r['mean'] * 100:.2f}% ({r['spread'] * 100:.2f} pp) | {c.get('train_images', 0):,} | "
                f"{c.get('seconds', '-')} |"
            )
        lines += ["", *(f"- {v}" for v in verdicts(t))]
        searched = {a: sampler_learned(t["compute"][a].get("revision")) for a in ("b", "e") if a in t["compute"]}
        lines += [f"- what {a}'s sampler learned from: {what}" for a, what in searched.items()]
        rules = {a: c["promote_fraction"] for a, c in t["compute"].items() if c.get("promote_fraction")}
        if rules:
            lines.append(
                "- promotion each study ran (the fraction of a rung promoted; the default is now a quarter): "
                + ", ".join(f"{a} {fraction_words(v)}" for a, v in sorted(rules.items()))
            )
    return "\n".join(lines)


def fraction_words(fraction: float) -> str:
    """``the top third (0.333)``: a promoted fraction as the README names it."""
    names = {0.333333: "the top third", 0.25: "the top quarter", 0.5: "the top half"}
    return f"{names.get(round(fraction, 6), 'the top')} ({fraction:.3g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run in minutes (numbers meaningless)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / ".equal-compute"), help="working folder (resumable)")
    p.add_argument("--mobilenet-budgets", type=float, nargs="*", default=[0.25, 0.5])
    p.add_argument("--resnet-budgets", type=float, nargs="*", default=[0.25])
    p.add_argument("--trials", type=int, default=30, help="trials per search (arms a and b)")
    p.add_argument("--trial-steps", type=int, default=30, help="brief fine-tune steps per trial")
    p.add_argument("--trial-batch", type=int, default=64)
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--val-images", type=int, default=2000, help="val images each trial is read on at rung 0")
    p.add_argument("--epochs", type=float, default=2, help="final fine-tune epochs of every row (d gets more)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--samplers",
        nargs="*",
        choices=sorted(SAMPLER_ARMS),
        default=sorted(SAMPLER_ARMS),
        help="other samplers to run as b (arms e: gp, f: random); none to skip them",
    )
    p.add_argument(
        "--sampler-tracks",
        type=int,
        default=1,
        help="run the sampler arms on this many tracks, first first (default 1: MobileNetV2 at 25%%, the tight budget "
        "where the choice matters; each arm costs a search and its exports)",
    )
    p.add_argument(
        "--arms",
        default="".join(ARMS),
        help="the arms to export, e.g. abcef (default: all; d's and g's fine-tunes are the longest, and g needs d). "
        "The results show only these, and the verdicts those they can",
    )
    p.add_argument(
        "--exports-only",
        action="store_true",
        help="run the searches (cached) and the exports, and stop before the latency passes (which need a quiet "
        "machine) and before writing the section",
    )
    p.add_argument(
        "--searches-only", action="store_true", help="run every arm's search (quiet machine) and stop before exports"
    )
    p.add_argument("--render", action="store_true", help="only rewrite the section from benchmarks/equal_compute.json")
    args = p.parse_args()
    out = ROOT / "benchmarks" / "equal_compute.json"
    if args.render:
        write_section(SECTION, render(json.loads(out.read_text())))
        return
    if set(args.arms) - set(ARMS):  # before hours of searches, not after them
        sys.exit(f"error: --arms takes letters of {''.join(ARMS)}, not {args.arms!r}")
    if not DATA.is_dir() or not RESNET_WEIGHTS.is_file():
        sys.exit(f"error: this benchmark needs {DATA} and {RESNET_WEIGHTS} (the shared CIFAR-10 material); not found")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = plan_of(args)
    work = Path(args.work if not args.quick else str(Path(args.work).with_name(".equal-compute-quick")))
    started = time.perf_counter()
    carry = not args.quick  # the full run takes several sessions: what they need is kept in tracked files too
    bench = Bench(plan, work, mirror=MIRROR if carry else None, studies_mirror=STUDIES_MIRROR if carry else None)
    log(f"plan {plan}")
    samplers = tuple(args.samplers)
    # Every search first (they time latency: a quiet machine), then the exports, which only train and can share it.
    tracks = [
        search_track(bench, model, fraction, samplers if i < args.sampler_tracks else ())
        for i, (model, fraction) in enumerate(plan.tracks)
    ]
    if args.searches_only:
        log("--searches-only: every search is done; the exports and the latency passes are the next run's")
        return
    tracks = [export_track(bench, t, args.arms) for t in tracks]
    if args.exports_only:
        for t in tracks:
            for r in t["rows"]:
                if "mean" in r:
                    tops = ", ".join(f"{100 * x:.2f}" for x in r["top1"])
                    log(f"{t['model']} at {t['fraction']:g}: {r['row']}: test top-1 {100 * r['mean']:.2f}% "
                        f"(seeds {tops}; spread {100 * r['spread']:.2f} pp)")  # fmt: skip
        log("--exports-only: the exports are cached; the latency passes and the section are the next run's")
        return
    for t in tracks:  # an export finished on an earlier machine left its results but not its file
        for r in t["rows"]:
            if "onnx" in r:
                r["onnx"], r["stand_in"] = timed_file(bench.work, bench.studies, r["study"], r["trial"], r["onnx"])
    measure_latencies(bench, tracks)
    result = {
        "plan": asdict(plan),
        "arms": ARMS,
        "tracks": tracks,
        "seconds": time.perf_counter() - started,
        "computed": bench.computed,
        "reused": bench.reused,
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
    }
    log(f"done in {result['seconds'] / 60:.1f} min; reused {len(bench.reused)} cached results")
    text = render(result)
    if args.quick:
        print(json.dumps(result, indent=1, default=str))
        print(text)
        return
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(SECTION, text)


if __name__ == "__main__":
    main()

"""Benchmark: trials per hour with 1 worker versus 2 workers on this machine, in one run.

Runs the same small study twice, back to back, against a PostgreSQL server on 127.0.0.1
(started with ``.ci/postgres.sh``; each run gets a fresh database):

1. ``cli.py search ...``               one worker, unpinned (PyTorch uses every core), and
2. ``cli.py search ... --workers 2``   two workers, each pinned to one core.

Both use the same baseline (trained once here first, passed with ``--weights``), settings and
seed, so the random start-up policies are the same trials in both runs. Throughput is trials
over the span from the first trial's start to the last trial's end, read from the study; each
trial's phase timings show where the time goes. Writes ``benchmarks/workers.json`` and the
"Workers" section of BENCHMARKS.md.

    python benchmarks/workers.py            # about 10 minutes on the 2-core dev machine
    python benchmarks/workers.py --smoke    # a minute: checks the script, writes nothing
    python benchmarks/workers.py --render   # rewrite the section from workers.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from search.data.loading import load_dataset  # noqa: E402
from search.data.spec import DataSpec  # noqa: E402
from search.measuring.hardware import fingerprint, git_revision, package_versions  # noqa: E402
from search.training.baseline import prepare_baseline  # noqa: E402

SIZES = {"trials": 12, "input_size": 64, "finetune_steps": 30}
SMOKE = {"trials": 5, "input_size": 32, "finetune_steps": 2}
"""``--smoke``: checks the script end to end in about a minute and writes nothing."""


def _settings(sizes: dict[str, int]) -> list[str]:
    return [
        "--budget-ms", "1000",  # every pruned policy is within budget, so every trial fine-tunes
        "--input-size", str(sizes["input_size"]),
        "--finetune-steps", str(sizes["finetune_steps"]),
        "--finetune-batch", "32",  # the batch its recorded numbers were measured at (the default is 64 since)
        "--trials", str(sizes["trials"]),
    ]  # fmt: skip


def _server() -> str:
    out = subprocess.run(["bash", str(ROOT / ".ci" / "postgres.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().split("=", 1)[1]


def _fresh_database(server: str) -> str:
    url = sqlalchemy.make_url(server)
    name = f"bench_workers_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_database(server: str, url: str) -> None:
    engine = sqlalchemy.create_engine(sqlalchemy.make_url(server), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{sqlalchemy.make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


def _wait_for_quiet(limit: float = 0.8, patience: float = 180.0) -> None:
    """Give other work on the machine a few minutes to finish, so both runs start on an idle machine."""
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        time.sleep(5)


def _run(label: str, args: list[str], url: str, log: Path) -> dict[str, Any]:
    _wait_for_quiet()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "cli.py", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    study = optuna.load_study(study_name="bench", storage=url)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    span = (last - first).total_seconds()
    tuned = [t for t in trials if t.user_attrs.get("fine_tuned")]

    def mean_phase(name: str) -> float:
        values = [t.user_attrs["seconds"][name] for t in trials if name in t.user_attrs.get("seconds", {})]
        return round(statistics.fmean(values), 2) if values else 0.0

    per_trial = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {
        "label": label,
        "exit_code": code,
        "command": "python cli.py " + " ".join(a if "://" not in a else "postgresql://..." for a in args),
        "wall_seconds": round(wall, 1),
        "trials": len(trials),
        "fine_tuned": len(tuned),
        "trial_span_seconds": round(span, 1),
        "trials_per_hour": round(len(trials) / span * 3600, 1),
        "mean_trial_seconds": round(statistics.fmean(per_trial), 2),
        "mean_phase_seconds": {p: mean_phase(p) for p in ("prune", "latency", "bn_recalibration", "evaluate")}
        | {"finetune": mean_phase("finetune")},
        "finetune_images_per_second": round(
            statistics.fmean(t.user_attrs["finetune"]["images_per_second"] for t in tuned), 1
        )
        if tuned
        else None,
        "latency_ratio_of_uniform_0.5": next(
            (
                t.user_attrs["latency"]["ratio"]
                for t in trials
                if t.user_attrs.get("recipe", "").startswith("uniform 0.5")
            ),
            None,
        ),
        "workers": {
            ",".join(map(str, cpus)): {
                "trials": sum(1 for t in trials if tuple(t.user_attrs["worker"]["cpus"]) == cpus),
                "first_trial_after_seconds": round(
                    min(
                        (t.datetime_start - first).total_seconds()
                        for t in trials
                        if tuple(t.user_attrs["worker"]["cpus"]) == cpus
                    ),
                    1,
                ),
            }
            for cpus in sorted({tuple(t.user_attrs["worker"]["cpus"]) for t in trials})
        },
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }


def _section(result: dict[str, Any]) -> str:
    one, two = result["runs"]
    sizes = result["settings"]
    split = ", ".join(
        f"CPU {cpus}: {w['trials']} (first trial after {w['first_trial_after_seconds']:.0f} s)"
        for cpus, w in two["workers"].items()
    )
    speedup = result["speedup"]
    p1, p2 = one["mean_phase_seconds"], two["mean_phase_seconds"]
    return f"""`python benchmarks/workers.py` ({result["date"]}, {result["hardware"]["cpu"]}, {result["hardware"]["logical_cpus"]} logical CPUs):
the same study ({sizes["trials"]} trials of ResNet-18 on digits at {sizes["input_size"]}x{sizes["input_size"]}, {sizes["finetune_steps"]} fine-tune steps of
batch 32, budget 1000 ms so every pruned policy is fine-tuned, same baseline and seed) on a local PostgreSQL server,
run with one worker and then with `--workers 2`. Throughput counts trials over the span from the first trial's start
to the last one's end (setup excluded); wall time includes starting the processes and creating the study.

| run | trials/hour | mean s/trial (per worker) | fine-tune s | fine-tune img/s | latency s | prune s | wall s |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 1 worker (PyTorch on both cores) | {one["trials_per_hour"]} | {one["mean_trial_seconds"]} | {p1["finetune"]} | {one["finetune_images_per_second"]} | {p1["latency"]} | {p1["prune"]} | {one["wall_seconds"]} |
| 2 workers (one core each) | {two["trials_per_hour"]} | {two["mean_trial_seconds"]} | {p2["finetune"]} | {two["finetune_images_per_second"]} | {p2["latency"]} | {p2["prune"]} | {two["wall_seconds"]} |

Speed-up with 2 workers: **{speedup:.2f}x** trials/hour. Trials per worker in the 2-worker run: {split}.
Load average (1 min) when the runs started: {one["load_average_1min"]["before"]} and {two["load_average_1min"]["before"]}.

What limits it: {result["explanation"]}

Raw numbers: `benchmarks/workers.json`; worker logs are not kept.
"""


def _explain(one: dict[str, Any], two: dict[str, Any], speedup: float) -> str:
    """What the measured numbers say limits the speed-up (written from them, not assumed)."""
    slow = two["mean_trial_seconds"] / one["mean_trial_seconds"]
    p1, p2 = one["mean_phase_seconds"], two["mean_phase_seconds"]
    delay = max((w["first_trial_after_seconds"] for w in two["workers"].values()), default=0.0)
    parts = [
        f"two workers would give 2x if each ran a trial as fast as one worker alone. Here a trial took "
        f"{one['mean_trial_seconds']:.1f} s alone and {two['mean_trial_seconds']:.1f} s on each of two pinned "
        f"workers ({slow:.2f}x), which by itself allows {2 / slow:.2f}x."
    ]
    if slow > 1.05:
        parts.append(
            f" The slowdown is in the phases PyTorch runs on every core it has: alone, a worker fine-tunes "
            f"with both cores ({one['finetune_images_per_second']} img/s, {p1['finetune']} s a trial) and a pinned "
            f"worker with one ({two['finetune_images_per_second']} img/s, {p2['finetune']} s); BatchNorm "
            f"recalibration and evaluation likewise ({p1['bn_recalibration'] + p1['evaluate']:.1f} s against "
            f"{p2['bn_recalibration'] + p2['evaluate']:.1f} s). On two cores the two workers mostly split the same "
            f"compute that one worker already had."
        )
    else:
        parts.append(
            f" A pinned worker was not slower per trial than the lone one (fine-tune {p2['finetune']} s against "
            f"{p1['finetune']} s): PyTorch's two threads in the lone worker gain little over one on this machine "
            f"(they wait on each other and on anything else running; load average "
            f"{one['load_average_1min']['before']} when it started)."
        )
    parts.append(
        f" What the second worker does win is the single-threaded part of a trial, during which a lone worker "
        f"leaves a core idle: the latency phase (ONNX export, then timing on one ONNX Runtime thread: "
        f"{p1['latency']} s alone, {p2['latency']} s pinned) and channel pruning ({p1['prune']} s, {p2['prune']} s); "
        f"here they are only {(p1['latency'] + p1['prune']) / one['mean_trial_seconds']:.0%} of a lone trial."
    )
    if speedup < 2 / slow - 0.05:
        parts.append(
            f" The rest of the gap ({speedup:.2f}x measured against {2 / slow:.2f}x) is start-up and the tail: the "
            f"second worker starts only after the first has created the study, and ran its first trial {delay:.0f} s "
            f"after the first worker's; and the last trial runs alone."
        )
    busy = max(one["load_average_1min"]["before"], two["load_average_1min"]["before"])
    if busy > 1.0:
        parts.append(
            f" Caution: the machine was not idle (load average {one['load_average_1min']['before']} and "
            f"{two['load_average_1min']['before']} when the runs started), which slows an unpinned worker's "
            f"multi-threaded PyTorch far more than pinned single-threaded workers, so treat these numbers as noisy."
        )
    parts.append(
        " Memory bandwidth and the shared L3 cache are shared too. More machines (one worker each on the same "
        "storage URL) do not share cores, so each should add close to one worker's throughput (not measured here: "
        "one machine)."
    )
    return "".join(parts)


def main() -> None:
    if "--render" in sys.argv[1:]:  # rewrite the section from workers.json, without measuring again
        result = json.loads((ROOT / "benchmarks" / "workers.json").read_text())
        result["explanation"] = _explain(*result["runs"], result["speedup"])
        (ROOT / "benchmarks" / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
        write_section("Workers", _section(result))
        return
    smoke = "--smoke" in sys.argv[1:]
    sizes = SMOKE if smoke else SIZES
    server = _server()
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        data = load_dataset(DataSpec("digits", input_size=sizes["input_size"]))
        baseline = prepare_baseline("resnet18", None, data, cache_dir=studies / "cache", epochs=1)
        runs = []
        for label, extra in (("1 worker", []), ("2 workers", ["--workers", "2"])):
            url = _fresh_database(server)
            args = [
                "search",
                *_settings(sizes),
                "--weights",
                baseline.weights,
                "--storage",
                url,
                "--study",
                "bench",
                "--studies-dir",
                str(studies / label.replace(" ", "-")),
                *extra,
            ]
            try:
                runs.append(_run(label, args, url, Path(tmp) / f"{label}.log"))
            finally:
                _drop_database(server, url)
            log = (Path(tmp) / f"{label}.log").read_text()
            print(f"{label}: {json.dumps(runs[-1])}", flush=True)
            if runs[-1]["exit_code"] != 0:
                print(log[-3000:], file=sys.stderr)
    one, two = runs
    speedup = two["trials_per_hour"] / one["trials_per_hour"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(),
        "hardware": fingerprint(1),
        "versions": package_versions(),
        "settings": sizes,
        "runs": runs,
        "speedup": round(speedup, 3),
    }
    result["explanation"] = _explain(one, two, speedup)
    if smoke:
        print(_section(result))
        return
    (ROOT / "benchmarks" / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section("Workers", _section(result))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: the equal-compute searches' fronts timed again, as ``search --confirm-repeats`` now ends (issue #25).

Equal compute's picks (BENCHMARKS.md "Equal compute") were timed within the 0.25 budget by their
searches and 1-7% above it later, in processes of their own. This runs what a search now does at its
end (:func:`search.study.confirm.confirm_front`: every trial on the front within the budget timed
``--repeats`` more times, each in a fresh timing process) on a copy of each finished study, and
reports what the recommendation becomes: the same pick, a pick flagged at the budget's edge, or
another pick once the first is over the budget. Beside it, the latency equal compute's final passes
measured for the old pick (5 passes in one process of its own, interleaved with the baseline).

Run on a quiet machine (it times latency): ``python benchmarks/confirm_edge.py``. Writes
``benchmarks/confirm_edge.json`` and the BENCHMARKS.md section "Front timed again". The studies'
copies live under ``benchmarks/.confirm-edge`` (a rerun starts from fresh copies).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from search.measuring.candidate import CandidateMeter  # noqa: E402
from search.measuring.hardware import cpu_model, git_revision  # noqa: E402
from search.measuring.isolated import IsolatedTimer  # noqa: E402
from search.measuring.quantize import QuantizeSettings  # noqa: E402
from search.measuring.timing import LatencySettings  # noqa: E402
from search.progress import NullReporter  # noqa: E402
from search.shipping.rebuild import load_study_baseline  # noqa: E402
from search.study.confirm import confirm_front  # noqa: E402
from search.study.front import Row, recommendation, rows  # noqa: E402

STUDIES = [ROOT / "benchmarks" / ".equal-compute" / "studies", ROOT / "benchmarks" / "equal_compute" / "studies"]
RESULTS = ROOT / "benchmarks" / "equal_compute.json"
WORK = ROOT / "benchmarks" / ".confirm-edge"
OUT = ROOT / "benchmarks" / "confirm_edge.json"
ARMS = {  # study -> the equal-compute arm it is
    "mobilenet_v2_cifar-0.25x": "a",
    "mobilenet_v2_cifar-0.25x-b": "b",
    "mobilenet_v2_cifar-0.25x-b-random": "c",
    "mobilenet_v2_cifar-0.25x-e": "e",
    "mobilenet_v2_cifar-0.25x-f": "f",
}

optuna.logging.set_verbosity(optuna.logging.ERROR)


class _Log(NullReporter):
    def info(self, message: str) -> None:
        log(message)

    def warn(self, message: str) -> None:
        log(f"warning: {message}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _final_passes() -> dict[tuple[str, int], float]:
    """(study, trial) -> the latency fraction equal compute's final passes measured for that row."""
    if not RESULTS.exists():
        return {}
    found = {}
    for track in json.loads(RESULTS.read_text()).get("tracks", []):
        for row in track.get("rows", []):
            if row.get("latency_fraction") is not None:
                found[(row["study"], int(row["trial"]))] = float(row["latency_fraction"])
    return found


def _pick(r: Row | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"trial": r.number, "ratio": round(r.ratio, 5), "accuracy": r.accuracy, "repeats": list(r.latency_repeats)}


def run_one(name: str, source: Path, repeats: int, finals: dict[tuple[str, int], float]) -> dict[str, Any]:
    copy = WORK / f"{name}.db"
    shutil.copyfile(source, copy)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{copy}")
    attrs = study.user_attrs
    budget = float(attrs["budget_ms"]) / float(attrs["baseline_latency_ms"])
    before = recommendation(rows(study))
    base = load_study_baseline(study)
    config = attrs["config"]
    meter = CandidateMeter(
        base.model,
        base.data,
        timer=IsolatedTimer(LatencySettings(threads=base.threads, runtime=config.get("runtime", "onnxruntime"))),
        quantize=QuantizeSettings.from_dict(config),  # the study's calibration settings, as its search used
        baseline_ms=float(attrs["baseline_latency_ms"]),
    )
    started = time.perf_counter()
    timed = confirm_front(study, meter, _Log(), repeats)
    seconds = time.perf_counter() - started
    all_rows = rows(study)
    after = recommendation(all_rows)
    old = None if before is None else before.pick.number
    return {
        "study": name,
        "arm": ARMS.get(name),
        "budget_fraction": round(budget, 5),
        "before": _pick(None if before is None else before.pick),
        "before_final_passes": None if old is None else finals.get((name, old)),
        "before_timed_again": next((_pick(r) for r in all_rows if r.number == old), None),
        "after": _pick(None if after is None else after.pick),
        "after_at_edge": bool(after and after.pick.at_edge),
        "over_when_timed_again": sorted(r.number for r in all_rows if r.over_when_timed_again),
        "timed_again": timed,
        "seconds": round(seconds, 1),
    }


def _top1(pick: dict[str, Any]) -> str:
    return f"{pick['accuracy']:.1%}" if pick.get("accuracy") is not None else "-"


def render(results: list[dict[str, Any]], repeats: int) -> str:
    lines = [
        f"`benchmarks/confirm_edge.py` on {cpu_model()}, {time.strftime('%Y-%m-%d')}: each equal-compute study at 25% "
        f"(copied), its front timed again as `search --confirm-repeats {repeats}` now ends (every trial on the front "
        "within the budget, each repeat in a fresh timing process, interleaved with the baseline; 1 thread). Ratios "
        "are of the baseline; the budget is 0.25 of the study's baseline.",
        "",
        "| arm | pick before (val top-1) | its search timing | its final passes (equal compute) | timed again "
        "(median; each) | pick after (val top-1, ratio) | at the edge | over when timed again | trials timed again, s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        before, again, after = r["before"] or {}, r["before_timed_again"] or {}, r["after"] or {}
        reps = ", ".join(f"{x:.3f}" for x in again.get("repeats", []))
        final = f"{r['before_final_passes']:.3f}" if r.get("before_final_passes") else "-"
        lines.append(
            f"| {r['arm']} | trial {before.get('trial')} ({_top1(before)}) | {before.get('ratio', 0):.3f} | {final} "
            f"| {again.get('ratio', 0):.3f} ({reps}) | trial {after.get('trial')} ({_top1(after)}, "
            f"{after.get('ratio', 0):.3f}) "
            f"| {'yes' if r['after_at_edge'] else 'no'} | {', '.join(map(str, r['over_when_timed_again'])) or '-'} "
            f"| {r['timed_again']}, {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only rewrite the section from the JSON")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one study, one repeat; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    if args.render:
        saved = json.loads(OUT.read_text())
        results, repeats = saved["results"], saved["repeats"]
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        finals = _final_passes()
        results = []
        for name in list(ARMS)[1:2] if args.quick else ARMS:
            source = next((d / f"{name}.db" for d in STUDIES if (d / f"{name}.db").exists()), None)
            if source is None:
                log(f"{name}: no study copy found; left out")
                continue
            log(f"{name}: timing its front again")
            results.append(run_one(name, source, args.repeats, finals))
            log(json.dumps(results[-1]))
        repeats = args.repeats
        if args.quick:
            print(render(results, repeats))
            log("--quick: nothing written")
            return
        OUT.write_text(
            json.dumps(
                {"results": results, "repeats": repeats, "cpu": cpu_model(), "git_revision": git_revision()}, indent=1
            )
        )
    from benchmarks.sections import write_section

    body = render(results, repeats)
    print(body)
    write_section("Front timed again", body)


if __name__ == "__main__":
    main()

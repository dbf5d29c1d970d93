"""Benchmark: how many promotions each rule would have made on the equal-compute studies, replayed (issue #25).

Asynchronous ASHA promotes a trial when it ranks in the top fraction of the trials finished *so far*; with
few finished, early trials go on and later ones displace them. This replays each committed study's rung-0
results in the order its trials finished, through :func:`search.study.rungs.promotable`, one worker promoting
before each next trial as ``search`` does, under each rule:

- ``plain ASHA``: the top fraction of the trials so far at every check (the search before this benchmark);
- ``eager share 1/2``: while trials still run, the best half of that fraction; the whole fraction once every
  trial has finished (the search now, :data:`search.study.rungs.EAGER_SHARE`);
- ``at the end only``: nothing while trials run, the top fraction after the last (synchronous halving);
- ``cap at planned/3``: plain ASHA, stopped once a third of the planned trials are promoted;
- ``a quarter, eager share``: the eager share with ``--promote-fraction 0.25`` instead of the third;
- ``a quarter, at least 2``: that, and at least two of a rung once every trial has finished
  (:data:`search.study.rungs.FEWEST_PROMOTED`; the search's default since 2026-12-07). The other rules have no
  minimum, as the searches they replay had none.

Every rule's promotions are a subset of plain ASHA's (each asks for the top of the same rankings at the same
moments, or less), so each rung-1 result a rule needs is in the study, and the rule's pick is read by the
product's own recommendation on the study with the other promotions removed. Seconds saved are the recorded
seconds of the promotions a rule drops; the search time is the study's own (creation to its last trial) less
those. What replay cannot show: a sampler that learns from rung 1 (since 761e3b7) would have proposed other
trials after a different promotion; the random arm (c) has no such path.

    python benchmarks/promotion_replay.py          # seconds; writes benchmarks/promotion_replay.json
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from allocation import study_seconds

from search.study.confirm import TIMING_CLAIM_PREFIX
from search.study.front import compare, recommendation, rows
from search.study.rungs import FEWEST_PROMOTED, RUNG_PREFIX, promotable, rung_key, stored_rungs

HERE = Path(__file__).resolve().parent
STUDIES = HERE / "equal_compute" / "studies"
SEARCHES = HERE / "searches"
"""Arm a's studies (no promotion), for the ratio of each search's time to today's search."""
RUNS = HERE / "promotion_rule" / "studies"
"""Real searches of one model and budget, the same day: without promotion (``-a2``) and with the eager share (``-b2``)."""
OUT = HERE / "promotion_replay.json"
RULES: dict[str, dict[str, Any]] = {
    # while: what is due while trials still run: the whole fraction, the eager share of it, or nothing
    "plain ASHA": {"while": "whole"},
    "eager share 1/2": {"while": "eager"},
    "at the end only": {"while": "none"},
    "cap at planned/3": {"while": "whole", "cap": True},
    "a quarter, eager share": {"while": "eager", "fraction": 0.25},
    "a quarter, at least 2": {"while": "eager", "fraction": 0.25, "fewest": FEWEST_PROMOTED},
}
_COPIES = tempfile.TemporaryDirectory(prefix="promotion-replay-")  # removed when the interpreter exits


def _open(db: Path) -> optuna.Study:
    copy = (
        Path(tempfile.mkdtemp(dir=_COPIES.name)) / db.name
    )  # the replay rewrites rung records: never the committed file
    shutil.copy(db, copy)
    url = f"sqlite:///{copy}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def _records(study: optuna.Study) -> dict[int, list[dict]]:
    """Each promoted trial's rung records, as the study stored them."""
    found = {t.number: stored_rungs(study.user_attrs, t.number) for t in study.get_trials(deepcopy=False)}
    return {n: r for n, r in found.items() if r}


def _eligible(study: optuna.Study) -> int:
    """Trials a promotion may take (complete, within the budget, not a copy): all of them, at a fraction of 1."""
    return len(promotable(study.get_trials(deepcopy=False), {}, (1,), 1.0, fewest=0))


def _replay(
    study: optuna.Study,
    real: dict[int, list[dict]],
    during: str,
    cap: int | None,
    fraction: float | None = None,
    fewest: int = 0,
) -> list[int]:
    """The trials a rule promotes, in order, when the study's trials finish as they did. ``during``: what is due
    while trials still run (``RULES``); ``fraction``: another ``--promote-fraction`` than the study's, no larger;
    ``fewest``: how many of a rung go on at least, once every trial has finished."""
    config = study.user_attrs["config"]
    steps = tuple(config["rungs"])
    fraction = float(config["promote_fraction"]) if fraction is None else fraction
    finished = sorted(
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.datetime_complete
    )
    # What the search saw while it ran: no rung records yet, and no front timed again (that comes after).
    attrs = {k: v for k, v in study.user_attrs.items() if not k.startswith((RUNG_PREFIX, TIMING_CLAIM_PREFIX))}
    promoted: list[int] = []
    for count in range(len(finished) + 1):
        last = count == len(finished)
        if not last and during == "none":
            continue
        while cap is None or len(promoted) < cap:
            final = last or during == "whole"
            due = [n for n, _ in promotable(finished[:count], attrs, steps, fraction, final=final, fewest=fewest)]
            missing = [n for n in due if not real.get(n)]
            assert not missing, f"rule promotes {missing}, which plain ASHA did not: not a subset"
            if not due:
                break
            promoted.append(due[0])
            attrs[rung_key(due[0])] = real[due[0]]
    return promoted


def _pick(study: optuna.Study, real: dict[int, list[dict]], promoted: list[int]) -> Any:
    for number, records in real.items():
        study.set_user_attr(rung_key(number), records if number in promoted else [])
    return recommendation(rows(study))


def _seconds(records: list[dict]) -> float:
    return sum(float(v) for r in records for v in (r.get("seconds") or {}).values())


def _today(name: str) -> float | None:
    """Arm a's search time for the same model and budget (the study without promotion)."""
    base = name.removesuffix("-random").rsplit("-", 1)[0]
    db = SEARCHES / f"{base}.db"
    return study_seconds(_open(db)) if db.is_file() else None


def replay_study(db: Path) -> dict[str, Any]:
    study = _open(db)
    real = _records(study)
    wall = study_seconds(study)
    today = _today(study.study_name)
    planned = int(study.user_attrs["config"]["trials"])
    eligible = _eligible(study)
    actual = _pick(study, real, list(real)).pick
    out: dict[str, Any] = {
        "study": study.study_name,
        "sampler": study.user_attrs["config"].get("sampler", "tpe"),
        "eligible_trials": eligible,
        "promoted_in_the_study": len(real),
        "search_seconds": round(wall, 1),
        "today_seconds": None if today is None else round(today, 1),
        "rules": {},
    }
    for label, rule in RULES.items():
        cap = math.floor(planned * float(study.user_attrs["config"]["promote_fraction"])) if rule.get("cap") else None
        promoted = _replay(study, real, rule["while"], cap, rule.get("fraction"), rule.get("fewest", 0))
        found = _pick(study, real, promoted)
        pick = found.pick
        dropped = _seconds([r for n, rs in real.items() if n not in promoted for r in rs])
        verdict = None if pick.number == actual.number else compare(actual, pick) or compare(pick, actual)
        out["rules"][label] = {
            "promoted": sorted(promoted),
            "promotions": len(promoted),
            "promotion_seconds": round(_seconds([r for n in promoted for r in real[n]]), 1),
            "search_seconds": round(wall - dropped, 1),
            "ratio_to_today": None if today is None else round((wall - dropped) / today, 2),
            "pick": pick.number,
            "pick_rung": pick.rung,
            "pick_accuracy": pick.accuracy,
            "same_pick": pick.number == actual.number,
            "tied_with_the_studys_pick": None if verdict is None else bool(verdict.tied),
        }
    return out


def real_runs() -> list[dict[str, Any]]:
    """The real searches in :data:`RUNS`: each one's time, training and pick (what replay cannot show)."""
    out = []
    for db in sorted(RUNS.glob("*.db")):
        study = _open(db)
        real = _records(study)
        found = recommendation(rows(study))
        pick = None if found is None else found.pick
        out.append(
            {
                "study": study.study_name,
                "revision": study.user_attrs.get("git_revision"),
                "search_seconds": round(study_seconds(study), 1),
                "creation_seconds": study.user_attrs.get("creation_seconds"),
                "eligible_trials": _eligible(study),
                "promoted": sorted(real),
                "promotion_seconds": round(_seconds([r for rs in real.values() for r in rs]), 1),
                "pick": None if pick is None else pick.number,
                "pick_rung": None if pick is None else pick.rung,
                "pick_accuracy": None if pick is None else pick.accuracy,
                "tied": [] if found is None else [v.other.number for v in found.tied],
            }
        )
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| study | rule | promoted | promotion s | search s | x today | pick (rung-1 top-1) | vs the study's pick |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, x in r["rules"].items():
            versus = "same" if x["same_pick"] else ("tied" if x["tied_with_the_studys_pick"] else "differs")
            ratio = "-" if x["ratio_to_today"] is None else f"{x['ratio_to_today']:.2f}"
            lines.append(
                f"| {r['study']} | {label} | {x['promotions']} of {r['eligible_trials']} | {x['promotion_seconds']:.0f} "
                f"| {x['search_seconds']:.0f} | {ratio} | trial {x['pick']} ({x['pick_accuracy']:.2%}) | {versus} |"
            )
    return "\n".join(lines)


def real_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| study | set-up s | promoted | promotion s | search s | pick | tied with the most accurate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        setup = (r["creation_seconds"] or {}).get("total", "-")
        pick = "-" if r["pick"] is None else f"trial {r['pick']} ({r['pick_accuracy']:.2%}, rung {r['pick_rung']})"
        tied = ", ".join(str(n) for n in r["tied"]) or "-"
        lines.append(
            f"| {r['study']} | {setup} | {len(r['promoted'])} of {r['eligible_trials']} | {r['promotion_seconds']:.0f} "
            f"| {r['search_seconds']:.0f} | {pick} | {tied} |"
        )
    return "\n".join(lines)


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = [replay_study(db) for db in sorted(STUDIES.glob("*.db"))]
    results = [r for r in results if r["promoted_in_the_study"]]
    for r in results:  # plain ASHA replayed must give what the search did, or the replay measures nothing
        assert r["rules"]["plain ASHA"]["promotions"] == r["promoted_in_the_study"], r["study"]
    runs = real_runs()
    OUT.write_text(json.dumps({"replayed": results, "real_runs": runs}, indent=1) + "\n")
    print(table(results))
    print()
    print(real_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

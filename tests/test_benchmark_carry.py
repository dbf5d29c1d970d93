"""The long benchmarks carry their results and search databases between machines (benchmarks/carry.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.carry import ResultsCache, carry_study


def test_a_new_machine_starts_from_the_tracked_results_and_the_work_folder_wins(tmp_path: Path) -> None:
    mirror = tmp_path / "tracked.json"
    mirror.write_text(json.dumps({"export a": 1, "export b": 2}))
    work = tmp_path / "work"
    (work).mkdir()
    (work / "results.json").write_text(json.dumps({"export b": 3}))  # newer here than in the tracked copy
    cache = ResultsCache(work, mirror)
    assert cache.data == {"export a": 1, "export b": 3}
    cache.data["export c"] = 4
    cache.save()
    for path in (work / "results.json", mirror):
        assert json.loads(path.read_text()) == {"export a": 1, "export b": 3, "export c": 4}
    assert not list(tmp_path.rglob("*.partial"))
    fresh = ResultsCache(tmp_path / "new-machine", mirror)  # the work folder vanished with the machine
    assert fresh.data == {"export a": 1, "export b": 3, "export c": 4}


def test_a_search_database_is_kept_and_put_back_where_the_work_folder_lost_it(tmp_path: Path) -> None:
    studies, mirror = tmp_path / "work" / "studies", tmp_path / "tracked"
    studies.mkdir(parents=True)
    (studies / "s.db").write_bytes(b"trials")
    carry_study(studies, "s", mirror)
    assert (mirror / "s.db").read_bytes() == b"trials"
    (studies / "s.db").unlink()
    carry_study(studies, "s", mirror)
    assert (studies / "s.db").read_bytes() == b"trials"
    carry_study(studies, "other", mirror)  # neither has it: nothing happens
    assert not (studies / "other.db").exists() and not (mirror / "other.db").exists()
    carry_study(studies, "s", None)  # no mirror (--quick): nothing is kept


def test_a_study_made_from_another_takes_its_settings_but_none_of_its_promotions() -> None:
    from benchmarks.allocation import study_settings

    attrs = {
        "budget_ms": 0.3,
        "baseline_latency_ms": 1.2,
        "latency_aware": {"table": 1},
        "rung:23": [{"rung": 1}],
        "promotion:23:1": {"state": "done", "pid": 4383},
    }
    # b's claims copied into c, all marked done, kept c from ever promoting its trials of the same numbers
    assert study_settings(attrs) == {"budget_ms": 0.3, "baseline_latency_ms": 1.2}


def _hold_claim(work: str, key: str, started: Any, release: Any) -> None:
    cache = ResultsCache(Path(work))
    with cache.claim(key, wait=False) as held:
        assert held
        started.set()
        release.wait(30)
        cache.data[key] = "computed by the other run"
        cache.save()


def test_two_runs_sharing_a_work_folder_split_the_work_and_keep_both_results(tmp_path: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started, release = context.Event(), context.Event()
    other = context.Process(target=_hold_claim, args=(str(tmp_path), "export a", started, release))
    other.start()
    try:
        assert started.wait(60)
        cache = ResultsCache(tmp_path)
        with cache.claim("export a", wait=False) as held:
            assert not held  # the other run has it: this one moves on
        with cache.claim("export b", wait=False) as held:
            assert held
            cache.data["export b"] = "computed here"
            cache.save()
        release.set()
        with cache.claim("export a", wait=True) as held:  # waits for the other run, then sees its result
            assert held and cache.data["export a"] == "computed by the other run"
    finally:
        release.set()
        other.join(60)
    assert other.exitcode == 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == {
        "export a": "computed by the other run",
        "export b": "computed here",
    }  # neither save lost the other's


def test_the_partial_recovery_section_groups_the_seeds_into_rows_against_todays_export() -> None:
    from benchmarks.recovery import rows_so_far

    done = {
        "export s-0.25x 26 K1 W0 seed 0 epochs 3": {"top1": 0.83},
        "export s-0.25x 26 K1 W0 seed 1 epochs 3": {"top1": 0.82},
        "export s-0.25x 26 K2 W0 seed 0 epochs 3": {"top1": 0.81},
        "export s-0.25x 26 K1 W1 seed 0 epochs 10": {"top1": 0.86},  # no today's row at 10 epochs yet
        "export s-int8 9 K1 W0 qat seed 0 epochs 3": {"top1": 0.80},
    }
    lines = rows_so_far(done)
    assert "| s-0.25x 26 | K1 W0 | 3 | 2 | 82.50% | 1.00 pp | +0.00 pp |" in lines
    assert "| s-0.25x 26 | K2 W0 | 3 | 1 | 81.00% | 0.00 pp | -1.50 pp |" in lines
    assert "| s-0.25x 26 | K1 W1 | 10 | 1 | 86.00% | 0.00 pp | - |" in lines
    assert "| s-int8 9 | K1 W0 qat | 3 | 1 | 80.00% | 0.00 pp | - |" in lines


def test_the_recovery_verdicts_judge_the_gain_at_equal_epochs_and_say_whether_it_lasts() -> None:
    from dataclasses import asdict

    from benchmarks.recovery import Recipe, verdicts

    def row(label: str, k: int, w: float, epochs: float, tops: list[float]) -> dict[str, Any]:
        recipe = asdict(Recipe(label, prune_steps=k, feature_distill=w))  # as the benchmark records it
        mean = sum(tops) / len(tops)
        return {"row": label, "recipe": recipe, "epochs": epochs, "seeds": list(range(len(tops)))} | {
            "mean": mean,
            "spread": max(tops) - min(tops),
        }

    rows = [
        row("today", 1, 0, 3, [0.830, 0.826]),
        row("K2", 2, 0, 3, [0.816, 0.815]),
        row("W3", 1, 3, 3, [0.841, 0.838]),
        row("today", 1, 0, 10, [0.850]),
        row("W3", 1, 3, 10, [0.856]),
    ]
    got = verdicts([{"model": "mobilenet_v2_cifar", "fraction": 0.25, "rows": rows}])
    assert got[0].startswith("mobilenet_v2_cifar at 25%: W3 +1.15 pp") and "; met (" in got[0]
    assert got[1] == (
        "mobilenet_v2_cifar at 25% at 10 epochs: W3 +0.60 pp against today's export (1 seed; 85.00% and 85.60%)"
    )
    rows[2] = row("W3", 1, 3, 3, [0.836, 0.830])  # +0.5 pp: short of the 1 pp target
    assert "; missed (" in verdicts([{"model": "mobilenet_v2_cifar", "fraction": 0.25, "rows": rows[:3]}])[0]


def test_the_recovery_section_names_a_track_left_out_and_the_longer_rows_not_run() -> None:
    from benchmarks.recovery import render

    rows = [
        {"row": "today", "recipe": {"prune_steps": 1, "feature_distill": 0, "quantization": None}, "epochs": 3}
        | {"seeds": [0], "mean": 0.83, "spread": 0.0, "finetune_seconds": 600, "runs": [{"top1": 0.83}]}
    ]
    result = {
        "date": "2026-12-06",
        "git_revision": "abc",
        "hardware": {"cpu": "x"},
        "tracks": [
            {"model": "m", "fraction": 0.25, "rows": rows, "long_note": "the longer rows were not run this time"},
            {"model": "r", "fraction": 0.25, "rows": [], "note": "not run this time (`--no-resnet`)"},
        ],
    }
    body = render(result)
    assert "(the longer rows were not run this time)" in body
    assert "**r at 25%**\n\nnot run this time (`--no-resnet`)" in body


def test_the_int8_verdict_compares_qat_with_ptq_against_the_fp32_export_and_seed_by_seed() -> None:
    from benchmarks.recovery import verdicts

    def row(mode: str, tops: list[float], fp32: list[float]) -> dict[str, Any]:
        runs = [{"top1": t, "fp32_top1": f} for t, f in zip(tops, fp32, strict=True)]
        recipe = {"prune_steps": 1, "feature_distill": 3, "quantization": mode}
        return {"row": mode, "recipe": recipe, "epochs": 3, "seeds": [0, 1], "runs": runs} | {
            "mean": sum(tops) / 2,
            "spread": max(tops) - min(tops),
        }

    track = {"model": "m", "fraction": 0.25, "precision": "int8"}
    ptq = row("ptq", [0.8559, 0.8249], [0.8556, 0.8243])  # PTQ loses nothing: QAT need only not fall below it
    got = verdicts([track | {"rows": [ptq, row("qat", [0.8570, 0.8240], [0.85, 0.82])]}])
    assert got == [
        "m at 25%, INT8: PTQ -0.05 pp and QAT -0.06 pp below the FP32 export's top-1 (QAT - PTQ seed by seed: "
        "+0.11, -0.09 pp); met (QAT within 0.3 pp where PTQ loses more, never below PTQ)"
    ]
    assert "; missed" in verdicts([track | {"rows": [ptq, row("qat", [0.8530, 0.8240], [0.85, 0.82])]}])[0]

"""Every space file turns a trial into a policy that round-trips through JSON and enqueue params."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.errors import UsageError
from search.pruning.policy import Policy
from search.pruning.space import SPACES_DIR, default_space_path, load_space

SPACE_FILES = sorted(SPACES_DIR.glob("*.toml"))


def test_spaces_folder_has_one_file_per_family() -> None:
    names = {p.stem for p in SPACE_FILES}
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v2_cifar", "generic"} <= names


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_space_file_turns_a_fixed_trial_into_a_policy(path: Path) -> None:
    space = load_space(path)
    for ratio in (0.0, *space.uniform_ratios):
        policy = space.uniform(ratio)
        params = space.params_for(policy)
        # Only the space calls suggest_*: FixedTrial replays exactly the enqueued parameters.
        suggested = space.suggest(optuna.trial.FixedTrial(params))
        assert suggested == policy
        assert Policy.from_json(suggested.to_json()) == suggested


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_space_samples_within_its_ranges(path: Path) -> None:
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial = study.ask()
        policy = space.suggest(trial)
        for stage in space.stages:
            chosen = policy.stages[stage.name]
            assert stage.stream.low <= chosen.stream <= stage.stream.high
            assert stage.inner.low <= chosen.inner <= stage.inner.high
            assert chosen.criterion in stage.criteria
        assert policy.round_to in space.round_to
        study.tell(trial, 0.0)


def test_default_space_for_families() -> None:
    assert default_space_path("resnet18").name == "resnet18.toml"
    assert default_space_path(None).name == "generic.toml"


def test_small_input_mobilenet_v2_finds_its_own_file_and_prunes_inner_and_stream_per_stage() -> None:
    import torch

    from search.models.build import build_model
    from search.pruning.auto_space import space_for
    from search.pruning.channels import apply_policy

    example = torch.randn(1, 3, 32, 32)
    space = space_for("mobilenet_v2_cifar", None, 10, example)
    assert Path(space.path).name == "mobilenet_v2_cifar.toml", "its own file, not the full-size model's"
    assert Path(space_for("resnet18_cifar", None, 10, example).path).name == "resnet18.toml", "else the arch's"
    names = [s.name for s in space.stages]
    assert names == ["c16", "c24", "c32", "c64", "c96", "c160", "head"]
    pruned = apply_policy(build_model("mobilenet_v2_cifar", 10), space.uniform(0.35), space, example)
    for stage in space.stages:  # every range the file opens removes channels of that kind there
        for kind in ("stream", "inner"):
            opened = not getattr(stage, kind).fixed
            assert (pruned.removed.get(f"{stage.name}.{kind}", 0) > 0) == opened, (stage.name, kind, pruned.removed)
    assert pruned.channels["features.3.conv.0.0"] < 144 and pruned.channels["features.3.conv.2"] < 24


def test_bad_space_files_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        "nostages.toml": 'family = "x"\n',
        "badrange.toml": "[stages.layer1]\nstream = [0.5, 0.2]\n",
        "badcrit.toml": '[stages.layer1]\ncriteria = ["l3"]\n',
        "unknown.toml": "[stages.layer1]\nratio = 0.3\n",
        "syntax.toml": "[stages.layer1\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UsageError) as err:
            load_space(path)
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="does not exist"):
        load_space(tmp_path / "missing.toml")


def test_budget_matched_uniform_finds_the_least_pruned_ratio_within_the_budget() -> None:
    from search.pruning.recipes import budget_matched, uniform_grid

    space = load_space(SPACES_DIR / "resnet18.toml")
    measured: list[float] = []

    def ratio_of(policy):  # latency falling with the pruned fraction, with an uneven step at 0.4
        r = policy.stages["layer2"].stream
        measured.append(r)
        return 1.0 - r if r < 0.4 else 0.45 - (r - 0.4)

    grid = uniform_grid(space, "fp32")
    r, policy, ratio = budget_matched(grid, 0.5, ratio_of)
    assert r == pytest.approx(0.4) and policy.stages["layer2"].stream == 0.4 and ratio == 0.45
    assert len(measured) <= 5, "bisection, not a scan of the whole grid"
    assert budget_matched(grid, 0.01, ratio_of) is None, "even the most pruned uniform is too slow"


def test_start_up_samples_near_the_budget_use_most_of_it_and_vary_the_anchor() -> None:
    from search.pruning.near_budget import NEAR_BUDGET_ATTEMPTS, NEAR_BUDGET_FLOOR, near_budget

    space = load_space(SPACES_DIR / "resnet18.toml")
    anchor = space.uniform(0.4)
    calls: list[float] = []

    def ratio_of(policy):  # latency falling with the mean prune ratio
        mean = sum(s.stream + s.inner for s in policy.stages.values()) / (2 * len(policy.stages))
        calls.append(mean)
        return 1.0 - 1.2 * mean

    found = near_budget(space, [anchor], 0.5, ratio_of, seed=1)
    assert 1 <= len(found) <= 3 and len(calls) <= NEAR_BUDGET_ATTEMPTS
    for policy in found:
        assert NEAR_BUDGET_FLOOR * 0.5 <= ratio_of(policy) <= 0.5
        assert policy != anchor and "random" not in {s.criterion for s in policy.stages.values()}
    assert found == near_budget(space, [anchor], 0.5, ratio_of, seed=1), "reproducible from the seed"
    assert near_budget(space, [], 0.5, ratio_of, seed=1) == []


def test_the_tables_estimate_spares_measuring_start_up_draws_far_from_the_budget() -> None:
    from search.pruning.near_budget import ESTIMATE_MARGIN, NEAR_BUDGET_FLOOR, near_budget

    space = load_space(SPACES_DIR / "resnet18.toml")
    anchor = space.uniform(0.4)
    low, high = NEAR_BUDGET_FLOOR * 0.5 * (1 - ESTIMATE_MARGIN), 0.5 * (1 + ESTIMATE_MARGIN)

    def mean_ratio(policy):
        return sum(s.stream + s.inner for s in policy.stages.values()) / (2 * len(policy.stages))

    def run(estimate):
        calls: list[float] = []

        def ratio_of(policy):  # latency falling with the mean prune ratio; the anchor's was measured before
            if policy != anchor:
                calls.append(mean_ratio(policy))
            return 1.0 - 1.2 * mean_ratio(policy)

        return near_budget(space, [anchor], 0.5, ratio_of, seed=3, estimate=estimate), calls

    plain, plain_calls = run(None)
    # An estimate right up to a constant factor (which the anchor's own measurement calibrates away).
    filtered, filtered_calls = run(lambda policy: 0.7 * (1.0 - 1.2 * mean_ratio(policy)))
    assert any(not low <= 1.0 - 1.2 * c <= high for c in plain_calls), "without it some are measured far off"
    assert len(filtered) >= len(plain) and len(filtered_calls) < len(plain_calls)
    assert all(low <= 1.0 - 1.2 * c <= high for c in filtered_calls), "only draws near the band are measured"
    # No estimate for the anchor (the tables were not measured): the plain search, draw for draw.
    assert run(lambda policy: None) == (plain, plain_calls)


def test_int8_anchors_calibrate_the_estimate_of_int8_draws_only() -> None:
    from search.pruning.near_budget import estimate_scale

    space = load_space(SPACES_DIR / "resnet18.toml").with_precisions(["fp32", "int8"])
    anchors = [space.uniform(0.4), space.uniform(0.5), space.uniform(0.3, precision="int8")]
    measured = {a.key(): m for a, m in zip(anchors, (0.30, 0.33, 0.15), strict=True)}  # INT8 runs faster
    scale = estimate_scale(anchors, lambda a: measured[a.key()], lambda a: 0.3)  # the FP32 tables' estimate
    assert scale == pytest.approx({"fp32": 1.05, "int8": 0.5})
    assert estimate_scale(anchors, lambda a: measured[a.key()], lambda a: None) == {}, "no tables: no filter"


def test_a_recommendation_at_the_top_of_most_ranges_asks_to_widen_the_space() -> None:
    from types import SimpleNamespace

    from search.cli.pareto import limits_hint

    space = load_space(default_space_path("mobilenet_v2_cifar"))
    study = SimpleNamespace(user_attrs={"space": {"path": space.path, "text": space.text}})
    fastest = space.fastest_policies()[0]
    pinned, tunable = space.at_upper_limits(fastest)
    assert tunable == 12 and len(pinned) == 12  # c16 and head prune only their inner channels
    hint = limits_hint(study, fastest)
    assert hint is not None and "12 of its 12 ranges" in hint and "c24.stream" in hint and space.path in hint

    halfway = space.uniform(0.3)
    assert space.at_upper_limits(halfway) == ([], 12)
    assert limits_hint(study, halfway) is None
    assert limits_hint(SimpleNamespace(user_attrs={}), fastest) is None  # a study from before spaces were stored

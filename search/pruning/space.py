"""Search spaces: TOML files in ``spaces/`` that say which policies a study may try.

A space turns an Optuna trial into a :class:`~search.policy.Policy`. This module is the only
code that calls ``trial.suggest_*``; ``tests/test_spaces.py`` runs every file in ``spaces/``
through ``optuna.trial.FixedTrial``.

File format (see ``spaces/resnet18.toml`` for a commented example)::

    family = "resnet18"              # informative; which models the file was written for
    criteria = ["l1", "l2", ...]     # criteria every stage may use, unless it lists its own
    round_to = [8, 16]               # channel-rounding choices
    ratio_step = 0.05                # ratios are sampled on this grid
    uniform_ratios = [0.2, 0.35]     # enqueued first as the usual uniform recipe
    uniform_criterion = "l1"
    precision = ["fp32", "int8"]     # optional (default both); the study keeps what this CPU runs faster

    [stages.layer1]
    modules = ["conv1", "layer1"]    # module-name prefixes in the stage (default: the stage name)
    stream = [0.0, 0.6]              # [low, high] ratio range, or one number to fix it
    inner = [0.0, 0.7]
    criteria = ["l1", "taylor"]      # optional: narrows the criteria for this stage
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search.errors import UsageError
from search.pruning.policy import CRITERIA, PRECISIONS, Policy, StagePolicy

__all__ = [
    "SPACES_DIR",
    "RatioRange",
    "SearchSpace",
    "StageSpace",
    "default_space_path",
    "load_space",
    "parse_space",
    "shipped_space_path",
]

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"

_TOP_KEYS = {"family", "criteria", "round_to", "ratio_step", "uniform_ratios", "uniform_criterion", "precision"}
_STAGE_KEYS = {"modules", "stream", "inner", "criteria"}


@dataclass(frozen=True)
class RatioRange:
    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def clip(self, value: float) -> float:
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class StageSpace:
    name: str
    modules: tuple[str, ...]
    """Module-name prefixes that belong to the stage (``layer1`` matches ``layer1.0.conv1``)."""
    stream: RatioRange
    inner: RatioRange
    criteria: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file."""

    path: str
    """The file it was read from, or a label such as ``derived from resnext50_32x4d`` for a derived space."""
    family: str
    stages: tuple[StageSpace, ...]
    round_to: tuple[int, ...]
    ratio_step: float
    uniform_ratios: tuple[float, ...]
    uniform_criterion: str
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    """Precisions a policy may use; a study narrows them (:meth:`with_precisions`) to what it searches."""
    text: str = ""
    """The space file's text (stored on the study; what a resumed study's space must equal)."""

    def with_precisions(self, allowed: tuple[str, ...] | list[str]) -> SearchSpace:
        """This space limited to the precisions in ``allowed`` (in this space's order)."""
        kept = tuple(p for p in self.precisions if p in allowed)
        if not kept:
            raise UsageError(
                f"space file {self.path} allows precision {', '.join(self.precisions)} but the search allows "
                f"{', '.join(allowed)}; change --precision or the space's precision list"
            )
        return dataclasses.replace(self, precisions=kept)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Policy:
        """Sample a policy for ``trial`` (the only place that calls ``trial.suggest_*``)."""
        stages = {}
        for stage in self.stages:
            stream = self._suggest_ratio(trial, f"{stage.name}.stream", stage.stream)
            inner = self._suggest_ratio(trial, f"{stage.name}.inner", stage.inner)
            if len(stage.criteria) == 1:
                criterion = stage.criteria[0]
            else:
                criterion = trial.suggest_categorical(f"{stage.name}.criterion", list(stage.criteria))
            stages[stage.name] = StagePolicy(stream=stream, inner=inner, criterion=str(criterion))
        if len(self.round_to) == 1:
            round_to = self.round_to[0]
        else:
            round_to = int(trial.suggest_categorical("round_to", list(self.round_to)))
        if len(self.precisions) == 1:
            precision = self.precisions[0]
        else:
            precision = str(trial.suggest_categorical("precision", list(self.precisions)))
        return Policy(stages=stages, round_to=round_to, precision=precision)

    def _suggest_ratio(self, trial: optuna.trial.BaseTrial, name: str, rng: RatioRange) -> float:
        if rng.fixed:
            return rng.low
        value = trial.suggest_float(name, rng.low, rng.high, step=self.ratio_step)
        return round(value, 6)

    def params_for(self, policy: Policy) -> dict[str, Any]:
        """The trial parameters that make :meth:`suggest` return ``policy`` (for ``enqueue_trial``)."""
        params: dict[str, Any] = {}
        for stage in self.stages:
            chosen = policy.stages[stage.name]
            if not stage.stream.fixed:
                params[f"{stage.name}.stream"] = chosen.stream
            if not stage.inner.fixed:
                params[f"{stage.name}.inner"] = chosen.inner
            if len(stage.criteria) > 1:
                params[f"{stage.name}.criterion"] = chosen.criterion
        if len(self.round_to) > 1:
            params["round_to"] = policy.round_to
        if len(self.precisions) > 1:
            params["precision"] = policy.precision
        return params

    @property
    def default_precision(self) -> str:
        """The precision of the recipes: FP32 when the space allows it."""
        return "fp32" if "fp32" in self.precisions else self.precisions[0]

    def uniform(self, ratio: float, criterion: str | None = None, precision: str | None = None) -> Policy:
        """Every stage at ``ratio`` (clipped to its range and snapped to the grid): the usual recipe."""
        criterion = criterion or self.uniform_criterion
        stages = {}
        for stage in self.stages:
            stages[stage.name] = StagePolicy(
                stream=self._snap(stage.stream, ratio),
                inner=self._snap(stage.inner, ratio),
                criterion=criterion if criterion in stage.criteria else stage.criteria[0],
            )
        return Policy(stages=stages, round_to=min(self.round_to), precision=precision or self.default_precision)

    def allocated(
        self,
        fractions: dict[str, tuple[float, float]],
        criterion: str | dict[str, str],
        precision: str | None = None,
        round_to: int | None = None,
    ) -> Policy:
        """Each stage at its own (stream, inner) fractions, clipped to its ranges and snapped to the grid.

        ``criterion`` is one for every stage or one per stage name; a stage that does not allow it
        uses its first. ``round_to`` defaults to the space's finest rounding.
        """
        stages = {}
        for stage in self.stages:
            stream, inner = fractions.get(stage.name, (0.0, 0.0))
            wanted = criterion.get(stage.name, "") if isinstance(criterion, dict) else criterion
            stages[stage.name] = StagePolicy(
                stream=self._snap(stage.stream, stream),
                inner=self._snap(stage.inner, inner),
                criterion=wanted if wanted in stage.criteria else stage.criteria[0],
            )
        return Policy(
            stages=stages,
            round_to=min(self.round_to) if round_to is None else round_to,
            precision=precision or self.default_precision,
        )

    def unpruned(self, precision: str | None = None) -> Policy:
        return self.uniform(0.0, precision=precision)

    def fastest_policies(self) -> list[Policy]:
        """The policies that remove the most channels the space allows, one per rounding choice.

        Latency is not monotone in the channel count (rounding to 16 can beat rounding to 8 or
        lose to it), so the fastest reachable latency is the minimum measured over these.
        """
        stages = {
            s.name: StagePolicy(stream=s.stream.high, inner=s.inner.high, criterion=s.criteria[0]) for s in self.stages
        }
        return [Policy(stages=stages, round_to=r, precision=self.default_precision) for r in self.round_to]

    def at_upper_limits(self, policy: Policy) -> tuple[list[str], int]:
        """The tunable ranges ``policy`` sits at the top of (``c24.stream``, ...), and how many there are.

        A recommendation at the top of most of its ranges says the budget needs more pruning
        than the space allows there: the search had little left to allocate.
        """
        pinned, tunable = [], 0
        for stage in self.stages:
            chosen = policy.stages.get(stage.name)
            for part in ("stream", "inner"):
                rng: RatioRange = getattr(stage, part)
                if rng.fixed:
                    continue
                tunable += 1
                if chosen is not None and getattr(chosen, part) >= rng.high - 1e-9:
                    pinned.append(f"{stage.name}.{part}")
        return pinned, tunable

    def _snap(self, rng: RatioRange, ratio: float) -> float:
        if rng.fixed:
            return rng.low
        steps = round((rng.clip(ratio) - rng.low) / self.ratio_step)
        return round(rng.low + steps * self.ratio_step, 6)


def shipped_space_path(arch: str | None) -> Path | None:
    """The hand-written space file shipped for a torchvision architecture, if there is one."""
    path = SPACES_DIR / f"{arch}.toml"
    return path if arch and path.exists() else None


def default_space_path(family: str | None) -> Path:
    """The space file shipped for a model family (``generic.toml``, one stage for the whole model, otherwise)."""
    return shipped_space_path(family) or SPACES_DIR / "generic.toml"


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file; every problem is a one-line :class:`UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"space file {path} does not exist; pass --space with a file like spaces/resnet18.toml")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise UsageError(f"space file {path} is not valid TOML: {exc}") from None
    return parse_space(text, str(path))


def parse_space(text: str, path: str) -> SearchSpace:
    """Check a space file's ``text`` (``path`` names it in messages); problems are one-line :class:`UsageError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"space file {path} is not valid TOML: {exc}") from None
    where = f"space file {path}"
    _reject_unknown(raw, _TOP_KEYS | {"stages"}, where)
    criteria = _criteria(raw.get("criteria", list(CRITERIA)), where)
    step = float(raw.get("ratio_step", 0.05))
    if not 0.0 < step < 1.0:
        raise UsageError(f"{where}: ratio_step must be in (0, 1), got {step}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise UsageError(f"{where} has no [stages.NAME] tables; add at least one")
    stages = tuple(_stage(name, body, criteria, step, where) for name, body in stages_raw.items())
    round_to = raw.get("round_to", [8])
    round_to = [round_to] if isinstance(round_to, int) else round_to
    if not round_to or not all(isinstance(r, int) and r >= 1 for r in round_to):
        raise UsageError(f"{where}: round_to must be a positive integer or a list of them")
    uniform_criterion = str(raw.get("uniform_criterion", "l1"))
    _criteria([uniform_criterion], where)
    uniform_ratios = tuple(float(r) for r in raw.get("uniform_ratios", [0.25, 0.5]))
    if not all(0.0 <= r < 1.0 for r in uniform_ratios):
        raise UsageError(f"{where}: uniform_ratios must lie in [0, 1)")
    return SearchSpace(
        path=path,
        family=str(raw.get("family", Path(path).stem)),
        stages=stages,
        round_to=tuple(int(r) for r in round_to),
        ratio_step=step,
        uniform_ratios=uniform_ratios,
        uniform_criterion=uniform_criterion,
        precisions=_precisions(raw.get("precision", list(PRECISIONS)), where),
        text=text,
    )


def _stage(name: str, body: Any, criteria: tuple[str, ...], step: float, where: str) -> StageSpace:
    if not isinstance(body, dict):
        raise UsageError(f"{where}: stages.{name} must be a table")
    _reject_unknown(body, _STAGE_KEYS, f"{where}, stages.{name}")
    modules = body.get("modules", [name])
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise UsageError(f"{where}: stages.{name}.modules must be a list of module-name prefixes")
    return StageSpace(
        name=name,
        modules=tuple(modules),
        stream=_ratio_range(body.get("stream", 0.0), step, f"{where}: stages.{name}.stream"),
        inner=_ratio_range(body.get("inner", 0.0), step, f"{where}: stages.{name}.inner"),
        criteria=_criteria(body.get("criteria", list(criteria)), where),
    )


def _ratio_range(value: Any, step: float, where: str) -> RatioRange:
    if isinstance(value, (int, float)):
        low = high = float(value)
    elif isinstance(value, list) and len(value) == 2:
        low, high = (float(v) for v in value)
    else:
        raise UsageError(f"{where} must be a number or [low, high], got {value!r}")
    if not 0.0 <= low <= high < 1.0:
        raise UsageError(f"{where} must satisfy 0 <= low <= high < 1, got {value!r}")
    span = (high - low) / step
    if low != high and not math.isclose(span, round(span), abs_tol=1e-6):
        raise UsageError(f"{where}: the range {value!r} is not a whole number of ratio_step {step}")
    return RatioRange(low, high)


def _criteria(values: Any, where: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    unknown = [v for v in values if v not in CRITERIA]
    if unknown or not values:
        raise UsageError(f"{where}: unknown criteria {unknown}; choose from {', '.join(CRITERIA)}")
    return tuple(values)


def _precisions(values: Any, where: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values or any(v not in PRECISIONS for v in values):
        raise UsageError(f"{where}: precision must list some of {', '.join(PRECISIONS)}, got {values!r}")
    return tuple(dict.fromkeys(values))


def _reject_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")

"""The resolved settings of a search, as typed values (the CLI builds them; nothing reads argv)."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from search.data.spec import DataSpec

__all__ = ["PROMOTE_FRACTION", "PROMOTION_FACTOR", "RUNG_VAL_IMAGES", "SAMPLERS", "SearchConfig"]

SAMPLERS = ("tpe", "gp", "random")
"""``--sampler``: Optuna's multi-objective TPE, its Gaussian-process sampler (GPSampler) or random sampling."""

PROMOTION_FACTOR = 10
"""Without ``--rungs``, the one promoted rung fine-tunes this many times ``--finetune-steps`` in total (300 steps
at the default 30), at most one epoch of the training split: the rungs the signal benchmark chose (BENCHMARKS.md,
"Signal"), where a whole epoch ranked candidates no better than 300 steps."""

PROMOTE_FRACTION = 1 / 4
"""Without ``--promote-fraction``, a new study promotes the best quarter of each rung (a resumed one keeps its own):
on the equal-compute studies a third took a 30-trial search to 2.03-2.18x the time of one without promotion, and a
quarter kept every pick or one tied with it (BENCHMARKS.md "Promotion while the study runs")."""

RUNG_VAL_IMAGES = 10_000
"""Without ``--rung-val-images``, a promotion reads at most this many validation images (the whole split when it
is smaller, as CIFAR-10's 5,000 are): on ImageNet's 50,000 at 224 px a read of all of them on a CPU costs about as
much as the rung's fine-tune, while 10,000 already bound a top-1 near 80% within about ±0.8 pp, and a paired
difference between two candidates read on the same images much more tightly."""


@dataclass(frozen=True)
class SearchConfig:
    budget_ms: float | None = None
    """The CPU latency budget in milliseconds (batch 1, ``threads`` intra-op threads)."""
    budget_fraction: float | None = None
    """Instead of ``budget_ms``: the budget as a fraction of the unpruned model's latency, measured
    when the study is created (the study stores the resolved milliseconds)."""
    model: str = "resnet18"
    """A torchvision architecture name (see ``search.models.build.KNOWN_MODELS``) or ``module:function``."""
    weights: str | None = None
    """A state_dict file, this tool's checkpoint, ``imagenet``, or None to train a baseline here."""
    data: DataSpec = field(default_factory=lambda: DataSpec("digits"))
    space: str | None = None
    """A space file; None picks ``spaces/<family>.toml``."""
    study: str | None = None
    """Study name; None derives ``<model>-<data>-<budget>ms``."""
    storage: str | None = None
    """A SQLAlchemy URL; None is ``sqlite:///studies/<study>.db``."""
    trials: int = 8
    """Finished trials the study should have; a rerun resumes until there are this many.

    The default keeps the built-in default run (``search --budget-ms 30``) within 15 minutes on a
    2-core CPU, baseline training included; a real search wants more (``--trials 40``).

    Sampled policies measured over the budget are recorded but do not count (see
    :mod:`search.study.coordination`): trials are spent on the recipes and on policies that get fine-tuned."""
    timeout: float | None = None
    """Stop starting new trials after this many seconds."""
    seed: int = 0
    threads: int = 1
    """The runtime's threads for latency measurements."""
    runtime: str = "onnxruntime"
    """The runtime every latency is measured in (``--runtime``); recorded in the study's hardware fingerprint."""
    finetune_steps: int = 30
    finetune_batch: int = 64
    finetune_lr: float = 0.01
    distill: float = 0.0
    """Weight of distillation from the unpruned model in the brief fine-tune (0 = off)."""
    bn_batches: int = 4
    """Training batches used to recalibrate BatchNorm statistics after pruning."""
    val_images: int | None = None
    """Evaluate trials on a fixed random subset of this many validation images (None: all)."""
    fit_budget: bool = False
    """Fit each sampled policy to the budget: its shape kept, its strength found by measured bisection
    (:mod:`search.pruning.budget_fit`), so no trial is spent over the budget or far below it."""
    baseline_epochs: int = 3
    """Epochs to train a baseline when no ``weights`` are given."""
    train_dtype: str = "auto"
    """Training arithmetic: auto (bf16 where the device has it natively, fp16 on older GPUs), bf16, fp16 or fp32."""
    device: str = "auto"
    """Where training and evaluation run: auto (the first CUDA device, if any), cpu, cuda or cuda:N.
    Latency is measured in ONNX Runtime on the CPU (or the latency target) whatever this says."""
    allow_mixed_devices: bool = False
    """Let a resumed study (or a joining worker) fine-tune on another kind of device than its creator."""
    precisions: tuple[str, ...] = ("fp32", "int8")
    """Deployment precisions the search may choose; int8 is dropped where this CPU does not run it faster."""
    calibration_method: str = "minmax"
    """INT8 activation-range calibration: minmax, entropy or percentile (ONNX Runtime's calibrators)."""
    calibration_images: int = 256
    """Training images that calibrate each INT8 model."""
    promotion: bool = True
    """Promote the best trials to longer fine-tunes as the study runs (:mod:`search.study.promotion`)."""
    rungs: tuple[int, ...] | None = None
    """Total fine-tune steps of rungs 1, 2, ... (rung 0 is ``finetune_steps``); None: one rung of
    ``PROMOTION_FACTOR`` times ``finetune_steps``, fitted to the training split by :meth:`with_default_rungs`."""
    rung_val_images: int | None = RUNG_VAL_IMAGES
    """Validation images each promotion reads: the whole split when it has no more, else a fixed subset of this
    many (the same for every trial, so rung records pair image by image); None: always the whole split. Never
    fewer than ``val_images`` (rung 0's)."""
    promote_fraction: float | None = None
    """The best this fraction of the trials at a rung are promoted to the next (ASHA's 1/eta), and at least
    :data:`search.study.rungs.FEWEST_PROMOTED` of them once the study has finished; None: the study's own when
    resuming one, else :data:`PROMOTE_FRACTION` (read it as :attr:`promoted_fraction`)."""
    sampler: str = "tpe"
    """How the policies after the recipes are proposed: one of :data:`SAMPLERS` (``--sampler``)."""
    trial_weights: str | None = None
    """Folder for each trial's fine-tuned weights, which promotions continue from; None:
    ``<studies_dir>/<study>/trial-weights``. Workers on several hosts need a path they all see."""
    confirm_repeats: int | None = None
    """Once the trials are done, time each trial on the front within the budget this many more times, each in a
    fresh process, and judge it by their median (:mod:`search.study.confirm`); 0: the search's one timing;
    None: :func:`search.study.confirm.default_repeats` (3)."""
    studies_dir: str = "studies"
    heartbeat_seconds: int | None = None
    """Heartbeat interval of a new study (a trial silent for twice this is failed and retried once);
    None: 60 s for a new study, the study's own value when joining one."""

    def __post_init__(self) -> None:
        if (self.budget_ms is None) == (self.budget_fraction is None):
            raise ValueError("give exactly one of budget_ms and budget_fraction")
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise ValueError("budget_ms must be positive")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError("budget_fraction must be in (0, 1]")
        if self.val_images is not None and self.val_images < 1:
            raise ValueError("val_images must be >= 1")
        if self.rung_val_images is not None and self.rung_val_images < 1:
            raise ValueError("rung_val_images must be >= 1")
        if self.rungs is not None:
            steps = (self.finetune_steps, *self.rungs)
            if any(b <= a for a, b in itertools.pairwise(steps)):
                raise ValueError("rungs must be increasing step counts, each above finetune_steps")
        if self.confirm_repeats is not None and self.confirm_repeats < 0:
            raise ValueError("confirm_repeats must be >= 0")
        if self.promote_fraction is not None and not 0 < self.promote_fraction < 1:
            raise ValueError("promote_fraction must be in (0, 1)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if not self.precisions or any(p not in ("fp32", "int8") for p in self.precisions):
            raise ValueError(f"precisions must be some of fp32, int8; got {self.precisions!r}")

    @property
    def study_name(self) -> str:
        if self.study:
            return self.study
        data = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.data.source.split(":", 1)[0]).strip("_.") or "data"
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        budget = f"{self.budget_ms:g}ms" if self.budget_ms is not None else f"{self.budget_fraction:g}x"
        return f"{model}-{data}-{budget}"

    @property
    def rung_steps(self) -> tuple[int, ...]:
        """Total fine-tune steps of the rungs above 0 (empty: no promotion)."""
        if not self.promotion:
            return ()
        if self.rungs is not None:
            return tuple(self.rungs)
        return (PROMOTION_FACTOR * self.finetune_steps,) if self.finetune_steps > 0 else ()

    @property
    def promoted_fraction(self) -> float:
        """The promoted fraction of each rung: ``promote_fraction``, or :data:`PROMOTE_FRACTION` when unset."""
        return PROMOTE_FRACTION if self.promote_fraction is None else self.promote_fraction

    @property
    def promotion_val_images(self) -> int | None:
        """The validation images a promotion reads (None: all): ``rung_val_images``, never fewer than rung 0's."""
        if self.rung_val_images is None or self.val_images is None:
            return None
        return max(self.rung_val_images, self.val_images)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.studies_dir) / self.study_name}.db"

    def with_default_rungs(self, train_images: int) -> SearchConfig:
        """This config with the default rung (no ``--rungs``) fixed for a training split of ``train_images``.

        The rung is ``PROMOTION_FACTOR`` times ``finetune_steps``, at most the steps of one epoch; where one epoch
        is no more than the brief fine-tune itself, there is nothing to promote to: no rung (``rungs == ()``).
        """
        if self.rungs is not None or not self.promotion or self.finetune_steps <= 0:
            return self
        epoch = max(1, math.ceil(train_images / self.finetune_batch))
        steps = min(PROMOTION_FACTOR * self.finetune_steps, epoch)
        return replace(self, rungs=(steps,) if steps > self.finetune_steps else ())

    def with_budget_ms(self, budget_ms: float) -> SearchConfig:
        """This config with its budget resolved to milliseconds, keeping the study name and storage it had."""
        return replace(self, budget_ms=budget_ms, budget_fraction=None, study=self.study_name, storage=self.storage_url)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (stored on the study), the storage URL's password masked."""
        from search.study.storage import masked

        values = asdict(self)
        if values.get("storage"):
            values["storage"] = masked(values["storage"])
        return values

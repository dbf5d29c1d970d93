"""How ``export`` fine-tunes and checks a model (light to import: the CLI takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QUANTIZATION_MODES", "ExportSettings"]

QUANTIZATION_MODES: tuple[str, ...] = ("ptq", "qat")
"""How an INT8 policy's model is made: quantized after the FP32 fine-tune (``ptq``), or fine-tuned with
fake quantization for its last ``qat_epochs`` first (``qat``, :mod:`search.shipping.qat`)."""


@dataclass(frozen=True)
class ExportSettings:
    epochs: float = 5
    """Full fine-tune epochs over the training split (a fraction fine-tunes part of an epoch)."""
    batch_size: int = 32
    lr: float = 0.01
    distill: float = 0.5
    """Weight of distillation from the unpruned model (0 turns it off)."""
    train_dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    """Where to fine-tune and evaluate: auto (the first CUDA device, if any), cpu, cuda or cuda:N."""
    max_abs_diff: float = 1e-3
    """ONNX Runtime and PyTorch logits may differ by this much, or by ``max_rel_diff`` of the logits' scale."""
    max_rel_diff: float = 1e-3
    """...relative to the largest logit magnitude seen (deeper models and larger logits round more)."""
    min_agreement: float = 0.99
    """...and must agree on the top-1 class for at least this fraction of checked images."""
    parity_images: int = 128
    min_int8_agreement: float = 0.95
    """An INT8 export must predict the FP32 export's top-1 class on at least this fraction of images."""
    test_images: int | None = None
    """Score top-1 on a fixed random subset of this many held-out images (None: all; quick checks)."""
    steps: int | None = None
    """Fine-tune for this many steps instead of ``epochs`` (for quick checks)."""
    finetune_unpruned: bool = False
    """Fine-tune a policy that prunes nothing too (its weights are the baseline's, which the brief
    fine-tune at export rarely improves: one epoch took an unpruned INT8 pick from 97.77% to 97.03%)."""
    quantization: str = "ptq"
    """One of :data:`QUANTIZATION_MODES` (INT8 policies only). PTQ stays the default until
    benchmarks/recovery.py has measured QAT against it."""
    qat_epochs: float = 1
    """With ``qat``: the last this many of ``epochs`` train with fake quantization (all of them if fewer)."""
    min_qat_agreement: float = 0.99
    """With ``qat``: the INT8 model must predict the fake-quantized PyTorch model's class on this fraction of images."""
    prune_steps: int = 1
    """Reach the trial's channels in this many pruning steps, fine-tuning after each (1: one shot);
    the fine-tune's steps are split between them (:mod:`search.shipping.iterative`)."""
    feature_distill: float = 3.0
    """Weight of matching the space's stage outputs to the unpruned model's (0 turns it off;
    :mod:`search.training.feature_distill`). The default is benchmarks/recovery.py's best: on
    MobileNetV2 at 25% of its latency, 3 epochs, weight 3 gave +1.15 pp over none (2 seeds each,
    spreads 0.29 and 0.39 pp), weight 1 +0.65 pp; fine-tunes of 21 min against 18-20 on one shared core."""
    feature_distill_asked: bool = False
    """The user chose ``feature_distill`` (the flag was given): where it cannot apply (a study that did not
    store its space, a space with no stage ending in a feature map) that is an error; the default is left
    out there instead, with a line saying so."""

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.qat_epochs <= 0:
            raise ValueError("qat_epochs must be > 0")
        if self.prune_steps < 1:
            raise ValueError("prune_steps must be >= 1")
        if self.feature_distill < 0:
            raise ValueError("feature_distill must be >= 0")

"""Top-1 on a split or on a fixed random subset of it, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from search.data.dataset import Split
from search.measuring.onnx_export import export_onnx
from search.training.evaluate import onnx_top1, top1


class _AlwaysClass(nn.Module):
    """Predicts one class for every image: its top-1 is that class's share of the images seen."""

    def __init__(self, cls: int, classes: int) -> None:
        super().__init__()
        self.cls, self.classes = cls, classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.classes) + x.mean() * 0 * self.scale
        logits[:, self.cls] = 1.0
        return logits


def test_a_limited_evaluation_samples_every_class_and_is_the_same_each_time(digits32) -> None:
    val = digits32.split("val")
    order = torch.argsort(val.labels, stable=True)  # a class-sorted split, as folders give
    sorted_split = Split(val.images[order], val.labels[order])
    digits32 = dataclasses.replace(digits32, val=sorted_split)
    model = _AlwaysClass(int(sorted_split.labels[0]), digits32.num_classes)
    assert top1(model, digits32, "val", limit=30, batch_size=8) < 0.5, "the first 30 images are all one class"
    first = top1(model, digits32, "val", limit=60)
    assert first == top1(model, digits32, "val", limit=60)
    onnx_model = export_onnx(
        _AlwaysClass(int(sorted_split.labels[0]), digits32.num_classes), digits32.example_input(), dynamic_batch=True
    )
    assert onnx_top1(onnx_model, digits32, "val", limit=60) == first


def test_a_model_evaluated_first_can_still_be_trained(digits32) -> None:
    from search.models.build import build_model
    from search.training.finetune import TrainSettings, train

    model = build_model("resnet18", digits32.num_classes)
    top1(model, digits32, "val", limit=8)  # converts the weights to channels_last; they must stay trainable
    train(model, digits32, TrainSettings(steps=1, batch_size=4, train_dtype="fp32"))

"""What the pre-training tasks (MNTP, bag-of-words) share: a batch of named tensors and one named loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from retriever.config import ExperimentConfig
from retriever.losses import LossOutput


class PretrainingTask:
    name: ClassVar[str]
    product: ClassVar[str]  # the run directory's folder that `export` writes

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.cost_model: Any = None  # a `retriever.flops.StepCostModel`, made by `build`

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def named_loss(self, value: torch.Tensor) -> LossOutput:
        return LossOutput(total=value, parts={self.name: value}, weights={self.name: 1.0})

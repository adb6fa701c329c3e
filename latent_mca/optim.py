"""Learning-rate schedules selectable from YAML (``lr_scheduler: {class_path: ...}``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x the base learning rate, stepped per batch.

    This is the ``cosine_with_min_lr`` schedule of the paper's code (``min_lr = 0.1 x lr``).

    Args:
        optimizer: The optimizer.
        max_steps: Total optimiser steps of the run.
        warmup_steps: Steps of linear warm-up from 0 (an int, or a fraction of ``max_steps`` when < 1).
        min_lr_ratio: Final learning rate as a fraction of the base one.
    """

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: float = 0,
                 min_lr_ratio: float = 0.1) -> None:
        if max_steps < 1:
            raise ValueError("lr_scheduler.max_steps must be >= 1")
        warm = int(warmup_steps * max_steps) if 0 < warmup_steps < 1 else int(warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, max_steps - warm))
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


class ConstantLR(LambdaLR):
    """A constant learning rate with an optional linear warm-up (the paper's RL setting).

    Args:
        optimizer: The optimizer.
        warmup_steps: Steps of linear warm-up from 0.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0) -> None:
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)

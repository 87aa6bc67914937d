"""Learning-rate schedules of the trainer recipes, stepped as nnU-Net steps its own (once per epoch)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler


class EpochLRScheduler(_LRScheduler):
    """Sets each parameter group's lr to `lr(initial lr, step)`, stepped as nnU-Net
    steps its PolyLRScheduler: `step(current_epoch)` at every epoch start, so a resumed run (`--c`)
    continues the schedule without saved scheduler state."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int):
        self.max_steps, self.ctr = max_steps, 0
        super().__init__(optimizer)

    def lr(self, base_lr: float, step: int) -> float:
        raise NotImplementedError

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr(base_lr, current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class CosineLRScheduler(EpochLRScheduler):
    """Cosine annealing of each parameter group's initial lr down to `min_lr` over `max_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, min_lr: float = 0.0):
        self.min_lr = min_lr
        super().__init__(optimizer, max_steps)

    def lr(self, base_lr: float, step: int) -> float:
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(step / self.max_steps, 1.0)))


class WarmupPolyLRScheduler(EpochLRScheduler):
    """Linear warm-up to the initial lr over `warmup_steps` (step i: (i + 1) / warmup_steps), then
    nnU-Net's poly decay (exponent 0.9) over the remaining steps: the schedule of nnU-Net's
    Primus trainers, in one scheduler instead of two."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        self.warmup_steps, self.exponent = warmup_steps, exponent
        super().__init__(optimizer, max_steps)

    def lr(self, base_lr: float, step: int) -> float:
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1)
        return base_lr * (1 - min(progress, 1.0)) ** self.exponent

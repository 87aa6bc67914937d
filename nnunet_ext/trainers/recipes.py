"""Trainers for architectures whose published recipe is not nnU-Net's (optimiser, schedule).

An architecture names its recipe in the registry (`recipe=`); its trainers are generated from it.
Every other architecture trains with nnU-Net's SGD and poly schedule (nnunet_ext.trainers.base).
"""

from __future__ import annotations

import numpy as np
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ext.blocks.kan import kan_parameters
from nnunet_ext.trainers.base import nnUNetExtTrainer
from nnunet_ext.trainers.schedulers import CosineLRScheduler, WarmupPolyLRScheduler


class UKANRecipe(nnUNetExtTrainer):
    """U-KAN's official recipe: Adam with weight decay 1e-4, lr 1e-4 and 1e-2 for the KAN layers,
    cosine annealing to 1e-5; nnU-Net's epochs, loss and gradient clipping (docs/ukan.md)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.kan_lr, self.min_lr, self.weight_decay = 1e-4, 1e-2, 1e-5, 1e-4

    def configure_optimizers(self):
        kan = kan_parameters(self.network)
        kan_ids = {id(p) for p in kan}
        other = [p for p in self.network.parameters() if id(p) not in kan_ids]
        optimizer = torch.optim.Adam([{"params": other, "lr": self.initial_lr}, {"params": kan, "lr": self.kan_lr}],
                                     weight_decay=self.weight_decay)
        return optimizer, CosineLRScheduler(optimizer, self.num_epochs, self.min_lr)


class TransformerRecipe(nnUNetExtTrainer):
    """The transformer recipe of nnU-Net's Primus trainers: AdamW (lr 3e-4, weight decay 5e-2, betas
    0.9/0.98), a linear warm-up over the first 5% of the epochs (50 of nnU-Net's 1000), then poly
    decay. Plain SGD at nnU-Net's lr 0.01 is unstable for a transformer trained from scratch
    (docs/vit_hybrid.md)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.weight_decay, self.warmup_fraction = 3e-4, 5e-2, 0.05

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, betas=(0.9, 0.98),
                                      weight_decay=self.weight_decay, fused=self.device.type == "cuda")
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs, warmup)


class MedNeXtRecipe(nnUNetExtTrainer):
    """MedNeXt's official recipe (nnUNetTrainerV2_Optim_and_LR): AdamW at lr 1e-3 with eps 1e-4 (1e-8 can give
    NaN in fp16), weight decay 3e-5, nnU-Net's poly schedule, epochs and gradient clipping (docs/mednext.md).
    The official network (its `official` presets) is supervised as that trainer does: every output, the
    bottleneck's included, weighted 1, 1/2, 1/4, ... (normalised), where nnU-Net zeroes the lowest one's."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.weight_decay = 1e-3, 3e-5

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, eps=1e-4,
                                      weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision and self.bare_network().bottleneck_head is not None:
            weights = 0.5 ** np.arange(len(loss.weight_factors))
            loss.weight_factors = tuple(weights / weights.sum())
        return loss

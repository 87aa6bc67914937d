"""nnU-Net trainers for every registered architecture.

nnU-Net finds these classes through the folder printed by `nnunet-ext env` (nnUNet_extTrainer),
whose modules only re-export this module, so a trainer found by nnU-Net is this very class and
pickles by reference. Short-schedule variants (`<Trainer>_debug`) are generated from the
registry for tests and demos.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.blocks.kan import kan_parameters
from nnunet_ext.registry import ARCHITECTURES, get_architecture
from nnunet_ext.topology import Topology


class nnUNetExtTrainer(nnUNetTrainer):
    """Builds the registered architecture `architecture` on the plans' topology; everything else
    (data, augmentation, loss with deep supervision, schedule, inference) is stock nnU-Net."""

    architecture: str = ""

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # A classmethod, not nnU-Net's staticmethod: training calls it on the instance and inference
        # on the class, both with these arguments, and it needs to know which architecture to build.
        return get_architecture(cls.architecture).build(
            Topology.from_plans(configuration_manager), num_input_channels, num_output_channels,
            deep_supervision=enable_deep_supervision)


class nnUNetTrainerAttentionUNet(nnUNetExtTrainer):
    architecture = "attention_unet"


class nnUNetTrainerLKMUNet(nnUNetExtTrainer):
    """LKM-UNet with nnU-Net's optimiser: the paper's lr 0.01, momentum 0.99 and weight decay 3e-5
    are nnU-Net's SGD defaults, which the official code trains with (docs/lkm_unet.md)."""
    architecture = "lkm_unet"


class nnUNetTrainerDLKANet(nnUNetExtTrainer):
    """D-LKA Net with nnU-Net's optimiser, which the official 3D code also trains with (SGD,
    Nesterov momentum 0.99, lr 0.01)."""
    architecture = "dlka_net"


class CosineLRScheduler(_LRScheduler):
    """Cosine annealing of each parameter group's initial lr down to `min_lr` over `max_steps`,
    stepped as nnU-Net steps its PolyLRScheduler: `step(current_epoch)` at every epoch start."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, min_lr: float = 0.0):
        self.max_steps, self.min_lr, self.ctr = max_steps, min_lr, 0
        super().__init__(optimizer)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        factor = 0.5 * (1 + math.cos(math.pi * min(current_step / self.max_steps, 1.0)))
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.min_lr + (base_lr - self.min_lr) * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class nnUNetTrainerUKAN(nnUNetExtTrainer):
    """U-KAN with the official recipe: Adam with weight decay 1e-4, lr 1e-4 and 1e-2 for the KAN
    layers, cosine annealing to 1e-5; nnU-Net's epochs, loss and gradient clipping (docs/ukan.md)."""
    architecture = "ukan"

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


# Short schedules: (epochs, training iterations per epoch, validation iterations per epoch).
SCHEDULES = {"debug": (1, 5, 2), "demo": (4, 10, 3)}


def _with_schedule(trainer: type, suffix: str, epochs: int, iterations: int, val_iterations: int) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records init arguments by these exact parameter names; keep them.
        trainer.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            epochs, iterations, val_iterations

    name = f"{trainer.__name__}_{suffix}"
    return type(name, (trainer,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{trainer.__name__} for {epochs} epoch(s) of {iterations} iterations."})


__all__ = []
for _arch in ARCHITECTURES.values():
    _trainer = globals()[_arch.trainer]
    __all__.append(_arch.trainer)
    for _suffix, _schedule in SCHEDULES.items():
        _variant = _with_schedule(_trainer, _suffix, *_schedule)
        globals()[_variant.__name__] = _variant
        __all__.append(_variant.__name__)
del _arch, _trainer, _suffix, _schedule, _variant

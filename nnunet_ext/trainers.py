"""nnU-Net trainers for every registered architecture.

nnU-Net finds these classes through the folder printed by `nnunet-ext env` (nnUNet_extTrainer),
whose modules only re-export this module, so a trainer found by nnU-Net is this very class and
pickles by reference. Short-schedule variants (`<Trainer>_debug`) are generated from the
registry for tests and demos.
"""

from __future__ import annotations

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

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

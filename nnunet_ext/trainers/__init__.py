"""Every trainer class, generated from the registry: the classes stock nnU-Net trains and predicts with.

Per registered architecture: its trainer (a subclass of the architecture's recipe that builds its
network), one trainer per preset (the preset's options as `network_options`), and `<trainer>_<schedule>`
for every short schedule of registry.SCHEDULES; nnU-Net's own nnUNetTrainer gets the short schedules
too, so that the baseline of a comparison can train as long.

nnU-Net finds these classes by name through the folder `nnunet-ext env` prints (nnUNet_extTrainer),
whose module only re-exports this one: a trainer found by nnU-Net is the very class defined here, and
pickles by reference (`__module__` is this module's), as nnU-Net's multiprocessing needs.
"""

from __future__ import annotations

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.registry import ARCHITECTURES, SCHEDULES, Schedule


def _subclass(base: type, name: str, doc: str, attributes: dict) -> type:
    return type(name, (base,), {"__module__": __name__, "__qualname__": name, "__doc__": doc, **attributes})


def _with_schedule(trainer: type, suffix: str, schedule: Schedule) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records init arguments by these exact parameter names; keep them.
        trainer.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            schedule.epochs, schedule.iterations, schedule.val_iterations
        self.save_every = 1  # checkpoint_latest after every epoch, so `--c` resumes an interrupted short run

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # nnU-Net sets the test-time mirroring axes here and saves them in the checkpoint, which
        # nnUNetv2_predict reads; the returned axes are training's augmentation, kept.
        configured = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        self.inference_allowed_mirroring_axes = None
        return configured

    attributes = {"__init__": __init__}
    if not schedule.mirroring:
        attributes["configure_rotation_dummyDA_mirroring_and_inital_patch_size"] = \
            configure_rotation_dummyDA_mirroring_and_inital_patch_size
    mirroring = "" if schedule.mirroring else ", predicting without test-time mirroring"
    return _subclass(trainer, f"{trainer.__name__}_{suffix}",
                     f"{trainer.__name__} for {schedule.epochs} epoch(s) of {schedule.iterations} iterations"
                     f"{mirroring}.", attributes)


def _trainers(arch) -> list[type]:
    """The architecture's trainer, then one per preset."""
    recipe = arch.recipe_class()
    trainer = _subclass(recipe, arch.trainer, f"{arch.summary} ({arch.reference}). Recipe: {recipe.__doc__}",
                        {"architecture": arch.name})
    presets = [_subclass(trainer, arch.preset_trainer(name), f"{arch.trainer} with its '{name}' preset: {options}.",
                         {"network_options": dict(options)}) for name, options in arch.presets.items()]
    return [trainer, *presets]


_generated = [trainer for arch in ARCHITECTURES.values() for trainer in _trainers(arch)]
_generated += [_with_schedule(trainer, suffix, schedule)
               for trainer in (nnUNetTrainer, *_generated) for suffix, schedule in SCHEDULES.items()]
globals().update({trainer.__name__: trainer for trainer in _generated})
__all__ = [trainer.__name__ for trainer in _generated]

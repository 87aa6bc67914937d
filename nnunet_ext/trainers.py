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
from nnunet_ext.registry import ARCHITECTURES, fast_path_state, get_architecture
from nnunet_ext.topology import Topology


class nnUNetExtTrainer(nnUNetTrainer):
    """Builds the registered architecture `architecture` on the plans' topology; everything else
    (data, augmentation, loss with deep supervision, schedule, inference) is stock nnU-Net."""

    architecture: str = ""
    # Overrides of the architecture's registered options (registry.py, its docs page): a subclass with, e.g.,
    # {"zero_init_decoder": True} is an ablation that nnUNetv2_train and nnUNetv2_predict run as they are.
    network_options: dict = {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # A classmethod, not nnU-Net's staticmethod: training calls it on the instance and inference
        # on the class, both with these arguments, and it needs to know which architecture to build.
        return get_architecture(cls.architecture).build(
            Topology.from_plans(configuration_manager), num_input_channels, num_output_channels,
            deep_supervision=enable_deep_supervision, **cls.network_options)

    def on_train_start(self) -> None:
        super().on_train_start()
        for path in get_architecture(self.architecture).fast_paths:  # a slow run should say why
            if path.device == self.device.type:
                self.print_to_log_file(f"{path.name}: {fast_path_state(path.missing())}")

    def train_step(self, batch: dict) -> dict:
        try:
            return super().train_step(batch)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(self.out_of_memory_hint()) from error

    def out_of_memory_hint(self) -> str:
        """What to do when a training step does not fit: plans sized for this architecture and GPU."""
        from nnunet_ext.planning import plans_name

        arch, cm = get_architecture(self.architecture), self.configuration_manager
        gpu = (math.floor(torch.cuda.get_device_properties(self.device).total_memory / 2 ** 30)
               if self.device.type == "cuda" else None)
        return (f"{arch.name} ran out of {self.device.type} memory training a batch of {cm.batch_size} patches of "
                f"{list(cm.patch_size)} ({self.plans_manager.plans_name}, {self.configuration_name}). Plan patch and "
                f"batch size for this GPU: nnunet-ext plan -d {self.plans_manager.dataset_name} -a {arch.name} "
                f"--gpu-memory {gpu or '<GB of your GPU>'} -c {self.configuration_name}, then train with -p "
                f"{plans_name(arch, gpu) if gpu else 'the plans name it prints'}. Checkpoints already in the fold "
                "folder are unchanged.")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, after checking that the checkpoint holds this network. `--c` and `--val` load the
        fold folder's checkpoint; one another trainer wrote (a copied file, a renamed folder) would
        otherwise fail inside load_state_dict with every mismatching key. The file is left as it is."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):  # nnU-Net's own method takes nothing else
            self._check_checkpoint(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def _check_checkpoint(self, filename: str) -> None:
        # Memory-mapped: only the tensors' shapes are read here, nnU-Net reads the data afterwards.
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False, mmap=True)
        network = getattr(self.network, "module", self.network)  # DDP
        ours = getattr(network, "_orig_mod", network).state_dict()  # torch.compile
        theirs = {k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()}
        wrong = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
        extra = set(theirs) - set(ours)
        if wrong or extra:
            source = checkpoint.get("trainer_name", "an unknown trainer")
            raise RuntimeError(
                f"{filename} was written by {source} and does not hold {type(self).__name__}'s network "
                f"({self.architecture} on these plans): {len(wrong)} of its {len(ours)} tensors are missing or "
                f"shaped differently (first: {wrong[0] if wrong else '-'}), and {len(extra)} are not part of it. "
                f"The file is unchanged. Continue or validate it with -tr {source} (and its plans), or train "
                f"{type(self).__name__} from scratch in a fold folder of its own.")


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


class nnUNetTrainerViTransUNet(nnUNetExtTrainer):
    """ViT/CNN hybrid with the transformer recipe of nnU-Net's Primus trainers: AdamW (lr 3e-4,
    weight decay 5e-2, betas 0.9/0.98), a linear warm-up over the first 5% of the epochs (50 of
    nnU-Net's 1000), then poly decay. Plain SGD at nnU-Net's lr 0.01 is unstable for a transformer
    trained from scratch (docs/vit_hybrid.md)."""
    architecture = "vit_hybrid"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr, self.weight_decay, self.warmup_fraction = 3e-4, 5e-2, 0.05

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, betas=(0.9, 0.98),
                                      weight_decay=self.weight_decay, fused=self.device.type == "cuda")
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLRScheduler(optimizer, self.num_epochs, warmup)


# Short schedules: (epochs, training iterations per epoch, validation iterations per epoch). `real` is the
# CPU schedule of `nnunet-ext real-data` (docs/results.md: under an hour per dataset on 2 cores).
SCHEDULES = {"debug": (1, 5, 2), "demo": (4, 10, 3), "real": (12, 10, 2)}


def _with_schedule(trainer: type, suffix: str, epochs: int, iterations: int, val_iterations: int) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records init arguments by these exact parameter names; keep them.
        trainer.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            epochs, iterations, val_iterations
        self.save_every = 1  # checkpoint_latest after every epoch, so `--c` resumes an interrupted short run

    name = f"{trainer.__name__}_{suffix}"
    return type(name, (trainer,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{trainer.__name__} for {epochs} epoch(s) of {iterations} iterations."})


__all__ = [arch.trainer for arch in ARCHITECTURES.values()]
# nnU-Net's default trainer gets the same short schedules: the baseline of a comparison must train as long.
for _trainer in (nnUNetTrainer, *(globals()[name] for name in list(__all__))):
    for _suffix, _schedule in SCHEDULES.items():
        _variant = _with_schedule(_trainer, _suffix, *_schedule)
        globals()[_variant.__name__] = _variant
        __all__.append(_variant.__name__)
del _trainer, _suffix, _schedule, _variant

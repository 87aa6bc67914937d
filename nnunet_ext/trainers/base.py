"""The trainer every architecture's trainers derive from: nnU-Net's, building the registered network."""

from __future__ import annotations

import math

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.networks.base import mismatching_tensors
from nnunet_ext.registry import fast_path_state, get_architecture
from nnunet_ext.topology import Topology


class nnUNetExtTrainer(nnUNetTrainer):
    """Builds the registered architecture `architecture` on the plans' topology; everything else
    (data, augmentation, loss with deep supervision, schedule, inference) is stock nnU-Net."""

    architecture: str = ""
    # Overrides of the network's option defaults (its constructor, its docs page). The registry's presets set
    # them for their trainers; a subclass with, e.g., {"zero_init_decoder": True} is an ablation that
    # nnUNetv2_train and nnUNetv2_predict run as they are.
    network_options: dict = {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # A classmethod, not nnU-Net's staticmethod: training calls it on the instance and inference
        # on the class, both with these arguments, and it needs to know which architecture to build.
        return get_architecture(cls.architecture).build(
            Topology.from_plans(configuration_manager), num_input_channels, num_output_channels,
            deep_supervision=enable_deep_supervision, **cls.network_options)

    def _get_deep_supervision_scales(self):
        """A target scale per output of the network: nnU-Net's own (one per decoder stage) but where the network
        has more (MedNeXt's official network supervises its bottleneck too)."""
        if not self.enable_deep_supervision:
            return None
        return [[1 / s for s in stride] for stride in self.bare_network().output_strides]

    def _do_i_compile(self) -> bool:
        """nnU-Net's answer (on by default on CUDA), unless the architecture's entry says why it cannot be
        compiled well; then the training log says so, once."""
        compiles, off = super()._do_i_compile(), get_architecture(self.architecture).compile_off
        if compiles and off and not getattr(self, "_said_compile_off", False):
            self.print_to_log_file(f"torch.compile is off for {self.architecture}: {off}.")
            self._said_compile_off = True
        return compiles and not off

    def on_train_start(self) -> None:
        super().on_train_start()
        for path in get_architecture(self.architecture).fast_paths:  # a slow run should say why
            if path.device == self.device.type:
                self.print_to_log_file(f"{path.name}: {fast_path_state(path.missing())}")
        for note in self.bare_network().notes:
            self.print_to_log_file(f"{self.architecture}: {note}.")

    def bare_network(self) -> torch.nn.Module:
        """The network itself, out of DDP's and torch.compile's wrappers."""
        network = getattr(self.network, "module", self.network)
        return getattr(network, "_orig_mod", network)

    def train_step(self, batch: dict) -> dict:
        try:
            return super().train_step(batch)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(self.out_of_memory_hint()) from error

    def out_of_memory_hint(self) -> str:
        """What to do when a training step does not fit: plans sized for this architecture and GPU."""
        arch, cm = get_architecture(self.architecture), self.configuration_manager
        gpu = (math.floor(torch.cuda.get_device_properties(self.device).total_memory / 2 ** 30)
               if self.device.type == "cuda" else None)
        return (f"{arch.name} ran out of {self.device.type} memory training a batch of {cm.batch_size} patches of "
                f"{list(cm.patch_size)} ({self.plans_manager.plans_name}, {self.configuration_name}). Plan patch and "
                f"batch size for this GPU: nnunet-ext plan -d {self.plans_manager.dataset_name} -a {arch.name} "
                f"--gpu-memory {gpu or '<GB of your GPU>'} -c {self.configuration_name}, then train with -p "
                f"{arch.plans_name(gpu) if gpu else 'the plans name it prints'}. Checkpoints already in the fold "
                "folder are unchanged.")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, after checking that the checkpoint holds this network. `--c` and `--val` load the
        fold folder's checkpoint; one another trainer wrote (a copied file, a renamed folder) would
        otherwise fail inside load_state_dict with every mismatching key. The file is left as it is."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):  # nnU-Net's own method takes nothing else
            checkpoint = self._check_checkpoint(filename_or_checkpoint)
            if "imported_from" in checkpoint:
                return self._load_imported(checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def _load_imported(self, checkpoint: dict) -> None:
        """A checkpoint `nnunet-ext import-official` wrote holds the official weights and no training state:
        `--val` validates them, `--c` trains on from them with a fresh optimiser and schedule."""
        self.bare_network().load_state_dict(checkpoint["network_weights"])
        self.inference_allowed_mirroring_axes = checkpoint["inference_allowed_mirroring_axes"]
        self.print_to_log_file(f"Weights imported by nnunet-ext import-official from "
                               f"{checkpoint['imported_from']['file']}; no optimiser state or epoch came with them.")

    def _check_checkpoint(self, filename: str) -> dict:
        # Memory-mapped: only the tensors' shapes are read here, nnU-Net reads the data afterwards.
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False, mmap=True)
        ours = self.bare_network().state_dict()
        theirs = {k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()}
        wrong, extra = mismatching_tensors(ours, theirs)
        if wrong or extra:
            source = checkpoint.get("trainer_name", "an unknown trainer")
            raise RuntimeError(
                f"{filename} was written by {source} and does not hold {type(self).__name__}'s network "
                f"({self.architecture} on these plans): {len(wrong)} of its {len(ours)} tensors are missing or "
                f"shaped differently (first: {wrong[0] if wrong else '-'}), and {len(extra)} are not part of it. "
                f"The file is unchanged. Continue or validate it with -tr {source} (and its plans), or train "
                f"{type(self).__name__} from scratch in a fold folder of its own.")
        return checkpoint

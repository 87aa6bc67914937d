"""`nnunet-ext upkern`: MedNeXt's UpKern (Roy et al. 2023, section 2.3). A network trained with kernel 3 starts
its kernel-5 twin: every weight whose kernel grew is the trained one resized by (bi/tri)linear interpolation,
every other tensor is copied, as the official code's upkern_load_weights does. The file it writes is what
`nnUNetv2_train ... -tr <Trainer>K5 -pretrained_weights FILE` starts from (nnU-Net leaves out the heads).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_ext.registry import ARCHITECTURES, SCHEDULES
from nnunet_ext.tools.import_official import ImportRefused, read_checkpoint, state_dict_of
from nnunet_ext.topology import Topology


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint of a trained kernel-3 MedNeXt (its fold folder's checkpoint_final.pth)")
    parser.add_argument("-o", "--output", type=Path,
                        help="file to write (default: checkpoint_upkern.pth next to the checkpoint)")


def kernel5_trainer(trainer_name: str) -> tuple[str, str, str]:
    """(architecture, preset of the checkpoint's trainer, preset with kernel 5) of a kernel-3 trainer."""
    for suffix in SCHEDULES:
        trainer_name = trainer_name.removesuffix(f"_{suffix}")
    for arch in ARCHITECTURES.values():
        presets = {"": {}, **arch.presets}
        for preset, options in presets.items():
            if trainer_name != (arch.preset_trainer(preset) if preset else arch.trainer):
                continue
            grown = {**options, "kernel_size": 5}
            target = next((p for p, o in presets.items() if o == grown), None)
            if "kernel_size" in arch.options() and options.get("kernel_size", 3) == 3 and target:
                return arch.name, preset, target
    kernel3 = [t for a in ARCHITECTURES.values() if "k5" in a.presets
               for t in (a.trainer, a.preset_trainer("official"))]
    raise ImportRefused(f"{trainer_name} is not a kernel-3 MedNeXt trainer; UpKern starts a kernel-5 network from one "
                        f"of: {', '.join(kernel3)}.")


def upkern(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`target`'s tensors from `source`'s: equal shapes copied, kernels resized (linear interpolation, corners
    not aligned, as the official code's F.interpolate); anything else is an error naming the tensor."""
    grown = {}
    for name, tensor in target.items():
        if name not in source:
            raise ImportRefused(f"the checkpoint lacks '{name}', which the kernel-5 network has.")
        old = source[name]
        if old.shape == tensor.shape:
            grown[name] = old.clone()
        elif old.dim() == tensor.dim() >= 4 and old.shape[:2] == tensor.shape[:2]:
            mode = {4: "bilinear", 5: "trilinear"}[old.dim()]
            grown[name] = F.interpolate(old.float(), size=tensor.shape[2:], mode=mode).to(tensor.dtype)
        else:
            raise ImportRefused(f"'{name}' is {tuple(old.shape)} in the checkpoint and {tuple(tensor.shape)} in the "
                                "kernel-5 network: not a kernel that grew.")
    return grown


def main(args) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = read_checkpoint(args.checkpoint)
    if not isinstance(checkpoint, dict) or "trainer_name" not in checkpoint or "init_args" not in checkpoint:
        raise ImportRefused(f"{args.checkpoint} is not a checkpoint nnU-Net wrote (it names no trainer and plans); "
                            "UpKern reads a fold folder's checkpoint_final.pth of a kernel-3 MedNeXt trainer.")
    name, _, target_preset = kernel5_trainer(checkpoint["trainer_name"])
    arch = ARCHITECTURES[name]
    init = checkpoint["init_args"]
    plans = PlansManager(init["plans"])
    manager = plans.get_configuration(init["configuration"])
    network = arch.build(Topology.from_plans(manager), determine_num_input_channels(plans, manager,
                                                                                    init["dataset_json"]),
                         plans.get_label_manager(init["dataset_json"]).num_segmentation_heads,
                         **arch.presets[target_preset])
    weights = upkern(state_dict_of(checkpoint, args.checkpoint), network.state_dict())
    output = args.output or args.checkpoint.with_name("checkpoint_upkern.pth")
    trainer = arch.preset_trainer(target_preset)
    torch.save({"network_weights": weights, "trainer_name": trainer,
                "upkern_from": {"file": str(args.checkpoint), "trainer": checkpoint["trainer_name"]}}, output)
    dataset = init["plans"]["dataset_name"]
    print(f"Written: {output} ({checkpoint['trainer_name']} -> {trainer})\nTrain: nnUNetv2_train {dataset} "
          f"{init['configuration']} FOLD -p {init['plans']['plans_name']} -tr {trainer} -pretrained_weights {output}")
    return 0

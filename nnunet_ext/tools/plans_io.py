"""Load a preprocessed dataset's plans configuration the way nnU-Net's trainer does."""

from __future__ import annotations

import json
import os
from pathlib import Path


def dataset_files(dataset: str | int, plans: str = "nnUNetPlans") -> tuple[Path, Path]:
    """(plans file, dataset.json) of a planned dataset in nnUNet_preprocessed.

    Raises FileNotFoundError with the command that writes the missing one.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise FileNotFoundError("nnUNet_preprocessed is not set; export it (see `nnunet-ext doctor`).")
    folder = Path(preprocessed) / maybe_convert_to_dataset_name(dataset)
    plans_file, dataset_file = folder / f"{plans}.json", folder / "dataset.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"No plans file {plans_file}; run nnUNetv2_plan_and_preprocess -d {dataset} "
                                + ("" if plans == "nnUNetPlans" else f"(or the planner that writes {plans}) ")
                                + "first.")
    if not dataset_file.is_file():
        raise FileNotFoundError(f"No {dataset_file} next to the plans; nnUNetv2_extract_fingerprint -d {dataset} "
                                "copies it there.")
    return plans_file, dataset_file


def load_configuration(dataset: str | int, configuration: str, plans: str = "nnUNetPlans"):
    """Return (ConfigurationManager, input channels, segmentation heads) of a planned dataset.

    Raises FileNotFoundError or KeyError with the command that fixes it.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file, dataset_file = dataset_files(dataset, plans)
    manager = PlansManager(str(plans_file))
    if configuration not in manager.available_configurations:
        raise KeyError(f"Configuration '{configuration}' is not in {plans_file.name}; available: "
                       f"{', '.join(manager.available_configurations)}.")
    cm = manager.get_configuration(configuration)
    dataset_json = json.loads(dataset_file.read_text())
    return (cm, determine_num_input_channels(manager, cm, dataset_json),
            manager.get_label_manager(dataset_json).num_segmentation_heads)

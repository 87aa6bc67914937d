"""`nnunet-ext demo`: a tiny synthetic dataset, planned, trained for a few minutes on CPU and predicted
with the stock nnUNetv2_* commands, in a folder of its own; it ends with nnU-Net's validation Dice."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from nnunet_ext.tools.make_dataset import make_dataset
from nnunet_ext.tools.workspace import Workspace

DEMO_MARKER = ".nnunet_ext_demo"  # marks a folder the demo made, and may replace


def add_arguments(parser) -> None:
    parser.add_argument("--dir", default="nnunet_ext_demo", help="workspace folder (replaced on each run)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", choices=("2d", "3d_fullres"))
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerAttentionUNet_demo")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))



def main(args) -> int:
    root = Path(args.dir).resolve()
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).exists():
        print(f"error: {root} exists and is not an nnunet-ext demo folder; choose another --dir "
              "(the demo replaces its folder's contents).", file=sys.stderr)
        return 2
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / DEMO_MARKER).touch()
    ws, log = Workspace(root), root / "demo.log"
    dataset, cfg, trainer = "999", args.configuration, args.trainer

    def step(text, command, *cmd_args):
        print(f"==> {text}", flush=True)
        ws.run(command, *cmd_args, log=log)

    print(f"==> Writing a tiny synthetic dataset to {ws.raw}", flush=True)
    make_dataset(ws.raw, 999, "Demo")
    step(f"nnUNetv2_plan_and_preprocess -d {dataset} -c {cfg}", "nnUNetv2_plan_and_preprocess",
         "-d", dataset, "-c", cfg, "-np", "2", "--verify_dataset_integrity")
    step(f"nnUNetv2_train {dataset} {cfg} 0 -tr {trainer} -device {args.device}", "nnUNetv2_train",
         dataset, cfg, "0", "-tr", trainer, "-device", args.device)
    predictions = root / "predictions"
    step(f"nnUNetv2_predict -i imagesTs -o {predictions} -d {dataset} -c {cfg} -f 0 -tr {trainer}",
         "nnUNetv2_predict", "-i", ws.raw / "Dataset999_Demo" / "imagesTs", "-o", predictions,
         "-d", dataset, "-c", cfg, "-f", "0", "-tr", trainer, "-device", args.device)
    dice = ws.validation_dice("Dataset999_Demo", trainer, cfg)
    print(f"\nValidation Dice (nnU-Net's evaluation of fold 0): "
          + ", ".join(f"label {k}: {v:.3f}" for k, v in dice.items() if k != "foreground_mean")
          + f"; foreground mean {dice['foreground_mean']:.3f}")
    print(f"Predictions: {predictions}\nFull log: {log}")
    return 0

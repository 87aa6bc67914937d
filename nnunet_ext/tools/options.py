"""Command-line arguments that several `nnunet-ext` commands take."""

from __future__ import annotations

import argparse


def available_device(name: str) -> str:
    """An argparse type: a device torch can use on this machine."""
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise argparse.ArgumentTypeError(f"'{name}' is not one of {', '.join(available)}")
    if not available[name]:
        raise argparse.ArgumentTypeError(f"{name} is not available to torch {torch.__version__} on this machine; "
                                         "use --device cpu")
    return name


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--device", default="cpu", type=available_device, help="cpu (default), cuda or mps")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the tables report their median")


def add_dataset_options(parser: argparse.ArgumentParser, required: bool = True, help: str = "name or id") -> None:
    parser.add_argument("-d", "--dataset", required=required, help=help)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")


def add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="nnunet_ext_reports",
                        help="folder for the files it writes (default: ./nnunet_ext_reports)")


def add_architectures_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-a", "--architectures", nargs="+", action="extend",
                        help="registered names (default: all); -a may be given more than once")


def architectures(args) -> list[str]:
    """The registered names `-a` gives (all by default), each once, in order; an unknown one is a KeyError with
    suggestions."""
    from nnunet_ext.registry import ARCHITECTURES, get_architecture

    return list(dict.fromkeys(get_architecture(a).name for a in (args.architectures or ARCHITECTURES)))

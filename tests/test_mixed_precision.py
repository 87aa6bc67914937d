"""fp16 mixed precision as nnU-Net trains on CUDA, proven on CPU (torch has float16 autocast and a
GradScaler for CPU tensors).

nnU-Net's train_step autocasts to float16 on CUDA and enters a dummy context elsewhere; with that
context made CUDA's autocast and the trainer given a GradScaler, nnU-Net's own train_step runs its
CUDA path here. Inputs have the magnitudes nnU-Net feeds: z-scored intensities with CT outliers up
to 50. Each architecture's layers that float16 cannot hold compute in float32 under autocast, which
the last tests check layer by layer: Mamba's scan (its exponentials, as the official LKM-UNet does),
Attention U-Net's unscaled self-attention, the B-spline bases and the deformable sampling positions.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnunet_ext.trainers as trainers
from conftest import matrix
from nnunet_ext.blocks.attention import NonLocalSelfAttention
from nnunet_ext.blocks.large_kernel_mamba import BiMamba
from nnunet_ext.ops.b_spline import b_spline_bases, uniform_grid
from nnunet_ext.ops.deform_conv import deform_conv
from nnunet_ext.registry import ARCHITECTURES

FP16_TOLERANCE = 2e-2  # of the largest fp32 logit: float16 keeps 11 bits through some 20 layers
STEPS = 8


@pytest.fixture
def cuda_autocast_on_cpu(monkeypatch):
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    monkeypatch.setattr(module, "dummy_context", lambda: torch.autocast("cpu", dtype=torch.float16))


def nnunet_inputs(shape, generator) -> torch.Tensor:
    """z-scored intensities with a sprinkle of CT outliers (metal, bone) up to 50 standard deviations."""
    x = torch.randn(shape, generator=generator)
    x.view(-1)[torch.randint(0, x.numel(), (x.numel() // 500 + 1,), generator=generator)] = 50.0
    return x


def trainer_for(name: str, planned, configuration: str):
    folder = planned.preprocessed / planned.dataset
    plans, dataset = (json.loads((folder / f).read_text()) for f in ("nnUNetPlans.json", "dataset.json"))
    plans["continue_training"] = False  # what nnUNetv2_train adds
    trainer = getattr(trainers, ARCHITECTURES[name].trainer)(plans, configuration, 0, dataset, torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("name,configuration", [
    pytest.param(a, c, marks=matrix(a, f"fp16-{c}", group="fp16"), id=f"{a}-{c}")
    for a in ARCHITECTURES for c in ("2d", "3d_fullres")])  # a rotation: one configuration per architecture and run
def test_nnunets_train_step_under_fp16_autocast_with_a_grad_scaler(name, configuration, nnunet_env,
                                                                   cuda_autocast_on_cpu):
    torch.manual_seed(0)
    trainer = trainer_for(name, nnunet_env, configuration)
    trainer.grad_scaler = torch.amp.GradScaler("cpu")  # nnU-Net makes one on CUDA only
    # Half the plans' patch per axis at most: float16 convolutions run on CPU some 70 times slower than
    # float32 ones (3D), and the network takes any input size.
    network = trainer.network
    patch = [min(p, 2 * s) for p, s in zip(trainer.configuration_manager.patch_size, network.total_stride)]
    generator = torch.Generator().manual_seed(0)
    data = nnunet_inputs((2, 1, *patch), generator)
    labels = torch.randint(0, 3, (2, 1, *patch), generator=generator).float()
    with torch.no_grad():
        sizes = [o.shape[2:] for o in network(data)]
    batch = {"data": data, "target": [F.interpolate(labels, size=s, mode="nearest") for s in sizes]}

    applied = 0
    for _ in range(STEPS):
        before = [p.detach().clone() for p in network.parameters()]
        loss = float(trainer.train_step(batch)["loss"])
        assert torch.isfinite(torch.tensor(loss)), loss
        applied += any(not torch.equal(a, p) for a, p in zip(before, network.parameters()))
    # The scaler skips the steps whose fp16 gradients overflow and halves its scale, as on a GPU; it settles.
    assert applied >= STEPS // 2 and trainer.grad_scaler.get_scale() >= 2 ** 8
    assert all(torch.isfinite(p).all() for p in network.parameters())

    network.eval()
    network.decoder.deep_supervision = False
    with torch.no_grad():
        reference = network(data)
        with torch.autocast("cpu", dtype=torch.float16):
            low = network(data)
    assert low.dtype == torch.float16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() <= FP16_TOLERANCE * reference.abs().max()


def test_mamba_computes_in_float32_under_autocast():
    torch.manual_seed(0)
    bim = BiMamba(8, d_state=4, d_conv=2, expand=1)
    tokens = (torch.randn(2, 30, 8) * 20).half()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            low = bim(tokens)
        assert low.dtype == torch.float16
        assert torch.equal(low, bim(tokens.float()).half())


def test_self_attention_computes_in_float32_under_autocast():
    """Unscaled logits in the thousands: float16 would put the softmax several percent off."""
    torch.manual_seed(0)
    block = NonLocalSelfAttention(nn.Conv2d, 32)
    with torch.no_grad():
        block.gamma.fill_(1.0)
        x = torch.randn(1, 32, 16, 16) * 30
        with torch.autocast("cpu", dtype=torch.float16):
            low = block(x)
        assert low.dtype == torch.float32  # the input's
        torch.testing.assert_close(low, block(x), rtol=0, atol=0)
        logits = torch.einsum("bcn,bcm->bnm", block.query(x).flatten(2), block.key(x).flatten(2))
        assert logits.abs().max() > 2048  # where float16 steps by 2 or more


def test_spline_bases_and_deformable_positions_are_float32_under_fp16_autocast():
    x = torch.randn(16, 4).half()
    with torch.autocast("cpu", dtype=torch.float16):
        assert b_spline_bases(x, uniform_grid(4, 5, 3), 3).dtype == torch.float32
    # float16 feature maps and offsets, as an autocast convolution hands them over, on a map 300 wide:
    # positions there in float16 step by 1/4 pixel (measured: 19% off); in float32 only the products round.
    generator = torch.Generator().manual_seed(0)
    image, weight = torch.randn(1, 2, 6, 300, generator=generator).half(), torch.randn(2, 2, 3, 3, generator=generator)
    offset = torch.randn(1, 18, 6, 300, generator=generator).half()
    with torch.no_grad():
        reference = deform_conv(image.float(), offset.float(), weight, padding=1)
        with torch.autocast("cpu", dtype=torch.float16):
            low = deform_conv(image, offset, weight, padding=1)
    assert low.dtype == torch.float16
    assert (low.float() - reference).abs().max() <= 2e-3 * reference.abs().max()

"""Matrix products of rows with a weight, rows @ weight.T, by oneDNN on the CPU.

PyTorch's CPU matrix products (mm, addmm, F.linear) call MKL's sgemm. oneDNN's 1x1 convolution computes the same
product over the rows viewed as a channels-last image, (rows, in) as the (1, in, rows, 1) map its memory already
is, and its output is again rows. On this project's AMD EPYC (AVX-512, 2 threads) the convolution ran our layers'
products 1.3-2.3 times as fast as sgemm, forward and both gradients: (4096 x 64) @ (64 x 256) at 374 GFLOP/s
against 160, U-KAN's spline product (1024 x 512) @ (512 x 64) at 282-338 against 166-175, MedNeXt's expansion
(4096 x 32) @ (32 x 128) at 237 against 123 (docs/mednext.md, "Speed and memory"). Below about 2^23
multiply-adds the convolution's fixed cost (about 10 us) outweighs that, and sgemm runs. MKL's sgemm is expected
to be at its best on Intel CPUs, where the two should be even.

The same numbers up to the order of the sums. CUDA, other dtypes, autocast, torch.compile (inductor lowers
products itself) and the CPU paths switched off (`cpu_kernel.cpu_paths_enabled`) take PyTorch's products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_ext.ops import cpu_kernel

MIN_MULTIPLY_ADDS = 2 ** 23


def _image(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows (n, c) as the channels-last (1, c, n, 1) map their memory is."""
    return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)


def _kernel(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(*weight.shape, 1, 1)


def by_onednn(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rows (n, in) @ weight.T runs as oneDNN's convolution: float32 CPU tensors, rows contiguous, the
    product large enough, outside autocast and torch.compile, with the CPU paths allowed."""
    return (rows.device.type == "cpu" and rows.dtype == weight.dtype == torch.float32 and rows.dim() == 2
            and rows.shape[0] * rows.shape[1] * weight.shape[0] >= MIN_MULTIPLY_ADDS and rows.is_contiguous()
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and cpu_kernel.cpu_paths_enabled())


def _from_image(image: torch.Tensor) -> torch.Tensor:
    """`_image`'s inverse: a channels-last (1, c, n, 1) map as its (n, c) rows, a view."""
    return image.permute(0, 2, 3, 1).reshape(image.shape[2], image.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in): on the CPU by oneDNN where `by_onednn` says so, differentiable
    (its backward is the convolution's, oneDNN's too)."""
    rows = x.reshape(-1, x.shape[-1])
    if not by_onednn(rows, weight):
        return F.linear(x, weight, bias)
    return _from_image(F.conv2d(_image(rows), _kernel(weight), bias)).view(*x.shape[:-1], weight.shape[0])


def addmm(add: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """add + rows @ weight.T for rows (n, in), add a bias (out,) or a matrix (n, out), into `out` if given; by
    oneDNN where `by_onednn` says so (for autograd Functions: not differentiable)."""
    if not by_onednn(rows, weight):
        return torch.addmm(add, rows, weight.t(), out=out)
    bias = add if add.dim() == 1 else None
    product = _from_image(F.conv2d(_image(rows), _kernel(weight), bias))
    if bias is None:
        return torch.add(add, product, out=out)
    return product if out is None else out.copy_(product)


def linear_backward(grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, input_grad: bool = True,
                    weight_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of rows @ weight.T in rows (n, in) and in weight (out, in) from `grad` (n, out), each
    where asked: grad @ weight and grad.T @ rows, by oneDNN's convolution backward where `by_onednn` says so."""
    if not (by_onednn(rows, weight) and grad.is_contiguous()):
        return grad @ weight if input_grad else None, grad.t() @ rows if weight_grad else None
    grad_image, grad_weight, _ = torch.ops.aten.convolution_backward(
        _image(grad), _image(rows), _kernel(weight), None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1,
        (input_grad, weight_grad, False))
    return _from_image(grad_image) if input_grad else None, grad_weight.view(weight.shape) if weight_grad else None

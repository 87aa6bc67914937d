"""Rows of a large matrix a few at a time, so that what a layer forms from them stays in the CPU's cache.

U-KAN's spline product (`b_spline.b_spline_linear`) and MedNeXt's pointwise MLP (`channels_last.pointwise_mlp`)
form, for every row of their input, a row several times as wide that a matrix product then reduces: a KAN
layer's bases, MedNeXt's expanded channels. Formed for the whole map they go to memory and back, in pages
faulted in anew each time (47 MB per layer at the 3d_fullres stages of 32 to 64 channels); formed about 2 MB at
a time into buffers that every chunk reuses, they stay in the L2 cache (2 MB per core here) between the
operation that writes them and the product that reads them, and are never all held, so backward forms them
again chunk by chunk instead of keeping them. Smaller chunks measured slower: each costs its calls' overhead.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 2 ** 21


def in_chunks(rows: int, *widths: int):
    """(slice of rows, one float32 buffer of that many rows per width) over `rows` rows; the buffers are the
    same for every chunk, about CHUNK_BYTES in all."""
    step = max(1, min(rows, CHUNK_BYTES // (4 * sum(widths))))
    buffers = [torch.empty(step, width, dtype=torch.float32) for width in widths]  # what the loops write
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        yield slice(lo, hi), [buffer[:hi - lo] for buffer in buffers]

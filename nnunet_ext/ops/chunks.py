"""Rows of a large matrix a few at a time, so that what a layer forms from them stays in the CPU's cache.

U-KAN's spline product (`b_spline.b_spline_linear`) and MedNeXt's pointwise MLP (`channels_last.pointwise_mlp`)
form, for every row of their input, a row several times as wide that a matrix product then reduces: a KAN
layer's bases, MedNeXt's expanded channels. Formed for the whole map they go to memory and back, in pages
faulted in anew each time (47 MB per layer at the 3d_fullres stages of 32 to 64 channels); formed about 2 MB at
a time, they stay in the L2 cache (2 MB per core here) between the operation that writes them and the product
that reads them, and are never all held, so backward forms them again chunk by chunk instead of keeping them.
Smaller chunks measured slower: each costs its calls' overhead. The compiled loops write into buffers that every
chunk reuses (`in_chunks`); a product's output of a chunk's size comes from the allocator's free memory again.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 2 ** 21


def _rows_per_chunk(rows: int, widths) -> int:
    return max(1, min(rows, CHUNK_BYTES // (4 * sum(widths))))


def slices(rows: int, *widths: int):
    """Slices of `rows` rows, each about CHUNK_BYTES of float32 rows of all `widths` together."""
    step = _rows_per_chunk(rows, widths)
    for lo in range(0, rows, step):
        yield slice(lo, min(lo + step, rows))


def in_chunks(rows: int, *widths: int):
    """`slices`, each with one float32 buffer of its rows per width; the buffers are the same for every chunk."""
    buffers = [torch.empty(_rows_per_chunk(rows, widths), width, dtype=torch.float32) for width in widths]
    for chunk in slices(rows, *widths):
        yield chunk, [buffer[:chunk.stop - chunk.start] for buffer in buffers]

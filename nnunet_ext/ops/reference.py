"""The selective scan written out one position at a time: the yardstick for tests and benchmarks.

Deliberately naive (a Python loop over the sequence, autograd through every step) and
independent of `selective_scan.py`; it computes in the dtype it is given (tests use float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same arguments as `selective_scan_fn`; returns (out, last_state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d, _ = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    B, C = (t.repeat_interleave(d // t.shape[1], dim=1) for t in (B, C))  # (batch, d, n, length)
    h = u.new_zeros(batch, d, A.shape[1])
    ys = []
    # unbind once: indexing one position per step would make backward quadratic in the length
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h

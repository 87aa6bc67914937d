"""Mamba's selective scan in plain PyTorch, with mamba_ssm's signature and numbers.

The recurrence (mamba_ssm `selective_scan_ref` semantics), per batch b, channel d, state n:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t,      out = y * silu(z)

`selective_scan_fn` dispatches to mamba_ssm's CUDA kernel when mamba-ssm is installed, the tensors
are on CUDA and the kernels are not switched off (`use_kernels(False)` or the environment variable
NNUNET_EXT_MAMBA_KERNELS=0). CPU tensors take the fused C loop of `nnunet_ext.ops.cpu_kernel`, which
also applies delta_bias, softplus, D and the gate, where a C compiler can build it (off with
`use_cpu_kernel(False)` or NNUNET_EXT_CPU_KERNEL=0). Everything else runs `_SelectiveScan`, which

- accumulates states and products in float32 whatever the input dtype or autocast;
- never loops over the sequence in Python: a tile of L positions is cut into chunks of about
  sqrt(L); one loop over the position inside a chunk runs all chunks at once, a second loop over
  chunks carries the state across chunk boundaries, and one multiply-add fixes every position up;
- keeps memory at O(b*d*L) between forward and backward, like the CUDA kernel: the (b, d, L, n)
  states live only inside one tile (at most about `TILE_ELEMENTS` of them, cut along rows and
  positions), and backward recomputes them from the state saved at each tile's start.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from nnunet_ext.ops import cpu_kernel
from nnunet_ext.ops.cpu_kernel import CompiledScan, cpu_kernel_available, env_switch
from nnunet_ext.ops.precision import autocast_off

# States (row, channel, position, n) materialised at once per tile; about six tensors of that size
# are alive inside backward. On CPU, tiles that stay in cache are fastest (measured with
# `nnunet-ext benchmark-scan`); on GPUs larger tiles cut Python overhead.
TILE_ELEMENTS = {"cpu": 2 ** 20, "cuda": 2 ** 25}
MIN_TILE_LENGTH = 1024  # below this the per-tile Python overhead dominates; split rows instead

_KERNELS_ENV = "NNUNET_EXT_MAMBA_KERNELS"
_use_kernels = env_switch(_KERNELS_ENV)


def use_kernels(enabled: bool) -> None:
    """Allow (default) or forbid dispatching to mamba_ssm's CUDA kernels."""
    global _use_kernels
    _use_kernels = bool(enabled)


def _import_kernels():
    """(mamba_ssm's CUDA selective-scan module, None) when installed and allowed, else (None, why not)."""
    if not _use_kernels:
        return None, f"switched off by {_KERNELS_ENV}=0 or use_kernels(False)"
    try:
        from mamba_ssm.ops import selective_scan_interface
    except ImportError as e:  # not installed, or installed without its compiled extension
        return None, f"mamba_ssm does not import ({e}): pip install 'nnunet-ext[mamba]' on a machine with nvcc"
    return selective_scan_interface, None


def mamba_ssm_kernels():
    """mamba_ssm's CUDA selective-scan module when installed and allowed, else None."""
    return _import_kernels()[0]


def kernels_off_reason() -> str | None:
    """Why CUDA tensors would not reach mamba_ssm's kernels; None when they would."""
    return _import_kernels()[1]


@contextlib.contextmanager
def pytorch_paths_only():
    """Inside the block, Mamba's ops (and U-KAN's B-spline bases, MedNeXt's pointwise MLP) take their PyTorch
    paths: neither the CPU paths nor mamba_ssm's kernels. That is what a device without either runs (a GPU's
    bases and MLPs always do), and it needs the most memory."""
    saved = cpu_kernel._enabled, _use_kernels
    cpu_kernel.use_cpu_kernel(False)
    use_kernels(False)
    try:
        yield
    finally:
        cpu_kernel.use_cpu_kernel(saved[0])
        use_kernels(saved[1])


# torch.compile runs the rest of a network compiled and calls the scan as it is: tracing would unroll
# its loops over chunk positions into graphs of thousands of nodes (and the CUDA kernel cannot be traced).
@torch.compiler.disable
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan with mamba_ssm's signature.

    Shapes: u, delta, z (batch, d, L); A (d, n); B, C (batch, n, L) or (batch, groups, n, L) with
    d divisible by groups; D, delta_bias (d,). Returns out (batch, d, L) in u's dtype and, with
    `return_last_state`, the float32 state after the last position, (batch, d, n).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda:
        kernels = mamba_ssm_kernels()
        if kernels is not None:
            return kernels.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             return_last_state)
    dtype_in = u.dtype
    f32 = (lambda t: None if t is None else t.float())
    with autocast_off(u.device):
        u32, delta32, A32, D32, z32, bias32 = (f32(t) for t in (u, delta, A, D, z, delta_bias))
        B32, C32 = (t.float() if t.dim() == 4 else t.float().unsqueeze(1) for t in (B, C))
        if u.device.type == "cpu" and cpu_kernel_available():
            y, last_state = CompiledScan.apply(u32, delta32, A32, B32, C32, D32, z32, bias32, delta_softplus)
        else:
            if bias32 is not None:
                delta32 = delta32 + bias32[:, None]
            if delta_softplus:
                delta32 = F.softplus(delta32)
            y, last_state = _SelectiveScan.apply(u32, delta32, A32, B32, C32)
            if D32 is not None:
                y = y + u32 * D32[:, None]
            if z32 is not None:
                y = y * F.silu(z32)
    out = y.to(dtype_in)
    return (out, last_state) if return_last_state else out


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan_fn: u must be (batch, d, length), got shape {tuple(u.shape)}.")
    batch, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan_fn: A must be (d, n) = ({d}, n), got {tuple(A.shape)}.")
    if A.is_complex():
        raise ValueError("selective_scan_fn: complex A is not supported; use a real A (Mamba's A = -exp(A_log)).")
    n = A.shape[1]
    expected = {"delta": (delta, (batch, d, length)), "z": (z, (batch, d, length)),
                "D": (D, (d,)), "delta_bias": (delta_bias, (d,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan_fn: {name} must have shape {shape}, got {tuple(tensor.shape)}.")
    for name, tensor in (("B", B), ("C", C)):
        ok = (tensor.dim() == 3 and tuple(tensor.shape) == (batch, n, length)) or (
            tensor.dim() == 4 and tensor.shape[0] == batch and tuple(tensor.shape[2:]) == (n, length)
            and d % tensor.shape[1] == 0)
        if not ok:
            raise ValueError(f"selective_scan_fn: {name} must be (batch, n, length) = {(batch, n, length)} "
                             f"or (batch, groups, n, length) with groups dividing d={d}; "
                             f"got {tuple(tensor.shape)}.")


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, all float32.

    Inputs u, delta (b, d, L); A (d, n); B, C (b, g, n, L). Returns y (b, d, L) and the last
    state (b, d, n). The work is cut into tiles of rows x positions (`_tiling`); forward saves
    its inputs and the state entering each tile, backward recomputes the tile's states from it.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, d, length = u.shape
        rows, positions = _tiling(batch, d * A.shape[1], length, u.device)
        ys, lasts, starts = [], [], []
        for r in range(0, batch, rows):
            h, y = u.new_zeros(min(rows, batch - r), d, A.shape[1]), []
            for s in range(0, length, positions):
                starts.append(h)
                y_tile, h = _Tile(u, delta, A, B, C, r, r + rows, s, s + positions).forward(h)
                y.append(y_tile)
            ys.append(torch.cat(y, dim=-1))
            lasts.append(h)
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.tiling = rows, positions
        return torch.cat(ys), torch.cat(lasts)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        rows, positions = ctx.tiling
        grads = [torch.zeros_like(t) for t in (u, delta, A, B, C)]
        if grad_last is None:
            grad_last = u.new_zeros(u.shape[0], *A.shape)
        starts = iter(reversed(starts))
        for r in reversed(range(0, u.shape[0], rows)):
            carry = grad_last[r:r + rows]
            for s in reversed(range(0, u.shape[-1], positions)):
                tile = _Tile(u, delta, A, B, C, r, r + rows, s, s + positions)
                carry = tile.backward(next(starts), grad_y[r:r + rows, :, s:s + positions], carry, grads)
        return tuple(grads)


def _tiling(batch: int, states_per_position: int, length: int, device: torch.device) -> tuple[int, int]:
    """(rows, positions) per tile: a tile holds at most about `TILE_ELEMENTS[device]` states, cut
    along the sequence first but never below MIN_TILE_LENGTH positions, then across rows."""
    budget = TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cuda"])
    if batch * states_per_position * length <= budget:
        return batch, length
    positions = min(length, max(MIN_TILE_LENGTH, budget // (batch * states_per_position)))
    return max(1, min(batch, budget // (states_per_position * positions))), positions


class _Tile:
    """Rows [r0, r1) and positions [start, stop) of one scan, laid out as (T, chunks, b, g, d/g, n).

    T, the positions per chunk, is about sqrt(length) so that the two Python loops of the scan
    (over T, then over chunks) are both short. The tail is padded with delta = u = B = C = 0: the
    state passes through unchanged (exp(0) = 1, no input) and the padded outputs are discarded.
    """

    def __init__(self, u, delta, A, B, C, r0, r1, start, stop):
        u, delta, B, C = u[r0:r1], delta[r0:r1], B[r0:r1], C[r0:r1]
        stop = min(stop, u.shape[-1])
        self.rows = slice(r0, r1)
        self.length = stop - start
        self.T = math.ceil(math.sqrt(self.length))
        self.chunks = math.ceil(self.length / self.T)
        self.batch, d, _ = u.shape
        self.groups, self.n = B.shape[1], A.shape[1]
        self.start, self.stop = start, stop
        self.delta = self._positions(delta[..., start:stop], grouped=True)
        self.u = self._positions(u[..., start:stop], grouped=True)
        self.B = self._positions(B[..., start:stop], grouped=False)
        self.C = self._positions(C[..., start:stop], grouped=False)
        self.A = A.view(self.groups, d // self.groups, self.n)

    def _positions(self, t, grouped):
        """(b, d, l) or (b, g, n, l) -> (T, chunks, b, g, d/g) or (T, chunks, b, g, 1, n)."""
        pad = self.T * self.chunks - self.length
        t = F.pad(t, (0, pad)).unflatten(-1, (self.chunks, self.T))
        if grouped:  # (b, d, chunks, T)
            return t.unflatten(1, (self.groups, -1)).permute(4, 3, 0, 1, 2).contiguous()
        return t.permute(4, 3, 0, 1, 2).unsqueeze(4).contiguous()  # (b, g, n, chunks, T)

    def _to_sequence(self, t):
        """(T, chunks, b, g, k) -> (b, g, k, length); k is d/g for channels, n for B and C."""
        return t.permute(2, 3, 4, 1, 0).flatten(3)[..., :self.length]

    def _decay_and_input(self):
        decay = torch.exp(self.delta.unsqueeze(-1) * self.A)
        inputs = (self.delta * self.u).unsqueeze(-1) * self.B
        return decay, inputs

    def _states(self, h0, decay, inputs):
        """All states h_t of the tile, given the state h0 entering it."""
        h = inputs.clone()
        cumulative = decay.clone()  # product of decays from the chunk start up to t
        for t in range(1, self.T):
            h[t].addcmul_(decay[t], h[t - 1])
            cumulative[t].mul_(cumulative[t - 1])
        # state entering each chunk: h0 for the first, then the carried end state of the previous
        entering = torch.empty_like(h[0])
        state = h0.view(self.batch, self.groups, -1, self.n)
        for c in range(self.chunks):
            entering[c] = state
            state = torch.addcmul(h[-1, c], cumulative[-1, c], state)
        h.addcmul_(cumulative, entering)
        return h

    def forward(self, h0):
        decay, inputs = self._decay_and_input()
        h = self._states(h0, decay, inputs)
        y = (h * self.C).sum(-1)
        # a copy: a view would keep the whole tile's states alive while forward saves it for backward
        return self._to_sequence(y).flatten(1, 2), h[-1, -1].flatten(1, 2).clone()

    def backward(self, h0, grad_y, grad_last, grads):
        """Write this tile's gradients into `grads` (u, delta, A, B, C; A accumulates) and
        return the gradient of the state entering the tile."""
        decay, inputs = self._decay_and_input()
        h = self._states(h0, decay, inputs)
        grad_y = self._positions(grad_y, grouped=True)
        # g_t = dL/dh_t = C_t grad_y_t + decay_{t+1} g_{t+1}: the forward scan run backwards
        g = grad_y.unsqueeze(-1) * self.C
        after = torch.ones_like(decay)  # product of decays from t + 1 to the chunk end
        for t in range(self.T - 2, -1, -1):
            g[t].addcmul_(decay[t + 1], g[t + 1])
            torch.mul(decay[t + 1], after[t + 1], out=after[t])
        leaving = torch.empty_like(g[0])  # dL/dh at the end of each chunk, from later chunks
        state = grad_last.view(self.batch, self.groups, -1, self.n)
        for c in reversed(range(self.chunks)):
            leaving[c] = state
            state = decay[0, c] * torch.addcmul(g[0, c], after[0, c], state)
        g.addcmul_(after, leaving)

        # exp(delta A) h_{t-1} = h_t - x_t, so dL/d(delta_t A) = g_t (h_t - x_t)
        g_delta_a = g * (h - inputs)
        g_delta = (g_delta_a * self.A).sum(-1)
        grads[2] += (g_delta_a * self.delta.unsqueeze(-1)).sum((0, 1, 2)).flatten(0, 1)
        g_delta_u = (g * self.B).sum(-1)
        g_delta += g_delta_u * self.u
        grads[1][self.rows, ..., self.start:self.stop] = self._to_sequence(g_delta).flatten(1, 2)
        grads[0][self.rows, ..., self.start:self.stop] = self._to_sequence(g_delta_u * self.delta).flatten(1, 2)
        grads[3][self.rows, ..., self.start:self.stop] = self._to_sequence(
            (g * (self.delta * self.u).unsqueeze(-1)).sum(4))
        grads[4][self.rows, ..., self.start:self.stop] = self._to_sequence((h * grad_y.unsqueeze(-1)).sum(4))
        return state.flatten(1, 2)

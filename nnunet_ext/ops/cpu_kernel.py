"""The compiled CPU loops (csrc/): a Mamba layer's selective scan with everything around it and its causal
convolution with its SiLU (mamba.c), the B-spline bases of a KAN layer on equally spaced knots
(b_spline.c), the weight gradient of a depthwise convolution (depthwise.c) and the trilinear sampling of a
deformable convolution (deform.c); compiled on first use into one library, called through ctypes.

A C compiler is all it needs: no PyTorch headers, no ninja, about a second to build. The library is
cached under NNUNET_EXT_CACHE (default ~/.cache/nnunet_ext), named by a hash of the sources, the flags
and the CPU, so a cluster sharing one home folder never loads a build for another processor.
Without a compiler `selective_scan_fn`, `causal_conv1d_silu`, `b_spline_bases`, `depthwise_conv` and
`deform_conv` keep their PyTorch paths, and `cpu_kernel_off_reason` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
# Each source with its compile flags. -ffast-math lets gcc call glibc's vectorised expf and reorder the
# d_state sums; b_spline.c tests for NaN, which -ffast-math would let gcc drop (-fno-trapping-math keeps
# NaN and lets gcc vectorise its selects). Fast math is given to the compile step only: linked with it,
# gcc before 13 adds crtfastmath.o, which switches the whole process to flushing denormals when the
# library loads. -march=native is safe because the cache key names the CPU.
SOURCES = {_CSRC / "mamba.c": ["-O3", "-ffast-math", "-march=native", "-fPIC", "-c"],
           _CSRC / "b_spline.c": ["-O3", "-fno-trapping-math", "-march=native", "-fPIC", "-c"],
           _CSRC / "depthwise.c": ["-O3", "-march=native", "-fPIC", "-c"],
           _CSRC / "deform.c": ["-O3", "-march=native", "-fPIC", "-c"]}
LINK_FLAGS = ["-shared"]
CHUNK = 64  # positions whose states backward recomputes at once: (CHUNK + 1) x d_state floats stay in L1
_ENV = "NNUNET_EXT_CPU_KERNEL"


def env_switch(variable: str) -> bool:
    """A fast path's switch: on unless the environment variable is 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() not in {"0", "false", "no", "off"}


_enabled = env_switch(_ENV)


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "d", "groups", "n", "length", "chunk", "parts",
                                                    "softplus", "batch_stride", "channel_stride", "width")]


def use_cpu_kernel(enabled: bool) -> None:
    """Allow (default) or forbid the compiled CPU loops and the other CPU paths (`cpu_paths_enabled`); forbidden,
    CPU tensors take the PyTorch paths."""
    global _enabled
    _enabled = bool(enabled)


def _cpu_name() -> str:
    """The CPU's model and instruction-set flags, which decide what -march=native may emit."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def _build(compiler: list[str], library: Path) -> str | None:
    """Compile SOURCES and link them into `library`; what went wrong when that fails."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # build aside, then rename: other processes see no library or a whole one
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
            built = Path(tmp) / library.name
            commands = [([*compiler, *flags, str(source), "-o", str(obj)], source.name)
                        for (source, flags), obj in zip(SOURCES.items(), objects)]
            commands.append(([*compiler, *LINK_FLAGS, *map(str, objects), "-o", str(built), "-lm"], "the library"))
            for command, what in commands:
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    detail = result.stderr.strip()[-500:]
                    return (f"{shlex.join(compiler)} failed to build {what} "
                            f"(exit status {result.returncode})" + (f": {detail}" if detail else "")
                            + "; install a working gcc or set CC")
            os.replace(built, library)
    except OSError as e:  # no such compiler, or a cache folder we cannot write
        return (f"cannot build {', '.join(source.name for source in SOURCES)} with {shlex.join(compiler)!r} in "
                f"{library.parent} ({e}); install gcc or set CC, and point NNUNET_EXT_CACHE to a writable folder")
    return None


@lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else None)  # CC may be "ccache gcc"
    if compiler is None:
        return None, "no C compiler found; install gcc or set CC"
    parts = [part for source, flags in SOURCES.items() for part in (source.read_bytes(), " ".join(flags).encode())]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(LINK_FLAGS).encode(), _cpu_name().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("NNUNET_EXT_CACHE", Path.home() / ".cache" / "nnunet_ext"))
    library = cache / f"kernels_{key}.so"
    if not library.exists():
        error = _build(compiler, library)
        if error:
            return None, error
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as e:  # for example a cache on a filesystem mounted noexec
        return None, f"cannot load {library} ({e}); point NNUNET_EXT_CACHE to another folder"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.scan_forward.argtypes = [ctypes.POINTER(_Dims), i64, i64, i64] + [ptr] * 11
    lib.scan_backward.argtypes = [ctypes.POINTER(_Dims), i64, i64, i64, i64] + [ptr] * 19
    lib.conv_forward.argtypes = [ctypes.POINTER(_Dims), i64, i64, i64] + [ptr] * 4
    lib.conv_backward.argtypes = [ctypes.POINTER(_Dims), i64, i64, i64] + [ptr] * 7
    lib.bspline_forward.argtypes = [i64] * 5 + [ptr] * 5
    lib.bspline_backward.argtypes = [i64] * 5 + [ptr] * 6
    lib.depthwise_grad_weight.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.deform_forward.argtypes = [ptr, i64, i64] + [ptr] * 4
    lib.deform_grad_position_weight.argtypes = [ptr, i64, i64] + [ptr] * 6
    lib.deform_grad_input.argtypes = [ptr, i64, i64] + [ptr] * 4
    for function in (lib.scan_forward, lib.scan_backward, lib.conv_forward, lib.conv_backward,
                     lib.bspline_forward, lib.bspline_backward, lib.depthwise_grad_weight, lib.deform_forward,
                     lib.deform_grad_position_weight, lib.deform_grad_input):
        function.restype = None
    return lib, None


def cpu_kernel_off_reason() -> str | None:
    """Why CPU tensors would take the PyTorch paths instead of the compiled loops; None when they would not."""
    if not _enabled:
        return f"switched off by {_ENV}=0 or use_cpu_kernel(False)"
    return _load()[1]


def cpu_paths_enabled() -> bool:
    """Whether CPU tensors may take this package's CPU paths at all (`use_cpu_kernel`, NNUNET_EXT_CPU_KERNEL):
    those in plain PyTorch too, such as MedNeXt's pointwise MLP in chunks. The compiled loops need the library
    as well (`cpu_kernel_available`)."""
    return _enabled


def cpu_kernel_available() -> bool:
    return cpu_kernel_off_reason() is None


@lru_cache(maxsize=None)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child inherits the parent's pool object but not its threads."""
    return ThreadPoolExecutor(threads, thread_name_prefix="nnunet_ext_scan")


def _run(function, dims: _Dims, items, args, with_part: bool = False) -> None:
    """Call the C `function` once per work item of `_work` (its part too when `with_part`)."""
    _parallel([partial(function, ctypes.byref(dims), b, lo, hi, *((p,) if with_part else ()), *args)
               for b, lo, hi, p in items])


def _parallel(calls) -> None:
    """Run the C calls on torch's number of threads; ctypes releases the GIL while C runs."""
    threads = torch.get_num_threads()
    if threads == 1 or len(calls) == 1:
        for call in calls:
            call()
        return
    for future in [_pool(threads, os.getpid()).submit(call) for call in calls]:
        future.result()


def _work(batch: int, d: int, groups: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(parts, [(row, first channel, end channel, part)]): every group's channels cut into `parts`
    pieces, enough pieces for all threads."""
    per_group = d // groups
    parts = max(1, min(per_group, -(-torch.get_num_threads() // (batch * groups))))
    items = []
    for b in range(batch):
        for g in range(groups):
            for p in range(parts):
                lo, hi = g * per_group + p * per_group // parts, g * per_group + (p + 1) * per_group // parts
                items.append((b, lo, hi, p))
    return parts, items


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _layout(*sequences: torch.Tensor | None) -> tuple[list, tuple[int, int]]:
    """The (batch, d, L) tensors and their (batch, channel) strides, which is how the C loops address
    them: as they are when all share one dense layout, contiguous (b, d, L) or mamba_ssm's "d (b l)",
    else contiguous copies."""
    present = [t for t in sequences if t is not None]
    batch, d, length = present[0].shape
    layouts = {(d * length, length, 1), (length, batch * length, 1)}
    strides = {t.stride() for t in present}
    if len(strides) != 1 or not strides <= layouts:
        sequences = [None if t is None else t.contiguous() for t in sequences]
        strides = {(d * length, length, 1)}
    return list(sequences), strides.pop()[:2]


def _like(t: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """An empty float32 tensor of t's (batch, d, L) shape laid out with `strides`."""
    return torch.empty_strided(t.shape, (*strides, 1), dtype=torch.float32)


def _in_layout(t: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """t as float32 with `strides`, copied only if it is not already."""
    if t.dtype == torch.float32 and t.stride() == (*strides, 1):
        return t
    return _like(t, strides).copy_(t)


def _dims(t: torch.Tensor, strides: tuple[int, int], groups: int = 1, n: int = 0, parts: int = 1,
          softplus: bool = False, width: int = 0) -> _Dims:
    batch, d, length = t.shape
    return _Dims(batch, d, groups, n, length, CHUNK, parts, softplus, *strides, width)


class CompiledCausalConv(torch.autograd.Function):
    """causal_conv1d_silu for float32 CPU tensors: x (b, d, L), weight (d, width), bias (d,) or None;
    the output has x's layout."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        lib = _load()[0]
        (x,), strides = _layout(x)
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        dims = _dims(x, strides, width=weight.shape[1])
        u = _like(x, strides)
        args = [_ptr(t) for t in (x, weight, bias, u)]
        _run(lib.conv_forward, dims, _work(x.shape[0], x.shape[1], 1)[1], args)
        ctx.save_for_backward(x, weight, bias)
        ctx.strides = strides
        return u

    @staticmethod
    def backward(ctx, grad_u):
        lib = _load()[0]
        x, weight, bias = ctx.saved_tensors
        batch, d, _ = x.shape
        dims = _dims(x, ctx.strides, width=weight.shape[1])
        grad_u = _in_layout(grad_u, ctx.strides)
        dx, dw, dbias = _like(x, ctx.strides), x.new_empty(batch, d, weight.shape[1]), x.new_empty(batch, d)
        args = [_ptr(t) for t in (x, weight, bias, grad_u, dx, dw, dbias)]
        _run(lib.conv_backward, dims, _work(batch, d, 1)[1], args)
        return dx, dw.sum(0), None if bias is None else dbias.sum(0)


class CompiledScan(torch.autograd.Function):
    """selective_scan_fn's whole computation for float32 CPU tensors: u, delta, z (b, d, L); A (d, n);
    B, C (b, g, n, L); D, delta_bias (d,) or None; softplus a bool. Returns the output (b, d, L) in
    the layout of u, delta and z, and the last state (b, d, n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        lib = _load()[0]
        batch, d, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        (u, delta, z), strides = _layout(u, delta, z)
        A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
        B_t, C_t = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()  # (b, g, L, n)
        parts, items = _work(batch, d, groups)
        dims = _dims(u, strides, groups, n, parts, softplus)
        out = _like(u, strides)
        states = u.new_empty(batch, d, -(-length // CHUNK), n)
        last = u.new_empty(batch, d, n)
        args = [_ptr(t) for t in (u, delta, delta_bias, A, B_t, C_t, D, z, out, states, last)]
        _run(lib.scan_forward, dims, items, args)
        ctx.save_for_backward(u, delta, delta_bias, A, B_t, C_t, D, z, states)
        ctx.softplus, ctx.strides = softplus, strides
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        lib = _load()[0]
        u, delta, delta_bias, A, B_t, C_t, D, z, states = ctx.saved_tensors
        batch, d, length = u.shape
        groups, n = B_t.shape[1], A.shape[1]
        parts, items = _work(batch, d, groups)
        dims = _dims(u, ctx.strides, groups, n, parts, ctx.softplus)
        grad_out = _in_layout(grad_out, ctx.strides)
        grad_last = None if grad_last is None else grad_last.float().contiguous()
        du, ddelta = _like(u, ctx.strides), _like(u, ctx.strides)
        dz = None if z is None else _like(u, ctx.strides)
        dA = u.new_empty(batch, d, n)
        dD, ddelta_bias = u.new_empty(batch, d), u.new_empty(batch, d)
        dB = u.new_zeros(batch, groups, parts, length, n)
        dC = u.new_zeros(batch, groups, parts, length, n)
        args = [_ptr(t) for t in (u, delta, delta_bias, A, B_t, C_t, D, z, states, grad_out, grad_last,
                                  du, ddelta, dA, dB, dC, dD, ddelta_bias, dz)]
        _run(lib.scan_backward, dims, items, args, with_part=True)
        return (du, ddelta, dA.sum(0), dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2),
                None if D is None else dD.sum(0), dz, None if delta_bias is None else ddelta_bias.sum(0), None)


def _pieces(rows: int, threads: int | None = None) -> list[tuple[int, int]]:
    """`rows` rows cut into one (first row, end row) piece per thread (default: torch's threads), none empty."""
    pieces = max(1, min(rows, threads or torch.get_num_threads()))
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _row_calls(function, rows: int, sizes: tuple, tensors: tuple, threads: int | None = None) -> list:
    """`function(*sizes, first row, end row, *pointers to tensors)` over `rows` rows, one call per piece:
    the C loops' signature."""
    pointers = [_ptr(t) for t in tensors]
    return [partial(function, *sizes, lo, hi, *pointers) for lo, hi in _pieces(rows, threads)]


def b_spline_forward(x: torch.Tensor, start: torch.Tensor, step: torch.Tensor, matrix: torch.Tensor,
                     intervals: int, out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """The bases (rows, features, intervals - order) of x (rows, features) on equally spaced knots from
    `start` with spacing `step` (features each), the interval polynomials being [1, u, .., u^k] @ `matrix`
    ((k + 1) x (k + 1)); all float32 and contiguous. `out`: where to write them (a buffer used again saves
    the page faults of a fresh one); `threads`: how many share the rows (default: torch's)."""
    order = matrix.shape[0] - 1
    bases = x.new_empty(*x.shape, intervals - order) if out is None else out
    _parallel(_row_calls(_load()[0].bspline_forward, x.shape[0], (x.shape[1], intervals, order),
                         (x, start, step, matrix, bases), threads))
    return bases


def b_spline_backward(x: torch.Tensor, start: torch.Tensor, step: torch.Tensor, matrix: torch.Tensor,
                      intervals: int, grad: torch.Tensor, out: torch.Tensor | None = None,
                      threads: int | None = None) -> torch.Tensor:
    """The gradient in x (rows, features) from the bases' gradient `grad`, as `b_spline_forward` laid them out;
    written to `out` if given (contiguous, x's shape); `threads` as for `b_spline_forward`."""
    grad_x = torch.empty_like(x) if out is None else out
    _parallel(_row_calls(_load()[0].bspline_backward, x.shape[0], (x.shape[1], intervals, matrix.shape[0] - 1),
                         (x, start, step, matrix, grad.contiguous(), grad_x), threads))
    return grad_x


def depthwise_grad_weight(x: torch.Tensor, grad: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple,
                          dilation: tuple) -> torch.Tensor:
    """The weight gradient (C, 1, *kernel) of a depthwise 3D convolution of x (N, C, D, H, W) that gave the
    output gradient `grad` (N, C, *output's D, H, W): float32, both channels-last. For a transposed convolution,
    x is its output gradient and grad its input."""
    (batch, channels, *spatial), output = x.shape, grad.shape[2:]
    shape = (ctypes.c_int64 * 19)(channels, *spatial, *output, *kernel, *stride, *padding, *dilation)
    pieces = _pieces(batch * output[0] * output[1])
    sums = x.new_empty(len(pieces), math.prod(kernel), channels)  # each piece's own sums, added below
    function = _load()[0].depthwise_grad_weight
    _parallel([partial(function, shape, lo, hi, _ptr(x), _ptr(grad), _ptr(sums[i]))
               for i, (lo, hi) in enumerate(pieces)])
    return sums.sum(0).t().reshape(channels, 1, *kernel)


def _deform_shape(x: torch.Tensor, position: torch.Tensor):
    return (ctypes.c_int64 * 7)(*x.shape, *position.shape[1:3])


def deform(x: torch.Tensor, position: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of maps x (M, D, H, W, C) at `position` (M, P, T, 3), (z, y, x) in input pixels, zeros
    outside, weighed by `weight` (T, C) and summed over the T taps: out (M, P, C), a depthwise deformable
    convolution without bias (with T = 1 and a weight of ones, the samples). No sample is stored. float32 and
    contiguous, x being channels-last maps' memory."""
    out = x.new_empty(*position.shape[:2], x.shape[-1])
    _parallel(_row_calls(_load()[0].deform_forward, out.shape[0] * out.shape[1], (_deform_shape(x, position),),
                         (x, position, weight, out)))
    return out


def deform_backward(x: torch.Tensor, position: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                    needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """The gradients in x, `position` and `weight` (those `needs` asks for) from the output's gradient (M, P, C)."""
    lib, shape = _load()[0], _deform_shape(x, position)
    grad_x = grad_position = grad_weight = None
    if needs[0]:  # threads take channels, so that none adds to another's floats
        grad_x = torch.zeros_like(x)
        _parallel(_row_calls(lib.deform_grad_input, x.shape[-1], (shape,), (position, weight, grad, grad_x)))
    if needs[1] or needs[2]:
        pieces = _pieces(grad.shape[0] * grad.shape[1])
        grad_position = torch.empty_like(position)
        parts = weight.new_empty(len(pieces), *weight.shape) if needs[2] else [None] * len(pieces)
        _parallel([partial(lib.deform_grad_position_weight, shape, lo, hi,
                           *(_ptr(t) for t in (x, position, weight, grad, grad_position, part)))
                   for part, (lo, hi) in zip(parts, pieces)])
        grad_weight = parts.sum(0) if needs[2] else None
    return grad_x, grad_position if needs[1] else None, grad_weight

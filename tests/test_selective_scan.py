"""The selective scan against an independent float64 loop and against mamba_ssm's own reference, on
both CPU paths: the fused C loop (nnunet_ext.ops.cpu_kernel) and the PyTorch tiles."""

from __future__ import annotations

import multiprocessing
import sys
import types

import pytest
import torch
import nnunet_ext.ops.cpu_kernel as cpu_kernel
import nnunet_ext.ops.selective_scan as scan_module
from conftest import channels_first
from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.ops.b_spline import b_spline_bases, uniform_grid
from nnunet_ext.ops.reference import selective_scan_loop


def sequential_scan(u, delta, A, B, C, **options):
    """The float64 position-by-position loop."""
    return selective_scan_loop(u.double(), delta.double(), A.double(), B.double(), C.double(),
                               **{k: v.double() if torch.is_tensor(v) else v for k, v in options.items()})


def make_inputs(batch, d, length, n, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(u=torch.randn(batch, d, length, generator=g), delta=torch.randn(batch, d, length, generator=g) * 0.5,
                A=-torch.rand(d, n, generator=g) * 4, B=torch.randn(*bc_shape, generator=g),
                C=torch.randn(*bc_shape, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(batch, d, length, generator=g), delta_bias=torch.randn(d, generator=g) * 0.5)


def check_against_loop(inputs, optional, softplus, rtol=1e-4):
    """Outputs, last state and the gradient of every input match the float64 loop."""
    used = {k: v for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") or k in optional}
    ours = {k: v.clone().requires_grad_() for k, v in used.items()}
    ref = {k: v.double().requires_grad_() for k, v in used.items()}
    y, last = selective_scan_fn(**ours, delta_softplus=softplus, return_last_state=True)
    y_ref, last_ref = sequential_scan(**ref, delta_softplus=softplus)
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=rtol * y_ref.abs().max().item())
    torch.testing.assert_close(last.double(), last_ref, rtol=rtol, atol=rtol * last_ref.abs().max().item())
    w, w_last = torch.randn_like(y_ref), torch.randn_like(last_ref)
    ((y * w.float()).sum() + (last * w_last.float()).sum()).backward()
    ((y_ref * w).sum() + (last_ref * w_last).sum()).backward()
    for k in used:
        scale = ref[k].grad.abs().max().item()
        torch.testing.assert_close(ours[k].grad.double(), ref[k].grad, rtol=rtol, atol=rtol * scale + 1e-12,
                                   msg=lambda m: f"gradient of {k}: {m}")


@pytest.mark.parametrize("batch,d,length,n,groups", [
    (1, 3, 1, 2, None), (2, 6, 37, 5, None), (2, 8, 101, 4, 2), (3, 4, 256, 16, None), (1, 2, 2049, 3, None),
    (2, 6, 999, 16, 3)])
def test_matches_sequential_loop_with_every_option(batch, d, length, n, groups, cpu_path):
    inputs = make_inputs(batch, d, length, n, groups)
    check_against_loop(inputs, optional=("D", "z", "delta_bias"), softplus=True)


@pytest.mark.parametrize("optional,softplus", [((), False), (("D",), False), (("z",), True),
                                               (("delta_bias",), True), (("D", "delta_bias"), False)])
def test_matches_sequential_loop_for_each_optional_input(optional, softplus, cpu_path):
    inputs = make_inputs(2, 4, 77, 6, seed=1)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a raw delta must be positive to be a step size
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    check_against_loop(inputs, optional, softplus)


@pytest.mark.parametrize("layout", ["d (b l)", "mixed"])
def test_any_memory_layout_gives_the_same_numbers(layout, cpu_path):
    """Our Mamba layer hands the scan views of (d, batch * length) tensors, which the compiled scan
    reads and writes in place; inputs that do not share one layout are copied."""
    inputs = make_inputs(3, 8, 70, 4, seed=9)
    names = ("u", "delta", "z", "B", "C") if layout == "d (b l)" else ("z", "B")
    inputs = {k: channels_first(v) if k in names else v for k, v in inputs.items()}
    assert inputs["z"].stride() == (70, 3 * 70, 1)
    check_against_loop(inputs, optional=("D", "z", "delta_bias"), softplus=True)
    y = selective_scan_fn(**inputs, delta_softplus=True)
    in_place = cpu_path == "compiled" and layout == "d (b l)"
    assert y.stride() == (inputs["u"].stride() if in_place else (8 * 70, 70, 1))


def test_softplus_is_linear_beyond_its_threshold(cpu_path):
    """PyTorch's softplus returns its input above 20 (gradient 1), so a large raw step never
    overflows exp on the way."""
    inputs = make_inputs(2, 4, 60, 4, seed=10)
    inputs["delta"][:, :2] += 100
    check_against_loop(inputs, optional=("delta_bias",), softplus=True)


def test_tiles_across_rows_and_positions(monkeypatch):
    """Force tiny tiles so one call of the PyTorch scan is cut along both rows and positions: same numbers."""
    monkeypatch.setattr(cpu_kernel, "_enabled", False)
    monkeypatch.setitem(scan_module.TILE_ELEMENTS, "cpu", 2 * 24 * 50)
    monkeypatch.setattr(scan_module, "MIN_TILE_LENGTH", 50)
    inputs = make_inputs(5, 4, 333, 6, seed=2)
    assert scan_module._tiling(5, 24, 333, torch.device("cpu")) == (2, 50)  # rows 2+2+1, 7 tiles each
    check_against_loop(inputs, optional=("D", "z", "delta_bias"), softplus=True)


def test_keeps_memory_linear_in_length_between_forward_and_backward(monkeypatch, cpu_path):
    """Between forward and backward the scan holds O(b*d*L) memory like the CUDA kernel, never the
    (b, d, L, n) states: the PyTorch scan its inputs and the (rows, d, n) state entering each tile, the
    C scan its inputs, B and C transposed, and the state entering each chunk of CHUNK positions."""
    monkeypatch.setitem(scan_module.TILE_ELEMENTS, "cpu", 2 * 8 * 16 * 100)
    monkeypatch.setattr(scan_module, "MIN_TILE_LENGTH", 100)
    batch, d, length, n = 4, 8, 1000, 16
    assert scan_module._tiling(batch, d * n, length, torch.device("cpu")) == (2, 100)  # 20 tiles
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch, d, length, n).items()
              if k in ("u", "delta", "A", "B", "C")}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_fn(**inputs)
    input_bytes = sum(t.untyped_storage().nbytes() for t in inputs.values())
    if cpu_path == "pytorch":
        extra = 20 * 2 * d * n * 4
    else:
        extra = (inputs["B"].nbytes + inputs["C"].nbytes) + batch * d * -(-length // cpu_kernel.CHUNK) * n * 4
    assert sum(storages.values()) <= input_bytes + extra < batch * d * length * n * 4
    assert sum(storages.values()) >= input_bytes  # the hook saw what the scan saves


def test_long_sequence_of_strongly_decaying_states_stays_finite(cpu_path):
    """Large steps times large |A| decay states to zero within a few positions: no overflow."""
    inputs = make_inputs(1, 4, 4000, 16, seed=3)
    inputs["delta"] = inputs["delta"].abs() * 20
    inputs["A"] = inputs["A"] * 25
    check_against_loop(inputs, optional=(), softplus=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype, cpu_path):
    inputs = make_inputs(2, 4, 300, 8, seed=4)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_fn(**low, delta_softplus=True)
    assert y.dtype == dtype
    # same as float32 on the rounded inputs, up to the output's rounding: the scan ran in float32
    y_ref, _ = sequential_scan(**{k: v.float() for k, v in low.items()}, delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2 * y_ref.abs().max().item())


def test_matches_mamba_ssm_selective_scan_ref(mamba_ssm, cpu_path):
    for groups in (None, 2):
        inputs = make_inputs(2, 8, 150, 16, groups, seed=5)
        kwargs = dict(D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True,
                      return_last_state=True)
        args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
        y, last = selective_scan_fn(*args, **kwargs)
        y_ref, last_ref = mamba_ssm.selective_scan_ref(*args, **kwargs)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-5)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test; torch's thread count is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_compiled_scan_cuts_channels_across_threads(threads, monkeypatch, set_threads):
    """With more threads than batch rows times groups, each group's channels are cut into parts whose
    B and C gradients are summed afterwards: same numbers as the float64 loop for any thread count."""
    monkeypatch.setattr(cpu_kernel, "_enabled", True)
    set_threads(threads)
    assert cpu_kernel._work(1, 12, 2)[0] == min(6, -(-threads // 2))
    check_against_loop(make_inputs(1, 12, 150, 5, groups=2, seed=6), optional=("D", "z"), softplus=True)


def _scan_sum(seed):
    inputs = make_inputs(2, 8, 100, 4, seed=seed)
    return selective_scan_fn(**{k: inputs[k] for k in ("u", "delta", "A", "B", "C")}).sum().item()


def test_compiled_scan_runs_in_a_child_forked_after_it_ran(monkeypatch, set_threads):
    """The child inherits the parent's thread pool object but not its threads: it must make its own
    pool, or it would wait forever (data loaders and user code fork after training started)."""
    monkeypatch.setattr(cpu_kernel, "_enabled", True)
    set_threads(2)  # the pool only runs with more than one thread
    expected = _scan_sum(8)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_scan_sum, (8,)).get(timeout=60) == expected


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty build cache; the library is loaded afresh in the test and again after it."""
    monkeypatch.setenv("NNUNET_EXT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_enabled", True)
    cpu_kernel._load.cache_clear()
    yield tmp_path
    cpu_kernel._load.cache_clear()


def test_without_a_working_compiler_the_pytorch_scan_runs_and_the_reason_is_given(kernel_cache, monkeypatch):
    monkeypatch.setenv("CC", "false")
    assert cpu_kernel.cpu_kernel_off_reason().startswith(
        "false failed to build mamba.c (exit status 1)")
    check_against_loop(make_inputs(2, 4, 77, 6, seed=7), optional=("D",), softplus=True)
    cpu_kernel._load.cache_clear()
    monkeypatch.setenv("CC", str(kernel_cache / "no-such-compiler"))
    assert cpu_kernel.cpu_kernel_off_reason().startswith("cannot build mamba.c, b_spline.c, depthwise.c, deform.c with")
    grid, x = uniform_grid(3, 5, 3), torch.randn(40, 3)  # U-KAN's bases take PyTorch's formulation too
    torch.testing.assert_close(b_spline_bases(x, grid, 3, uniform=True), b_spline_bases(x, grid, 3))
    assert not list(kernel_cache.iterdir())  # a failed build leaves nothing behind
    cpu_kernel._load.cache_clear()
    monkeypatch.delenv("CC")
    (kernel_cache / "file").write_text("")
    monkeypatch.setenv("NNUNET_EXT_CACHE", str(kernel_cache / "file" / "cache"))  # cannot be created
    assert "point NNUNET_EXT_CACHE to a writable folder" in cpu_kernel.cpu_kernel_off_reason()


def test_the_library_is_built_once_and_keeps_denormals(kernel_cache, monkeypatch):
    """A cached build loads without a compiler. Loading it leaves the process's floating-point mode
    alone: linked with -ffast-math, gcc 12 would make every later float op flush denormals to zero."""
    assert cpu_kernel.cpu_kernel_off_reason() is None
    assert [p.suffix for p in kernel_cache.iterdir()] == [".so"]
    cpu_kernel._load.cache_clear()
    monkeypatch.setenv("CC", "false")
    assert cpu_kernel.cpu_kernel_off_reason() is None
    tiny = torch.tensor([1e-39])  # a float32 denormal
    assert (tiny * 1.0).item() > 0 and (tiny.numpy() * 1.0).item() > 0


@pytest.mark.parametrize("change,message", [
    (dict(u=torch.randn(2, 4)), "u must be"), (dict(A=torch.randn(5, 3)), "A must be"),
    (dict(B=torch.randn(2, 3, 9)), "B must be"), (dict(C=torch.randn(2, 3, 3, 10)), "C must be"),
    (dict(D=torch.randn(3)), "D must have shape"), (dict(z=torch.randn(2, 4, 9)), "z must have shape")])
def test_bad_shapes_get_a_clear_error(change, message):
    inputs = {**make_inputs(2, 4, 10, 3), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan_fn(**inputs)


def test_cuda_kernels_are_used_only_when_allowed(monkeypatch):
    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", fake)
    sys.modules["mamba_ssm.ops"].selective_scan_interface = fake
    assert scan_module.mamba_ssm_kernels() is fake and scan_module.kernels_off_reason() is None
    monkeypatch.setattr(scan_module, "_use_kernels", True)
    scan_module.use_kernels(False)
    assert scan_module.mamba_ssm_kernels() is None
    assert scan_module.kernels_off_reason().startswith("switched off by NNUNET_EXT_MAMBA_KERNELS=0")


def test_a_mamba_ssm_that_does_not_import_is_named_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # any import of it raises ImportError
    monkeypatch.setattr(scan_module, "_use_kernels", True)
    assert scan_module.mamba_ssm_kernels() is None
    reason = scan_module.kernels_off_reason()
    assert reason.startswith("mamba_ssm does not import (") and "pip install 'nnunet-ext[mamba]'" in reason

"""The ``lozoo::small_fc_step_`` op: registration, opcheck, torch.compile, bad inputs, the build.

Bad inputs are checked on every implementation that can receive them — the compiled CPU kernel,
the pure-torch twin and the fake kernel (meta tensors) — with the same message.
"""

from __future__ import annotations

import os

import pytest
import torch

import lopt
from lopt import core
from lopt.kernels import build, ops, torch_backend

from .test_kernels_parity import cpp_step_fn, op_inputs
from .test_lopt_core import random_theta


def make_args(shape=(6, 9), cfg=lopt.ORIGINAL, dtype=torch.float32, **over):
    theta = random_theta(cfg, seed=1)
    p = torch.randn(shape).to(dtype)
    state = core.init_tensor_state(p, cfg)
    decays, layers = op_inputs(theta, cfg)
    d1, d0 = core.factored_dims(tuple(shape) or (1,), cfg.tie_break) or (-1, -1)
    args = {
        "param": p, "grad": torch.randn(shape).to(dtype), "m": state["m"], "v": state["v"],
        "r": state.get("r"), "c": state.get("c"), "vd": state.get("vd"), "decays": decays,
        "layers": layers, "d1": d1, "d0": d0, "t": 3.0, "lr": 0.5, "weight_decay": 0.1,
        "step_mult": cfg.step_mult, "exp_mult": cfg.exp_mult, "maximize": False,
    }  # fmt: skip
    args.update(over)
    return tuple(args.values())


def test_compiled_cpu_kernel_is_available_in_ci():
    """CI must run the compiled kernel: a silent fallback to torch fails here."""
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (CI=true)")
    result = ops.load_cpp()
    assert result.ok, result.error
    assert torch.ops.lozoo.cpu_isa() in ("avx512", "avx2", "generic")


def test_registered_schema_is_the_documented_one():
    cpp_step_fn()
    assert str(ops.step_op()._schema) == ops.SCHEMA


# torch's own opcheck / compile machinery still touches torch.jit internally.
JIT_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.parametrize(
    "shape,dtype,cfg",
    [
        ((), torch.float32, lopt.ORIGINAL),
        ((7,), torch.float32, lopt.MULO),
        ((6, 9), torch.float32, lopt.MULO),
        ((3, 5, 5, 3), torch.float32, lopt.ORIGINAL),
        ((4, 5), torch.bfloat16, lopt.ORIGINAL),
        ((5,), torch.float16, lopt.MULO),
    ],
    ids=str,
)
@pytest.mark.filterwarnings(JIT_DEPRECATION)
def test_opcheck(shape, dtype, cfg):
    cpp_step_fn()
    torch.library.opcheck(ops.step_op(), make_args(shape, cfg, dtype))


@pytest.mark.filterwarnings(JIT_DEPRECATION)
def test_torch_compile_fullgraph_matches_eager():
    fn = cpp_step_fn()
    a = make_args((6, 9))
    b = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)

    def step_and_use(*args):
        torch.ops.lozoo.small_fc_step_(*args)
        return args[0] * 2

    out = torch.compile(step_and_use, fullgraph=True)(*a)
    fn(*b)
    assert torch.equal(out, b[0] * 2)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)


def _to_meta(args):
    return tuple(
        x.to("meta") if isinstance(x, torch.Tensor)
        else [t.to("meta") for t in x] if isinstance(x, list) else x
        for x in args
    )  # fmt: skip


@pytest.fixture(params=["cpp", "torch", "fake"])
def call(request):
    if request.param == "cpp":
        return cpp_step_fn()
    if request.param == "torch":
        return torch_backend.small_fc_step_
    cpp_step_fn()  # the fake kernel is registered with the op
    return lambda *args: ops.step_op()(*_to_meta(args))


def _layers(cfg=lopt.ORIGINAL):
    return op_inputs(random_theta(cfg), cfg)[1]


BAD_INPUTS = {
    "int_param": (
        lambda: make_args(param=torch.zeros(6, 9, dtype=torch.long)),
        "param must be float32, bfloat16 or float16, got Long",
    ),
    "double_param": (
        lambda: make_args(dtype=torch.float64),
        "param must be float32, bfloat16 or float16, got Double",
    ),
    "grad_dtype": (
        lambda: make_args(grad=torch.zeros(6, 9, dtype=torch.bfloat16)),
        r"grad must have param's dtype \(Float\), got BFloat16",
    ),
    "grad_shape": (
        lambda: make_args(grad=torch.zeros(6, 8)),
        r"grad has shape \(6, 8\) but param has shape \(6, 9\)",
    ),
    "strided_param": (
        lambda: make_args(param=torch.zeros(9, 6).t()),
        "param must be contiguous",
    ),
    "m_shape": (
        lambda: make_args(m=torch.zeros(6, 9, 2)),
        r"m has shape \(6, 9, 2\) but a param of shape \(6, 9\) needs \(6, 9, 3\)",
    ),
    "v_dtype": (
        lambda: make_args(v=torch.zeros(6, 9, 1, dtype=torch.float64)),
        "v must be float32 state, got Double",
    ),
    "m_strided": (
        lambda: make_args(m=torch.zeros(3, 6, 9).permute(1, 2, 0)),
        "m must be contiguous",
    ),
    "missing_c": (
        lambda: make_args(c=None),
        "a rank-2 param needs the factored state r and c, and no vd",
    ),
    "swapped_axes": (
        lambda: make_args(d1=1, d0=0),
        r"r has shape \(6, 3\) but a param of shape \(6, 9\) needs \(9, 3\)",
    ),
    "same_axes": (
        lambda: make_args(d1=1, d0=1),
        r"\(d1, d0\) = \(1, 1\) are not two distinct axes of a rank-2 param",
    ),
    "vector_with_axes": (
        lambda: make_args((7,), d1=0, d0=0),
        r"a rank-1 param has no factored axes; pass d1 = d0 = -1, got \(0, 0\)",
    ),
    "vector_without_vd": (
        lambda: make_args((7,), vd=None),
        "a rank-1 param needs the non-factored state vd, and no r or c",
    ),
    "decays": (
        lambda: make_args(decays=torch.zeros(6)),
        r"decays must be a contiguous float32 tensor of 7 elements on param's device, got "
        r"Float of shape \(6,\)",
    ),
    "layer_count": (
        lambda: make_args(layers=_layers()[:5]),
        r"layers must be \[w0, b0, w1, b1, ..., wL, bL\] with at least two weight matrices, "
        "got 5 tensors",
    ),
    "w0_shape": (
        lambda: make_args(layers=[torch.zeros(38, 4)] + _layers()[1:]),
        r"layers\[0\] \(w0\) must have shape \(39, 4\), got \(38, 4\)",
    ),
    "b1_shape": (
        lambda: make_args(layers=_layers()[:3] + [torch.zeros(5)] + _layers()[4:]),
        r"layers\[3\] \(b1\) must have shape \(4,\), got \(5,\)",
    ),
    "layer_dtype": (
        lambda: make_args(layers=_layers()[:2] + [torch.zeros(4, 4).double()] + _layers()[3:]),
        r"layers\[2\] must be a contiguous float32 tensor on param's device, got Double",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_rejected_with_the_same_message(call, name):
    make, message = BAD_INPUTS[name]
    with pytest.raises(RuntimeError, match="lozoo::small_fc_step_: " + message):
        call(*make())


def test_state_on_another_device_is_rejected():
    cpp_step_fn()
    args = make_args(m=torch.zeros(6, 9, 3, device="meta"))
    for fn in (ops.step_op(), torch_backend.small_fc_step_):
        with pytest.raises(RuntimeError, match="m is on meta but param is on cpu"):
            fn(*args)


def test_kernel_sources_are_found_and_the_build_key_tracks_them(tmp_path, monkeypatch):
    src = build.source_dir()
    assert (src / "small_fc_cpu.cpp").is_file() and (src / "small_fc_cuda.cu").is_file()
    key = build.build_key(build.CPU_LIB)
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LOZOO_CSRC", str(copy))
    assert build.build_key(build.CPU_LIB) == key
    (copy / "small_fc_math.h").write_text((copy / "small_fc_math.h").read_text() + "\n// x\n")
    assert build.build_key(build.CPU_LIB) != key


@pytest.mark.slow
def test_every_cuda_source_compiles_with_nvcc(tmp_path):
    """CI compiles the CUDA kernel (nvcc -c, no GPU needed); a missing nvcc fails in CI."""
    nvcc = build.nvcc_path()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: CI must compile every .cu source")
        pytest.skip("nvcc not found")
    objects = build.compile_cuda_objects(tmp_path, nvcc)
    names = {o.name for o in objects}
    assert {"small_fc_cuda.cu.o", "small_fc_cuda.cpp.o"} <= names
    assert all(o.stat().st_size > 0 for o in objects)

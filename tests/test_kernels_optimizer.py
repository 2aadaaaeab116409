"""``SmallFCLOpt(backend=...)``: selection, errors, fallback warning, resume across backends."""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

import lopt
from lopt.kernels import build, dispatch, ops, torch_backend

from .test_kernels_parity import cpp_step_fn
from .test_lopt_core import random_theta
from .test_optimizer import batch, make_model, train

BACKENDS = ["torch", "cpp"]


def make(model, backend, preset="mulo", **kw):
    if backend == "cpp":
        cpp_step_fn()
    cfg = lopt.preset(preset)
    return lopt.SmallFCLOpt(
        model.parameters(), random_theta(cfg, seed=1), cfg, backend=backend, **kw
    )


def assert_same_training(a: nn.Module, b: nn.Module, start: nn.Module, rtol=1e-5):
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start.parameters()):
        travelled = (pa.detach() - p0.detach()).abs().max()
        err = (pa.detach() - pb.detach()).abs().max()
        slack = torch.finfo(torch.float32).eps * pa.detach().abs().max() * 4
        assert err <= rtol * travelled + slack, f"{name}: {err} vs travelled {travelled}"


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid backends: 'auto', "):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), random_theta(lopt.ORIGINAL), backend="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_backend_without_cuda_says_why():
    want = "has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    with pytest.raises(RuntimeError, match=f"backend='cuda' is unavailable: .*{want}"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), random_theta(lopt.ORIGINAL), backend="cuda")


def test_explicit_backend_rejects_a_parameter_on_another_device():
    cpp_step_fn()
    with pytest.raises(RuntimeError, match="backend='cpp' steps cpu tensors only, got a param"):
        dispatch.step_function("cpp", torch.device("meta"))
    with pytest.raises(RuntimeError, match="backend='cuda' steps cuda tensors only"):
        dispatch.step_function("cuda", torch.device("cpu"))


def test_cpp_backend_that_cannot_build_is_an_error(monkeypatch):
    failed = build.BuildResult(False, error="simulated: no compiler")
    monkeypatch.setattr(ops, "load_cpp", lambda build_if_needed=True: failed)
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable: .*simulated: no comp"):
        lopt.SmallFCLOpt(nn.Linear(2, 2).parameters(), random_theta(lopt.ORIGINAL), backend="cpp")


def test_auto_uses_the_compiled_kernel_without_warning():
    cpp_step_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.step_function("auto", torch.device("cpu")) is ops.step_op()


def test_auto_falls_back_to_torch_and_warns_once_per_process(monkeypatch):
    failed = build.BuildResult(False, error="simulated: no compiler")
    monkeypatch.setattr(ops, "load_cpp", lambda build_if_needed=True: failed)
    monkeypatch.setattr(dispatch, "_warned", set())
    model = make_model()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no compiled small_fc_lopt kernel for cpu tensors "):
        opt = make(model, "auto")
        train(model, opt, range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second optimizer in the same process stays quiet
        train(copy.deepcopy(model), make(copy.deepcopy(model), "auto"), range(1))
    train(ref, make(ref, "torch"), range(2))
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert dispatch.step_function("auto", torch.device("cpu")) is torch_backend.small_fc_step_


@pytest.mark.parametrize("preset", ["original", "mulo"])
def test_backends_train_identically(preset):
    start = make_model()
    runs = {}
    for backend in BACKENDS:
        model = copy.deepcopy(start)
        train(model, make(model, backend, preset, weight_decay=0.05), range(6))
        runs[backend] = model
    assert_same_training(runs["cpp"], runs["torch"], start)


@pytest.mark.parametrize("first,second", [("cpp", "torch"), ("torch", "cpp")])
def test_checkpoint_resumes_with_another_backend(first, second):
    start = make_model()
    straight = copy.deepcopy(start)
    train(straight, make(straight, second), range(6))

    model = copy.deepcopy(start)
    opt = make(model, first)
    train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed, second)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, range(3, 6))
    assert_same_training(resumed, straight, start)


def test_state_format_is_identical_across_backends():
    dicts = {}
    for backend in BACKENDS:
        model = make_model()
        opt = make(model, backend)
        train(model, opt, range(2))
        dicts[backend] = opt.state_dict()["state"]
    for pid, state in dicts["torch"].items():
        other = dicts["cpp"][pid]
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert value.shape == other[key].shape and value.dtype == other[key].dtype
            assert value.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_conv_weight_is_stepped_in_place(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    ref, start = copy.deepcopy(conv), copy.deepcopy(conv)
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    for module, name in ((conv, backend), (ref, "torch")):
        opt = make(module, name)
        for _ in range(3):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training(conv, ref, start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_keeps_fp32_state(backend):
    model = make_model().to(torch.bfloat16)
    opt = make(model, backend)
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        (model(x.bfloat16()) * model.temperature - y.bfloat16()).float().square().mean().backward()
        opt.step()
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_backend_survives_pickling():
    model = make_model()
    opt = make(model, "torch")
    assert copy.deepcopy(opt).backend == "torch"


def test_ci_runs_the_compiled_kernel_through_the_optimizer(monkeypatch):
    """In CI the default backend must reach the compiled op (no silent torch fallback)."""
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (CI=true)")
    calls = []
    real = ops.step_op

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(ops, "step_op", spy)
    model = make_model()
    train(model, lopt.SmallFCLOpt(model.parameters(), random_theta(lopt.MULO)), range(1))
    assert calls, "SmallFCLOpt(backend='auto') did not use the compiled CPU kernel"

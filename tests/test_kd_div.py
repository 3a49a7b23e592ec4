"""dfkd_fast.kd_div / js_div: every path against float64 autograd of the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dfkd_fast
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.ops.kd_div import REDUCTIONS, kd_div_reference

from .paths import CUDA_AVAILABLE, INTERPRETER, path_fixture
from .tolerances import JS_GRAD, KD_GRAD, KD_LOSS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUNCTIONS = {"kl": dfkd_fast.kd_div, "js": dfkd_fast.js_div}


path = path_fixture("kd_div", has_cpu_kernel=True)


def make_logits(shape, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return student.to(device), teacher.to(device)


def check_against_float64(
    divergence, student, teacher, temperature, reduction="batchmean", weight=None, seed=0
):
    """Runs the op with autograd on both logits (and the weight if it requires grad) under a
    random incoming gradient, and compares value and gradients with float64 autograd."""
    function = FUNCTIONS[divergence]
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = function(s, t, temperature, reduction, weight)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))

    s64 = student.detach().cpu().double().requires_grad_()
    t64 = teacher.detach().cpu().double().requires_grad_()
    w64 = None
    if weight is not None:
        w64 = weight.detach().cpu().double().requires_grad_(weight.requires_grad)
    expected = kd_div_reference(s64, t64, temperature, reduction, w64, divergence)
    expected.backward(grad_out)

    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert_same_divergence(loss, expected, temperature)
    # Gradients in units of T * max |d loss / d row divergence|: the derivative of a divergence
    # with respect to logit / T is of order one, whatever T, the weights and the reduction.
    row_factor = grad_out.abs() * (1.0 if w64 is None else w64.detach().abs())
    if reduction == "batchmean":
        row_factor = row_factor / max(student.shape[:-1].numel(), 1)
    elif reduction == "mean":
        row_factor = row_factor / max(student.numel(), 1)
    unit = temperature * max(row_factor.max().item() if row_factor.numel() else 0.0, 1e-30)
    tolerances = KD_GRAD if divergence == "kl" else JS_GRAD
    tolerances[student.dtype].assert_close(s.grad / unit, s64.grad / unit)
    tolerances[teacher.dtype].assert_close(t.grad / unit, t64.grad / unit)
    assert s.grad.dtype == student.dtype and t.grad.dtype == teacher.dtype
    if weight is not None and weight.requires_grad:
        assert_same_divergence(weight.grad, w64.grad, temperature)
    return loss


def assert_same_divergence(actual, expected, temperature):
    """Losses are T^2 times a float32 divergence: compare the divergences (in nats)."""
    KD_LOSS.assert_close(actual / temperature**2, expected / temperature**2)


# ------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("num_classes", [2, 10, 100, 1000, 1031])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_both_gradients(path, divergence, num_classes, temperature, dtype):
    rows = 37 if num_classes < 1000 else 5
    student, teacher = make_logits((rows, num_classes), dtype, path.device, seed=num_classes)
    weight = torch.rand(rows, generator=torch.Generator().manual_seed(3)).to(path.device)
    check_against_float64(divergence, student, teacher, temperature, "batchmean", weight)


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_kind", ["none", "float", "mask", "float-with-grad"])
def test_reductions_and_weights(path, divergence, reduction, weight_kind):
    rows, num_classes = 23, 37
    student, teacher = make_logits((rows, num_classes), torch.float32, path.device, seed=5)
    g = torch.Generator().manual_seed(7)
    weight = {
        "none": None,
        "float": torch.rand(rows, generator=g),
        "mask": torch.rand(rows, generator=g) > 0.5,
        "float-with-grad": torch.rand(rows, generator=g).requires_grad_(),
    }[weight_kind]
    if weight is not None:
        weight = weight.to(path.device).detach().requires_grad_(weight_kind == "float-with-grad")
    check_against_float64(divergence, student, teacher, 2.0, reduction, weight)


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_two_to_the_17_classes(path, divergence):
    student, teacher = make_logits((3, 2**17), torch.float32, path.device, seed=17)
    check_against_float64(divergence, student, teacher, 2.0, "sum")


def test_extra_dimensions_and_one_dimensional_logits(path):
    student, teacher = make_logits((4, 3, 11), torch.float32, path.device, seed=9)
    per_row = check_against_float64("kl", student, teacher, 1.5, "none")
    assert per_row.shape == (4, 3)
    check_against_float64("js", student[0, 0], teacher[0, 0], 1.5, "none")


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_student_and_teacher_of_different_dtypes(path, divergence):
    student, _ = make_logits((9, 33), torch.bfloat16, path.device, seed=13)
    _, teacher = make_logits((9, 33), torch.float32, path.device, seed=14)
    check_against_float64(divergence, student, teacher, 2.0, "batchmean")


def test_non_contiguous_logits(path):
    student, teacher = make_logits((50, 40), torch.float32, path.device, seed=11)
    s_t, t_t = student[:, :20].t(), teacher[:, ::2].t()  # (20, 50): transposed, and strided too
    assert not s_t.is_contiguous() and not t_t.is_contiguous()
    check_against_float64("kl", s_t, t_t, 3.0, "sum")
    check_against_float64("js", s_t, t_t, 3.0, "sum")


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_logits_of_magnitude_1e4(path, divergence, temperature):
    student, teacher = make_logits((6, 10), torch.float32, path.device, seed=2, scale=1e4)
    check_against_float64(divergence, student, teacher, temperature, "batchmean")


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_one_hot_rows_give_zero_loss_and_gradient(path, divergence):
    logits = torch.full((4, 7), -1e4, device=path.device)
    logits[torch.arange(4), torch.tensor([0, 3, 6, 2])] = 1e4
    s, t = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = FUNCTIONS[divergence](s, t, 0.05, "sum")
    loss.backward()
    assert loss.item() == 0.0
    assert s.grad.abs().max().item() == 0.0 and t.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_minus_infinity_logits_give_finite_values_and_gradients(path, divergence):
    student, teacher = make_logits((5, 12), torch.float32, path.device, seed=4)
    masked_classes = torch.zeros(12, dtype=torch.bool)
    masked_classes[[1, 5, 11]] = True
    student[:, masked_classes] = -math.inf  # classes both networks exclude
    teacher[:, masked_classes] = -math.inf
    teacher[:, 7] = -math.inf  # a class only the teacher excludes
    if divergence == "js":
        student[:, 8] = -math.inf  # and one only the student excludes
    loss = check_against_float64(divergence, student, teacher, 2.0, "sum")
    assert torch.isfinite(loss)


def test_only_requested_gradients_are_computed(path):
    student, teacher = make_logits((8, 10), torch.float32, path.device, seed=6)
    s = student.clone().requires_grad_()
    dfkd_fast.kd_div(s, teacher, 2.0).backward()
    assert s.grad is not None and teacher.grad is None
    t = teacher.clone().requires_grad_()
    dfkd_fast.js_div(student, t, 2.0).backward()
    assert t.grad is not None and student.grad is None


def test_kernel_loss_without_gradients(path):
    student, teacher = make_logits((8, 10), torch.float32, path.device, seed=6)
    with torch.no_grad():
        loss = dfkd_fast.kd_div(student, teacher, 2.0)
    assert_same_divergence(loss, kd_div_reference(student.double(), teacher.double(), 2.0), 2.0)


def test_empty_batch(path):
    empty = torch.zeros(0, 5, device=path.device)
    assert dfkd_fast.kd_div(empty, empty, reduction="sum").item() == 0.0
    assert math.isnan(dfkd_fast.kd_div(empty, empty, reduction="batchmean").item())
    assert dfkd_fast.kd_div(empty, empty, reduction="none").shape == (0,)


@pytest.mark.slow
def test_a_million_rows(path):
    student, teacher = make_logits((2**20, 3), torch.float32, path.device, seed=20)
    loss = dfkd_fast.kd_div(student, teacher, 2.0, "sum")
    expected = kd_div_reference(student.double(), teacher.double(), 2.0, "sum")
    assert_same_divergence(loss, expected, 2.0)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 9),
    num_classes=st.integers(2, 300),
    temperature=st.floats(0.05, 100.0),
    scale=st.sampled_from([0.1, 3.0, 50.0]),
    divergence=st.sampled_from(["kl", "js"]),
    seed=st.integers(0, 2**31),
)
def test_properties_of_the_divergences(rows, num_classes, temperature, scale, divergence, seed):
    student, teacher = make_logits((rows, num_classes), torch.float32, "cpu", seed, scale)
    # Multiples of 2^-10 below 2^13: adding integer shifts below 2^10 stays exact in float32.
    student, teacher = (torch.round(x * 1024) / 1024 for x in (student, teacher))
    function = FUNCTIONS[divergence]
    per_row = function(student, teacher, temperature, "none")
    expected = kd_div_reference(
        student.double(), teacher.double(), temperature, "none", divergence=divergence
    )
    assert_same_divergence(per_row, expected, temperature)
    divergence_tolerance = KD_LOSS.atol * temperature**2  # in loss units
    assert (per_row >= -divergence_tolerance).all()
    assert function(teacher, teacher, temperature, "none").abs().max() <= divergence_tolerance
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(-500, 500, (rows, 1), generator=generator).float()
    shifted = function(student + shift, teacher - shift, temperature, "none")
    assert_same_divergence(shifted, expected, temperature)
    if divergence == "js":
        assert (per_row <= temperature**2 * math.log(2) + divergence_tolerance).all()
        swapped = function(teacher, student, temperature, "none")
        assert_same_divergence(swapped, expected, temperature)


# ------------------------------------------------------------------------------------------
# PyTorch integration
# ------------------------------------------------------------------------------------------


OPERATORS = (
    ["kd_div"]
    + (["kd_div_triton"] if INTERPRETER or CUDA_AVAILABLE else [])
)  # fmt: skip


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_opcheck(operator, divergence, reduction):
    device = "cuda" if CUDA_AVAILABLE and operator == "kd_div_triton" else "cpu"
    forward = getattr(torch.ops.dfkd_fast, operator)
    backward = getattr(torch.ops.dfkd_fast, operator + "_backward")
    student, teacher = make_logits((6, 9), torch.float32, device, seed=1)
    weight = torch.rand(6, device=device)
    torch.library.opcheck(
        forward.default,
        (student.requires_grad_(), teacher.requires_grad_(), weight, 2.0, reduction, divergence),
    )
    loss, stats = forward(student.detach(), teacher.detach(), weight, 2.0, reduction, divergence)
    grad = torch.randn_like(loss)
    for need_student, need_teacher in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            backward.default,
            (grad, student.detach(), teacher.detach(), weight, stats, 2.0, reduction, divergence,
             need_student, need_teacher),
        )  # fmt: skip


def _distillation_step(student, teacher):
    return dfkd_fast.kd_div(student, teacher, 4.0) + 0.5 * dfkd_fast.js_div(student, teacher, 1.0)


def test_torch_compile_fullgraph_on_the_default_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the C++ kernels, through their operator
    student, teacher = make_logits((16, 10), torch.float32, "cpu", seed=12)
    compiled = torch.compile(_distillation_step, fullgraph=True)
    results = []
    for function in (compiled, _distillation_step):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = function(s, t)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="compiles the Triton op for CUDA")
def test_torch_compile_fullgraph_on_cuda():
    student, teacher = make_logits((16, 10), torch.float32, "cuda", seed=12)
    compiled = torch.compile(_distillation_step, fullgraph=True)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    compiled(s, t).backward()
    s_ref, t_ref = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    _distillation_step(s_ref, t_ref).backward()
    KD_GRAD[torch.float32].assert_close(s.grad, s_ref.grad)
    KD_GRAD[torch.float32].assert_close(t.grad, t_ref.grad)


def test_reference_backend_override(path):
    student, teacher = make_logits((8, 10), torch.float32, path.device, seed=6)
    with dfkd_fast.use_backend("reference"):
        assert (
            choose_implementation("kd_div", KernelKind.TRITON, path.device, torch.float32)
            is Implementation.REFERENCE
        )
        loss = dfkd_fast.kd_div(student, teacher, 2.0)
    assert_same_divergence(loss, kd_div_reference(student.double(), teacher.double(), 2.0), 2.0)


def test_float64_runs_the_reference(path):
    student, teacher = make_logits((8, 10), torch.float64, path.device, seed=6)
    loss = dfkd_fast.kd_div(student, teacher, 2.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, kd_div_reference(student, teacher, 2.0))


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------


def test_modules_call_the_functions(path):
    student, teacher = make_logits((8, 10), torch.float32, path.device, seed=6)
    weight = torch.rand(8, device=path.device)
    kd, js = dfkd_fast.KDLoss(3.0, "sum"), dfkd_fast.JSDivLoss(3.0, "none")
    assert torch.equal(kd(student, teacher, weight), dfkd_fast.kd_div(student, teacher, 3.0, "sum", weight))
    assert torch.equal(js(student, teacher), dfkd_fast.js_div(student, teacher, 3.0, "none"))
    assert "temperature=3.0" in repr(kd)
    with pytest.raises(ValueError, match="temperature"):
        dfkd_fast.KDLoss(0.0)
    with pytest.raises(ValueError, match="reduction"):
        dfkd_fast.JSDivLoss(1.0, "average")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

LOGITS = torch.zeros(4, 10)


@pytest.mark.parametrize("function", [dfkd_fast.kd_div, dfkd_fast.js_div])
@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((LOGITS, torch.zeros(4, 11)), {}, ValueError, "teacher_logits must have the shape"),
        ((LOGITS, torch.zeros(10, 4)), {}, ValueError, "teacher_logits must have the shape"),
        ((LOGITS, torch.zeros(4, 10, device="meta")), {}, ValueError, "teacher_logits must be on"),
        ((LOGITS.long(), LOGITS), {}, TypeError, "student_logits must be a floating"),
        ((LOGITS, LOGITS.int()), {}, TypeError, "teacher_logits must be a floating"),
        ((LOGITS.numpy(), LOGITS), {}, TypeError, "student_logits must be a torch.Tensor"),
        ((torch.zeros(4, 0), torch.zeros(4, 0)), {}, ValueError, "class"),
        ((LOGITS, LOGITS), dict(temperature=0.0), ValueError, "temperature"),
        ((LOGITS, LOGITS), dict(temperature=-1.0), ValueError, "temperature"),
        ((LOGITS, LOGITS), dict(temperature=math.nan), ValueError, "temperature"),
        ((LOGITS, LOGITS), dict(temperature=math.inf), ValueError, "temperature"),
        ((LOGITS, LOGITS), dict(temperature="2"), TypeError, "temperature"),
        ((LOGITS, LOGITS), dict(temperature=torch.tensor(2.0)), TypeError, "temperature"),
        ((LOGITS, LOGITS), dict(reduction="average"), ValueError, "reduction"),
        ((LOGITS, LOGITS), dict(weight=torch.ones(5)), ValueError, "weight must hold one value"),
        ((LOGITS, LOGITS), dict(weight=torch.ones(4, 1)), ValueError, "weight must hold one value"),
        ((LOGITS, LOGITS), dict(weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight"),
        ((LOGITS, LOGITS), dict(weight=[1.0] * 4), TypeError, "weight"),
    ],
)
def test_bad_input_is_rejected_with_the_argument_named(function, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(*args, **kwargs)

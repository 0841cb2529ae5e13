"""explain / tracking: each kind of cut is named with its file, line and fix (argmax, detach, a hand-written
update under no_grad, .item(), integer casts, ...), partly cut paths warn, connected paths stay silent, it works
end to end through nestgrad.train, and the cheap check proposed for train (require_path)."""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import nestgrad as ng
from nestgrad.diagnostics._explain import (
    DisconnectedError,
    PartialPathWarning,
    PathReport,
    explain,
    reaches,
    require_path,
    tracking,
)

HERE = os.path.basename(__file__)


pytestmark = pytest.mark.usefixtures("float64")


def line_of(fn, marker: str) -> int:
    """The line number of the first line of ``fn``'s source that contains ``marker``."""
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(src) if marker in text)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 4, generator=g)
    W = torch.randn(4, 3, generator=g).requires_grad_()
    A = torch.randn(4, 3, generator=g).requires_grad_()
    return X, W, A


def disconnected(fn, hparams) -> PathReport:
    with pytest.raises(DisconnectedError) as info:
        explain(fn, hparams)
    report = info.value.report
    assert str(report) == str(info.value)
    assert not report.connected
    return report


def only_cut(report: PathReport, op: str, kind: str, fn, marker: str):
    """The report names ``op`` (of ``kind``) at this file and the line of ``marker`` in ``fn``."""
    [cut] = [c for c in report.cuts if c.op == op]
    assert cut.kind == kind
    assert os.path.basename(cut.filename) == HERE
    assert cut.lineno == line_of(fn, marker)
    assert f"{op} at " in str(report) and f"{HERE}:{cut.lineno}" in str(report)
    assert marker in cut.code
    return cut


# ----------------------------------------------------------------------------------------------- (a) argmax
def test_argmax_pseudo_labels_are_named_with_file_line_and_fixes():
    X, W, A = data()

    def fn(A):
        logits = X @ A
        labels = logits.argmax(dim=1)
        return F.cross_entropy(X @ W, labels)

    report = disconnected(fn, A)
    assert report.status == "cut"
    only_cut(report, "argmax", "index", fn, "argmax(")
    text = str(report)
    assert "ZerothOrder" in text and "gumbel_softmax" in text and "softmax(logits / tau)" in text
    assert "One of the differentiated Tensors appears to not have been used in the graph" in text
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # what autograd alone says
        torch.autograd.grad(report.loss, A)


def test_max_with_dim_names_its_indices_output():
    X, W, A = data()

    def fn(A):
        _, labels = torch.max(X @ A, dim=1)
        return F.cross_entropy(X @ W, labels)

    cut = only_cut(disconnected(fn, A), "max", "index", fn, "torch.max(")
    assert cut.detail == "its indices output"


# ----------------------------------------------------------------------------------------------- (b) detach
def test_detach_is_named_with_its_line():
    X, W, A = data()

    def fn(A):
        h = torch.tanh(X @ A)
        target = h.detach()
        return ((X @ W - target) ** 2).mean()

    report = disconnected(fn, A)
    only_cut(report, "detach", "detach", fn, "h.detach()")
    assert "Remove the .detach()" in str(report)


def test_dot_data_is_a_detach():
    X, W, A = data()

    def fn(A):
        return ((X @ W) * (X @ A).data).mean()

    only_cut(disconnected(fn, A), ".data", "detach", fn, ".data")


def test_data_assignment_and_writes_into_views_are_followed():
    _, _, A = data()

    def assign(A):
        w = torch.zeros(4, 3, requires_grad=True)
        w.data = A * 2
        return (w**2).sum()

    only_cut(disconnected(assign, A), ".data =", "detach", assign, "w.data = ")

    def view(A):
        buf = torch.zeros(5, 3)
        buf[:4].copy_(torch.tanh(A).detach())  # writes into a view of buf: buf itself carries the cut
        return (buf * torch.ones(5, 3, requires_grad=True)).sum()

    only_cut(disconnected(view, A), "detach", "detach", view, "buf[:4].copy_(")


# -------------------------------------------------------------- (c) the forum user's hand-written update in no_grad
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_hand_written_update_under_no_grad_is_named_with_the_region_and_the_fix():
    """The forum thread: loss.backward(create_graph=True), then p.copy_(p - lr * p.grad) under torch.no_grad()."""
    torch.manual_seed(0)
    X, Y = torch.randn(8, 4), torch.randn(8, 2)
    A = torch.rand(2, requires_grad=True)

    def fn(A):
        model = torch.nn.Linear(4, 2)
        for _ in range(2):
            loss1 = (((model(X) - Y) ** 2) * A).sum()
            loss1.backward(inputs=list(model.parameters()), create_graph=True)
            with torch.no_grad():
                for p in model.parameters():
                    new_val = p - 0.01 * p.grad
                    p.copy_(new_val)
        return ((model(X) - Y) ** 2).sum()

    report = disconnected(fn, A)
    assert report.status == "cut"
    mul = only_cut(report, "mul", "no_grad", fn, "new_val = p - 0.01 * p.grad")
    copy = only_cut(report, "copy_", "inplace_no_grad", fn, "p.copy_(new_val)")
    assert mul.count == copy.count == 4  # 2 steps x 2 parameters
    assert mul.region is not None and mul.region[1] == line_of(fn, "with torch.no_grad():")
    text = str(report)
    assert "torch.no_grad() region (entered at " in text and f"{HERE}:{mul.region[1]})" in text
    assert "Move the computation out of torch.no_grad()" in text and "create_graph=True" in text
    assert "nestgrad.train" in text


def test_in_place_sgd_step_under_no_grad_with_autograd_grad():
    X, _, A = data()
    y = torch.randn(16)

    def fn(A):
        w = torch.zeros(4, requires_grad=True)
        for _ in range(3):
            loss = (torch.exp(A[:, 0]).sum() * (X @ w - y) ** 2).mean()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            with torch.no_grad():
                w.sub_(0.1 * g)
        return ((X @ w - y) ** 2).mean()

    report = disconnected(fn, A)
    only_cut(report, "sub_", "inplace_no_grad", fn, "w.sub_(")
    assert "Do not update weights in place under torch.no_grad()" in str(report)

    def fixed(A):  # the fix the report suggests: out of place, grad enabled
        w = torch.zeros(4, requires_grad=True)
        for _ in range(3):
            loss = (torch.exp(A[:, 0]).sum() * (X @ w - y) ** 2).mean()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            w = w - 0.1 * g
        return ((X @ w - y) ** 2).mean()

    assert explain(fixed, A).status == "connected"


def test_autograd_grad_without_create_graph():
    X, _, A = data()

    def fn(A):
        w = torch.ones(4, requires_grad=True)
        (g,) = torch.autograd.grad((A.sum() * (X @ w) ** 2).mean(), w)
        return ((X @ (w - 0.1 * g)) ** 2).mean()

    report = disconnected(fn, A)
    only_cut(report, "torch.autograd.grad", "no_create_graph", fn, "torch.autograd.grad(")
    assert "create_graph=True" in str(report)


# --------------------------------------------------------------------------------------- (d) .item() and float()
def test_item_is_named_with_its_line():
    X, W, A = data()

    def fn(A):
        scale = A.abs().mean().item()
        return (X @ W).pow(2).mean() * scale

    report = disconnected(fn, A)
    only_cut(report, "item", "python", fn, ".item()")
    assert "Keep the value a Tensor" in str(report)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")
def test_a_python_number_lost_in_python_arithmetic_is_still_reported():
    X, W, A = data()

    def fn(A):
        scale = 2.0 * float(A.abs().mean()) + 1.0  # a new float: the tracker cannot follow it
        return (X @ W).pow(2).mean() * scale

    report = disconnected(fn, A)
    assert report.status == "unused" and report.cuts == ()
    assert "__float__ at" in str(report) and f"{HERE}:{line_of(fn, 'float(A')}" in str(report)


# ------------------------------------------------------------------------------------------- (e) partly cut
def test_partly_cut_warns_and_the_gradient_is_still_returned():
    X, _, A = data()

    def fn(A):
        logits = X @ A
        labels = logits.argmax(dim=1)  # self-training: the same logits, directly and through argmax
        return F.cross_entropy(logits, labels)

    with pytest.warns(PartialPathWarning, match="argmax") as record:
        report = explain(fn, A)
    assert report.status == "partly cut" and report.connected
    assert f"{HERE}:{line_of(fn, 'argmax(')}" in str(record[0].message)
    (dA,) = torch.autograd.grad(report.loss, A)
    assert dA.abs().sum() > 0


# --------------------------------------------------------------------------------------- (f) fully connected
def test_connected_path_neither_raises_nor_warns_even_with_masks_and_metrics():
    X, W, A = data()

    def fn(A):
        z = X @ A
        h = torch.where(z > 0, z, 0.1 * z)  # a mask: no warning, the path through z is exact
        accuracy = (h.argmax(1) == 0).double().mean()  # argmax for a metric: does not reach the loss
        assert 0 <= accuracy <= 1
        return F.cross_entropy(h @ W.T @ W, torch.zeros(16, dtype=torch.long))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = explain(fn, A)
    assert report.status == "connected" and [(c.op, c.kind) for c in report.cuts] == [("gt", "compare")]
    assert "no path is cut" in str(report) and "Masks on the way" in str(report)
    assert torch.autograd.grad(report.loss, A)[0].abs().sum() > 0


def model_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 5, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return model, X, y


@pytest.mark.parametrize("method", [ng.Unroll(), ng.Unroll(truncate=2), ng.Reverse()], ids=repr)
def test_train_with_a_connected_hparam_is_silent(method):
    """Cuts nestgrad makes on purpose (truncation, adjoint methods training under no_grad) do not warn."""
    model, X, y = model_problem()
    A = torch.zeros(24, requires_grad=True)

    def loss_fn(p, batch, A):
        return (torch.sigmoid(A) * F.cross_entropy(ng.call(model, p, X), y, reduction="none")).mean()

    def outer(A):
        opt = ng.optim.Adam(lr=0.05)
        trained = ng.train(loss_fn, dict(model.named_parameters()), opt, [None], steps=4, hparams=A, method=method)
        return F.cross_entropy(ng.call(model, trained, X), y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = explain(outer, A)
    assert report.status == "connected"
    assert all(c.internal for c in report.cuts)
    (dA,) = torch.autograd.grad(report.loss, A)
    (ref,) = torch.autograd.grad(outer(A), A)
    torch.testing.assert_close(dA, ref)


# --------------------------------------------------------------------------------------- (g) through ng.train
def test_argmax_labels_inside_train_are_found_end_to_end():
    model, X, y = model_problem()
    T = torch.randn(5, 3, requires_grad=True)  # a teacher whose argmax labels the student learns

    def loss_fn(p, batch, T):
        x = batch
        labels = (x @ T).argmax(dim=1)
        return F.cross_entropy(ng.call(model, p, x), labels)

    def outer(T, method=None):
        opt = ng.optim.SGD(lr=0.1, momentum=0.9)
        trained = ng.train(loss_fn, dict(model.named_parameters()), opt, [X], steps=6, hparams=T, method=method)
        return F.cross_entropy(ng.call(model, trained, X), y)

    report = disconnected(outer, T)
    cut = only_cut(report, "argmax", "index", loss_fn, "argmax(")
    # Once per step (6); or once, if train itself stops at the first step to explain the cut.
    assert cut.count in (1, 6) and not cut.internal
    assert "nestgrad.ZerothOrder" in str(report)
    # The fix it suggests: ZerothOrder estimates the hypergradient without differentiating the path.
    report = explain(lambda T: outer(T, ng.ZerothOrder(samples=2, sigma=0.3, seed=0)), T)
    assert report.status == "connected"
    assert torch.autograd.grad(report.loss, T)[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------ (h) integer casts
def test_long_cast_is_named_with_its_line():
    _, W, A = data()

    def fn(A):
        k = (A[:, 0].abs() * 3).long()
        return (W[k.clamp(max=3)] ** 2).sum()

    only_cut(disconnected(fn, A), "long", "cast", fn, ".long()")


def test_to_integer_dtype_and_comparisons_are_cuts_when_they_are_the_only_path():
    _, W, A = data()

    def cast(A):
        return (W * (A > 0).to(torch.float64)).sum()

    report = disconnected(cast, A)
    only_cut(report, "gt", "compare", cast, "(A > 0)")
    assert "torch.sigmoid((x - t) / tau)" in str(report)


def test_round_has_a_zero_gradient_and_is_a_cut_although_autograd_connects_it():
    _, W, A = data()

    def fn(A):
        return (W * torch.round(A * 3)).sum()

    report = disconnected(fn, A)
    assert reaches(report.loss, A) and report.graph_reaches  # autograd connects it ...
    assert "returns a silent zero" in str(report)
    assert torch.autograd.grad(report.loss, A)[0].abs().sum() == 0  # ... with a silent zero
    only_cut(report, "round", "zero_grad", fn, "torch.round(")
    assert "straight-through" in str(report)


# ---------------------------------------------------------------------------------------------- the API
def test_tracking_context_manager_and_report_without_raising():
    X, W, A = data()
    with tracking(A) as tracker:
        loss = F.cross_entropy(X @ W, (X @ A).argmin(1))
        assert torch._C._is_torch_function_mode_enabled()
    assert not torch._C._is_torch_function_mode_enabled()  # nothing is left active: no cost outside the block
    report = tracker.report(loss)
    assert report.status == "cut" and [c.op for c in report.cuts] == ["argmin"]
    with pytest.raises(RuntimeError, match="entered once"), tracker:
        pass


def test_hparams_trees_and_an_unused_hparam():
    X, W, A = data()
    B = torch.randn(3, requires_grad=True)

    report = explain(lambda h: (X @ h["A"] + h["B"]).pow(2).mean(), {"A": A, "B": B})
    assert report.status == "connected"
    with pytest.raises(DisconnectedError) as info:
        explain(lambda h: (X @ W).pow(2).mean(), (A, B))
    assert info.value.report.status == "unused"
    assert "never used a value derived from the hparams" in str(info.value)


def test_an_hparam_that_does_not_require_grad_is_pointed_out():
    X, _, _ = data()
    A = torch.randn(4, 3)
    with pytest.raises(DisconnectedError, match=r"does not require grad.*requires_grad_\(\)"):
        explain(lambda A: (X @ A).pow(2).mean(), A)


def test_explain_needs_a_function_not_a_loss():
    X, _, A = data()
    with pytest.raises(TypeError, match="cannot be explained after the fact"):
        explain((X @ A).sum(), A)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hparams must be a Tensor"):
        explain(lambda h: h, [1.0])


def test_custom_function_outputs_are_connected():
    X, _, A = data()

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2  # runs with grad disabled: not a cut, the Function's backward connects it

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = explain(lambda A: (X @ Double.apply(A)).pow(2).mean(), A)
    assert report.status == "connected" and report.cuts == ()


# ---------------------------------------------------------------- require_path: the cheap check proposed for train
def test_require_path_is_one_graph_walk_when_connected():
    X, W, A = data()
    loss = (X @ A).pow(2).mean()
    reruns = []
    require_path(loss, A, rerun=lambda h: reruns.append(h))  # type: ignore[arg-type,func-returns-value]
    assert reruns == []
    assert reaches(loss, A) and reaches(loss, {"a": A, "w": W}) and not reaches((X @ W).sum(), A)


def test_require_path_explains_a_cut_loss_and_returns_the_report_of_an_unused_one():
    X, W, A = data()

    def loss_fn(A):
        labels = (X @ A).argmax(1)
        return F.cross_entropy(X @ W, labels)

    state = torch.get_rng_state()
    with pytest.raises(DisconnectedError, match="argmax") as info:
        require_path(loss_fn(A), A, rerun=loss_fn)
    assert info.value.report.cuts[0].lineno == line_of(loss_fn, "argmax(")
    assert torch.equal(torch.get_rng_state(), state)
    report = require_path((X @ W).sum(), A, rerun=lambda A: (X @ W).sum())
    assert report is not None and report.status == "unused"
    assert "never used a value derived from the hparams" in str(report)
    assert require_path((X @ A).sum(), A, rerun=lambda A: (X @ A).sum()) is None


def test_explain_of_a_cut_hparam_gives_no_requires_grad_warning_whose_fix_does_not_apply() -> None:
    """Under ng.explain, hparams computed from the explained ones through a cut are reported as cut, without
    train's "none requires grad ... call .requires_grad_()" warning (its fix does not apply to them);
    outside explain the warning stays."""
    X, y = torch.randn(16, 4), torch.randn(16)
    A = torch.zeros(16, requires_grad=True)

    def loss_fn(p, batch, wt):
        return (wt * (batch[0] @ p["w"] - batch[1]) ** 2).mean()

    def outer(A):
        weights = (torch.sigmoid(A) > 0.5).double()  # a comparison: piecewise constant in A
        w = ng.train(loss_fn, {"w": torch.zeros(4, requires_grad=True)}, ng.optim.SGD(lr=0.1), [(X, y)], steps=3,
                     hparams=weights)  # fmt: skip
        return (X @ w["w"]).pow(2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DisconnectedError, match="CUT"):
            explain(outer, A)
    with pytest.warns(UserWarning, match="none requires grad"):
        outer(A)

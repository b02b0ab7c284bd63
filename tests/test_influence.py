"""Influence-function unlearning: the derivatives, the solvers, the edit against exact retraining,
and LoRA as a PEFT kind. All fp64 where precision is asserted; all on tiny models (seconds)."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from lmeraser.config import InfluenceParams, PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.store import ArtifactStore
from lmeraser.training import train_prompt
from lmeraser.unlearning.influence import (
    Objective,
    conjugate_gradient,
    damped_solve,
    influence_edit,
    power_iteration,
    prepare_model,
)

from helpers import tiny_backbone, tiny_data

WD = 1e-2  # the convex case's L2 weight


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


@pytest.fixture(scope="module")
def data():
    return tiny_data(24)


def _prompt_model(backbone, data, kind="pad"):
    schedule = {"epochs": 2, "batch_size": 8, "lr": 0.05}
    params = PromptParams(
        kind=kind, pad={"width": 1, **schedule}, vpt={"num_tokens": 2, **schedule}, lora={"rank": 2, **schedule}
    )
    state = train_prompt(backbone, *data, params, 4, 3)
    return prepare_model(backbone, params, 4, state, torch.float64), params


def _flat_loss(objective, x, y):
    return lambda theta: objective.loss(theta, x, y)


# -- derivatives -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pad", "vpt", "lora"])
def test_hvp_matches_central_finite_differences(backbone, data, kind):
    model, params = _prompt_model(backbone, data, kind)
    x, y = data[0].double(), data[1]
    objective = Objective(model, params.adapter.weight_decay)
    theta = objective.theta0
    v = torch.randn(objective.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v /= v.norm()
    hv = objective.hvp(theta, x, y)(v)
    eps = 1e-5
    fd = (objective.gradient(theta + eps * v, x, y) - objective.gradient(theta - eps * v, x, y)) / (2 * eps)
    assert float((hv - fd).norm() / fd.norm()) < 1e-4
    assert float(hv.norm()) > 0


def _convex(n=120, d=6, classes=3, seed=0):
    """An L2-regularised softmax regression (a linear head on frozen features): strictly convex."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def _fit(x, y, init=None) -> torch.nn.Linear:
    """The exact retrain: L-BFGS to convergence on mean cross-entropy + (WD/2)‖θ‖²."""
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1).double()
    if init is not None:
        head.load_state_dict(init)
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * WD * sum((p * p).sum() for p in head.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return head


def test_hvp_and_gauss_newton_match_the_explicit_hessian():
    x, y = _convex(n=30, d=3)
    head = _fit(x, y)
    objective = Objective(head, WD)
    theta = objective.theta0
    explicit = hessian(_flat_loss(objective, x, y), theta)
    basis = torch.eye(objective.dim, dtype=torch.float64)
    hvp, gn = objective.hvp(theta, x, y), objective.gauss_newton(theta, x)
    by_hvp = torch.stack([hvp(e) for e in basis], 1)
    by_gn = torch.stack([gn(e) for e in basis], 1)
    assert torch.allclose(by_hvp, explicit, rtol=1e-8, atol=1e-10)
    # Logits are linear in θ here, so Gauss–Newton is the Hessian exactly.
    assert torch.allclose(by_gn, explicit, rtol=1e-8, atol=1e-10)
    assert float(torch.linalg.eigvalsh(explicit).min()) >= WD * (1 - 1e-9)


def test_gauss_newton_is_positive_semidefinite_on_the_vit(backbone, data):
    model, params = _prompt_model(backbone, data, "vpt")
    objective = Objective(model, 0.0)
    gn = objective.gauss_newton(objective.theta0, data[0].double())
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        v = torch.randn(objective.dim, generator=g, dtype=torch.float64)
        assert float(v.dot(gn(v))) >= -1e-12


# -- solvers ---------------------------------------------------------------------------------


def _spd(dim=30, seed=0, negative=False):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-2, 1, dim, dtype=torch.float64)
    if negative:
        eigenvalues[0] = -0.5
    return q @ torch.diag(eigenvalues) @ q.T, torch.randn(dim, generator=g, dtype=torch.float64)


def test_conjugate_gradient_matches_linalg_solve():
    a, b = _spd()
    for damping in (0.0, 0.1):
        result = conjugate_gradient(lambda v: a @ v, b, damping, 1e-10, 500)
        expected = torch.linalg.solve(a + damping * torch.eye(len(b), dtype=torch.float64), b)
        assert not result.negative_curvature
        assert result.relative_residual <= 1e-10
        assert float((result.x - expected).norm() / expected.norm()) < 1e-8


def test_power_iteration_finds_the_top_eigenvalue():
    a, _ = _spd()
    top = float(torch.linalg.eigvalsh(a).max())
    estimate = power_iteration(lambda v: a @ v, len(a), 200, torch.Generator().manual_seed(0), torch.float64)
    assert abs(estimate - top) / top < 1e-3


def test_damping_from_power_iterations_is_reported_and_makes_an_indefinite_system_solvable():
    a, b = _spd(negative=True)
    params = InfluenceParams(power_iterations=60, cg_tol=1e-10, cg_max_iter=500)
    solve = damped_solve(
        lambda v: a @ v, b, len(b), params, indefinite=True, generator=torch.Generator().manual_seed(0)
    )
    assert solve.lambda_min is not None and solve.lambda_min < 0
    assert solve.damping > 0.5  # covers the negative eigenvalue
    expected = torch.linalg.solve(a + solve.damping * torch.eye(len(b), dtype=torch.float64), b)
    assert float((solve.x - expected).norm() / expected.norm()) < 1e-8
    fixed = damped_solve(
        lambda v: a @ v,
        b,
        len(b),
        params.model_copy(update={"damping": 2.0}),
        indefinite=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert fixed.damping == 2.0


# -- the edit, against exact retraining (convex case) -----------------------------------------


def _edit_vs_retrain(edit: str, newton_steps: int, hessian_kind: str = "exact") -> float:
    x, y = _convex()
    head = _fit(x, y)
    x_new, y_new, present = x.clone(), y.clone(), torch.ones(len(y), dtype=torch.bool)
    if edit == "remove":
        present[7] = False
    elif edit == "response":
        y_new[7] = (y[7] + 1) % 3
    else:  # query
        x_new[7] = x[7] + 0.5
    theta, objective, report = influence_edit(
        head,
        x,
        y,
        x_new,
        y_new,
        present,
        InfluenceParams(hessian=hessian_kind, newton_steps=newton_steps, damping=0.0, cg_tol=1e-12),
        WD,
        seed=0,
    )
    exact = _fit(x_new[present], y_new[present], init=head.state_dict())
    exact_theta = torch.cat([exact.weight.reshape(-1), exact.bias])
    exact_delta, delta = exact_theta.detach() - objective.theta0, theta - objective.theta0
    assert report.cg_relative_residual <= 1e-12 and report.n_changed == 1
    return float((delta - exact_delta).norm() / exact_delta.norm())


@pytest.mark.parametrize("edit, one_step_bound", [("remove", 0.05), ("response", 0.25), ("query", 0.25)])
def test_influence_matches_exact_retraining_of_a_convex_head(edit, one_step_bound):
    # One step is the influence approximation: within 5% for a removal; a relabelled or
    # altered sample moves θ further (it is removed and re-added with a large gradient), so one
    # step captures most but not all of it. Newton refinement then reaches the retrain.
    assert _edit_vs_retrain(edit, 0) < one_step_bound
    assert _edit_vs_retrain(edit, 2) < 1e-3


def test_gauss_newton_edit_equals_exact_hessian_edit_on_a_linear_head():
    assert abs(_edit_vs_retrain("remove", 0, "gauss_newton") - _edit_vs_retrain("remove", 0, "exact")) < 1e-6


def test_removing_a_sample_raises_its_loss_and_is_deterministic(backbone, data):
    model, params = _prompt_model(backbone, data, "pad")
    x, y = data[0].double(), data[1]
    present = torch.ones(len(y), dtype=torch.bool)
    present[:3] = False
    runs = [
        influence_edit(model, x, y, x, y, present, InfluenceParams(), params.adapter.weight_decay, seed=5)
        for _ in range(2)
    ]
    (theta, objective, report), (theta2, *_) = runs
    assert torch.equal(theta, theta2)
    before = F.cross_entropy(objective.logits(objective.theta0, x[:3]), y[:3])
    after = F.cross_entropy(objective.logits(theta, x[:3]), y[:3])
    assert float(after) > float(before)
    assert report.damping > 0 and report.damping_source == "power_iteration" and report.cg_relative_residual <= 1e-6
    state = objective.state(theta)
    assert set(state) == set(model.state_dict()) and all(t.dtype == torch.float32 for t in state.values())


def test_edits_that_change_nothing_or_remove_everything_are_refused(backbone, data):
    model, params = _prompt_model(backbone, data, "pad")
    x, y = data[0].double(), data[1]
    everyone = torch.ones(len(y), dtype=torch.bool)
    with pytest.raises(LmeraserError, match="changes no sample"):
        influence_edit(model, x, y, x, y, everyone, InfluenceParams(), 0.0, seed=0)
    with pytest.raises(LmeraserError, match="removes every sample"):
        influence_edit(model, x, y, x, y, ~everyone, InfluenceParams(), 0.0, seed=0)


# -- LoRA --------------------------------------------------------------------------------------

LORA = PromptParams.of("lora", rank=2, epochs=2, batch_size=8, lr=0.05)


def test_lora_training_is_byte_identical_and_stores_only_adapters_and_head(tmp_path, backbone, data):
    stored = [
        ArtifactStore(tmp_path / name).save("k", train_prompt(backbone, *data, LORA, 4, 7), {"cluster": 0})
        for name in "ab"
    ]
    assert stored[0].path.read_bytes() == stored[1].path.read_bytes()
    state = train_prompt(backbone, *data, LORA, 4, 7)
    assert state and all(name.startswith(("lora.a.", "lora.b.", "head.")) for name in state)
    assert any(name.startswith("lora.b.") and float(t.abs().sum()) > 0 for name, t in state.items())  # it learned
    # The shared backbone is untouched: adapters live on the cluster's private copy.
    assert not any("lora" in name for name, _ in backbone.named_parameters())


def test_lora_starts_at_the_frozen_backbone_and_rejects_unknown_targets(backbone, data):
    from lmeraser.models.prompts import PromptedClassifier, init_peft

    model = PromptedClassifier(backbone, LORA, 4)
    init_peft(model, torch.Generator().manual_seed(0))
    x = data[0][:4]
    with torch.no_grad():
        assert torch.equal(model.features(x), backbone.forward_head(backbone.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="prompt.lora.targets"):
        PromptedClassifier(backbone, PromptParams.of("lora", rank=2, targets=("nope",)), 4)

"""Influence-function unlearning of one cluster's PEFT parameters (LLMEraser, ICLR 2025).

A cluster's prompt (or LoRA adapters) and head, θ, were trained on n samples D to minimise

    L(θ) = (1/n) Σ_D ℓ(z; θ) + (w/2) ‖θ‖²,   ℓ = cross-entropy, w = the PEFT kind's weight_decay.

An edit turns the samples z in S into z′ (removed: no z′), leaving n′ samples. One Newton step
from θ (taken as the minimiser of L) on the edited objective gives

    Δθ = (H + λI)⁻¹ ( (1/n′) Σ_S [∇ℓ(z; θ) − ∇ℓ(z′; θ)] + (n/n′ − 1) w θ ),

the paper's (1/n) H⁻¹ Σ_S [∇ℓ(z) − ∇ℓ(z′)] when w = 0 and |S| ≪ n. H is the Hessian of L at θ
(or its Gauss–Newton approximation), λ a small damping chosen by power iterations, and the system
is solved by conjugate gradient. Optional damped Newton steps then refine θ on the edited
objective itself. The loss, the eval-mode model and the input normalisation are exactly the
trainer's; the result is approximate by nature, which is why the product records it as such and
still queues the exact rebuild.

Everything here is plain torch (torch.func), with no I/O: `influence_edit` takes tensors and a
model and returns the new parameters, the objective (for `Objective.state`) and a report.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, linearize, vjp, vmap

from lmeraser.config import InfluenceParams, PromptParams
from lmeraser.determinism import deterministic
from lmeraser.errors import LmeraserError
from lmeraser.models.prompts import PromptedClassifier

MatVec = Callable[[torch.Tensor], torch.Tensor]

# Above this many Jacobian entries (n · classes · params; 400 MB in float32) the Gauss–Newton
# product is computed matrix-free instead of from a stored Jacobian. The stored Jacobian is much
# faster (measured: Fashion-MNIST LoRA, 28,618 parameters, 9-12 s matrix-free).
_JACOBIAN_BUDGET = 100_000_000


def prepare_model(
    backbone: torch.nn.Module,
    params: PromptParams,
    num_classes: int,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> PromptedClassifier:
    """The cluster's model in eval mode and `dtype`, on a private copy of the backbone, on the
    backbone's device.

    Attention uses timm's unfused path: the same function as the fused CPU kernel used in
    training, but one that forward-mode AD (needed for Hessian-vector products) can differentiate.

    Args:
        backbone: the served backbone (`ServingModel.backbone`); copied, never changed.
        params: the prompt section (the PEFT kind and its settings) the cluster was trained with.
        num_classes: the classes of the classifier head.
        state: the prompt state dict the cluster serves (`ServingModel.state`): prompt or LoRA adapters, and head.
        dtype: the precision the update runs in (`influence.dtype`).
    """
    backbone = copy.deepcopy(backbone).to(dtype).eval()
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    model = PromptedClassifier(backbone, params, num_classes).to(device=next(backbone.parameters()).device, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


class Objective:
    """L(θ) = mean cross-entropy + (w/2)‖θ‖² as a function of a flat parameter vector θ."""

    def __init__(self, model: torch.nn.Module, weight_decay: float):
        self.model = model
        self.weight_decay = weight_decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        tensors = dict(model.named_parameters())
        self.shapes = [tensors[n].shape for n in self.names]
        self.sizes = [tensors[n].numel() for n in self.names]
        self.theta0 = torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    @property
    def dim(self) -> int:
        return self.theta0.numel()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ as the model's trainable tensors by name (views of `theta`, no copies).

        Args:
            theta: a flat parameter vector of length `dim`, in `names` order.
        """
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def state(self, theta: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A state dict for `load_prompt` / the artifact store, in the storage dtype, in host memory.

        Args:
            theta: the flat PEFT parameters to store (θ_new from `influence_edit`).
            dtype: the dtype every tensor is stored in, whatever θ's.
        """
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state.update({n: t.detach().to("cpu", dtype).contiguous().clone() for n, t in self.unflatten(theta).items()})
        return {k: v.to(dtype).contiguous() for k, v in state.items()}

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's logits on `x` with its trainable parameters set to `theta`.

        Args:
            theta: a flat parameter vector of length `dim`.
            x: preprocessed inputs (n, channels, size, size) on the model's device, in its dtype.
        """
        return functional_call(self.model, self.unflatten(theta), (x,))

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L(θ) on the rows (`x`, `y`): their mean cross-entropy plus (w/2)‖θ‖².

        Args:
            theta: a flat parameter vector of length `dim`.
            x: preprocessed inputs (n, channels, size, size) on the model's device, in its dtype.
            y: their labels (n,), class indices on the same device.
        """
        return F.cross_entropy(self.logits(theta, x), y) + 0.5 * self.weight_decay * theta.dot(theta)

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇L(θ) on the rows (`x`, `y`), regulariser included.

        Args:
            theta: a flat parameter vector of length `dim`.
            x: preprocessed inputs (n, channels, size, size) on the model's device, in its dtype.
            y: their labels (n,), class indices on the same device.
        """
        return grad(self.loss)(theta, x, y)

    def per_example_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """∇ℓ(z_i; θ) for each sample (no regulariser), shape (n, dim).

        Args:
            theta: a flat parameter vector of length `dim`.
            x: the samples' preprocessed inputs (n, channels, size, size), on the model's device, in its dtype.
            y: their labels (n,), class indices on the same device.
            chunk: samples per vectorised call (bounds the memory the per-sample graphs take).
        """

        def one(theta: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.logits(theta, xi[None]), yi[None])

        if len(y) == 0:
            return theta.new_zeros(0, self.dim)
        per_sample = vmap(grad(one), in_dims=(None, 0, 0))
        return torch.cat([per_sample(theta, x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(y), chunk)])

    def hvp(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> MatVec:
        """v ↦ ∇²L(θ) v, forward-over-reverse.

        Args:
            theta: the point the Hessian is taken at.
            x: the inputs L is averaged over (the Hessian sample, or the edited rows in a Newton step).
            y: their labels.
        """
        gradient = grad(self.loss)
        return lambda v: jvp(lambda t: gradient(t, x, y), (theta,), (v,))[1]

    def gauss_newton(self, theta: torch.Tensor, x: torch.Tensor) -> MatVec:
        """v ↦ (Jᵀ H_out J / n + w I) v: positive semi-definite by construction.

        J is the Jacobian of the logits and H_out = diag(p) − p pᵀ the Hessian of the
        cross-entropy in the logits. J is formed once (per sample, vectorised) when it fits the
        budget, else the product is matrix-free (a linearised jvp and a vjp per call).

        Args:
            theta: the point J and p are taken at.
            x: the inputs the product is averaged over (the Hessian sample); no labels: the matrix does not depend on
                them.
        """
        n = x.shape[0]
        logits = self.logits(theta, x).detach()
        classes = logits.shape[1]
        probs = logits.softmax(-1)

        def h_out(u: torch.Tensor) -> torch.Tensor:  # u: (n, C)
            return probs * u - probs * (probs * u).sum(-1, keepdim=True)

        if n * classes * self.dim <= _JACOBIAN_BUDGET:
            one = lambda t, xi: self.logits(t, xi[None])[0]  # noqa: E731
            jac = torch.cat(
                [vmap(jacrev(one), in_dims=(None, 0))(theta, x[i : i + 64]) for i in range(0, n, 64)]
            )  # (n, C, P)
            flat = jac.reshape(n * classes, self.dim)
            return lambda v: flat.T @ h_out((flat @ v).view(n, classes)).reshape(-1) / n + self.weight_decay * v
        _, jvp_fn = linearize(lambda t: self.logits(t, x), theta)
        _, vjp_fn = vjp(lambda t: self.logits(t, x), theta)
        return lambda v: vjp_fn(h_out(jvp_fn(v)))[0] / n + self.weight_decay * v


# -- solvers -------------------------------------------------------------------------------------


def power_iteration(
    matvec: MatVec,
    dim: int,
    iterations: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> float:
    """The eigenvalue of largest magnitude (Rayleigh quotient after `iterations` steps); the start
    vector is drawn on the CPU (`generator`), the same on every device.

    Args:
        matvec: the operator's product with a vector.
        dim: the vector space's dimension.
        iterations: power steps to take.
        generator: draws the start vector.
        dtype, device: where and in what precision the iterations run.
    """
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v)
        value = float(v.dot(w))
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return value


@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    relative_residual: float
    negative_curvature: bool = False


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, damping: float, tol: float, max_iter: int) -> CGResult:
    """Solve (A + damping·I) x = b; stops when ‖r‖/‖b‖ ≤ tol, or at negative curvature.

    Args:
        matvec: A's product with a vector (a Hessian-vector product).
        b: the right-hand side.
        damping: λ added to A's diagonal.
        tol: the relative residual to stop at.
        max_iter: the most iterations.
    """
    x = torch.zeros_like(b)
    b_norm = float(b.norm())
    if b_norm == 0:
        return CGResult(x, 0, 0.0)
    r = b.clone()
    p = r.clone()
    rr = r.dot(r)
    for iteration in range(1, max_iter + 1):
        ap = matvec(p) + damping * p
        curvature = p.dot(ap)
        if curvature <= 0:
            return CGResult(x, iteration, float(r.norm()) / b_norm, negative_curvature=True)
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        residual = math.sqrt(float(rr_new)) / b_norm  # in Python: torch's sqrt is MKL's, CPU-dependent
        if residual <= tol:
            return CGResult(x, iteration, residual)
        p = r + (rr_new / rr) * p
        rr = rr_new
    # The recurrence's residual drifts from the true one; report the true residual.
    true = float((b - matvec(x) - damping * x).norm()) / b_norm
    return CGResult(x, max_iter, true)


@dataclass
class Solve:
    x: torch.Tensor
    damping: float
    lambda_max: float
    lambda_min: float | None
    cg: CGResult
    restarts: int = 0


def damped_solve(
    matvec: MatVec,
    b: torch.Tensor,
    dim: int,
    params: InfluenceParams,
    indefinite: bool,
    generator: torch.Generator,
    damping: float | None = None,
    spectrum: tuple[float, float | None] | None = None,
) -> Solve:
    """(H + λI)⁻¹ b with λ from power iterations (or fixed), raising λ if CG meets negative curvature.

    `damping` and `spectrum` (λ_max, λ_min) let a caller re-solve at a larger λ without
    repeating the power iterations.

    Args:
        matvec: the curvature's product with a vector (`Objective.hvp` or `Objective.gauss_newton`).
        b: the right-hand side (the influence step's gradient difference, or a Newton step's gradient).
        dim: the number of PEFT parameters (the length of `b`).
        params: the influence settings: fixed damping or its ratio, power iterations, CG tolerance and iterations.
        indefinite: the curvature may have negative eigenvalues (`influence.hessian` exact): λ_min is estimated too.
        generator: draws the power iterations' start vectors.
        damping: λ to start from; None: `params.damping`, else from the spectrum.
        spectrum: (λ_max, λ_min) already estimated (λ_min None if it was not); None: run the power iterations.
    """
    if spectrum is None:
        lambda_max = power_iteration(matvec, dim, params.power_iterations, generator, b.dtype, b.device)
        lambda_min = None
        if indefinite:
            # The spectrum's other end: the top eigenvalue of (λ_max I − H) is λ_max − λ_min.
            shifted = power_iteration(
                lambda v: lambda_max * v - matvec(v), dim, params.power_iterations, generator, b.dtype, b.device
            )
            lambda_min = lambda_max - shifted
    else:
        lambda_max, lambda_min = spectrum
    if damping is None:
        damping = (
            params.damping
            if params.damping is not None
            else params.damping_ratio * abs(lambda_max) + max(0.0, -(lambda_min or 0.0))
        )
    restarts = 0
    while True:
        result = conjugate_gradient(matvec, b, damping, params.cg_tol, params.cg_max_iter)
        if not result.negative_curvature or restarts == 8:
            break
        # The few power iterations under-estimated the negative end: damp more and solve again.
        damping = max(10 * damping, 1e-8 * max(abs(lambda_max), 1.0))
        restarts += 1
    if result.negative_curvature:
        raise LmeraserError(
            f"the Hessian stays indefinite at damping {damping:.3g}; "
            "use influence.hessian: gauss_newton or the exact method."
        )
    return Solve(result.x, damping, lambda_max, lambda_min, result, restarts)


# -- the edit ------------------------------------------------------------------------------------


@dataclass
class InfluenceReport:
    hessian: str
    dtype: str
    parameters: int
    n_before: int
    n_after: int
    n_changed: int
    hessian_samples: int
    damping: float
    damping_source: str
    lambda_max: float
    lambda_min: float | None
    cg_iterations: int
    cg_relative_residual: float
    cg_restarts: int
    update_norm: float
    damping_increases: int = 0  # Levenberg–Marquardt increases of λ (see influence_edit)
    edited_objective: dict = field(default_factory=dict)  # the tilted edited objective at θ and θ + Δθ
    residual_gradient_norm: float = 0.0  # ‖∇L(θ)‖: how far training stopped from the minimum
    newton: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def rows_like(
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_new: torch.Tensor,
    y_new: torch.Tensor,
    present: torch.Tensor,
) -> tuple:
    """An edit's rows on `theta`'s device, the inputs in its dtype.

    Args:
        theta: a tensor on the device and in the dtype wanted (the flat parameters, or one of the model's).
        x: the cluster's inputs before the edit.
        y: their labels before the edit.
        x_new: the same rows' inputs after the edit.
        y_new: their labels after the edit.
        present: whether each row is still in the cluster after the edit (False: removed).
    """
    device, dtype = theta.device, theta.dtype
    return x.to(device, dtype), y.to(device), x_new.to(device, dtype), y_new.to(device), present.to(device)


def edited_rows(
    x: torch.Tensor, y: torch.Tensor, x_new: torch.Tensor, y_new: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """The rows an edit touches: removed, relabelled or with a changed input.

    Args:
        x: the cluster's inputs before the edit.
        y: their labels before the edit.
        x_new: the same rows' inputs after the edit.
        y_new: their labels after the edit.
        present: whether each row is still in the cluster after the edit (False: removed).
    """
    return ~present | (y_new != y) | (x_new != x).flatten(1).any(1)


def influence_edit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_new: torch.Tensor,
    y_new: torch.Tensor,
    present: torch.Tensor,
    params: InfluenceParams,
    weight_decay: float,
    seed: int,
    threads: int = 1,
) -> tuple[torch.Tensor, Objective, InfluenceReport]:
    """Apply the edit D → D′ to `model`'s PEFT parameters by influence.

    Rows align: sample i was (x[i], y[i]); after the edit it is (x_new[i], y_new[i]) if
    present[i], or gone. Deterministic for fixed inputs, seed and threads. Runs on the model's
    device (the rows move there); random draws are made on the CPU.

    Args:
        model: the cluster's model (`prepare_model`): the trained PEFT parameters are θ.
        x, y: the cluster's inputs and labels as the served prompt was trained on them.
        x_new, y_new: the same rows after the edit (a corrected input or label).
        present: whether each row is still in the cluster after the edit (False: removed).
        params: the influence settings (curvature, damping, CG, Hessian samples).
        weight_decay: the training's L2 weight, part of the objective θ minimises.
        seed: seeds the Hessian sample and the power iterations' start vector.
        threads: torch's intra-op threads for the computation.

    Returns:
        θ_new (flat, in the model's dtype), the objective (for `Objective.state`) and the report.
    """
    start = time.perf_counter()
    n = len(y)
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    x, y, x_new, y_new, present = rows_like(parameter, x, y, x_new, y_new, present)
    changed = edited_rows(x, y, x_new, y_new, present)
    if not bool(changed.any()):
        raise LmeraserError("the edit changes no sample of the cluster.")
    if not bool(present.any()):
        raise LmeraserError(
            "the edit removes every sample of the cluster; the influence method needs at least one to remain "
            "(use the exact method)."
        )
    with deterministic(threads), torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        objective = Objective(model, weight_decay)
        theta = objective.theta0.clone()
        # A fixed Hessian sample of the cluster as trained (before the edit).
        rows = (
            torch.randperm(n, generator=generator)[: params.hessian_samples].sort().values
            if n > params.hessian_samples
            else torch.arange(n)
        )
        rows = rows.to(device)
        matvec = _curvature(objective, theta, x[rows], y[rows], params.hessian)
        # The Newton step from θ (a stationary point of L) on the edited objective, whose mean is
        # over n′ samples: b = (1/n′) Σ_S [∇ℓ(z) − ∇ℓ(z′)] + (n/n′ − 1) w θ. Without a regulariser
        # and for |S| ≪ n this is the paper's (1/n) Σ_S [...]; with one, the second term is what
        # keeps a removal consistent with retraining on the n′ remaining samples.
        n_after = int(present.sum())
        removed = objective.per_example_grads(theta, x[changed], y[changed]).sum(0)
        added_rows = changed & present
        added = objective.per_example_grads(theta, x_new[added_rows], y_new[added_rows]).sum(0)
        b = (removed - added) / n_after + (n / n_after - 1) * weight_decay * theta
        solve = damped_solve(matvec, b, objective.dim, params, params.hessian == "exact", generator)
        # Levenberg–Marquardt safeguard. The update is a Newton step that assumes θ minimises L;
        # a trained θ is only near a minimum (residual gradient r = ∇L(θ) ≠ 0), so θ is taken as
        # the exact minimiser of the tilted L − rᵀθ, and the step must not increase the tilted
        # edited objective. Where the curvature is nearly flat (a confidently fit cluster) the
        # step can overshoot; then λ grows tenfold and the system is solved again.
        # Checked on the Hessian sample plus the edited rows, which keeps it cheap on large clusters.
        check = torch.unique(torch.cat([rows, changed.nonzero().flatten()]))
        residual = objective.gradient(theta, x[check], y[check])
        kept = check[present[check]]
        x_check, y_check = x_new[kept], y_new[kept]
        start_theta = theta

        def tilted(t: torch.Tensor) -> float:
            return float(objective.loss(t, x_check, y_check) - residual.dot(t - start_theta))

        edited_before = tilted(theta)
        tolerance = 64 * torch.finfo(dtype).eps * max(1.0, abs(edited_before))  # rounding, not a real increase
        increases = 0
        while tilted(theta + solve.x) > edited_before + tolerance and increases < 12:
            increases += 1
            damping = max(10 * solve.damping, 1e-8 * max(abs(solve.lambda_max), 1.0))
            solve = damped_solve(
                matvec,
                b,
                objective.dim,
                params,
                params.hessian == "exact",
                generator,
                damping,
                (solve.lambda_max, solve.lambda_min),
            )
        theta = theta + solve.x
        report = InfluenceReport(
            hessian=params.hessian,
            dtype=str(dtype).removeprefix("torch."),
            parameters=objective.dim,
            n_before=n,
            n_after=n_after,
            n_changed=int(changed.sum()),
            hessian_samples=len(rows),
            damping=solve.damping,
            damping_source="fixed" if params.damping is not None else "power_iteration",
            lambda_max=solve.lambda_max,
            lambda_min=solve.lambda_min,
            cg_iterations=solve.cg.iterations,
            cg_relative_residual=solve.cg.relative_residual,
            cg_restarts=solve.restarts,
            update_norm=float(solve.x.norm()),
            damping_increases=increases,
            edited_objective={"before": edited_before, "after": tilted(theta)},
            residual_gradient_norm=float(residual.norm()),
        )
        x_edit, y_edit = x_new[present], y_new[present]
        for _ in range(params.newton_steps):
            report.newton.append(_newton_step(objective, theta, x_edit, y_edit, params, generator))
            theta = report.newton[-1].pop("theta")
    report.seconds = time.perf_counter() - start
    return theta, objective, report


def _curvature(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kind: str) -> MatVec:
    if kind == "exact":
        return objective.hvp(theta, x, y)
    return objective.gauss_newton(theta, x)


def _newton_step(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    params: InfluenceParams,
    generator: torch.Generator,
) -> dict:
    """One damped Newton step on the edited objective, with a backtracking line search."""
    gradient = objective.gradient(theta, x, y)
    loss = float(objective.loss(theta, x, y))
    solve = damped_solve(
        _curvature(objective, theta, x, y, params.hessian),
        gradient,
        objective.dim,
        params,
        params.hessian == "exact",
        generator,
    )
    step = 1.0
    for _ in range(10):
        candidate = theta - step * solve.x
        new_loss = float(objective.loss(candidate, x, y))
        if new_loss <= loss:
            break
        step /= 2
    else:
        candidate, new_loss, step = theta, loss, 0.0
    return {
        "theta": candidate,
        "step": step,
        "loss_before": loss,
        "loss_after": new_loss,
        "grad_norm": float(gradient.norm()),
        "damping": solve.damping,
        "cg_iterations": solve.cg.iterations,
        "cg_relative_residual": solve.cg.relative_residual,
    }

"""Trust-region policy optimisation as MAML's outer optimiser (paper §5.3).

``TRPO.step(objective)`` takes a function returning the surrogate loss and the mean KL at the
current parameters and moves them along the natural gradient: conjugate gradient on
Fisher-vector products (Hessian-vector products of the KL, here through the inner update),
a step scaled to the KL bound, and a backtracking line search that keeps the step only if the
loss improves and the KL stays within the bound.

The Fisher-vector product is exact by default (double backpropagation). ``fvp_eps`` gives the
reference code's instead: central finite differences of the KL's gradient at θ ± ε·v with
ε = ``fvp_eps``/‖θ‖ (cbfinn/maml_rl's ConjugateGradientOptimizer builds rllab's
FiniteDifferenceHvp with its ``num_slices`` argument, 1, in the ``base_eps`` position, so ε is
1/‖θ‖, not 1e-8/‖θ‖). With so large an ε the product is not the Hessian's: it is the mean slope of
the KL's gradient over ±ε·v, so it grows with |v| where the KL grows faster than a quadratic.

References:
    Schulman et al. (2015), Trust Region Policy Optimization, ICML, arXiv:1502.05477 (App. C).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector as flat
from torch.nn.utils import vector_to_parameters

from maml_runner.errors import is_number, positive_int, require

Objective = Callable[[bool], tuple[Tensor, Tensor]]


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """Approximately solve ``F x = b`` for symmetric positive definite ``F`` given ``x ↦ F x``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = r @ r
        if rr_new < 1e-10:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


class TRPO:
    """Natural-gradient step within ``KL ≤ max_kl`` (the paper: 0.01; rllab's other defaults).

    Args:
        params: the meta-parameters θ, updated in place.
        max_kl: δ, the trust region's KL bound.
        cg_iters: conjugate-gradient iterations.
        cg_damping: λ added to the Fisher matrix (``F + λI``) for a well-posed solve.
        backtrack_ratio: the step shrinks by this factor per rejected line-search try.
        max_backtracks: line-search tries before the step is abandoned.
        fvp_eps: None for exact Fisher-vector products; b > 0 for central finite differences of
            the KL gradient at θ ± (b/‖θ‖)·v (the reference code's: b = 1).

    Raises:
        InvalidArgument: ``max_kl`` not > 0, ``cg_iters`` or ``max_backtracks`` not an integer
            >= 1, ``cg_damping`` < 0, ``backtrack_ratio`` outside (0, 1), or ``fvp_eps`` not
            None and not > 0.
    """

    def __init__(
        self,
        params: list[Tensor],
        *,
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 15,
        fvp_eps: float | None = None,
    ) -> None:
        require(is_number(max_kl) and max_kl > 0, "max_kl", max_kl, "the KL bound must be > 0")
        positive_int("cg_iters", cg_iters)
        require(
            is_number(cg_damping) and cg_damping >= 0,
            "cg_damping",
            cg_damping,
            "the damping must be >= 0",
        )
        require(
            is_number(backtrack_ratio) and 0 < backtrack_ratio < 1,
            "backtrack_ratio",
            backtrack_ratio,
            "need 0 < backtrack_ratio < 1 (the step must shrink)",
        )
        positive_int("max_backtracks", max_backtracks)
        require(
            fvp_eps is None or (is_number(fvp_eps) and fvp_eps > 0),
            "fvp_eps",
            fvp_eps,
            "null (exact products) or > 0 (finite differences at θ ± fvp_eps/‖θ‖·v)",
        )
        self.params = list(params)
        self.fvp_eps = fvp_eps
        self.max_kl, self.cg_iters, self.cg_damping = max_kl, cg_iters, cg_damping
        self.backtrack_ratio, self.max_backtracks = backtrack_ratio, max_backtracks

    def fisher_vector_product(self, objective: Objective, kl: Tensor) -> Callable[[Tensor], Tensor]:
        """``v ↦ (F + λI) v`` at the current θ, with ``kl`` the objective's KL there (graph kept):
        exact, or the finite differences ``fvp_eps`` asks for."""
        if self.fvp_eps is None:
            kl_grad = flat(torch.autograd.grad(kl, self.params, create_graph=True))

            def exact(v: Tensor) -> Tensor:
                hv = torch.autograd.grad(kl_grad @ v, self.params, retain_graph=True)
                return flat(hv) + self.cg_damping * v

            return exact
        theta = flat(self.params).detach()
        eps = self.fvp_eps / (theta.norm().item() + 1e-8)

        def kl_grad_at(shifted: Tensor) -> Tensor:
            vector_to_parameters(shifted, self.params)
            try:
                return flat(torch.autograd.grad(objective(True)[1], self.params))
            finally:
                vector_to_parameters(theta, self.params)

        def finite_difference(v: Tensor) -> Tensor:
            diff = kl_grad_at(theta + eps * v) - kl_grad_at(theta - eps * v)
            return diff / (2 * eps) + self.cg_damping * v

        return finite_difference

    def step(self, objective: Objective) -> dict[str, float]:
        """One TRPO update; ``objective(differentiable)`` → ``(loss, kl)`` at the current θ."""
        loss, kl = objective(True)
        # the exact products differentiate the same graph again; finite differences rebuild it
        g = flat(torch.autograd.grad(loss, self.params, retain_graph=self.fvp_eps is None))
        old = flat(self.params).detach()
        fvp = self.fisher_vector_product(objective, kl)
        direction = conjugate_gradient(fvp, g, self.cg_iters)
        shs = 0.5 * (direction @ fvp(direction))
        step = direction * torch.sqrt(self.max_kl / shs.clamp_min(1e-12))
        loss_before = loss.item()
        for tries in range(self.max_backtracks):
            vector_to_parameters(old - self.backtrack_ratio**tries * step, self.params)
            new_loss, new_kl = (v.item() for v in objective(False))
            if new_loss < loss_before and new_kl <= self.max_kl:
                return {
                    "surrogate_before": loss_before,
                    "surrogate": new_loss,
                    "kl": new_kl,
                    "backtracks": tries,
                }
        vector_to_parameters(old, self.params)  # no acceptable step: keep θ
        return {
            "surrogate_before": loss_before,
            "surrogate": loss_before,
            "kl": 0.0,
            "backtracks": self.max_backtracks,
        }

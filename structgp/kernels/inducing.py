"""InducingPointKernel: low-rank (SoR / DTC / VFE) and FITC covariances from inducing points ``z`` ``(m, d)``.

With ``K_zz = L L^T`` (Cholesky in float64, jitter only through ``psd_cholesky``) and the factor
``F(x) = K_xz L^{-T}`` ``(n, m)``, the Nystrom approximation is ``Q_xx = K_xz K_zz^{-1} K_zx = F F^T``:

    sor / dtc / vfe:  K(x, x) = F F^T                            -> LowRank(F)
    fitc:             K(x, x) = F F^T + diag(K_xx - Q_xx)        -> LowRank(F) + Diagonal(...)

so with noise the training covariance is answered by Woodbury in ``n m^2``. Cross-covariances are
``Q(x1, x2) = F(x1) F(x2)^T`` (``cross_factor``), so predictive variances cost ``m^2`` a test point. The
methods differ at test points: SoR uses ``Q_**`` as the prior (degenerate), DTC, VFE and FITC the exact
``K_**`` (Quinonero-Candela and Rasmussen, 2005).

VFE (Titsias, 2009; gpytorch's ``InducingPointKernel`` / SGPR) predicts as DTC but fits the collapsed
variational lower bound of the exact marginal likelihood, with noise variances ``s_i``:

    log N(y; m, Q + diag(s)) - 1/2 sum_i (K_ii - Q_ii) / s_i        (= - tr(K - Q) / (2 sigma^2) for s_i = sigma^2)

the second term is :meth:`InducingPointKernel.bound_correction`, which the model adds to its log likelihood.
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor, nn

from structgp.covariance import Dense, Diagonal, LowRank, Operator
from structgp.inference import psd_cholesky
from structgp.kernels.base import Kernel, as_inputs, check_gpytorch_kernel, evaluate, evaluate_diag, symmetrize

METHODS = ("sor", "dtc", "fitc", "vfe")


class InducingPointKernel(Kernel):
    """SoR / DTC / FITC covariance of ``base_kernel`` through ``m`` inducing points.

    base_kernel: any gpytorch kernel; inducing_points: ``(m, d)`` initial locations (learned when
    ``learn_inducing_points``); method: ``"sor"``, ``"dtc"``, ``"fitc"`` or ``"vfe"`` (the collapsed
    variational bound, gpytorch's SGPR).
    """

    def __init__(
        self,
        base_kernel: gpytorch.kernels.Kernel,
        inducing_points: Tensor,
        method: str = "dtc",
        learn_inducing_points: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        self.base_kernel = check_gpytorch_kernel(base_kernel, "base_kernel")
        z = as_inputs(inducing_points, "inducing_points").detach().clone()
        if learn_inducing_points:
            self.inducing_points = nn.Parameter(z)
        else:
            self.register_buffer("inducing_points", z)
        self.method = method

    @property
    def num_inducing(self) -> int:
        return self.inducing_points.shape[-2]

    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = as_inputs(x, name)
        if x.shape[-1] != self.inducing_points.shape[-1]:
            raise ValueError(
                f"{name}: expected {self.inducing_points.shape[-1]} columns (as the inducing points), "
                f"got shape {tuple(x.shape)}"
            )
        return x

    def inducing_cholesky(self) -> Tensor:
        """``L`` (float64) with ``L L^T = K_zz`` ``(..., m, m)``; ``K_zz`` is evaluated in float64 (the
        inducing points and hyperparameters promoted) so that float32 rounding cannot make it indefinite."""
        kzz = symmetrize(evaluate(self.base_kernel, self.inducing_points.double()))
        return psd_cholesky(kzz, "K(z, z) of the inducing points")

    def cross_factor(self, x: Tensor) -> Tensor:
        """``F(x) = K_xz L^{-T}`` ``(..., n, m)``, so that ``Q(x1, x2) = F(x1) F(x2)^T``, returned in the dtype of
        ``x``. ``K_xz`` and the triangular solve are float64: the solve amplifies rounding in ``K_xz`` by up to
        ``cond(K_zz)^{1/2}``, which float32 inputs would turn into visible errors in ``Q``."""
        kxz = evaluate(self.base_kernel, x.double(), self.inducing_points.double())
        chol = self.inducing_cholesky()
        chol = chol.expand(*torch.broadcast_shapes(chol.shape[:-2], kxz.shape[:-2]), *chol.shape[-2:])
        factor = torch.linalg.solve_triangular(chol, kxz.mT, upper=False).mT
        return factor.to(x.dtype)

    def forward(self, x: Tensor) -> Operator:
        factor = self.cross_factor(x)
        low_rank = LowRank(factor)
        if self.method != "fitc":
            return low_rank
        # diag(K - Q) >= 0 in exact arithmetic; floored so the Diagonal stays positive
        floor = torch.finfo(factor.dtype).tiny ** 0.5
        correction = (evaluate_diag(self.base_kernel, x) - factor.square().sum(-1)).clamp_min(floor)
        return low_rank + Diagonal(correction)

    def bound_correction(self, x: Tensor, noise: Tensor) -> Tensor | None:
        """VFE's trace term ``-1/2 sum_i (K_ii - Q_ii) / noise_i`` ``(...)``; None for the other methods."""
        if self.method != "vfe":
            return None
        gap = evaluate_diag(self.base_kernel, x) - self.cross_factor(x).square().sum(-1)  # diag(K - Q) >= 0
        return -0.5 * (gap / noise).sum(-1)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.cross_factor(x1) @ self.cross_factor(x2).mT

    def prior(self, x: Tensor) -> Operator:
        if self.method == "sor":
            return LowRank(self.cross_factor(x))
        return Dense(symmetrize(evaluate(self.base_kernel, x)), name="k(x, x)")

    def prior_diagonal(self, x: Tensor) -> Tensor:
        if self.method == "sor":
            return self.cross_factor(x).square().sum(-1)
        return evaluate_diag(self.base_kernel, x)

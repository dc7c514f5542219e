"""Gaussian likelihoods ``y = f + e``: they add a diagonal noise operator to a covariance.

``likelihood(covariance)`` returns ``covariance + noise`` with ``noise`` a ``ScaledIdentity`` (learned
homoskedastic noise) or a ``Diagonal`` (fixed per-point noise, optionally plus a learned part), so the
structure-aware sum (``AddedDiagonal``) reaches the engines: Woodbury for low rank, eigen for Kronecker.
``likelihood(mvn)`` returns the marginal ``MultivariateNormal`` of ``y``.

Learned noise is a raw ``torch.nn.Parameter`` mapped through a gpytorch constraint (default
``GreaterThan(1e-4)``, softplus), with an optional prior (any ``torch.distributions.Distribution``, e.g. a
``gpytorch.priors`` prior) whose log density :meth:`log_prior` returns for the marginal log likelihood.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import as_tensor, check_ndim, check_positive
from structgp.distributions.multivariate_normal import MultivariateNormal


class LearnedNoise(nn.Module):
    """A positive noise variance ``(*batch_shape)`` learned through a constraint, with an optional prior.

    noise_constraint: a gpytorch constraint (``transform``/``inverse_transform``/``check``); default
        ``gpytorch.constraints.GreaterThan(1e-4)``.
    noise_prior: a ``torch.distributions.Distribution`` over the noise variance, or None.
    initial_noise: starting value (default: the constraint's initial value, else ``transform(0)``).
    """

    def __init__(
        self,
        *,
        noise_constraint=None,
        noise_prior: torch.distributions.Distribution | None = None,
        batch_shape: tuple[int, ...] = (),
        initial_noise: float | Tensor | None = None,
    ) -> None:
        super().__init__()
        if noise_constraint is None:
            from gpytorch.constraints import GreaterThan

            noise_constraint = GreaterThan(1e-4)
        for method in ("transform", "inverse_transform", "check"):
            if not callable(getattr(noise_constraint, method, None)):
                raise TypeError(
                    f"noise_constraint: expected a gpytorch constraint (with .{method}), "
                    f"got {type(noise_constraint).__name__}"
                )
        if noise_prior is not None and not isinstance(noise_prior, torch.distributions.Distribution):
            raise TypeError(
                f"noise_prior: expected a torch.distributions.Distribution (e.g. a gpytorch prior), "
                f"got {type(noise_prior).__name__}"
            )
        self.noise_constraint = noise_constraint
        self.noise_prior = noise_prior
        self.raw_noise = nn.Parameter(torch.zeros(torch.Size(batch_shape)))
        start = getattr(noise_constraint, "_initial_value", None)
        if initial_noise is not None:
            self.value = initial_noise
        elif start is not None:
            with torch.no_grad():
                self.raw_noise.fill_(float(start))

    @property
    def value(self) -> Tensor:
        """The noise variance ``(*batch_shape)``, ``transform(raw_noise)``."""
        return self.noise_constraint.transform(self.raw_noise)

    @value.setter
    def value(self, noise: float | Tensor) -> None:
        noise = as_tensor(noise, "noise", dtype=self.raw_noise.dtype, device=self.raw_noise.device)
        noise = noise.to(dtype=self.raw_noise.dtype, device=self.raw_noise.device)
        if not self.noise_constraint.check(noise):
            raise ValueError(f"noise: expected values satisfying {self.noise_constraint}, got {noise}")
        with torch.no_grad():
            self.raw_noise.copy_(self.noise_constraint.inverse_transform(noise).expand_as(self.raw_noise))

    def log_prior(self) -> Tensor:
        """``sum log p(noise)`` under the prior (0 without one)."""
        if self.noise_prior is None:
            return torch.zeros((), dtype=self.raw_noise.dtype, device=self.raw_noise.device)
        return self.noise_prior.log_prob(self.value).sum()


class GaussianLikelihood(nn.Module):
    """``y = f + e``, ``e ~ N(0, sigma^2 I)`` with a learned noise variance ``sigma^2`` ``(*batch_shape)``.

    ``likelihood(covariance)`` is ``covariance + ScaledIdentity(sigma^2, n)``; ``likelihood(mvn)`` is the
    marginal ``N(mvn.loc, mvn.covariance + sigma^2 I)``. The noise is cast to the covariance's dtype.
    """

    def __init__(
        self,
        *,
        noise_constraint=None,
        noise_prior: torch.distributions.Distribution | None = None,
        batch_shape: tuple[int, ...] = (),
        initial_noise: float | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.noise_covar = LearnedNoise(
            noise_constraint=noise_constraint,
            noise_prior=noise_prior,
            batch_shape=batch_shape,
            initial_noise=initial_noise,
        )

    @property
    def noise(self) -> Tensor:
        return self.noise_covar.value

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        self.noise_covar.value = value

    def noise_operator(self, n: int, *, dtype: torch.dtype, device: torch.device) -> Operator:
        """``sigma^2 I_n`` as a ``ScaledIdentity`` ``(*batch_shape, n, n)``."""
        return ScaledIdentity(self.noise.to(dtype=dtype, device=device), n)

    def log_prior(self) -> Tensor:
        return self.noise_covar.log_prior()

    def forward(self, input: Operator | Tensor | MultivariateNormal) -> Operator | MultivariateNormal:
        return _add_noise(self, input)


class FixedNoiseGaussianLikelihood(nn.Module):
    """``y_i = f_i + e_i``, ``e_i ~ N(0, noise_i)`` with known per-point noise ``(..., n)``.

    With ``learn_additional_noise=True`` a learned homoskedastic variance ``s`` (see
    :class:`LearnedNoise`, keyword arguments passed on) is added: ``noise_i + s``. The noise operator is
    a ``Diagonal``, so ``likelihood(covariance)`` keeps the structure-aware sum.
    """

    def __init__(
        self,
        noise: Tensor,
        *,
        learn_additional_noise: bool = False,
        noise_constraint=None,
        noise_prior: torch.distributions.Distribution | None = None,
        batch_shape: tuple[int, ...] = (),
        initial_noise: float | Tensor | None = None,
    ) -> None:
        super().__init__()
        noise = as_tensor(noise, "noise")
        check_ndim(noise, "noise", 1, "(..., n)")
        check_positive(noise, "noise")
        # not in the state dict: observed noise belongs to the data (as gpytorch's), so that hyperparameters can
        # be loaded into a model of another data size
        self.register_buffer("noise", noise, persistent=False)
        self.second_noise_covar = None
        if learn_additional_noise:
            self.second_noise_covar = LearnedNoise(
                noise_constraint=noise_constraint,
                noise_prior=noise_prior,
                batch_shape=batch_shape,
                initial_noise=initial_noise,
            )
        elif noise_constraint is not None or noise_prior is not None or initial_noise is not None:
            raise ValueError(
                "noise_constraint/noise_prior/initial_noise: only used with learn_additional_noise=True"
            )

    @property
    def second_noise(self) -> Tensor | None:
        """The learned extra variance ``(*batch_shape)``, or None."""
        return None if self.second_noise_covar is None else self.second_noise_covar.value

    def noise_operator(self, n: int, *, dtype: torch.dtype, device: torch.device) -> Operator:
        """``diag(noise (+ s))`` as a ``Diagonal`` ``(..., n, n)``."""
        if self.noise.shape[-1] != n:
            got = self.noise.shape[-1]
            raise ValueError(f"noise: expected {n} per-point variances to match the covariance, got {got}")
        diag = self.noise.to(dtype=dtype, device=device)
        if self.second_noise_covar is not None:
            diag = diag + self.second_noise.to(dtype=dtype, device=device).unsqueeze(-1)
        return Diagonal(diag)

    def log_prior(self) -> Tensor:
        if self.second_noise_covar is None:
            return torch.zeros((), dtype=self.noise.dtype, device=self.noise.device)
        return self.second_noise_covar.log_prior()

    def forward(self, input: Operator | Tensor | MultivariateNormal) -> Operator | MultivariateNormal:
        return _add_noise(self, input)


def _add_noise(likelihood, input: Operator | Tensor | MultivariateNormal) -> Operator | MultivariateNormal:
    if isinstance(input, MultivariateNormal):
        covariance = input._unbroadcasted_covariance
        noisy = covariance + _noise_for(likelihood, covariance)
        return MultivariateNormal(input.loc, noisy, validate_args=input._validate_args)
    if not isinstance(input, (Operator, Tensor)):
        raise TypeError(
            f"input: expected a structgp operator, an (..., n, n) tensor or a structgp MultivariateNormal, "
            f"got {type(input).__name__}"
        )
    covariance = as_operator(input, "input")
    return covariance + _noise_for(likelihood, covariance)


def _noise_for(likelihood, covariance: Operator) -> Operator:
    return likelihood.noise_operator(covariance.n, dtype=covariance.dtype, device=covariance.device)

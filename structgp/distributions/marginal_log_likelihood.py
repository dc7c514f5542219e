"""The exact marginal log likelihood of a Gaussian process with Gaussian noise.

    log p(y) = -1/2 ((y - m)^T (K + N)^{-1} (y - m) + log det (K + N) + n log 2 pi)

computed by one ``inv_quad_logdet`` of the structured ``K + N`` (``MultivariateNormal.log_prob``), so the
engine is whatever ``structgp.plan`` picks for the structure (exact structured paths, or the iterative
one under ``structgp.settings(method="cg")``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structgp.covariance.operator import Operator
from structgp.distributions.multivariate_normal import MultivariateNormal


def marginal_log_likelihood(
    mean: Tensor | None, covariance: Operator | Tensor, y: Tensor, *, normalize: bool = False
) -> Tensor:
    """``log N(y; mean, covariance)`` ``(*batch)``, divided by ``n`` when ``normalize``.

    mean: ``(..., n)`` or None (zero); covariance: the noisy covariance ``K + N`` ``(..., n, n)`` (an
    operator, e.g. ``likelihood(K)``, or an SPD tensor); y: observations ``(..., n)``.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a torch.Tensor of shape (..., n), got {type(y).__name__}")
    if mean is None:
        n = covariance.shape[-1]
        mean = torch.zeros(n, dtype=y.dtype, device=y.device)
    value = MultivariateNormal(mean, covariance, validate_args=False).log_prob(y)  # operators validated themselves
    return value / y.shape[-1] if normalize else value


class ExactMarginalLogLikelihood(nn.Module):
    """``mll(f_dist, y) = (log p(y) + log priors) / n`` for a Gaussian likelihood (as gpytorch's).

    likelihood: a :class:`GaussianLikelihood` or :class:`FixedNoiseGaussianLikelihood` (anything that maps
        a structgp ``MultivariateNormal`` of ``f`` to the marginal of ``y`` and has ``log_prior()``).
    model: optional module whose priors are added: gpytorch modules' ``named_priors()``, or a
        ``log_prior()`` method (the likelihood's prior is counted once when the model holds the likelihood);
        its gpytorch added loss terms (``added_loss_terms()``, e.g. a VFE kernel's trace term) are added too.
    normalize: divide by the number of data points ``n`` (gpytorch's convention; default True).
    """

    def __init__(
        self, likelihood: nn.Module, model: nn.Module | None = None, *, normalize: bool = True
    ) -> None:
        super().__init__()
        if not callable(getattr(likelihood, "log_prior", None)):
            raise TypeError(
                "likelihood: expected a structgp Gaussian likelihood (with log_prior()), "
                f"got {type(likelihood).__name__}"
            )
        self.likelihood = likelihood
        self.model = model
        self.normalize = normalize

    def forward(self, function_dist: MultivariateNormal, target: Tensor) -> Tensor:
        """The objective ``(*batch)``.

        function_dist: the prior ``MultivariateNormal`` of ``f``; target: observations ``(..., n)``.
        """
        if not isinstance(function_dist, MultivariateNormal):
            raise TypeError(
                f"function_dist: expected a structgp MultivariateNormal, got {type(function_dist).__name__}"
            )
        marginal = self.likelihood(function_dist)
        value = marginal.log_prob(target) + _model_log_prior(self.model) + _added_loss(self.model)
        if not _counts_prior_of(self.model, self.likelihood):
            value = value + self.likelihood.log_prior()
        return value / function_dist.event_shape[0] if self.normalize else value


def _counts_prior_of(model: nn.Module | None, module: nn.Module) -> bool:
    """Whether the model's ``log_prior()`` already includes ``module``'s (a structgp ExactGP's includes its
    likelihood's)."""
    if model is None or not callable(getattr(model, "log_prior", None)):
        return False
    return any(m is module for m in model.modules())


def _added_loss(model: nn.Module | None) -> Tensor | float:
    """The sum of the model's gpytorch added loss terms (0 without any)."""
    terms = getattr(model, "added_loss_terms", None)
    return sum((term.loss() for term in terms()), 0.0) if callable(terms) else 0.0


def _model_log_prior(model: nn.Module | None) -> Tensor | float:
    if model is None:
        return 0.0
    if callable(getattr(model, "log_prior", None)):
        return model.log_prior()
    total = 0.0
    if callable(getattr(model, "named_priors", None)):  # gpytorch.Module
        for _, module, prior, closure, _ in model.named_priors():
            total = total + prior.log_prob(closure(module)).sum()
    return total

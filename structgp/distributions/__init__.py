"""Distributions over structured covariances: MultivariateNormal, Gaussian likelihoods, the marginal
log likelihood."""

from structgp.distributions import pyro_divergence  # noqa: F401  (registers the divergence handler)
from structgp.distributions.kl import kl_multivariate_normal  # importing it registers kl_divergence rules
from structgp.distributions.likelihoods import FixedNoiseGaussianLikelihood, GaussianLikelihood, LearnedNoise
from structgp.distributions.marginal_log_likelihood import ExactMarginalLogLikelihood, marginal_log_likelihood
from structgp.distributions.multivariate_normal import MultivariateNormal

__all__ = [
    "ExactMarginalLogLikelihood",
    "FixedNoiseGaussianLikelihood",
    "GaussianLikelihood",
    "LearnedNoise",
    "MultivariateNormal",
    "kl_multivariate_normal",
    "marginal_log_likelihood",
]

"""Exact and scalable GP models: one model class, structured by its kernel, from fitting to prediction."""

from structgp.models.exact_gp import ExactGP
from structgp.models.fit import minimise
from structgp.models.noise import noise_operator
from structgp.models.posterior_covariance import PosteriorCovariance
from structgp.models.prediction import TrainingSolve
from structgp.models.training_cache import TrainingCache

__all__ = ["ExactGP", "PosteriorCovariance", "TrainingCache", "TrainingSolve", "minimise", "noise_operator"]

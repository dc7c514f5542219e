"""The noise operator of a likelihood at training or test points, keeping its structure.

Supported likelihoods (``noise_operator`` duck-typing first, so new structgp likelihoods work as is):

    structgp GaussianLikelihood / gpytorch GaussianLikelihood     s I                   ScaledIdentity
    structgp / gpytorch FixedNoiseGaussianLikelihood              diag(noise (+ s))     Diagonal
    gpytorch MultitaskGaussianLikelihood (rank 0)                 I_n (x) diag(s_t + s)  Kronecker of diagonals

The multitask noise is a Kronecker product of diagonals matching ``Kronecker(K_x, B)`` factor by factor,
so per-task noise is solved exactly by the Kronecker eigen engine.
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import Diagonal, Kronecker, Operator, ScaledIdentity


def noise_operator(
    likelihood, n: int, num_tasks: int, *, dtype: torch.dtype, device: torch.device, test_noise: Tensor | None = None
) -> Operator:
    """The noise covariance ``(..., n t, n t)`` of ``n`` points with ``t = num_tasks`` outputs each.

    test_noise: per-point variances at test points ``(..., n)`` (``(..., n, t)`` for several tasks); fixed-noise
    likelihoods need it there (they know only the training noise), the others refuse it.
    """
    if is_fixed_noise(likelihood):
        return _fixed(likelihood, n, num_tasks, dtype, device, test_noise)
    if test_noise is not None:
        raise ValueError("noise: per-point test noise is only used with a fixed-noise likelihood")
    if isinstance(likelihood, gpytorch.likelihoods.MultitaskGaussianLikelihood):
        return _multitask(likelihood, n, num_tasks, dtype, device)
    if callable(getattr(likelihood, "noise_operator", None)):  # structgp likelihoods
        return likelihood.noise_operator(n * num_tasks, dtype=dtype, device=device)
    if isinstance(likelihood, gpytorch.likelihoods.GaussianLikelihood):
        return ScaledIdentity(likelihood.noise.squeeze(-1).to(dtype=dtype, device=device), n * num_tasks)
    raise TypeError(
        "likelihood: expected a Gaussian likelihood (structgp GaussianLikelihood / FixedNoiseGaussianLikelihood, "
        "or gpytorch GaussianLikelihood / FixedNoiseGaussianLikelihood / MultitaskGaussianLikelihood), "
        f"got {type(likelihood).__name__}"
    )


def fixed_noise_at_test(likelihood, observation_noise: bool, noise: Tensor | None) -> None:
    """Fixed-noise likelihoods need the test noise given; others must not get one."""
    if observation_noise and is_fixed_noise(likelihood) and noise is None:
        raise ValueError(
            "noise: a fixed-noise likelihood knows only the training noise; pass the per-point test noise "
            "(predict(x, observation_noise=True, noise=...))"
        )


def is_fixed_noise(likelihood) -> bool:
    from structgp.distributions import FixedNoiseGaussianLikelihood

    return isinstance(likelihood, (FixedNoiseGaussianLikelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood))


def _fixed(likelihood, n: int, t: int, dtype, device, test_noise: Tensor | None) -> Diagonal:
    """``diag(noise + s)`` ``(..., n t, n t)``, ``s`` the learned extra variance (if any)."""
    gpytorch_kind = isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood)
    if gpytorch_kind:
        second = likelihood.second_noise_covar
        extra = None if second is None else second.noise.squeeze(-1)
        fixed = likelihood.noise_covar.noise  # gpytorch's ``likelihood.noise`` already includes ``s``
    else:
        extra, fixed = likelihood.second_noise, likelihood.noise
    if test_noise is None:
        noise, what = fixed, "the likelihood's training noise"
    else:
        if not isinstance(test_noise, Tensor):
            raise TypeError(f"noise: expected a tensor of per-point variances, got {type(test_noise).__name__}")
        noise, what = (test_noise.flatten(-2) if t > 1 else test_noise), "noise"
    if noise.shape[-1] != n * t:
        raise ValueError(
            f"{what}: expected {n * t} per-point variances ({n} points x {t} tasks), got shape {tuple(noise.shape)}"
        )
    diag = noise if extra is None else noise + extra.unsqueeze(-1)
    return Diagonal(diag.to(dtype=dtype, device=device))


def _multitask(likelihood, n: int, t: int, dtype: torch.dtype, device: torch.device) -> Operator:
    if getattr(likelihood, "rank", 0) != 0:
        raise ValueError("likelihood: a MultitaskGaussianLikelihood with rank > 0 is not supported (use rank=0)")
    if likelihood.num_tasks != t:
        raise ValueError(f"likelihood: expected num_tasks={t} (the kernel's), got {likelihood.num_tasks}")
    task = None
    if likelihood.has_task_noise:
        task = likelihood.task_noises
    if likelihood.has_global_noise:
        task = likelihood.noise if task is None else task + likelihood.noise  # noise (..., 1) broadcasts
    if task is None:
        raise ValueError("likelihood: has neither task noise nor global noise")
    task = task.to(dtype=dtype, device=device).expand(*task.shape[:-1], t)
    ones = torch.ones(task.shape[:-1], dtype=dtype, device=device)
    return Kronecker(ScaledIdentity(ones, n), Diagonal(task))

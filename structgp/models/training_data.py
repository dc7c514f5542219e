"""Replacing and extending an ExactGP's training data (gpytorch's ``set_train_data`` and
``get_fantasy_model``).

Fantasy data are appended along the points axis; batch dims broadcast as in gpytorch: the targets may carry
one more leading dim than the inputs (fantasy draws at the same points), and the model's batch broadcasts
with both. A fixed-noise likelihood needs the new points' noise variances (``noise``) and gets them appended.
"""

from __future__ import annotations

import copy

import gpytorch
import torch
from torch import Tensor, nn

from structgp.models.noise import is_fixed_noise


def check_replacement(name: str, new: Tensor, old: Tensor, strict: bool) -> None:
    """``new`` may replace ``old``: same dtype and device always, same shape when ``strict``."""
    if not isinstance(new, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(new).__name__}")
    if new.dtype != old.dtype or new.device != old.device:
        raise TypeError(
            f"{name}: expected dtype {old.dtype} on {old.device} (the model's), got {new.dtype} on {new.device}"
        )
    if strict and new.shape != old.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(old.shape)} (strict=True keeps the shape; pass strict=False to change "
            f"it), got {tuple(new.shape)}"
        )


def appended(old: Tensor, new: Tensor, event: int) -> Tensor:
    """``old`` and ``new`` concatenated along their points axis (``event`` trailing dims belong to a point, the
    points axis is just before them), batch dims broadcast."""
    batch = torch.broadcast_shapes(old.shape[: old.dim() - event - 1], new.shape[: new.dim() - event - 1])
    old = old.expand(*batch, *old.shape[old.dim() - event - 1 :])
    new = new.expand(*batch, *new.shape[new.dim() - event - 1 :])
    return torch.cat([old, new], dim=-1 - event)


def fantasy_copy(gp: nn.Module, x: Tensor, y: Tensor, noise: Tensor | None) -> nn.Module:
    """A deep copy of ``gp`` (hyperparameters copied, caches empty) trained on its data plus ``(x, y)``."""
    fixed = is_fixed_noise(gp.likelihood)
    if fixed and noise is None:
        raise ValueError("noise: a fixed-noise likelihood needs the noise variances of the new observations")
    if noise is not None and not fixed:
        raise ValueError("noise: per-point noise of new observations is only used with a fixed-noise likelihood")
    t = gp.num_tasks
    new = copy.deepcopy(gp)
    if fixed:
        new.likelihood = _with_noise(new.likelihood, noise.flatten(-2) if t > 1 else noise)
    full_x = appended(gp.train_x, x, 1)
    full_y = appended(gp.train_y, y, 1 if t > 1 else 0)
    new.set_train_data(full_x, full_y, strict=False)
    return new


def _with_noise(likelihood: nn.Module, noise: Tensor) -> nn.Module:
    """The fixed-noise likelihood with ``noise`` appended to its per-point variances."""
    if isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
        return likelihood.get_fantasy_likelihood(noise=noise)
    likelihood.noise = appended(likelihood.noise, noise.to(likelihood.noise), 0)
    return likelihood

"""A structgp ExactGP from BoTorch-style training data, with SingleTaskGP's defaults.

BoTorch's models fit their transforms to the training data first and hold the transformed data; so does
:func:`gp_from_data`. ``m > 1`` outcome columns are the tasks of a multitask kernel, else independent outputs as
the gp's last batch dim (see :mod:`.layout`). Defaults as SingleTaskGP: an ARD RBF kernel with BoTorch's
dimension-scaled priors (one hyperparameter set per output) and ``Standardize``.
"""

from __future__ import annotations

import torch
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from botorch.utils.types import DEFAULT
from torch import Tensor

from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.integrations.botorch.layout import Layout
from structgp.kernels import as_kernel
from structgp.models import ExactGP


def output_batch(train_X: Tensor, train_Y: Tensor) -> torch.Size:
    """SingleTaskGP's batch of hyperparameters: the inputs' batch, and one member per output for ``m > 1``."""
    m = train_Y.shape[-1]
    return train_X.shape[:-2] + (torch.Size([m]) if m > 1 else torch.Size())


def gp_from_data(train_X, train_Y, kernel, train_Yvar, likelihood, mean, input_transform, outcome_transform):
    """``(gp, batched_outputs, input_transform, outcome_transform)`` from BoTorch-style data (see
    :meth:`.model.BoTorchModel.from_data`); ``outcome_transform`` may be BoTorch's ``DEFAULT``
    (``Standardize``) and ``kernel`` None (SingleTaskGP's)."""
    if outcome_transform is DEFAULT:
        outcome_transform = Standardize(m=train_Y.shape[-1], batch_shape=train_X.shape[:-2])
    if kernel is None:
        kernel = get_covar_module_with_dim_scaled_prior(
            ard_num_dims=train_X.shape[-1], batch_shape=output_batch(train_X, train_Y)
        )
    train_X, train_Y, train_Yvar = _transformed(train_X, train_Y, train_Yvar, input_transform, outcome_transform)
    m = train_Y.shape[-1]
    tasks = as_kernel(kernel, "kernel").num_tasks
    batched = m > 1 and tasks == 1
    layout = Layout("tasks" if tasks > 1 else "batch" if batched else "single", m)
    if tasks > 1 and tasks != m:
        raise ValueError(f"train_Y: expected {tasks} columns (the kernel's tasks), got {m}")
    x = train_X.unsqueeze(-3) if batched and train_X.dim() > 2 else train_X
    if train_Yvar is not None:
        if likelihood is not None:
            raise ValueError("train_Yvar: give either observed noise or a likelihood, not both")
        likelihood = FixedNoiseGaussianLikelihood(layout.to_values(train_Yvar, "train_Yvar"))
    gp = ExactGP(x, layout.to_targets(train_Y), kernel, likelihood=likelihood, mean=mean)
    return gp, batched, input_transform, outcome_transform


def _transformed(train_X, train_Y, train_Yvar, input_transform, outcome_transform):
    """The data through the transforms, each fitted to them first (then left in eval mode)."""
    if input_transform is not None:
        input_transform.train()
        train_X = input_transform(train_X)
        input_transform.eval()
    if outcome_transform is not None:
        outcome_transform.train()
        train_Y, train_Yvar = outcome_transform(train_Y, train_Yvar, X=train_X)
        outcome_transform.eval()
    return train_X, train_Y, train_Yvar

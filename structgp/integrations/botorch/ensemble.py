"""EnsembleModel: a structgp gp with a batch of hyperparameter samples, as a BoTorch ensemble model.

The gp's hyperparameters carry a leading batch dim of ``s`` samples (e.g. from NUTS, :mod:`.nuts`), so one
batched structured training solve serves all of them. BoTorch sees an ensemble (``_is_ensemble``): posteriors
are ``GaussianMixturePosterior``\\ s with the samples at ``MCMC_DIM = -3`` of the outcomes ``(*b, s, q, m)``,
and acquisition functions average over them (``average_over_ensemble_models``, the ensemble dim of MC
acquisition functions).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import gpytorch
import torch
from torch import Tensor, nn

from structgp.integrations.botorch.model import BoTorchModel
from structgp.models import ExactGP


class EnsembleModel(BoTorchModel):
    """A :class:`BoTorchModel` whose gp's leading batch dim holds ``s`` hyperparameter samples (see
    :func:`batch_hyperparameters`); a mixture of ``s`` GPs with equal weights."""

    _is_ensemble = True
    _is_fully_bayesian = True
    _ensemble = True

    @property
    def num_samples(self) -> int:
        return self.gp.training_solve().alpha.shape[0]

    def condition_on_observations(self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs):
        """As :meth:`BoTorchModel.condition_on_observations`; the result is not flagged as an ensemble: its
        sample dim is a plain batch dim (at ``-3`` of the outcomes), so a value function evaluated on fantasies
        keeps one value per hyperparameter sample and the outer acquisition function (e.g. qKnowledgeGradient)
        averages over the samples once, after averaging over fantasies."""
        new = super().condition_on_observations(X, Y, noise=noise, **kwargs)
        new._is_ensemble = False
        return new


def batch_hyperparameters(gp: ExactGP, values: Mapping[str, Tensor]) -> ExactGP:
    """A copy of ``gp`` whose parameters ``values`` names (as ``gp.named_parameters()`` does, e.g.
    ``"kernel.base_kernel.raw_outputscale"``) hold a batch ``(s, *shape)`` of values instead of ``shape``.

    The gpytorch kernels above a batched parameter get ``s`` prepended to their ``batch_shape``; parameters not
    named stay shared. The copy's parameters do not require grad (an ensemble is not fitted further).
    """
    if not isinstance(gp, ExactGP):
        raise TypeError(f"gp: expected a structgp.models.ExactGP, got {type(gp).__name__}")
    params = dict(gp.named_parameters())
    sizes = set()
    for name, value in values.items():
        if name not in params:
            raise ValueError(f"values: {name!r} is not a parameter of the gp; its parameters: {sorted(params)}")
        if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[1:] != params[name].shape:
            shape = tuple(params[name].shape)
            raise ValueError(f"values[{name!r}]: expected shape (s, *{shape}), got {getattr(value, 'shape', value)}")
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"values: expected one number of samples s for all parameters, got {sorted(sizes)}")
    s = sizes.pop()
    new = copy.deepcopy(gp)
    batched_owners = set()
    for name, value in values.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_name)
        owner._parameters[leaf] = nn.Parameter(value.detach().to(params[name]).clone(), requires_grad=False)
        batched_owners.add(owner_name)
    for module_name, module in new.named_modules():
        if isinstance(module, gpytorch.kernels.Kernel) and _above_any(module_name, batched_owners):
            module.batch_shape = torch.Size([s]) + module.batch_shape
    for p in new.parameters():
        p.requires_grad_(False)
    return new


def _above_any(name: str, owners: set[str]) -> bool:
    """Whether the module ``name`` is one of ``owners`` or contains one."""
    return any(o == name or o.startswith(name + ".") for o in owners)

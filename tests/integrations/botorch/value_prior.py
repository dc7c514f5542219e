"""Test helper: a prior over a hyperparameter's value ``v`` as a Pyro distribution over the sampled ``z``.

For sites ``v = l + exp(z)`` or ``v = z`` (:mod:`structgp.integrations.botorch.nuts`; the package's own,
general form is :class:`structgp.integrations.botorch.site_prior.TransformedValuePrior`):

    v = l + exp(z):   log p(z) = log p_v(l + exp(z)) + z        (the Jacobian dv/dz = exp(z))
    v = z:            log p(z) = log p_v(z)

summed over the site's shape (one event). ``p_v`` is any ``torch.distributions.Distribution`` whose
``log_prob`` broadcasts to the site's shape (gpytorch priors, structgp noise priors).
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints


class ValuePrior(TorchDistribution):
    """``p(z)`` for ``v = lower + exp(z)`` (``lower`` None: ``v = z``) with ``v ~ prior``; event shape ``shape``."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, prior: torch.distributions.Distribution, lower: float | None, shape: torch.Size) -> None:
        self.prior = prior
        self.lower = lower
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size(shape), validate_args=False)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def value(self, z: Tensor) -> Tensor:
        return z if self.lower is None else self.lower + z.exp()

    def log_prob(self, z: Tensor) -> Tensor:
        density = self.prior.log_prob(self.value(z))
        if self.lower is not None:
            density = density + z
        density = density.expand(z.shape)
        return density.sum(tuple(range(-len(self.event_shape), 0))) if len(self.event_shape) else density

    def sample(self, sample_shape=()) -> Tensor:
        sample_shape, event = torch.Size(sample_shape), self.event_shape
        lead = event[: max(len(event) - len(self.prior.batch_shape), 0)]  # event dims the prior does not cover
        v = self.prior.sample(sample_shape + lead).expand(*sample_shape, *event)
        return v if self.lower is None else (v - self.lower).clamp_min(torch.finfo(v.dtype).tiny).log()

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("ValuePrior: a site's prior has no batch dims")
        return self

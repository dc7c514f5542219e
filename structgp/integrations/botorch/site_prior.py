"""A prior over a hyperparameter's value ``v``, as a Pyro distribution over its unconstrained ``z`` (see :mod:`.nuts`).

``v = T(z)`` with ``T`` an elementwise ``torch.distributions`` bijection from the reals onto the values the
constraint allows (exp + shift, sigmoid + affine map, identity). The density of ``z`` is the prior's, carried
over with the Jacobian:

    log p(z) = log p_v(T(z)) + log |T'(z)|          e.g. T(z) = a + (b - a) sigmoid(z) on an interval (a, b):
                                                    log |T'(z)| = log(b - a) + log sigmoid(z) + log sigmoid(-z)

summed over the site's shape (one event). Where ``p_v`` has mass outside ``T``'s range this is, up to a constant
(which NUTS does not need), the density of ``z`` for ``v`` drawn from ``p_v`` restricted to the range; ``sample``
draws that restricted prior (by rejection).
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Transform, constraints

MAX_ROUNDS = 100  # rejection rounds in ``sample`` before giving up


class TransformedValuePrior(TorchDistribution):
    """``p(z)`` for ``v = transform(z)`` with ``v ~ prior`` restricted to ``values`` (a ``torch.distributions``
    constraint: the range of ``transform``); event shape ``shape``.

    prior: any ``torch.distributions.Distribution`` (gpytorch priors, structgp noise priors) whose ``log_prob``
    broadcasts to the site's shape (an event-shaped prior covers the site's last dims jointly).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        prior: torch.distributions.Distribution,
        transform: Transform,
        values: constraints.Constraint,
        shape: torch.Size,
    ) -> None:
        if not isinstance(prior, torch.distributions.Distribution):
            raise TypeError(f"prior: expected a torch.distributions.Distribution, got {type(prior).__name__}")
        if (
            len(prior.event_shape) > len(shape)
            or prior.event_shape != torch.Size(shape)[len(shape) - len(prior.event_shape) :]
        ):
            raise ValueError(
                f"prior: its event shape {tuple(prior.event_shape)} does not end the site's {tuple(shape)}"
            )
        self.prior = prior
        self.transform = transform
        self.values = values
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size(shape), validate_args=False)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def log_prob(self, z: Tensor) -> Tensor:
        v = self.transform(z)
        n, e = len(self.event_shape), len(self.prior.event_shape)
        prior = self.prior.log_prob(v).expand(z.shape[: z.dim() - e])
        jacobian = self.transform.log_abs_det_jacobian(z, v).expand(z.shape)
        return _sum_last(prior, n - e) + _sum_last(jacobian, n)

    def sample(self, sample_shape=()) -> Tensor:
        """``T^{-1}(v)`` for ``v`` from the prior restricted to ``values`` (rejection, ``MAX_ROUNDS`` rounds)."""
        shape = torch.Size(sample_shape) + self.event_shape
        with torch.no_grad():
            v = self._draw(shape)
            for _ in range(MAX_ROUNDS):
                outside = self._outside(v)
                if not bool(outside.any()):
                    return self.transform.inv(v)
                v = torch.where(outside, self._draw(shape), v)
        raise ValueError(f"prior: fewer than 1 in {MAX_ROUNDS} draws of {self.prior} fall inside {self.values}")

    def _outside(self, v: Tensor) -> Tensor:
        """Where ``v`` leaves ``values``; an event-shaped prior's draws are kept or redrawn whole."""
        outside = ~self.values.check(v)
        e = len(self.prior.event_shape)
        if e:
            whole = outside.flatten(-e).any(-1)
            outside = whole.reshape(*whole.shape, *(1,) * e).expand_as(v)
        return outside

    def _draw(self, shape: torch.Size) -> Tensor:
        """Prior draws of ``shape`` (``(*sample, *event)``), independent over the event's elements."""
        batch = shape[: len(shape) - len(self.prior.event_shape)]
        lead = batch[: max(len(batch) - len(self.prior.batch_shape), 0)]
        wanted = batch[len(lead) :]
        prior = self.prior if self.prior.batch_shape == wanted else self.prior.expand(wanted)
        return prior.sample(lead)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("TransformedValuePrior: a site's prior has no batch dims")
        return self


def _sum_last(t: Tensor, k: int) -> Tensor:
    return t.sum(tuple(range(-k, 0))) if k else t

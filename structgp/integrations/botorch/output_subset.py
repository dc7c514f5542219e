"""Conditioning on observations of some of a gp's outputs (what a ``subset_output`` view is conditioned on).

A view over the gp outputs ``O`` (``k`` of the ``m``) observes ``y_n = f_O(X_n) + e`` at ``n'`` new points. The
update is :func:`.conditioning.condition` (a Schur complement against the previous posterior's joint) applied to
the values actually observed:

    joint over [f(X_a); f(X_n)]  ->  keep the rows/columns of f(X_a) and of f_O(X_n)  ->  condition on y_n

"tasks" (one multitask kernel, correlated outputs): the kept values are all ``P t`` values at the query points and
the ``n' k`` observed values; every task's posterior moves (through the task covariance). This is exact
heterotopic conditioning, the GP on the training data plus the observed outputs' new data, as a BoTorch
``MultiTaskGP`` given rows of those tasks only.

"batch" (independent outputs as the gp's last batch dim): the observed outputs are conditioned and the others
pass through unchanged, since an independent output's posterior does not depend on other outputs' data (a view
never shows them anyway). This is BoTorch's ``ModelListGP.subset_output(O).condition_on_observations``.

Steps chain with full steps (:class:`.conditioning.Observations`) in any order: the joint is built recursively.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from structgp.integrations.botorch.conditioning import Joint, Observations, condition, conditioned_joint
from structgp.integrations.botorch.layout import Layout


@dataclasses.dataclass(frozen=True)
class OutputObservations(Observations):
    """Observations of the gp outputs ``outputs`` (``k`` indices) only: ``y`` and ``noise`` hold the values of
    those outputs in that order (``(*B, n' k)`` point-major for "tasks", ``(*B, k, n')`` for "batch")."""

    outputs: tuple[int, ...] = ()


def joint_given(
    base: Joint, steps: Sequence[Observations], layout: Layout, noise_at: Callable[[int], Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """As :func:`.conditioning.conditioned_joint`, where steps may be :class:`OutputObservations`."""
    partial = [i for i, s in enumerate(steps) if isinstance(s, OutputObservations)]
    if not partial:
        return conditioned_joint(base, steps, layout, noise_at, x)
    last = partial[-1]
    before = functools.partial(joint_given, base, steps[:last], layout, noise_at)
    through = functools.partial(_condition_outputs, before, steps[last], layout, noise_at)
    return conditioned_joint(through, steps[last + 1 :], layout, noise_at, x)


def _condition_outputs(
    prior: Joint, obs: OutputObservations, layout: Layout, noise_at: Callable[[int], Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """The posterior ``prior`` conditioned on ``obs`` at ``x`` (model coordinates ``(*b, P, d)``)."""
    batch = torch.broadcast_shapes(x.shape[:-2], obs.x.shape[:-2])
    both = torch.cat([x.expand(*batch, *x.shape[-2:]), obs.x.expand(*batch, *obs.x.shape[-2:])], dim=-2)
    mean, cov = prior(both)
    p, n = x.shape[-2], obs.x.shape[-2]
    idx = torch.as_tensor(obs.outputs, dtype=torch.long, device=mean.device)
    noise = obs.noise if obs.noise is not None else _observed_noise(noise_at(n), layout, idx)
    if layout.kind == "tasks":
        t = layout.outputs
        observed = p * t + (torch.arange(n, device=mean.device).unsqueeze(-1) * t + idx).flatten()
        keep = torch.cat([torch.arange(p * t, device=mean.device), observed])
        mean, cov = mean.index_select(-1, keep), cov.index_select(-2, keep).index_select(-1, keep)
        return condition(mean, cov, p * t, obs.y, noise)
    if layout.kind != "batch":
        raise ValueError(f"layout: observations of some outputs need a multi-output layout, got {layout.kind!r}")
    new_mean, new_cov = condition(mean.index_select(-2, idx), cov.index_select(-3, idx), p, obs.y, noise)
    return _scatter(mean[..., :p], idx, new_mean, 1), _scatter(cov[..., :p, :p], idx, new_cov, 2)


def _observed_noise(values: Tensor, layout: Layout, idx: Tensor) -> Tensor:
    """The observed outputs' entries of noise ``values`` in the layout's order."""
    if layout.kind == "tasks":
        return values.unflatten(-1, (-1, layout.outputs)).index_select(-1, idx).flatten(-2)
    return values.index_select(-2, idx)


def _scatter(full: Tensor, idx: Tensor, part: Tensor, event: int) -> Tensor:
    """``full`` ``(*B, m, *e)`` with outputs ``idx`` replaced by ``part`` ``(*B', k, *e)`` (``event = len(e)``);
    the batches broadcast."""
    dim = -event - 1
    batch = torch.broadcast_shapes(full.shape[:dim], part.shape[:dim])
    full = full.expand(*batch, *full.shape[dim:])
    return full.index_copy(dim, idx, part.expand(*batch, *part.shape[dim:]))

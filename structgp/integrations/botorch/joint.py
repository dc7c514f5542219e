"""The joint posterior of a structgp ExactGP over a batch of small point sets, as a dense mean and covariance.

BoTorch asks for joint posteriors over ``q`` points for many candidates at once (inputs ``(*b, q, d)``).
``ExactGP.posterior`` answers a batch of point sets with one structured solve against the cached training
factorisation; the ``q x q`` covariance of each set is then made dense (it is small):

    mean  m(x) + K_xX alpha                  cov  K_xx - K_xX (K + N)^{-1} K_Xx       per point set

Kernels that take only unbatched test inputs (e.g. grid kernels) get the point sets flattened into chunks of
at most ``CHUNK_VALUES`` values posed as one input; only the diagonal (per point set) blocks of the chunk's
posterior covariance are formed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.models import PosteriorCovariance

CHUNK_VALUES = 512  # values (points x tasks) per flattened chunk for kernels without batched inputs


def gp_joint(gp, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean (*B, V), covariance (*B, V, V))`` of the gp's posterior at ``x`` ``(*b, P, d)`` (model
    coordinates); ``B`` broadcasts ``b`` with the gp's batch and ``V`` is ``P`` times the number of tasks."""
    if x.dim() == 2 or _takes_batched_inputs(gp.kernel, x):
        post = gp.posterior(x)
        return post.mean, post.covariance.to_dense()
    return _flattened_joint(gp, x)


def _takes_batched_inputs(kernel, x: Tensor) -> bool:
    probe = x.detach().reshape(-1, *x.shape[-2:])[:1]
    try:
        kernel.check_test_inputs(probe, "X")
    except ValueError:
        return False
    return True


def _flattened_joint(gp, x: Tensor) -> tuple[Tensor, Tensor]:
    """The point sets of ``x`` ``(*b, P, d)`` posed as one unbatched input, ``CHUNK_VALUES`` values at a time."""
    lead, (p, d) = x.shape[:-2], x.shape[-2:]
    sets = x.reshape(-1, p, d)
    per_set = p * gp.num_tasks
    step = max(1, CHUNK_VALUES // per_set)
    means, covs = [], []
    for start in range(0, sets.shape[0], step):
        chunk = sets[start : start + step]
        k = chunk.shape[0]
        post = gp.posterior(chunk.reshape(-1, d))
        means.append(post.mean.unflatten(-1, (k, -1)))  # (*G, k, V)
        covs.append(_diagonal_blocks(post.covariance, k))  # (*G, k, V, V)
    mean, cov = torch.cat(means, dim=-2), torch.cat(covs, dim=-3)
    return _batch_last(mean, lead, 1), _batch_last(cov, lead, 2)


def _diagonal_blocks(cov, k: int) -> Tensor:
    """The ``k`` diagonal ``V x V`` blocks ``(*G, k, V, V)`` of a ``(*G, k V, k V)`` covariance. A
    ``PosteriorCovariance`` ``prior - left right^T`` (symmetrised) gives them from per-block products of its
    ``(k V, r)`` factors, without forming the off-diagonal blocks (``k V^2 r`` instead of ``k^2 V^2 r``)."""
    if isinstance(cov, PosteriorCovariance):
        left, right = cov.left.unflatten(-2, (k, -1)), cov.right.unflatten(-2, (k, -1))  # (*G, k, V, r)
        reduction = left @ right.mT
        prior = _blocks(cov.prior.to_dense(), k)
        return prior - (reduction + reduction.mT) / 2
    return _blocks(cov.to_dense(), k)


def _blocks(dense: Tensor, k: int) -> Tensor:
    blocks = dense.unflatten(-1, (k, -1)).unflatten(-3, (k, -1))  # (*G, k, V, k, V)
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _batch_last(t: Tensor, lead: torch.Size, event: int) -> Tensor:
    """``(*G, L, *event)`` with ``L = prod(lead)`` -> ``(*broadcast(lead, G), *event)``; the last ``len(G)``
    dims of ``lead`` must be ones (model coordinates), which the gp batch ``G`` fills."""
    g = t.dim() - 1 - event
    head = lead[: len(lead) - g]
    if len(lead) < g or any(s != 1 for s in lead[len(lead) - g :]) or math.prod(head) != t.shape[g]:
        raise NotImplementedError(
            f"X: batch dims {tuple(lead)} do not broadcast against the gp's batch {tuple(t.shape[:g])} in a way "
            "kernels with unbatched inputs support (inputs must not vary along the gp's batch dims)"
        )
    t = t.reshape(*t.shape[:g], *head, *t.shape[g + 1 :])
    return t.movedim(tuple(range(g)), tuple(range(len(head), len(head) + g)))

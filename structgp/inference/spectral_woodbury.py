"""Kronecker + diagonal noise with a base singular in float64: Woodbury on the base's truncated spectral root.

A smooth kernel on a grid (an RBF factor whose lengthscale spans many grid points) has numerical rank
``r << N``. With its spectral root ``R`` (``N x r``, ``R R^T = K`` to the accuracy of ``eigh`` and of the
data, :mod:`structgp.inference.spectral_root`) any diagonal noise ``D`` (heteroskedastic included) is

    A = D + R R^T,   A^{-1} = D^{-1} - D^{-1} R C^{-1} R^T D^{-1},   C = I_r + R^T D^{-1} R,
    log det A = log det D + log det C

exactly, for ``2 N r^2 + r^3 / 3`` flops and ``N r`` memory, against ``N^3 / 3`` for the dense Cholesky
and an iterative answer from CG. It is the lifted engine with the identity lift (``F = L R = R``): the
questions are delegated to :class:`structgp.inference.lifted_woodbury.LiftedWoodbury`, gradients included
(the base's by exact first-order surrogates). ``ScaledIdentity`` and Kronecker-structured noise stay with
the cheaper per-factor eigendecomposition, which the cost model prefers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.diagonal import Diagonal
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.sparse_lifted import Lift, SparseLifted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference._cache import cached
from structgp.inference.lifted_woodbury import LiftedWoodbury
from structgp.inference.plan import Cost, Engine, describe, register
from structgp.inference.spectral_root import exact_root, known_root_rank

_LIFTED = LiftedWoodbury()


def _identity_lift(n: int, dtype: torch.dtype, device: torch.device) -> Lift:
    """The ``n x n`` identity as a canonical lift (built from its index arrays: nothing to sort)."""
    index = torch.arange(n, device=device)
    crow = torch.arange(n + 1, device=device)
    ones = torch.ones(n, dtype=dtype, device=device)
    return Lift._from_children([crow, index, index, ones, crow, index, index], (n, n, n, "identity"))


def _as_lifted(op: AddedDiagonal) -> AddedDiagonal:
    """``I K I^T + D``: the same matrix as the lifted engine's operator (cached on ``op``)."""

    def build() -> AddedDiagonal:
        lift = _identity_lift(op.n, op.base.dtype, op.base.device)
        return AddedDiagonal(SparseLifted(lift, op.base), op.noise)

    return cached(op, "as_lifted", build, detached=True)  # a wrapper of op's own tensors, no new graph


def _rank_guess(op: AddedDiagonal) -> int:
    """The rank the cost model assumes before the factor spectra are known: the largest factor's size (a
    smooth grid kernel's numerical rank is that of its factors multiplied; a wrong guess costs only the
    factor-sized work of :meth:`SpectralWoodbury.settle` before the call is planned again)."""
    return max(op.base.sizes)


@register(Kronecker, Diagonal)  # heteroskedastic noise; s I and Kronecker-structured noise go to the eigen engine
class SpectralWoodbury(Engine):
    name = "spectral_woodbury"
    method = "woodbury"
    reads_facts = True

    def why(self, op: AddedDiagonal) -> str | None:
        if op.base.is_diagonal:
            return None
        sizes = " x ".join(str(s) for s in op.base.sizes)
        known = known_root_rank(op.base)
        if known is None:
            return (
                f"{describe(op)}: Woodbury on the spectral root of the Kronecker {sizes} (N = {op.n}) if it is "
                "singular in float64 (found from the factor spectra when it runs)"
            )
        rank, spectral = known
        if not spectral:
            return None  # positive definite in float64: nothing to truncate, Cholesky or CG answer it
        return (
            f"{describe(op)}: Woodbury on the spectral root of rank {rank} of the Kronecker {sizes} "
            f"(N = {op.n}; singular in float64)"
        )

    def cost(self, op: AddedDiagonal) -> Cost:
        known = known_root_rank(op.base)
        r, n, batch = known[0] if known else _rank_guess(op), op.n, op.batch_shape.numel()
        flops = batch * (4 * n * r * r + r**3 / 3) + n * r  # forward and the surrogate backward
        nbytes = batch * (2 * n * r + 3 * r * r) * 8 + sum(s * s for s in op.base.sizes) * 8
        return Cost(float(flops), float(nbytes))

    def settle(self, op: AddedDiagonal) -> bool:
        """Whether the base is singular in float64 (its root then spectral); computes and caches the base's
        exact root facts (factor-sized work)."""
        with torch.no_grad():
            found = exact_root(op.base)
        return found is not None and not found[1]

    def solve(self, op: AddedDiagonal, rhs: Tensor) -> Tensor:
        return _LIFTED.solve(_as_lifted(op), rhs)

    def logdet(self, op: AddedDiagonal) -> Tensor:
        return _LIFTED.logdet(_as_lifted(op))

    def inv_quad_logdet(self, op: AddedDiagonal, rhs: Tensor) -> tuple[Tensor, Tensor]:
        return _LIFTED.inv_quad_logdet(_as_lifted(op), rhs)

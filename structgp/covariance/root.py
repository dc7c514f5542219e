"""Structured square roots ``R`` (``(..., n, k)``) with ``R R^T = A``, returned by ``op.root()``.

A root is a linear map, not a covariance: it multiplies ``(..., k, c)`` (``R @ x``, used to draw
samples ``R eps``) and ``(..., n, c)`` from the left by its transpose (``R.tmatmul(y) = R^T y``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.kron import kron_dense, kron_matmul
from structgp.covariance.map import LinearMap, guard_map_dense


class DenseRoot(LinearMap):
    """A dense root ``(..., n, k)`` (a Cholesky factor or a low-rank factor)."""

    _children = ("matrix",)

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        self.matrix = matrix

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    def _matmul(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def tmatmul(self, y: Tensor) -> Tensor:
        return self.matrix.mT @ y

    def to_dense(self) -> Tensor:
        return self.matrix


class DiagonalRoot(LinearMap):
    """``diag(s)`` for ``s`` of shape ``(..., n)``."""

    _children = ("diag",)

    def __init__(self, diag: Tensor) -> None:
        super().__init__()
        self.diag = diag

    @property
    def shape(self) -> torch.Size:
        return self.diag.shape + self.diag.shape[-1:]

    def _matmul(self, x: Tensor) -> Tensor:
        return self.diag.unsqueeze(-1) * x

    tmatmul = _matmul

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        return torch.diag_embed(self.diag)


class KroneckerRoot(LinearMap):
    """``R_1 (x) R_2 (x) ...`` for dense roots ``(..., n_i, k_i)``."""

    _children = ("factors",)

    def __init__(self, factors: list[Tensor]) -> None:
        super().__init__()
        self.factors = list(factors)

    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(*(f.shape[:-2] for f in self.factors))
        return batch + (math.prod(f.shape[-2] for f in self.factors), math.prod(f.shape[-1] for f in self.factors))

    def _matmul(self, x: Tensor) -> Tensor:
        return kron_matmul(self.factors, x)

    def tmatmul(self, y: Tensor) -> Tensor:
        return kron_matmul([f.mT for f in self.factors], y)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        return kron_dense(self.factors)


class ConcatRoot(LinearMap):
    """``[R_1, R_2, ...]`` side by side: ``R R^T = sum_i R_i R_i^T`` (independent draws per part)."""

    _children = ("parts",)

    def __init__(self, parts: list[LinearMap]) -> None:
        super().__init__()
        self.parts = list(parts)

    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(*(p.batch_shape for p in self.parts))
        return batch + (self.parts[0].shape[-2], sum(p.shape[-1] for p in self.parts))

    def _matmul(self, x: Tensor) -> Tensor:
        chunks = x.split([p.shape[-1] for p in self.parts], dim=-2)
        return sum(p._matmul(c) for p, c in zip(self.parts, chunks))

    def tmatmul(self, y: Tensor) -> Tensor:
        outs = [p.tmatmul(y) for p in self.parts]
        batch = torch.broadcast_shapes(*(o.shape[:-2] for o in outs))
        return torch.cat([o.expand(*batch, *o.shape[-2:]) for o in outs], dim=-2)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        mats = [p.to_dense() for p in self.parts]
        batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
        return torch.cat([m.expand(*batch, *m.shape[-2:]) for m in mats], dim=-1)

"""Structured square roots ``R`` (``(..., n, k)``) with ``R R^T = A``, returned by ``op.root()``.

A root is a linear map, not a covariance: it multiplies ``(..., k, c)`` (``R @ x``, used to draw
samples ``R eps``) and ``(..., n, c)`` from the left by its transpose (``R.tmatmul(y) = R^T y``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance._kron import kron_dense, kron_matmul
from structgp.covariance._pytree_node import PyTreeNode


class Root(PyTreeNode):
    """Base of structured roots ``(..., n, k)``."""

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        return self.shape[:-2]

    def _matmul(self, x: Tensor) -> Tensor:
        """``R x`` for ``x`` of shape ``(..., k, c)``."""
        raise NotImplementedError

    def tmatmul(self, y: Tensor) -> Tensor:
        """``R^T y`` for ``y`` of shape ``(..., n, c)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    @property
    def mT(self) -> Root:
        """The transpose ``R^T`` ``(..., k, n)``, itself a structured map (:mod:`structgp.covariance.linear_map`)."""
        from structgp.covariance.linear_map import transpose

        return transpose(self)

    @property
    def T(self) -> Root:
        """``R^T`` of an unbatched map (as ``Tensor.T``); use ``.mT`` for batched maps."""
        if len(self.shape) != 2:
            raise ValueError(f"T: defined for unbatched (n, k) maps, got shape {tuple(self.shape)}; use .mT")
        return self.mT

    def __rmatmul__(self, y: Tensor) -> Tensor:
        """``y @ R`` for ``y`` ``(..., c, n)`` (or ``(n,)``): ``(R^T y^T)^T``."""
        if y.dim() == 1:
            return self.mT @ y
        return (self.mT @ y.mT).mT

    def __matmul__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # a map, root or operator: a lazy product
            from structgp.covariance.linear_map import compose

            return compose(self, x)
        k = self.shape[-1]
        if x.dim() == 1:
            if x.shape[-1] != k:
                raise ValueError(f"x: expected shape ({k},), got {tuple(x.shape)}")
            return self._matmul(x.unsqueeze(-1)).squeeze(-1)
        if x.shape[-2] != k:
            raise ValueError(f"x: expected shape (..., {k}, c), got {tuple(x.shape)}")
        return self._matmul(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'x'.join(map(str, self.shape))})"


class DenseRoot(Root):
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


class DiagonalRoot(Root):
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
        return torch.diag_embed(self.diag)


class KroneckerRoot(Root):
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
        return kron_dense(self.factors)


class ConcatRoot(Root):
    """``[R_1, R_2, ...]`` side by side: ``R R^T = sum_i R_i R_i^T`` (independent draws per part)."""

    _children = ("parts",)

    def __init__(self, parts: list[Root]) -> None:
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
        mats = [p.to_dense() for p in self.parts]
        batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
        return torch.cat([m.expand(*batch, *m.shape[-2:]) for m in mats], dim=-1)

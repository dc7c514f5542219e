"""Kronecker: ``K_1 (x) K_2 (x) ... (x) K_d``, the covariance of a product kernel on a grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.kron import kron_dense, kron_matmul, kron_vector
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import broadcast_batch, check_same_kind


class Kronecker(Operator):
    """``K_1 (x) ... (x) K_d`` from factors ``(..., n_i, n_i)`` (tensors or operators); ``N = prod n_i``.

    Row ``(i_1, ..., i_d)`` of the product is flattened in row-major order (the last factor varies
    fastest), as ``torch.kron``. A product of diagonal factors is diagonal and can serve as noise.
    """

    _children = ("factors",)

    def __init__(self, *factors: Tensor | Operator) -> None:
        super().__init__()
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if len(factors) < 1:
            raise ValueError("factors: expected at least one factor")
        ops = [as_operator(f, f"factors[{i}]") for i, f in enumerate(factors)]
        for i, f in enumerate(ops):
            if f.n == 0:  # a 0 x 0 factor makes the product 0 x 0
                raise ValueError(f"factors[{i}]: expected a factor of size n_i >= 1, got {tuple(f.shape)}")
        broadcast_batch(*(f.batch_shape for f in ops), names=tuple(f"factors[{i}]" for i in range(len(ops))))
        check_same_kind({f"factors[{i}]": f._first_float() for i, f in enumerate(ops)})
        self.factors = ops

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(f.n for f in self.factors)

    @property
    def shape(self) -> torch.Size:
        n = math.prod(self.sizes)
        return torch.broadcast_shapes(*(f.batch_shape for f in self.factors)) + (n, n)

    @property
    def is_diagonal(self) -> bool:
        return all(f.is_diagonal for f in self.factors)

    def factor_matrices(self) -> list[Tensor]:
        """The dense factors ``(..., n_i, n_i)`` (each small)."""
        return [f._to_dense() for f in self.factors]

    def _matmul(self, rhs: Tensor) -> Tensor:
        return kron_matmul(self.factor_matrices(), rhs)

    def diagonal(self) -> Tensor:
        return kron_vector([f.diagonal() for f in self.factors])

    def _to_dense(self) -> Tensor:
        return kron_dense(self.factor_matrices())

    def _scale(self, c: Tensor) -> Kronecker:
        return self._replace(factors=[self.factors[0]._scale(c), *self.factors[1:]])

    def _expand(self, batch_shape: torch.Size) -> Kronecker:
        return self._replace(factors=[f._expand(batch_shape) for f in self.factors])

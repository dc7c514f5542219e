"""LowRank: ``W W^T`` from a tall factor."""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.covariance.validation import as_tensor, check_finite, check_ndim


class LowRank(Operator):
    """``W W^T`` for a factor ``W`` of shape ``(..., n, k)``; singular unless noise is added."""

    _children = ("factor",)

    def __init__(self, factor: Tensor) -> None:
        super().__init__()
        factor = as_tensor(factor, "factor")
        check_ndim(factor, "factor", 2, "(..., n, k)")
        if factor.shape[-2] == 0:
            raise ValueError(f"factor: expected shape (..., n, k) with n >= 1, got {tuple(factor.shape)}")
        check_finite(factor, "factor")
        self.factor = factor

    @property
    def shape(self) -> torch.Size:
        n = self.factor.shape[-2]
        return self.factor.shape[:-2] + (n, n)

    @property
    def rank(self) -> int:
        return self.factor.shape[-1]

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.factor @ (self.factor.mT @ rhs)

    def diagonal(self) -> Tensor:
        return self.factor.square().sum(-1)

    def _to_dense(self) -> Tensor:
        return self.factor @ self.factor.mT

    def _scale(self, c: Tensor) -> LowRank:
        return self._replace(factor=c.sqrt()[..., None, None] * self.factor)

    def _expand(self, batch_shape: torch.Size) -> LowRank:
        return self._replace(factor=self.factor.expand(*batch_shape, *self.factor.shape[-2:]))

"""PosteriorCovariance: the GP posterior covariance ``K_** - K_*x (K + N)^{-1} K_x*``, held lazily.

Held as ``prior - left right^T`` with ``left`` and ``right`` ``(..., n_*, r)``:

    general kernels:   left = K_*x (n_*, N),  right = ((K + N)^{-1} K_x*)^T   (one solve with n_* columns)
    low-rank kernels:  left = F_* (n_*, m),   right = F_* M,  M = F^T (K + N)^{-1} F   (m x m, cached)

where ``K_*x = F_* F^T`` for inducing-point kernels. The variance (``diagonal``) costs ``n_* r``, products
``n_* r`` a column; nothing ``n_* x n_*`` is formed until a joint question is asked (``to_dense``,
``solve``/``logdet``/``root`` by the dense Cholesky engine, e.g. for joint samples or ``log_prob``).
``left right^T`` is symmetric in exact arithmetic; its symmetric part is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance import Operator


class PosteriorCovariance(Operator):
    """``prior - (left right^T + right left^T) / 2`` of shape ``(..., n, n)``.

    prior: the prior covariance at the test points, an operator ``(..., n, n)``; left, right: ``(..., n, r)``.
    """

    _children = ("prior", "left", "right")

    def __init__(self, prior: Operator, left: Tensor, right: Tensor) -> None:
        super().__init__()
        if not isinstance(prior, Operator):
            raise TypeError(f"prior: expected a structgp operator, got {type(prior).__name__}")
        n = prior.n
        for name, t in (("left", left), ("right", right)):
            if not isinstance(t, Tensor) or t.dim() < 2 or t.shape[-2] != n:
                raise ValueError(f"{name}: expected a tensor (..., {n}, r), got {getattr(t, 'shape', type(t))}")
        if left.shape[-1] != right.shape[-1]:
            raise ValueError(f"right: expected {left.shape[-1]} columns (as left), got {right.shape[-1]}")
        self.prior = prior
        self.left = left
        self.right = right

    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.prior.batch_shape, self.left.shape[:-2], self.right.shape[:-2])
        return batch + self.prior.shape[-2:]

    def _matmul(self, rhs: Tensor) -> Tensor:
        reduction = self.left @ (self.right.mT @ rhs) + self.right @ (self.left.mT @ rhs)
        return self.prior._matmul(rhs) - reduction / 2

    def diagonal(self) -> Tensor:
        return self.prior.diagonal() - (self.left * self.right).sum(-1)

    def _to_dense(self) -> Tensor:
        reduction = self.left @ self.right.mT
        return self.prior._to_dense() - (reduction + reduction.mT) / 2

    def _scale(self, c: Tensor) -> PosteriorCovariance:
        return self._replace(prior=self.prior._scale(c), left=c[..., None, None] * self.left)

    def _expand(self, batch_shape: torch.Size) -> PosteriorCovariance:
        return self._replace(
            prior=self.prior._expand(batch_shape),
            left=self.left.expand(*batch_shape, *self.left.shape[-2:]),
            right=self.right.expand(*batch_shape, *self.right.shape[-2:]),
        )

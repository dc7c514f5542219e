"""Dense: an unstructured symmetric positive (semi)definite matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.covariance.validation import as_tensor, check_finite, check_square, check_symmetric


class Dense(Operator):
    """``A`` held as a dense tensor ``matrix`` of shape ``(..., n, n)``.

    ``matrix`` must be symmetric (checked by a product with a random vector to a relative 1e-3 in float32,
    1e-5 in float64); the factorisations use its symmetric part ``(A + A^T) / 2``, while products (and so
    the iterative engine) use ``A`` as given: symmetrise a matrix built by a float32 distance product
    (``torch.cdist``'s matrix-product formula can leave it asymmetric by 1e-4) before wrapping it.
    """

    _children = ("matrix",)

    def __init__(self, matrix: Tensor, *, name: str = "matrix") -> None:
        super().__init__()
        matrix = as_tensor(matrix, name)
        check_square(matrix, name)
        check_finite(matrix, name)
        check_symmetric(matrix, name)
        self.matrix = matrix

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.matrix @ rhs

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal(dim1=-2, dim2=-1)

    def _to_dense(self) -> Tensor:
        return self.matrix

    def _scale(self, c: Tensor) -> Dense:
        return self._replace(matrix=c[..., None, None] * self.matrix)

    def _expand(self, batch_shape: torch.Size) -> Dense:
        return self._replace(matrix=self.matrix.expand(*batch_shape, self.n, self.n))

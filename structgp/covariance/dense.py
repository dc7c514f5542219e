"""Dense: an unstructured symmetric positive (semi)definite matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.covariance.validation import as_tensor, check_finite, check_square, check_symmetric


class Dense(Operator):
    """``A`` held as a dense tensor ``matrix`` of shape ``(..., n, n)``.

    ``matrix`` must be symmetric (checked by a product with a random vector to a relative 1e-3 in float32,
    1e-5 in float64); the factorisations use its symmetric part ``(A + A^T) / 2`` (``A`` itself where the
    two differ by less than a factorisation's rounding error, ``|A_ij - A_ji| <= n eps max|A_kk|``), while
    products (and so the iterative engine) use ``A`` as given: symmetrise a matrix built by a float32
    distance product (``torch.cdist``'s matrix-product formula can leave it asymmetric by 1e-4) before
    wrapping it.
    """

    _children = ("matrix",)

    def __init__(self, matrix: Tensor, *, name: str = "matrix") -> None:
        super().__init__()
        matrix = as_tensor(matrix, name)
        check_square(matrix, name)
        check_finite(matrix, name)
        symmetric = check_symmetric(matrix, name)
        self.matrix = matrix
        # the matrix and its version when it was found negligibly asymmetric (None: not known)
        self._symmetric = (matrix, matrix._version) if symmetric and not matrix.is_inference() else None

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def _tensors(self) -> list[Tensor]:
        return [self.matrix]

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.matrix @ rhs

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal(dim1=-2, dim2=-1)

    def _to_dense(self) -> Tensor:
        return self.matrix

    def _dense_is_symmetric(self) -> bool:
        """True while ``matrix`` is the tensor the constructor found negligibly asymmetric (see
        ``negligibly_asymmetric``) and has not been modified in place since (copies rebuilt from pytree
        children do not know, and say False)."""
        if torch.compiler.is_compiling():  # traced code does not read version counters: symmetrise
            return False
        known = getattr(self, "_symmetric", None)
        return known is not None and known[0] is self.matrix and known[1] == self.matrix._version

    def _scale(self, c: Tensor) -> Dense:
        return self._replace(matrix=c[..., None, None] * self.matrix)

    def _expand(self, batch_shape: torch.Size) -> Dense:
        return self._replace(matrix=self.matrix.expand(*batch_shape, self.n, self.n))

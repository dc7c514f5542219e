"""Structured covariance operators: the data and their exact structured algebra.

Nothing here is materialised unless asked (``to_dense``, guarded by ``settings(dense_limit=...)``).
"""

from structgp.covariance.block_diag import BlockDiag, BlockDiagRoot
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.errors import DensifyError, NumericalError
from structgp.covariance.indexing import DenseIndexWarning
from structgp.covariance.kernel_operator import KernelOperator
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.linear_map import (
    BlockDiagMap,
    DenseMap,
    KroneckerMap,
    OperatorMap,
    Permutation,
    Product,
    Selection,
    SparseMap,
    Transpose,
)
from structgp.covariance.low_rank import LowRank
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.permuted import Permuted
from structgp.covariance.root import ConcatRoot, DenseRoot, DiagonalRoot, KroneckerRoot
from structgp.covariance.sparse_lifted import LiftedRoot, SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.covariance.torch_function import DenseFallbackWarning

__all__ = [
    "AddedDiagonal",
    "BlockDiag",
    "BlockDiagMap",
    "BlockDiagRoot",
    "ConcatRoot",
    "Dense",
    "DenseFallbackWarning",
    "DenseIndexWarning",
    "DenseMap",
    "DenseRoot",
    "DensifyError",
    "Diagonal",
    "DiagonalRoot",
    "KernelOperator",
    "Kronecker",
    "KroneckerMap",
    "KroneckerRoot",
    "LiftedRoot",
    "LowRank",
    "NumericalError",
    "Operator",
    "OperatorMap",
    "Permutation",
    "Permuted",
    "Product",
    "LinearMap",
    "ScaledIdentity",
    "Selection",
    "SparseLifted",
    "SparseMap",
    "Sum",
    "Transpose",
    "as_operator",
]

"""Structured covariance operators: the data and their exact structured algebra.

Nothing here is materialised unless asked (``to_dense``, guarded by ``settings(dense_limit=...)``).
"""

from structgp.covariance._operator import DensifyError, Operator, as_operator
from structgp.covariance.block_diag import BlockDiag, BlockDiagRoot
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.root import ConcatRoot, DenseRoot, DiagonalRoot, KroneckerRoot, Root
from structgp.covariance.sparse_lifted import LiftedRoot, SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum

__all__ = [
    "AddedDiagonal",
    "BlockDiag",
    "BlockDiagRoot",
    "ConcatRoot",
    "Dense",
    "DenseRoot",
    "DensifyError",
    "Diagonal",
    "DiagonalRoot",
    "Kronecker",
    "KroneckerRoot",
    "LiftedRoot",
    "LowRank",
    "Operator",
    "Root",
    "ScaledIdentity",
    "SparseLifted",
    "Sum",
    "as_operator",
]

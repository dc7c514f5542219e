"""structgp.distributed: exact GPs across processes on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Launch with ``torchrun --nproc_per_node=P script.py`` and call :func:`init` once; every rank then runs the
same script on the same data. A :class:`~structgp.covariance.KernelOperator` computes only its rank's
contiguous rows of each product (:func:`partition`: whole row tiles, so each rank computes exactly the
tiles one process would; with the KeOps backend too) and all-gathers them, so every rank holds the
full ``(n, c)`` product (bitwise one process's); the backward of a product reduces the hyperparameter
gradients with one all-reduce.

The iterative engine goes further for an operator made of kernel matrices and diagonals, and for
``L B L^T + D`` (:mod:`structgp.inference.partitioned`): its vectors (right-hand sides, probes, iterates, the pivoted
Cholesky factor) stay partitioned as each rank's rows (:class:`~structgp.distributed.rows.Rows`). A PCG
iteration all-gathers the search directions and sums the dot products over the ranks. Each pivot is
picked by one all-gather. Gradients are summed from the ranks' shares
(:func:`~structgp.distributed.rows.share_gradients`). Values, gradients and predictions equal one
process's up to the order of the sums.

A :class:`~structgp.covariance.SparseLifted` ``L B L^T`` partitions the observation rows of its lift the
same way (:mod:`structgp.covariance.lift_products`): each rank applies its rows of ``L``, ``L^T y`` is summed
over the ranks with one all-reduce of the latent vector and ``L x`` is all-gathered, so ``L B L^T v`` costs one
all-reduce and one all-gather; the lift Gram ``L^T D^{-1} L`` of the latent Woodbury engine is one
all-reduce of the ranks' row sums. Sums over ranks differ from one process by rounding only; every rank
holds the same numbers.

Without :func:`init` (or with one process) nothing is distributed and nothing is an error.

This package depends on nothing else in structgp (like ``structgp._config``), so every layer may use it.
"""

from structgp.distributed.collectives import all_reduce_sum, gather_rows
from structgp.distributed.errors import DistributedError
from structgp.distributed.fingerprint import check_consistent
from structgp.distributed.partition import partition, row_range, rows_of
from structgp.distributed.process_group import init, is_active, rank, shutdown, world

__all__ = [
    "DistributedError",
    "all_reduce_sum",
    "check_consistent",
    "gather_rows",
    "init",
    "is_active",
    "partition",
    "rank",
    "row_range",
    "rows_of",
    "shutdown",
    "world",
]

"""Which operators the iterative engine runs on rows across processes (structgp.inference.partitioned), in one
process: the structural rule for ``L B L^T + D`` (the spawned tests in ``tests/distributed`` run the runs)."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, KernelOperator, Kronecker, ScaledIdentity, SparseLifted
from structgp.inference.partitioned import lifted_sum

F64 = torch.float64


def grid(n: int) -> Dense:
    x = torch.linspace(0, 1, n, dtype=F64)
    return Dense(torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / 0.09) + 1e-6 * torch.eye(n, dtype=F64))


def general_lift(rows: int, cells: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(rows, cells, generator=gen, dtype=F64) * (torch.rand(rows, cells, generator=gen) < 0.3))


def selection_lift(rows: int, cells: int) -> torch.Tensor:
    return torch.eye(cells, dtype=F64)[torch.randperm(cells, generator=torch.Generator().manual_seed(1))[:rows]]


def test_lifted_sums_run_on_rows_where_one_process_takes_the_same_preconditioner():
    base = Kronecker(grid(4), grid(5))
    noise = Diagonal(torch.full((12,), 0.1, dtype=F64))
    general = SparseLifted(general_lift(12, 20), base) + noise
    masked = SparseLifted(selection_lift(12, 20), base) + noise
    assert masked.base.lift.kind == "selection" and general.base.lift.kind == "general"
    assert lifted_sum(general)
    assert lifted_sum(SparseLifted(general_lift(12, 20), base) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 12))
    assert not lifted_sum(masked)  # auto: one process takes the masked grid's own preconditioner
    for kind, expected in (("lifted_eigen", True), ("jacobi", True), ("none", True), ("pivoted_cholesky", False)):
        with sg.settings(preconditioner=kind):
            assert lifted_sum(general) is expected, kind
            assert lifted_sum(masked) is expected, kind


@pytest.mark.parametrize("what", ["kernel base", "no noise", "batched", "dense noise"])
def test_other_lifted_operators_keep_whole_vectors(what):
    lift = general_lift(12, 20)
    if what == "kernel base":
        kernel = gpytorch.kernels.RBFKernel().double()
        op = SparseLifted(lift, KernelOperator(kernel, torch.rand(20, 1, dtype=F64))) + ScaledIdentity(
            torch.tensor(0.1, dtype=F64), 12
        )
    elif what == "no noise":
        op = SparseLifted(lift, Kronecker(grid(4), grid(5)))
    elif what == "batched":
        op = SparseLifted(lift, Kronecker(grid(4), grid(5)).expand(3)) + Diagonal(torch.full((3, 12), 0.1, dtype=F64))
    else:
        op = SparseLifted(lift, Kronecker(grid(4), grid(5))) + Dense(0.1 * torch.eye(12, dtype=F64))
    assert not lifted_sum(op)

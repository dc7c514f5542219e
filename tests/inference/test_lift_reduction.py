"""Lifts that are really another structure (identity, permutation, selection): detected once, answered by the
base's own engine, equal to the general lifted path and to dense float64; bad lifts raise errors naming
``lift``."""

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted
from structgp.covariance.sparse_lifted import Lift
from tests.reference import F64, assert_close, dense_inv_quad_logdet, positive, spd


def one_hot(cols, n_in, dtype=F64, values=None):
    rows = torch.arange(len(cols))
    vals = torch.ones(len(cols), dtype=dtype) if values is None else values
    return torch.sparse_coo_tensor(torch.stack([rows, torch.as_tensor(cols)]), vals, (len(cols), n_in))


def test_kinds():
    assert Lift.from_tensor(one_hot(range(6), 6)).kind == "identity"
    assert Lift.from_tensor(one_hot([2, 0, 1, 5, 4, 3], 6)).kind == "permutation"
    assert Lift.from_tensor(one_hot([4, 0, 2], 6)).kind == "selection"
    assert Lift.from_tensor(torch.eye(6, dtype=F64).to_sparse_csr()).kind == "identity"
    assert Lift.from_tensor(torch.eye(6, dtype=F64)).kind == "identity"  # dense


@pytest.mark.parametrize(
    "lift",
    [
        one_hot([4, 0, 4], 6),  # a cell used twice: claimed selection, really general
        one_hot([1, 0, 2], 6, values=torch.tensor([1.0, 2.0, 1.0], dtype=F64)),  # a weight other than 1
        torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64),  # two cells in a row
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64),  # an empty row
        one_hot([0, 1, 2], 3, values=torch.ones(3, dtype=F64, requires_grad=True)),  # values are data
    ],
)
def test_claimed_structure_that_is_not_true_is_general(lift):
    assert Lift.from_tensor(lift).kind == "general"


def general_twin(lift):
    """The same matrix with a lift whose values carry gradients (so it is the general kind)."""
    lift = lift.coalesce()
    values = lift.values().clone().requires_grad_()
    return torch.sparse_coo_tensor(lift.indices(), values, lift.shape)


def kron():
    return Kronecker(spd(4), spd(3), spd(2))


CASES = {
    "identity Kronecker + s I": (
        one_hot(range(24), 24), kron, lambda n: ScaledIdentity(torch.tensor(0.3, dtype=F64), n)
    ),
    "identity Kronecker + D": (one_hot(range(24), 24), kron, lambda n: Diagonal(positive(n))),
    "permutation Kronecker + D": (one_hot(torch.randperm(24, generator=torch.Generator().manual_seed(1)), 24), kron,
                                  lambda n: Diagonal(positive(n))),
    "selection LowRank + s I": (one_hot([7, 1, 19, 3, 11], 24), lambda: LowRank(torch.randn(24, 3, dtype=F64)),
                                lambda n: ScaledIdentity(torch.tensor(0.2, dtype=F64), n)),
    "selection Dense + D": (one_hot([7, 1, 19, 3, 11], 24), lambda: Dense(spd(24)), lambda n: Diagonal(positive(n))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_against_general_path_and_dense(case):
    lift, make_base, make_noise = CASES[case]
    base = make_base()
    op = SparseLifted(lift, base) + make_noise(lift.shape[0])
    twin = SparseLifted(general_twin(lift), base) + op.noise
    assert op.base.lift.kind != "general" and twin.base.lift.kind == "general"
    kind = op.base.lift.kind
    p = sg.plan(op)
    assert p.engine.name == "lift_reduction" and p.reason.startswith(f"{kind} lift: ")
    y = torch.randn(2, lift.shape[0], dtype=F64)
    q, ld = op.inv_quad_logdet(y)
    assert sg.last_report().method == "lift_reduction"
    with sg.settings(method="lifted_woodbury"):
        q2, ld2 = twin.inv_quad_logdet(y)
    dense = twin.to_dense().detach()
    ref_q, ref_ld = dense_inv_quad_logdet(dense, y)
    assert_close(q, ref_q, rtol=1e-10, atol=1e-10)
    assert_close(ld, ref_ld, rtol=1e-10, atol=1e-10)
    assert_close(q2.detach(), ref_q, rtol=1e-9, atol=1e-9)
    assert_close(ld2.detach(), ref_ld, rtol=1e-9, atol=1e-9)
    assert_close(op.solve(y.mT), torch.linalg.solve(dense, y.mT), rtol=1e-9, atol=1e-9)
    assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-12)


def test_identity_lift_plan_names_the_base_engine():
    op = SparseLifted(one_hot(range(24), 24), kron()) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 24)
    assert sg.plan(op).reason == "identity lift: Kronecker + ScaledIdentity, answered by eigen"
    op.logdet()
    assert "reduced to Kronecker + ScaledIdentity: eigen" in str(sg.last_report())


def test_gradients_through_the_reduction():
    lift = one_hot(torch.randperm(24, generator=torch.Generator().manual_seed(2)), 24)

    def loss(f1, f2, d, y):
        op = SparseLifted(lift, Kronecker(f1 @ f1.mT + torch.eye(4, dtype=F64), f2 @ f2.mT + torch.eye(6, dtype=F64)))
        q, ld = (op + Diagonal(d)).inv_quad_logdet(y)
        return q + ld

    args = (torch.randn(4, 4, dtype=F64), torch.randn(6, 6, dtype=F64), positive(24), torch.randn(24, dtype=F64))
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(loss, args)


def test_masked_grid_keeps_the_lifted_form_and_gathers_its_dense_form():
    cols = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:17]
    grid = kron()
    op = SparseLifted(one_hot(cols, 24), grid) + Diagonal(positive(17))
    assert op.base.lift.kind == "selection"
    assert sg.plan(op).engine.name != "lift_reduction"
    dense = grid.to_dense()[cols][:, cols]
    assert_close(op.base.to_dense(), dense, rtol=1e-13, atol=1e-13)
    y = torch.randn(17, dtype=F64)
    q, ld = op.inv_quad_logdet(y)
    ref_q, ref_ld = dense_inv_quad_logdet(dense + torch.diag(op.noise.diagonal()), y)
    assert_close(q, ref_q) and assert_close(ld, ref_ld)


# -- bad lifts ------------------------------------------------------------------------------------------------
def test_out_of_range_and_negative_indices_name_the_lift():
    too_big = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 7]]), torch.ones(2, dtype=F64), (3, 5))
    with pytest.raises(ValueError, match="lift: column index 7 is out of range"):
        SparseLifted(too_big, Dense(spd(5)))
    negative = torch.sparse_coo_tensor(torch.tensor([[0, -1], [0, 2]]), torch.ones(2, dtype=F64), (3, 5))
    with pytest.raises(ValueError, match="lift: row index -1 is out of range"):
        SparseLifted(negative, Dense(spd(5)))
    csr = torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 9]), torch.ones(2, dtype=F64), (2, 5))
    with pytest.raises(ValueError, match="lift: column index 9 is out of range"):
        SparseLifted(csr, Dense(spd(5)))


def test_inconsistent_crow_names_the_lift():
    bad = torch.sparse_csr_tensor(
        torch.tensor([0, 2, 1]), torch.tensor([0, 1]), torch.ones(2, dtype=F64), (2, 5), check_invariants=False
    )
    with pytest.raises(ValueError, match="lift: CSR crow_indices must rise"):
        SparseLifted(bad, Dense(spd(5)))


def test_more_rows_than_cells_without_noise_is_singular():
    op = SparseLifted(torch.rand(8, 5, dtype=F64).to_sparse_coo(), Dense(spd(5)))
    with pytest.raises(ValueError, match="lift: L B L\\^T has rank at most n_in = 5 < n_out = 8"):
        op.logdet()
    with pytest.raises(ValueError, match="lift: "):
        sg.plan(op)

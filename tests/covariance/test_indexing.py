"""op[index] against dense torch indexing, with checks that structure (and laziness) is kept."""

import warnings

import pytest
import torch

import structgp as sg
from structgp.covariance import (
    AddedDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    LinearMap,
    LowRank,
    Operator,
    ScaledIdentity,
)
from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.indexing import DenseIndexWarning
from structgp.covariance.linear_map import Product
from structgp.covariance.sparse_lifted import SparseLifted
from tests.reference import F64, assert_close, positive, spd


def sparse_lift(n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    return (dense * (torch.rand(n_out, n_in, generator=gen) < 0.4)).to_sparse()


BUILDERS = {
    "dense": lambda: Dense(spd(6, 2)),
    "diagonal": lambda: Diagonal(positive(2, 6)),
    "scaled_identity": lambda: ScaledIdentity(positive(2), 6),
    "lowrank": lambda: LowRank(torch.randn(2, 6, 2, dtype=F64)),
    "lowrank_noise": lambda: LowRank(torch.randn(2, 6, 2, dtype=F64)) + Diagonal(positive(2, 6)),
    "kronecker": lambda: Kronecker(spd(2, 2), spd(3)),
    "kronecker_noise": lambda: Kronecker(spd(3), spd(2, 2)) + ScaledIdentity(positive(2), 6),
    "kronecker_kron_noise": lambda: Kronecker(spd(2), spd(3)) + Kronecker(*(Diagonal(positive(m)) for m in (2, 3))),
    "sum": lambda: Dense(spd(6)) + LowRank(torch.randn(2, 6, 1, dtype=F64)),
    "block_diag": lambda: BlockDiag(spd(2, 2, 3)),
    "block_diag_ragged": lambda: BlockDiag([spd(2), LowRank(spd(3)[:, :1]) + Diagonal(positive(3)), spd(1)]),
    "sparse_lifted": lambda: SparseLifted(sparse_lift(6, 4), Kronecker(spd(2, 2), spd(2))),
    "sparse_lifted_noise": lambda: SparseLifted(sparse_lift(6, 3), spd(3)) + Diagonal(positive(6)),
}

I = torch.tensor  # noqa: E741
INDICES = [
    (...,),
    (..., slice(1, 4), slice(1, 4)),  # principal
    (..., slice(0, 6, 2), slice(0, 6, 2)),
    (..., I([4, 0, 3]), slice(None)),  # rows
    (..., slice(2, 5), slice(0, 3)),  # general submatrix
    (..., I([1, 5])[:, None], I([0, 2, 3])[None, :]),
    (..., I([1, 5, 2])[:, None], I([1, 5, 2])[None, :]),  # principal by index tensors
    (..., 2, 3),  # entries
    (..., -1, -1),
    (..., I([0, 1, 5, 5]), I([0, 4, 2, 5])),
    (..., I([[0, 1], [2, 3]]), I([5, 4])),
    (..., 3),  # a row
    (..., slice(None), 1),  # a column
    (..., 2, I([0, 3])),
    (..., I([True, False, True, True, False, False]), slice(None)),
    (..., [0, 2], slice(1, 3)),
]


@pytest.fixture(params=list(BUILDERS))
def case(request):
    torch.manual_seed(1)
    op = BUILDERS[request.param]()
    return request.param, op, op.to_dense()


def as_dense(x):
    return x if isinstance(x, torch.Tensor) else x.to_dense()


@pytest.mark.parametrize("index", INDICES, ids=range(len(INDICES)))
def test_matrix_indexing_matches_dense(case, index):
    _, op, a = case
    out = op[index]
    ref = a.expand(*op.shape)[index]
    assert tuple(out.shape) == tuple(ref.shape)
    assert_close(as_dense(out), ref)


@pytest.mark.parametrize("index", [0, -1, (slice(0, 1),), (I([1, 0, 1]),), (slice(None), 0, 1)])
def test_batch_indexing_keeps_the_structure(case, index):
    name, op, a = case
    if not op.batch_shape:
        pytest.skip("unbatched")
    out = op[index]
    ref = a.expand(*op.shape)[index]
    assert tuple(out.shape) == tuple(ref.shape)
    if isinstance(out, Operator):
        assert type(out) is type(op)
        if isinstance(op, AddedDiagonal):
            assert type(out.base) is type(op.base) and type(out.noise) is type(op.noise)
    assert_close(as_dense(out), ref)


def test_principal_and_general_submatrices_have_the_right_kind(case):
    name, op, a = case
    principal = op[..., 1:4, 1:4]
    assert isinstance(principal, Operator)  # a covariance
    general = op[..., 1:4, 2:5]
    assert isinstance(general, LinearMap) and not isinstance(general, Operator)  # a map
    x = torch.randn(3, 2, dtype=F64)
    assert_close(general @ x, a[..., 1:4, 2:5] @ x)
    assert_close(general.mT @ x, a[..., 2:5, 1:4] @ x)
    if name in ("kronecker_kron_noise", "lowrank"):
        return
    sub = principal.to_dense()
    assert_close(principal.logdet(), torch.linalg.slogdet(sub)[1], 1e-8, 1e-8)


EXPECTED_PRINCIPAL = {
    "dense": Dense,
    "diagonal": Diagonal,
    "scaled_identity": ScaledIdentity,
    "lowrank": LowRank,
    "kronecker": SparseLifted,  # rows 1..3 of a 2 x 3 grid are not a Kronecker product: lifted
    "block_diag": BlockDiag,
    "block_diag_ragged": BlockDiag,
    "sparse_lifted": SparseLifted,
}


def test_principal_submatrix_types(case):
    name, op, _ = case
    if name in EXPECTED_PRINCIPAL:
        assert type(op[..., 1:4, 1:4]) is EXPECTED_PRINCIPAL[name]
    if name == "lowrank_noise":
        sub = op[..., 1:4, 1:4]
        assert isinstance(sub, AddedDiagonal) and isinstance(sub.base, LowRank)
        assert sg.plan(sub).method in ("woodbury", "cholesky")
    if name == "sparse_lifted_noise":
        sub = op[..., I([0, 2, 5])[:, None], I([0, 2, 5])[None]]
        assert isinstance(sub, AddedDiagonal) and isinstance(sub.base, SparseLifted)


def test_kronecker_grid_slices_stay_kronecker():
    a, b, c = spd(3), spd(4), spd(2)
    op = Kronecker(a, b, c) + ScaledIdentity(0.3, 24)
    dense = op.to_dense()
    for start, stop in [(8, 24), (8, 16), (10, 14), (0, 24), (9, 10)]:
        sub = op[start:stop, start:stop]
        assert isinstance(sub, AddedDiagonal) and isinstance(sub.base, Kronecker), (start, stop)
        assert_close(sub.to_dense(), dense[start:stop, start:stop])
    sub = op[8:16, 8:16]
    assert sub.base.sizes == (1, 4, 2)
    assert sg.plan(op[0:24:1, 0:24]).method == sg.plan(op).method
    with sg.settings(method="eigen"):
        assert_close(sub.logdet(), torch.linalg.slogdet(dense[8:16, 8:16])[1])
    lifted = op[5:9, 5:9]  # crosses a grid line: lifted, still exact
    assert isinstance(lifted.base, SparseLifted)
    assert_close(lifted.logdet(), torch.linalg.slogdet(dense[5:9, 5:9])[1])


def test_block_diag_ranges_stay_block_diagonal():
    blocks = spd(3, 5)  # 5 blocks of 3
    op = BlockDiag(blocks)
    aligned = op[3:12, 3:12]
    assert isinstance(aligned, BlockDiag) and aligned.num_blocks == 3
    assert aligned.groups[0].matrix.data_ptr() == blocks[1:4].data_ptr()  # a view, no copy
    ragged = op[4:11, 4:11]
    assert isinstance(ragged, BlockDiag) and ragged.num_blocks == 3
    assert_close(ragged.to_dense(), op.to_dense()[4:11, 4:11])
    assert_close(ragged.logdet(), torch.linalg.slogdet(op.to_dense()[4:11, 4:11])[1])


def test_sparse_lifted_rows_stay_lifted():
    base = Kronecker(spd(3), spd(4))
    op = SparseLifted(sparse_lift(50, 12, seed=3), base)
    rows = I([3, 7, 7, 20, 49])
    sub = op[rows[:, None], rows[None, :]]
    assert isinstance(sub, SparseLifted) and sub.base is base and sub.lift.n_out == 5
    assert_close(sub.to_dense(), op.to_dense()[rows][:, rows])
    general = op[rows, 10:20]
    assert isinstance(general, Product)
    assert general.factors[1].op is base  # L_r B L_c^T: the base is shared, never densified


def test_entries_and_submatrices_never_materialise():
    factors = [spd(64) for _ in range(3)]  # N = 262 144 (dense: 512 GiB)
    op = Kronecker(*factors) + ScaledIdentity(0.1, 64**3)
    i, j = I([0, 5, 262143, 100000]), I([0, 7, 262143, 4097])
    with sg.settings(dense_limit=2**20):
        vals = op[i, j]
        row = op[123, 1000:1010]
        sub = op[64:128, 64:128]
        block = op[4096:8192, 4096:8192]
    ref = [factors[0][a // 4096, b // 4096] * factors[1][a // 64 % 64, b // 64 % 64] * factors[2][a % 64, b % 64]
           + 0.1 * (a == b) for a, b in zip(i.tolist(), j.tolist())]
    assert_close(vals, torch.stack(ref))
    assert row.shape == (10,)
    assert isinstance(sub.base, Kronecker) and sub.base.sizes == (1, 1, 64)
    assert isinstance(block.base, Kronecker) and block.base.sizes == (1, 64, 64)


def test_sparse_lifted_entries_without_dense():
    op = SparseLifted(sparse_lift(400, 30, seed=5), spd(30)) + Diagonal(positive(400))
    i, j = torch.randint(0, 400, (50,)), torch.randint(0, 400, (50,))
    dense = op.to_dense()
    with sg.settings(dense_limit=2**10):  # not even the 30 x 30 base may be densified
        assert_close(op[i, j], dense[i, j])
        assert_close(op[7, :], dense[7])
        assert_close(op[:, 9], dense[:, 9])


def test_gradients_of_structured_indexing():
    def f(a, b, values, d):
        lift = torch.sparse_coo_tensor(I([[0, 0, 1, 2, 3], [0, 3, 1, 2, 5]]), values, (4, 6), check_invariants=False)
        op = SparseLifted(lift, Kronecker(a, b)) + Diagonal(d)
        sub = op[I([0, 2, 3])[:, None], I([0, 2, 3])[None]]
        return op[I([0, 1, 3]), I([3, 1, 0])], op[1, :], sub.logdet(), op[0:2, 1:4] @ torch.ones(3, 1, dtype=F64)

    ins = (spd(2).requires_grad_(), spd(3).requires_grad_(), torch.randn(5, dtype=F64, requires_grad=True),
           positive(4).requires_grad_())
    assert torch.autograd.gradcheck(f, ins)


def test_unsupported_indices():
    op = Dense(spd(4, 2))
    with pytest.raises(IndexError, match="too many indices"):
        op[0, 1, 2, 3]
    with pytest.raises(IndexError, match="out of bounds"):
        op[0, 4]
    with pytest.raises(IndexError, match="out of bounds"):
        op[..., I([0, 9]), 1]
    with pytest.raises(IndexError, match="integer or boolean"):
        op[..., torch.tensor([0.5]), 1]
    with pytest.warns(DenseIndexWarning):
        out = op[:, None]
    assert_close(out, op.to_dense()[:, None])
    with pytest.warns(DenseIndexWarning):  # index tensors in batch and matrix dims at once
        out = op[I([0, 1]), :, I([2, 3])]
    assert_close(out, op.to_dense()[I([0, 1]), :, I([2, 3])])


def test_lifted_entries_take_broadcasting_index_tensors():
    from structgp.covariance import SparseLifted
    from structgp.covariance.indexing import entries

    lift = torch.rand(6, 4, dtype=torch.float64)
    base = torch.randn(4, 4, dtype=torch.float64)
    op = SparseLifted(lift.to_sparse(), base @ base.T + torch.eye(4, dtype=torch.float64))
    i, j = torch.tensor([[0, 1], [5, 2]]), torch.tensor([[3], [2]])
    torch.testing.assert_close(entries(op, i, j), op.to_dense()[..., i, j])


def test_kernel_operator_entries_take_broadcasting_index_tensors_without_densifying():
    import gpytorch

    from structgp.covariance import KernelOperator
    from structgp.covariance.indexing import entries

    x = torch.rand(2, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5)).double()
    op = KernelOperator(kernel, x, scale=torch.tensor([0.5, 2.0], dtype=torch.float64))
    i, j = torch.tensor([[0, 1], [6, 2]]), torch.tensor([[3], [2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseIndexWarning)
        out = entries(op, i, j)
    torch.testing.assert_close(out, op.to_dense()[..., i, j], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_kernel_operator_entries_of_a_block_index_evaluate_the_block(batched, monkeypatch):
    # i (m, 1) x j (k,): the block k(x[i], x[j]) (O(m k) memory, not the pairs' O(m k d)), equal to the dense
    # matrix's entries, with gradients through the inputs and the raw parameters
    import gpytorch

    from structgp.covariance import KernelOperator
    from structgp.covariance.indexing import entries

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(*((2,) if batched else ()), 9, 2, dtype=torch.float64, generator=gen).requires_grad_()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    raw = [torch.tensor(0.3, dtype=torch.float64).requires_grad_(), torch.tensor([[-0.2]], dtype=torch.float64)]
    i, j = torch.tensor([[4], [0], [7]]), torch.tensor([7, 2, 4, 8])

    def block(x: torch.Tensor, raw_scale: torch.Tensor) -> torch.Tensor:
        return entries(KernelOperator(kernel, x, [raw_scale, raw[1]]), i, j)

    from structgp.covariance import indexing

    inputs = []
    evaluate = indexing.evaluate_kernel
    monkeypatch.setattr(indexing, "evaluate_kernel", lambda *a, **kw: inputs.append(a[3:]) or evaluate(*a, **kw))
    op = KernelOperator(kernel, x, raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseIndexWarning)
        out = entries(op, i, j)
    assert [(a.shape[-2], b.shape[-2]) for a, b in inputs] == [(3, 4)]  # the 3 rows and 4 columns, not 12 pairs
    assert out.shape == (*x.shape[:-2], 3, 4)
    torch.testing.assert_close(out, op.to_dense()[..., i, j], rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(block, (x, raw[0]))

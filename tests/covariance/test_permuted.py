"""Permuted: P B P^T against the float64 dense matrix B[perm][:, perm]; validation, noise, indexing, pytrees."""

import pytest
import torch
import torch.utils._pytree as pytree

import structgp as sg
from structgp.covariance import (
    BlockDiag,
    Dense,
    DensifyError,
    Diagonal,
    Kronecker,
    LowRank,
    Permuted,
    ScaledIdentity,
    SparseLifted,
)
from tests.reference import F64, assert_close, positive, spd


def permuted_dense(b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The reference (P B P^T)[i, j] = B[perm[i], perm[j]], by explicit loops (independent of index_select)."""
    n = perm.shape[0]
    out = torch.empty_like(b)
    for i in range(n):
        for j in range(n):
            out[..., i, j] = b[..., int(perm[i]), int(perm[j])]
    return out


def perm_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [(), (2,), (3, 1)])
def test_algebra_against_dense(batch):
    base = BlockDiag(spd(3, *batch, 4))
    perm = perm_of(12)
    op = Permuted(base, perm)
    ref = permuted_dense(base.to_dense(), perm)
    assert op.shape == (*batch, 12, 12) and op.batch_shape == batch and op.dtype == F64
    assert_close(op.to_dense(), ref)
    assert_close(op.diagonal(), ref.diagonal(dim1=-2, dim2=-1))
    x = torch.randn(*batch, 12, 3, dtype=F64)
    assert_close(op @ x, ref @ x)
    xt = torch.randn(*batch, 3, 12, dtype=F64).mT  # a transposed view: gathered along its memory rows
    assert xt.stride(-2) == 1
    assert_close(op @ xt, ref @ xt)
    v = torch.randn(12, dtype=F64)
    assert_close(op @ v, ref @ v)
    assert_close(x.mT @ op, x.mT @ ref)
    assert_close((2.5 * op).to_dense(), 2.5 * ref)
    assert_close(op.expand(4, *batch).to_dense(), ref.expand(4, *batch, 12, 12))


def test_convention_rows_follow_perm():
    b = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    op = Permuted(Dense(b), torch.tensor([2, 0, 1]))
    assert op.diagonal().tolist() == [3.0, 1.0, 2.0]  # row i of P B P^T is row perm[i] of B
    assert op.permutation().to_dense().tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_nested_permutations_flatten():
    b = spd(5)
    p1, p2 = perm_of(5, 1), perm_of(5, 2)
    op = Permuted(Permuted(b, p1), p2)
    assert isinstance(op.base, Dense)
    assert_close(op.to_dense(), permuted_dense(permuted_dense(b, p1), p2))


@pytest.mark.parametrize(
    "perm, error, match",
    [
        ([1, 0, 2], TypeError, "perm: expected a 1-D int64"),
        (torch.tensor([1.0, 0.0, 2.0]), TypeError, "perm: expected dtype torch.int64"),
        (torch.tensor([1, 0, 2], dtype=torch.int32), TypeError, "perm: expected dtype torch.int64"),
        (torch.tensor([1, 0]), ValueError, r"perm: expected shape \(3,\)"),
        (torch.tensor([[1, 0, 2]]), ValueError, r"perm: expected shape \(3,\)"),
        (torch.tensor([1, 1, 2]), ValueError, "perm: expected a permutation of range"),
        (torch.tensor([1, 0, 3]), ValueError, "perm: expected a permutation of range"),
        (torch.tensor([-1, 0, 1]), ValueError, "perm: expected a permutation of range"),
    ],
)
def test_bad_perm_is_named(perm, error, match):
    with pytest.raises(error, match=match):
        Permuted(spd(3), perm)


def test_bad_base_is_named():
    with pytest.raises(TypeError, match="base: expected a structgp operator"):
        Permuted([[1.0]], torch.tensor([0]))


@pytest.mark.parametrize("noise", ["diag", "scaled", "weak"])
def test_noise_keeps_the_structure_inside(noise):
    base = BlockDiag([spd(3), spd(2), spd(3)])
    perm = perm_of(8, 3)
    op = Permuted(base, perm)
    d = positive(8)
    extra = {"diag": Diagonal(d), "scaled": ScaledIdentity(torch.tensor(0.3, dtype=F64), 8),
             "weak": ScaledIdentity(0.3, 8)}[noise]
    total = op + extra
    assert isinstance(total, Permuted) and isinstance(total.base, BlockDiag)
    assert isinstance(extra + op, Permuted)
    assert sg.plan(total).method == "permuted" and "blockwise" in sg.plan(total).reason
    noise_ref = torch.diag(d) if noise == "diag" else 0.3 * torch.eye(8, dtype=F64)
    assert_close(total.to_dense(), permuted_dense(base.to_dense(), perm) + noise_ref)
    assert_close((total + Diagonal(d)).to_dense(), total.to_dense() + torch.diag(d))


def test_noise_on_a_low_rank_base_stays_woodbury():
    w = torch.randn(10, 2, dtype=F64)
    perm = perm_of(10, 4)
    d = positive(10)
    total = Permuted(LowRank(w), perm) + Diagonal(d)
    assert isinstance(total, Permuted) and "woodbury" in sg.plan(total).reason
    assert_close(total.to_dense(), permuted_dense(w @ w.mT, perm) + torch.diag(d))


def test_diagonal_base_is_diagonal():
    d = positive(6)
    perm = perm_of(6, 5)
    op = Permuted(Diagonal(d), perm)
    assert op.is_diagonal
    total = op + Diagonal(d)
    assert_close(total.to_dense(), torch.diag(d[perm] + d))


def test_to_dense_is_guarded():
    op = Permuted(BlockDiag(spd(2, 10)), perm_of(20))
    with sg.settings(dense_limit=100), pytest.raises(DensifyError, match="Permuted"):
        op.to_dense()


def test_pytree_and_to_keep_the_index_tensors():
    op = Permuted(BlockDiag(spd(2, 3)), perm_of(6))
    leaves, spec = pytree.tree_flatten(op)
    ints = [t for t in leaves if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    assert len(ints) >= 2 and all(t.dtype == torch.int64 for t in ints)
    again = pytree.tree_unflatten(leaves, spec)
    assert_close(again.to_dense(), op.to_dense())
    single = op.to(torch.float32)
    assert single.dtype == torch.float32 and single.perm.dtype == torch.int64
    assert_close(single.to_dense(), op.to_dense(), 1e-6, 1e-6)


def test_vmap_over_the_base_data():
    perm = perm_of(6, 6)
    mats = spd(3, 4, 2)  # 4 members, each 2 blocks of 3

    def quad(m, x):
        return (x * Permuted(BlockDiag(m), perm).solve(x)).sum()

    xs = torch.randn(4, 6, dtype=F64)
    out = torch.func.vmap(quad)(mats, xs)
    ref = torch.stack([quad(m, x) for m, x in zip(mats, xs)])
    assert_close(out, ref)


# -- indexing (structured: a dense fallback would warn, and warnings are errors here) ------------------
NO_DENSE = pytest.mark.filterwarnings("error::structgp.covariance.DenseIndexWarning")


def _indexed():
    base = BlockDiag([spd(3), spd(3), spd(2)])
    perm = torch.tensor([5, 0, 6, 1, 2, 7, 3, 4])  # rows 1, 3, 4 are the first block
    return Permuted(base, perm), permuted_dense(base.to_dense(), perm)


@NO_DENSE
def test_principal_submatrix_in_the_base_order_is_the_base_block():
    op, ref = _indexed()
    rows = torch.tensor([1, 3, 4])  # perm[rows] = [0, 1, 2]: the first block, in order
    sub = op[rows[:, None], rows[None, :]]
    assert isinstance(sub, BlockDiag) and sub.n == 3
    assert_close(sub.to_dense(), ref[rows][:, rows])
    idx = torch.tensor([4, 1, 3])  # the same rows in another order: a small Permuted of that block
    sub = op[idx[:, None], idx[None, :]]
    assert isinstance(sub, Permuted) and isinstance(sub.base, BlockDiag)
    assert_close(sub.to_dense(), ref[idx][:, idx])


@NO_DENSE
def test_principal_submatrix_of_scattered_rows():
    op, ref = _indexed()
    sub = op[2:7, 2:7]
    assert_close(sub.to_dense(), ref[2:7, 2:7])
    assert isinstance(sub, Permuted) and isinstance(sub.base, SparseLifted)  # base rows 1, 2, 3, 6, 7: lifted


@NO_DENSE
def test_submatrix_entries_and_batch_indexing():
    op, ref = _indexed()
    assert_close(op[1:4, 4:8].to_dense(), ref[1:4, 4:8])
    i, j = torch.tensor([0, 2, 5, 7]), torch.tensor([3, 2, 1, 7])
    assert_close(op[i, j], ref[i, j])
    assert_close(op[3, 1:6], ref[3, 1:6])
    batched = Permuted(BlockDiag(spd(2, 3, 2)), perm_of(4, 7))
    dense = batched.to_dense()
    assert isinstance(batched[1], Permuted)
    assert_close(batched[1].to_dense(), dense[1])
    assert_close(batched[1:, 0:2, 0:2].to_dense(), dense[1:, 0:2, 0:2])


@NO_DENSE
def test_kronecker_base_principal_keeps_kronecker():
    a, b = spd(2), spd(3)
    kron = Kronecker(a, b)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])  # swaps the two 3-row halves
    op = Permuted(kron, perm)
    sub = op[0:3, 0:3]  # rows 3..5 of the base: a range, so the Kronecker rule applies
    assert isinstance(sub, Kronecker)
    assert_close(sub.to_dense(), permuted_dense(kron.to_dense(), perm)[:3, :3])

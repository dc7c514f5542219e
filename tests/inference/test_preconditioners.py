"""Preconditioners and pivoted Cholesky against dense float64 references."""

import pytest
import torch

import structgp as sg
from structgp._config import current
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, Sum
from structgp.inference.pivoted_cholesky import column, pivoted_cholesky
from structgp.inference.preconditioners import (
    REMAINDER_TOL,
    Identity,
    Jacobi,
    LowRankDiagonal,
    build,
)
from structgp.inference.preconditioners import KroneckerEigenPreconditioner as KroneckerEigen
from tests.reference import F64, positive, spd


def rbf(x, lengthscale):
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)


def grid_kronecker(m=6, lengthscale=0.3, *batch):
    x = torch.linspace(0, 1, m, dtype=F64)
    k = rbf(x, lengthscale).expand(*batch, m, m)
    return Kronecker(k, rbf(x, 1.3 * lengthscale), rbf(x, 0.8 * lengthscale))


def dense_of(precond, n, dtype=F64):
    """(P, P^{-1}, R) of a preconditioner as dense matrices, from its products with the identity."""
    eye = torch.eye(n, dtype=dtype)
    inv = precond.solve(eye)
    root = precond.root_matmul(eye)
    return torch.linalg.inv(inv.double()), inv, root


@pytest.mark.parametrize(
    "op",
    [
        Dense(spd(7, 2, seed=0)),
        LowRank(torch.randn(2, 7, 3, dtype=F64)),
        Kronecker(spd(3, seed=1), Dense(spd(4, seed=2))),
        Dense(spd(12, seed=3)) + Diagonal(positive(12)),
        Sum(Dense(spd(6, seed=4)), LowRank(torch.randn(6, 2, dtype=F64))),
        Diagonal(positive(2, 5)),
    ],
    ids=["dense", "low_rank", "kronecker", "added_diagonal", "sum", "default_rule"],
)
def test_column_matches_dense(op):
    a = op.to_dense().expand(*op.batch_shape, op.n, op.n)
    index = torch.randint(0, op.n, op.batch_shape)
    got = column(op, index)
    ref = a.gather(-1, index[..., None, None].expand(*op.batch_shape, op.n, 1)).squeeze(-1)
    torch.testing.assert_close(got, ref)


def test_full_rank_pivoted_cholesky_reproduces_the_matrix():
    a = spd(9, 3, seed=5)
    factor, rest = pivoted_cholesky(Dense(a), 20)
    assert factor.shape == (3, 9, 9)
    torch.testing.assert_close(factor @ factor.mT, a)
    assert float(rest.abs().max()) < 1e-10


def test_partial_pivoted_cholesky_is_greedy_and_tracks_the_remainder():
    x = torch.rand(60, dtype=F64)
    a = rbf(x, 0.3) + torch.diag(torch.linspace(0, 0.5, 60, dtype=F64))
    factor, rest = pivoted_cholesky(Dense(a), 5)
    assert factor.shape == (60, 5)
    torch.testing.assert_close(rest, (a - factor @ factor.mT).diagonal())
    first = int(a.diagonal().argmax())
    torch.testing.assert_close(factor[:, 0], a[:, first] / a[first, first].sqrt())
    # a remainder of a PSD matrix by a pivoted Cholesky factor is PSD
    assert float(torch.linalg.eigvalsh(a - factor @ factor.mT).min()) > -1e-10


def test_pivoted_cholesky_stops_early_on_small_remainder():
    x = torch.linspace(0, 1, 200, dtype=F64)
    a = Dense(rbf(x, 0.3))
    factor, rest = pivoted_cholesky(a, 150, stop=torch.tensor(1e-6, dtype=F64))
    assert factor.shape[-1] < 40 and float(rest.sum()) <= 1e-6


def test_low_rank_diagonal_preconditioner():
    factor, d = torch.randn(2, 15, 4, dtype=F64), positive(2, 15)
    p = LowRankDiagonal(factor, d, "test")
    dense = factor @ factor.mT + torch.diag_embed(d)
    for b in range(2):
        sub = LowRankDiagonal(factor[b], d[b], "test")
        p_dense, inv, root = dense_of(sub, 15)
        torch.testing.assert_close(p_dense, dense[b])
        torch.testing.assert_close(inv, torch.linalg.inv(dense[b]))
        torch.testing.assert_close(root @ root.mT, dense[b])
    torch.testing.assert_close(p.logdet(), torch.linalg.slogdet(dense)[1])


def test_low_rank_plus_scaled_identity_root_is_symmetric():
    factor = torch.randn(10, 3, dtype=F64)
    p = LowRankDiagonal(factor, torch.full((10,), 0.3, dtype=F64), "test")
    root = p.root_matmul(torch.eye(10, dtype=F64))
    torch.testing.assert_close(root, root.mT)


def test_kronecker_eigen_preconditioner():
    k = grid_kronecker(4)
    mats = k.factor_matrices()
    vectors = [torch.linalg.eigh(m)[1] for m in mats]
    values = [torch.linalg.eigh(m)[0] for m in mats]
    from structgp.covariance.kron import kron_vector

    p = KroneckerEigen(vectors, kron_vector(values), torch.tensor(0.2, dtype=F64))
    ref = k.to_dense() + 0.2 * torch.eye(64, dtype=F64)
    p_dense, inv, root = dense_of(p, 64)
    torch.testing.assert_close(p_dense, ref)
    torch.testing.assert_close(root, root.mT)
    torch.testing.assert_close(root @ root, ref)
    torch.testing.assert_close(p.logdet(), torch.linalg.slogdet(ref)[1])


def test_jacobi_and_identity():
    d = positive(6)
    p_dense, inv, root = dense_of(Jacobi(d), 6)
    torch.testing.assert_close(p_dense, torch.diag(d))
    torch.testing.assert_close(Jacobi(d).logdet(), d.log().sum())
    ident = Identity(d, torch.Size())
    torch.testing.assert_close(ident.solve(d[:, None]), d[:, None])
    assert float(ident.logdet()) == 0.0


def test_auto_choice_per_structure():
    k = grid_kronecker(8, 0.5)
    noise = Diagonal(positive(512, low=0.05) * 0.1 + 0.05)
    assert build(k + noise, current()).name.startswith("deflated kronecker")
    assert isinstance(build(k + ScaledIdentity(0.1, 512), current()), KroneckerEigen)
    rough = grid_kronecker(8, lengthscale=0.02)  # flat spectrum: deflation would need most eigenpairs
    assert isinstance(build(rough + noise, current()), KroneckerEigen)
    assert build(Dense(spd(20)), current()).name == "pivoted cholesky"
    with sg.settings(precond_rank=0):
        assert isinstance(build(Dense(spd(20)), current()), Jacobi)


def test_deflated_kronecker_keeps_the_top_eigenpairs_and_the_noise():
    n = 512
    k = grid_kronecker(8, 0.5, 2)  # batched
    d = positive(2, n, low=0.05) * 0.1 + 0.05
    p = build(k + Diagonal(d), current())
    assert isinstance(p, LowRankDiagonal) and 0 < p.rank < n // 2
    p_dense, inv, root = dense_of(p, n)
    torch.testing.assert_close(root @ root.mT, p_dense)
    dense_k = k.to_dense()
    e = torch.linalg.eigvalsh(dense_k)
    gap = dense_k - (p_dense - torch.diag_embed(d))  # what the low-rank part leaves out of K
    assert float(torch.linalg.eigvalsh(gap).min()) > -1e-8
    for b in range(2):  # the left-out trace is the smallest eigenvalues' sum, within the budget
        torch.testing.assert_close(gap[b].trace(), e[b, : n - p.rank].sum(), rtol=1e-6, atol=1e-9)
        assert float(gap[b].trace()) <= REMAINDER_TOL * float(d[b].min()) * (1 + 1e-6)


def test_forced_kronecker_preconditioner_needs_kronecker():
    with sg.settings(preconditioner="kronecker_eigen"), pytest.raises(ValueError, match="Kronecker"):
        build(Dense(spd(5)), current())
    with pytest.raises(ValueError, match="preconditioner"):
        with sg.settings(preconditioner="magic"):
            pass


def test_float32_preconditioners():
    k = grid_kronecker(5).to(torch.float32)
    d = (torch.rand(125) * 0.1 + 0.05).float()
    for name in ("auto", "kronecker_eigen", "pivoted_cholesky", "jacobi"):
        with sg.settings(preconditioner=name):
            p = build(k + Diagonal(d), current())
        r = torch.randn(125, 2)
        assert p.solve(r).dtype == torch.float32 and p.root_matmul(r).dtype == torch.float32
        assert torch.isfinite(p.logdet()).all()


def test_pivoted_cholesky_leaves_a_float64_operator_untouched():
    """The remainder diagonal is updated in place: it must be a copy of the operator's diagonal."""
    a = spd(12, 2, seed=8)
    keep = a.clone()
    factor, rest = pivoted_cholesky(Dense(a), 5)
    assert torch.equal(a, keep)
    torch.testing.assert_close(rest, (a - factor @ factor.mT).diagonal(dim1=-2, dim2=-1))
    assert factor.shape == (2, 12, 5) and rest.dtype == F64


def test_top_eigenvectors_scale_is_applied_per_column():
    from structgp.covariance.kron import kron_dense
    from structgp.inference.kronecker_spectrum import eigenvector_columns as _top_eigenvectors

    mats = grid_kronecker(4, 0.3, 2).factor_matrices()
    vectors = [torch.linalg.eigh(m)[1] for m in mats]
    index = torch.tensor([[0, 5, 17, 63], [3, 2, 1, 40]])
    scale = torch.rand(2, 4, dtype=F64) + 0.5
    dense = kron_dense(vectors)
    ref = dense.gather(-1, index.unsqueeze(-2).expand(2, 64, 4))
    torch.testing.assert_close(_top_eigenvectors(vectors, index), ref)
    torch.testing.assert_close(_top_eigenvectors(vectors, index, scale), ref * scale.unsqueeze(-2))


def test_low_rank_diagonal_float32_with_a_wide_spectrum():
    """``s`` spread over 10 decades (noise 1e-2, factor singular values 1e-2 .. 1e2): in float32, ``P^{-1}``
    and the root stay consistent with the float64 ``P`` to float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    n, k = 300, 40
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=gen))
    factor = q * torch.logspace(-2, 2, k, dtype=F64)
    d = 0.01 + 0.01 * torch.rand(n, dtype=F64, generator=gen)
    p64 = factor @ factor.mT + torch.diag(d)
    p = LowRankDiagonal(factor.float(), d.float(), "test")
    r = torch.randn(n, 5, dtype=F64, generator=gen)
    ref = torch.linalg.solve(p64, r)
    got = p.solve(r.float()).double()
    p_norm = lambda e: (e * (p64 @ e)).sum().sqrt()  # noqa: E731
    assert float(p_norm(got - ref) / p_norm(ref)) < 1e-4
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    root = p.root_matmul(torch.eye(n)).double()
    assert float((root @ root.mT - p64).norm() / p64.norm()) < 1e-5
    torch.testing.assert_close(p.logdet().double(), torch.linalg.slogdet(p64)[1], rtol=1e-5, atol=1e-3)


def test_pivoted_cholesky_never_overshoots_the_diagonal_on_float32_rounding_noise():
    """A float32 RBF matrix is indefinite at its rounding level; run to full rank, the factor must not explain
    more than the diagonal holds (|l_ij| <= sqrt(d_i), which holds exactly for a PSD remainder)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(600, 2, generator=gen)
    k = torch.exp(-0.5 * torch.cdist(x, x).square() / 0.3**2)  # float32, numerically rank-deficient
    factor, d = pivoted_cholesky(Dense((k + k.mT) / 2), 600)
    explained = factor.square().sum(-1)  # diag(L L^T), float64
    assert bool((explained <= k.diagonal().double() + 1e-9).all())
    torch.testing.assert_close(explained + d, k.diagonal().double(), rtol=0, atol=1e-9)

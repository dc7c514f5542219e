import pytest
import torch

from structgp.covariance import Dense, Diagonal, Kronecker
from structgp.inference.cholesky import NotPositiveDefiniteError
from structgp.inference.spectral_root import cholesky_root, exact_root, spectral_root
from tests.reference import F64, assert_close, spd


def rbf(n: int, lengthscale: float, *batch: int) -> torch.Tensor:
    """An RBF Gram matrix on ``n`` points of [0, 1]: singular in float64 for long lengthscales."""
    x = torch.linspace(0, 1, n, dtype=F64)
    k = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)
    return k.expand(*batch, n, n).clone()


def test_reproduces_a_singular_kronecker_product_with_fewer_columns():
    k1, k2 = rbf(40, 0.5), rbf(30, 0.3)
    op = Kronecker(k1, k2)
    assert cholesky_root(op.factor_matrices()) is None  # Cholesky would need jitter
    r = spectral_root(op)
    assert r.shape[-2] == 1200 and r.shape[-1] < 400  # numerical rank, not n
    dense = r.to_dense()
    assert_close(dense @ dense.mT, op.to_dense(), rtol=0, atol=1e-13)


def test_dense_and_batched_factors():
    k = rbf(25, 0.4, 3)
    k[1] = spd(25)  # one well-conditioned member: the column count is the largest over the batch
    r = spectral_root(Dense(k))
    assert r.shape == (3, 25, 25)
    dense = r.to_dense()
    assert_close(dense @ dense.mT, k, rtol=0, atol=1e-12)


def test_exact_root_prefers_a_differentiable_cholesky():
    k = spd(6).requires_grad_()
    r, differentiable = exact_root(Kronecker(k, spd(3)))
    assert differentiable and r.factors[0].requires_grad
    r, differentiable = exact_root(Kronecker(rbf(30, 0.5), spd(3)))
    assert not differentiable and not r.factors[0].requires_grad
    assert exact_root(Diagonal(torch.ones(4, dtype=F64))) is None


def test_not_psd_names_the_factor():
    bad = spd(4)
    bad[0, 0] = -5.0
    with pytest.raises(NotPositiveDefiniteError, match="Kronecker factor 1"):
        spectral_root(Kronecker(rbf(20, 0.5), bad))
    with pytest.raises(NotPositiveDefiniteError, match="the Dense matrix"):
        spectral_root(Dense(bad))


def test_rejects_other_operators():
    with pytest.raises(TypeError, match="Kronecker or Dense"):
        spectral_root(Diagonal(torch.ones(3, dtype=F64)))

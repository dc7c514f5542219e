import warnings

import pytest
import torch

from structgp.covariance import Dense, Diagonal, Kronecker
from structgp.inference.cholesky import JitterWarning, NotPositiveDefiniteError
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
    assert exact_root(Kronecker(rbf(20, 0.5), bad)) is None  # the caller's jittered Cholesky decides


def test_rounding_level_indefiniteness_falls_back_to_jittered_cholesky():
    k = rbf(40, 0.3).float().double()  # float32 rounding: eigenvalues down to -1e-7 in a float64 matrix
    with pytest.warns(JitterWarning):
        r = Kronecker(k, k).root()
    assert r.shape == (1600, 1600)


def test_rejects_other_operators():
    with pytest.raises(TypeError, match="Kronecker or Dense"):
        spectral_root(Diagonal(torch.ones(3, dtype=F64)))


def test_kronecker_root_without_gradients_is_spectral_and_unjittered():
    """Sampling a smooth grid prior needs no jitter: ``root`` (no grad) is the exact spectral root."""
    k = rbf(40, 0.3)
    op = Kronecker(k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no JitterWarning
        r = op.root()
    assert r.shape == (1600, r.shape[-1]) and r.shape[-1] < 1600
    dense = r.to_dense()
    assert_close(dense @ dense.mT, op.to_dense(), rtol=0, atol=1e-13)
    f32 = Kronecker(k.float(), k.float()).root()  # float32 data: a float32 root of the same product
    assert f32.factors[0].dtype == torch.float32
    assert_close((f32.to_dense() @ f32.to_dense().mT).double(), op.to_dense(), rtol=0, atol=1e-5)


def test_kronecker_root_with_gradients_keeps_the_differentiable_cholesky():
    k = rbf(40, 0.3).requires_grad_()
    with pytest.warns(JitterWarning):
        r = Kronecker(k, spd(3)).root()
    assert r.shape == (120, 120) and r.factors[0].requires_grad

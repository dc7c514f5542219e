import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, ScaledIdentity
from tests.reference import F64, check_against_dense, dense_inv_quad_logdet, positive, spd


def kron(*mats):
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def rbf(x, lengthscale):
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale.square())


def test_data_against_torch_kron():
    a, b, c = spd(2), spd(3), spd(4)
    op = Kronecker(a, b, c)
    torch.testing.assert_close(op.to_dense(), kron(a, b, c))
    torch.testing.assert_close(op.diagonal(), kron(a, b, c).diagonal())
    x = torch.randn(24, 5, dtype=F64)
    torch.testing.assert_close(op @ x, kron(a, b, c) @ x)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), batch=st.sampled_from([(), (2,)]))
def test_kron_plus_scaled_identity(sizes, batch):
    factors = [spd(n, *batch) for n in sizes]
    op = Kronecker(*factors) + ScaledIdentity(positive(), math.prod(sizes))
    assert sg.plan(op).method in ("eigen", "cholesky")  # tiny products are cheaper densely
    with sg.settings(method="eigen"):
        check_against_dense(op, rtol=1e-7, atol=1e-7)


def test_auto_picks_eigen_for_grids():
    op = Kronecker(spd(8), spd(8), spd(8)) + ScaledIdentity(0.1, 512)
    assert sg.plan(op).method == "eigen"
    noise = Kronecker(*(Diagonal(positive(8)) for _ in range(3)))
    op = Kronecker(spd(8), spd(8), spd(8)) + noise
    assert sg.plan(op).method == "eigen"


def test_broadcast_factor_batches_and_operator_factors():
    op = Kronecker(spd(3, 2, 1), Dense(spd(2, 3)), Diagonal(positive(2))) + ScaledIdentity(positive(2, 3), 12)
    assert op.batch_shape == (2, 3)
    check_against_dense(op)


def test_kron_plus_kronecker_diagonal_noise_is_exact():
    a, b = spd(4), spd(3)
    d1, d2 = positive(4), positive(3)
    op = Kronecker(a, b) + Kronecker(Diagonal(d1), Diagonal(d2))
    with sg.settings(method="eigen"):
        assert "symmetrised" in sg.plan(op).reason
        check_against_dense(op)


def test_kron_plus_general_diagonal_falls_back_to_exact_dense():
    op = Kronecker(spd(3), spd(4)) + Diagonal(positive(12))
    assert sg.plan(op).method == "cholesky"
    check_against_dense(op)


def test_gradcheck_eigen_paths():
    ins = [spd(3).requires_grad_(), spd(2).requires_grad_(), positive().requires_grad_(),
           torch.randn(6, dtype=F64, requires_grad=True)]

    def f(a, b, s, y):
        op = Kronecker(a, b) + ScaledIdentity(s, 6)
        q, l = op.inv_quad_logdet(y)
        return q, l, op.solve(y), op.solve(y.expand(2, 6).mT)

    assert torch.autograd.gradcheck(f, ins)

    ins2 = [spd(3).requires_grad_(), spd(2).requires_grad_(), positive(3).requires_grad_(),
            positive(2).requires_grad_(), torch.randn(6, dtype=F64, requires_grad=True)]

    def g(a, b, d1, d2, y):
        op = Kronecker(a, b) + Kronecker(Diagonal(d1), Diagonal(d2))
        q, l = op.inv_quad_logdet(y)
        return q, l, op.solve(y)

    assert torch.autograd.gradcheck(g, ins2)


def test_gradients_match_dense_autograd_batched():
    a, b = spd(3, 2).requires_grad_(), spd(4).requires_grad_()
    s = positive(2).requires_grad_()
    y = torch.randn(2, 12, dtype=F64)
    q, l = (Kronecker(a, b) + ScaledIdentity(s, 12)).inv_quad_logdet(y)
    grads = torch.autograd.grad((q + l).sum(), (a, b, s))
    dense = torch.stack([kron(a[i], b) for i in range(2)]) + s[:, None, None] * torch.eye(12, dtype=F64)
    rq, rl = dense_inv_quad_logdet(dense, y)
    ref = torch.autograd.grad((rq + rl).sum(), (a, b, s))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_lengthscale_grid_rbf_has_finite_gradients(dtype):
    x = torch.linspace(0, 1, 12, dtype=dtype)
    lengthscale = torch.tensor(10.0, dtype=dtype, requires_grad=True)  # 10x the grid span
    noise = torch.tensor(1e-3, dtype=dtype, requires_grad=True)
    k = rbf(x, lengthscale)
    op = Kronecker(k, k, k) + ScaledIdentity(noise, 12**3)
    y = torch.randn(12**3, dtype=dtype)
    q, l = op.inv_quad_logdet(y)
    gl, gn = torch.autograd.grad(q + l, (lengthscale, noise), retain_graph=True)
    assert torch.isfinite(gl) and torch.isfinite(gn)
    if dtype == torch.float64:  # eigh's own backward would give inf/nan here; ours matches a dense solve
        dense = kron(k, k, k) + noise * torch.eye(12**3, dtype=dtype)
        rq, rl = dense_inv_quad_logdet(dense, y)
        rgl, rgn = torch.autograd.grad(rq + rl, (lengthscale, noise))
        torch.testing.assert_close(gl, rgl, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gn, rgn, rtol=1e-6, atol=0)


def test_float32_matches_float64():
    a, b = spd(16), spd(16)
    y = torch.randn(256, dtype=F64)
    q64, l64 = (Kronecker(a, b) + ScaledIdentity(0.1, 256)).inv_quad_logdet(y)
    s32 = torch.tensor(0.1)
    q32, l32 = (Kronecker(a.float(), b.float()) + ScaledIdentity(s32, 256)).inv_quad_logdet(y.float())
    torch.testing.assert_close(q32.double(), q64, rtol=1e-5, atol=0)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=0)


def test_eigendecomposition_is_cached_and_invalidated():
    a = spd(3)
    op = Kronecker(a, spd(2))
    noisy = op + ScaledIdentity(0.1, 6)
    with sg.settings(method="eigen"):
        _check_cache(op, noisy, a)


def _check_cache(op, noisy, a):
    noisy.logdet()
    first = op._cache["eigh"][1]
    noisy.solve(torch.randn(6, dtype=F64))
    assert op._cache["eigh"][1] is first
    with torch.no_grad():
        a.mul_(2)
    ref = torch.linalg.slogdet(noisy.to_dense())[1]
    torch.testing.assert_close(noisy.logdet(), ref)


def test_bad_factors():
    with pytest.raises(ValueError, match=r"factors\[1\].*square"):
        Kronecker(spd(2), torch.randn(2, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"factors\[1\]: expected dtype"):
        Kronecker(spd(2), spd(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="batch shapes do not broadcast"):
        Kronecker(spd(2, 2), spd(2, 3))


def test_non_psd_factor_is_named():
    bad = spd(3) - 5 * torch.eye(3, dtype=F64)
    op = Kronecker(spd(4), bad) + ScaledIdentity(0.1, 12)
    with sg.settings(method="eigen"), pytest.raises(ValueError, match="Kronecker factor 1 is not positive"):
        op.logdet()


def test_second_derivatives_of_the_eigen_path_raise_instead_of_being_wrong():
    a = spd(3).requires_grad_()
    s = positive().requires_grad_()
    op = Kronecker(a, spd(2)) + ScaledIdentity(s, 6)
    with sg.settings(method="eigen"):
        q, l = op.inv_quad_logdet(torch.randn(6, dtype=F64))
    with pytest.raises(RuntimeError, match="create_graph=True.*method='cholesky'"):
        torch.autograd.grad(q + l, s, create_graph=True)

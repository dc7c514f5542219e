"""Accuracy of the "cg" engine at its default settings (issue 14): the Gaussian log-likelihood within 1e-5
relative and every hyperparameter gradient within 1% of a float64 dense Cholesky reference (autograd through
``torch.linalg.cholesky`` of the dense covariance written here), for each of three seeds; a vector
hyperparameter (heteroskedastic noise variances) within 1% in norm.

Dense RBF on 2-d inputs (N = 1500 here for CI's time, noise 0.01, float64 and float32), Kronecker +
heteroskedastic Diagonal, SparseLifted + heteroskedastic Diagonal. The N = 3000 case is
``test_iterative.py::test_bar_dense_rbf_3000``; N = 2500 and 8000 are in
``benchmarks/bench_gradient_accuracy.py``."""

import math

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, ScaledIdentity, SparseLifted
from tests.reference import F64

SEEDS = (0, 1, 2)
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-2


def rbf(x, ell):
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / ell**2)


def kron_dense(mats):
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def gaussian_ll(inv_quad, logdet, n):
    return -0.5 * (inv_quad + logdet + n * math.log(2 * math.pi))


def reference(dense_cov, y, params):
    """Value and gradient of the log-likelihood by a float64 dense Cholesky."""
    leaves = [p.detach().double().requires_grad_() for p in params]
    chol = torch.linalg.cholesky(dense_cov(*leaves))
    inv_quad = torch.cholesky_solve(y[:, None], chol).squeeze(-1).dot(y)
    value = gaussian_ll(inv_quad, 2 * chol.diagonal().log().sum(), y.shape[0])
    return value.detach(), [g.detach() for g in torch.autograd.grad(value, leaves)]


def check(make_op, dense_cov, y, params, dtype=F64, name=""):
    ref_v, ref_g = reference(dense_cov, y, params)
    for seed in SEEDS:
        leaves = [p.detach().to(dtype).requires_grad_() for p in params]
        with sg.settings(method="cg", seed=seed):
            value = gaussian_ll(*make_op(*leaves).inv_quad_logdet(y.to(dtype)), y.shape[0])
        grads = torch.autograd.grad(value, leaves)
        rel_v = float((value.detach().double() - ref_v).abs() / ref_v.abs())
        # a vector hyperparameter (heteroskedastic noise) by the norm of its gradient's error: entries of its
        # gradient cross zero, where an entrywise relative error means nothing
        rel_g = [float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, ref_g)]
        print(f"{name} seed {seed}: value {rel_v:.1e}, gradients {[f'{e:.1e}' for e in rel_g]}; {sg.last_report()}")
        assert rel_v < VALUE_RTOL, (seed, rel_v)
        assert max(rel_g) < GRAD_RTOL, (seed, rel_g)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dense_rbf(dtype):
    n = 1500
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, dtype=F64, generator=gen)
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    with torch.no_grad():  # data from lengthscale 0.15; the likelihood is evaluated at 0.2
        y = torch.linalg.cholesky(torch.exp(-0.5 * sq / 0.15**2) + 0.01 * torch.eye(n, dtype=F64))
        y = y @ torch.randn(n, dtype=F64, generator=gen)
    sq_d = sq.to(dtype)

    def make_op(ell, noise):
        return Dense(torch.exp(-0.5 * sq_d / ell**2)) + ScaledIdentity(noise, n)

    def dense_cov(ell, noise):
        return torch.exp(-0.5 * sq / ell**2) + noise * torch.eye(n, dtype=F64)

    params = [torch.tensor(0.2, dtype=F64), torch.tensor(0.01, dtype=F64)]
    check(make_op, dense_cov, y, params, dtype, f"dense RBF {n} {dtype}")


def test_kronecker_heteroskedastic():
    """Kronecker 10^3 RBF + Diagonal noise in [0.05, 0.15]: three lengthscales and every noise variance."""
    m = 10
    gen = torch.Generator().manual_seed(1)
    g = torch.linspace(0, 1, m, dtype=F64)
    d = 0.05 + 0.1 * torch.rand(m**3, dtype=F64, generator=gen)
    y = torch.randn(m**3, dtype=F64, generator=gen)

    def make_op(l1, l2, l3, d):
        return Kronecker(rbf(g, l1), rbf(g, l2), rbf(g, l3)) + Diagonal(d)

    def dense_cov(l1, l2, l3, d):
        return kron_dense([rbf(g, l1), rbf(g, l2), rbf(g, l3)]) + torch.diag(d)

    params = [torch.tensor(v, dtype=F64) for v in (0.25, 0.3, 0.225)] + [d]
    check(make_op, dense_cov, y, params, name=f"kronecker {m}^3")


def test_sparse_lifted_heteroskedastic():
    """SparseLifted (8 nonzeros a row onto a 12^3 latent Kronecker grid, 1000 outputs) + Diagonal noise
    around 0.01: three lengthscales and every noise variance."""
    m, n_out, nnz = 12, 1000, 8
    gen = torch.Generator().manual_seed(2)
    n_in = m**3
    g = torch.linspace(0, 1, m, dtype=F64)
    cols = torch.randint(0, n_in, (n_out, nnz), generator=gen)
    vals = torch.rand(n_out, nnz, dtype=F64, generator=gen) / nnz
    rows = torch.arange(n_out).repeat_interleave(nnz)
    lift = torch.sparse_coo_tensor(torch.stack([rows, cols.reshape(-1)]), vals.reshape(-1), (n_out, n_in))
    lift = lift.coalesce()
    lift_dense = lift.to_dense()
    d = 0.005 + 0.01 * torch.rand(n_out, dtype=F64, generator=gen)
    y = torch.randn(n_out, dtype=F64, generator=gen)

    def make_op(l1, l2, l3, d):
        return SparseLifted(lift, Kronecker(rbf(g, l1), rbf(g, l2), rbf(g, l3))) + Diagonal(d)

    def dense_cov(l1, l2, l3, d):
        return lift_dense @ kron_dense([rbf(g, l1), rbf(g, l2), rbf(g, l3)]) @ lift_dense.mT + torch.diag(d)

    params = [torch.tensor(v, dtype=F64) for v in (0.25, 0.3, 0.225)] + [d]
    check(make_op, dense_cov, y, params, name="sparse lifted 12^3")

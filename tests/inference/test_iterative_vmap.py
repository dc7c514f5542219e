"""The "cg" engine under ``torch.func.vmap``: fixed-count masked PCG equals a Python loop over the members
(values and ``torch.func.grad``), the exact solution is reached, and what cannot run is refused clearly."""

import functools
import warnings

import pytest
import torch
from torch.func import grad, vmap

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank
from tests.reference import F64, dense_inv_quad_logdet, positive

N = 100


def rbf(lengthscale: torch.Tensor, n: int = N) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    k = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)
    return k + 0.1 * torch.eye(n, dtype=F64)


def cg(**kw):
    # precond_rank 20 < n: at full rank the pivoted Cholesky's noise columns make P^{-1} accurate only to
    # ~1e-7 (Woodbury with a tiny diagonal), so rounding differences (batched vs one by one, with or without
    # vmap alike) move the SLQ logdet by ~2e-8 relative
    return sg.settings(method="cg", cg_tol=1e-12, max_iter=N, num_probes=8, precond_rank=20, **kw)


def loop(f, *args):
    outs = [f(*(a[i] for a in args)) for i in range(args[0].shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def close(actual, expected, rtol=1e-8):
    if isinstance(actual, tuple):
        for a, e in zip(actual, expected):
            close(a, e, rtol)
        return
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


LS = torch.tensor([0.08, 0.15, 0.3, 0.6], dtype=F64)


def test_dense_rbf_inv_quad_logdet_and_solve_equal_a_loop():
    y = torch.randn(4, N, dtype=F64, generator=torch.Generator().manual_seed(0))

    def f(ls, y):
        with cg():
            op = Dense(rbf(ls))
            inv_quad, logdet = op.inv_quad_logdet(y)
            return inv_quad, logdet, op.logdet(), op.solve(y)

    got, ref = vmap(f)(LS, y), loop(f, LS, y)
    close(got, ref)
    # the solve and inverse quadratic form are exact to cg_tol (the logdet is a seeded SLQ estimate)
    exact = [dense_inv_quad_logdet(rbf(ls), v) for ls, v in zip(LS, y)]
    close(got[0], torch.stack([e[0] for e in exact]), rtol=1e-9)
    close(got[3], torch.stack([torch.linalg.solve(rbf(ls), v) for ls, v in zip(LS, y)]), rtol=1e-9)


def test_unbatched_rhs_and_multiple_columns():
    y = torch.randn(N, 3, dtype=F64, generator=torch.Generator().manual_seed(1))

    def f(ls):
        with cg():
            return Dense(rbf(ls)).solve(y)

    close(vmap(f)(LS), torch.stack([f(ls) for ls in LS]))


def test_grad_inside_vmap_equals_a_loop():
    y = torch.randn(4, N, dtype=F64, generator=torch.Generator().manual_seed(2))

    def nll(ls, y):
        with cg():
            op = Dense(rbf(ls))
            inv_quad, logdet = op.inv_quad_logdet(y)
            return inv_quad + logdet + op.solve(y).square().sum()

    close(vmap(grad(nll))(LS, y), loop(grad(nll), LS, y))


def test_low_rank_plus_diagonal_forced_to_cg_equals_a_loop():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, N, 5, dtype=F64, generator=g)
    d = positive(4, N)
    y = torch.randn(4, N, dtype=F64, generator=g)

    def f(w, d, y):
        with cg():
            op = LowRank(w) + Diagonal(d)
            return (*op.inv_quad_logdet(y), op.solve(y))

    got = vmap(f)(w, d, y)
    close(got, loop(f, w, d, y))
    exact = [dense_inv_quad_logdet(w[i] @ w[i].mT + torch.diag(d[i]), y[i]) for i in range(4)]
    close(got[0], torch.stack([e[0] for e in exact]), rtol=1e-9)
    # rank 5 < precond_rank: P = A, so the SLQ logdet is exact too
    close(got[1], torch.stack([e[1] for e in exact]), rtol=1e-9)

    def loss(w, d, y):
        inv_quad, logdet, x = f(w, d, y)
        return inv_quad + logdet + x.sum()

    close(vmap(grad(loss, argnums=(0, 1)))(w, d, y), loop(grad(loss, argnums=(0, 1)), w, d, y))


def test_masked_iterations_run_to_max_iter_without_warning():
    """Under vmap no residual is read: a max_iter too small gives an inaccurate solve and no warning."""
    y = torch.randn(4, N, dtype=F64, generator=torch.Generator().manual_seed(4))

    def f(ls, y):
        with sg.settings(method="cg", cg_tol=1e-12, max_iter=2, preconditioner="none"):
            return Dense(rbf(ls)).solve(y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(f)(LS, y)
    exact = torch.stack([torch.linalg.solve(rbf(ls), v) for ls, v in zip(LS, y)])
    assert (got - exact).norm() > 1e-3 * exact.norm()
    with pytest.warns(sg.inference.CGConvergenceWarning):
        close(got, loop(f, LS, y))


def test_kronecker_deflation_is_refused_with_a_clear_message():
    """The deflation rank is chosen from the eigenvalues (a host read); a fixed preconditioner runs."""

    def f(ls, d, preconditioner="auto"):
        with sg.settings(method="cg", cg_tol=1e-12, max_iter=36, preconditioner=preconditioner):
            return (Kronecker(rbf(ls, 6), rbf(ls, 6)) + Diagonal(d)).logdet()

    d = positive(4, 36)
    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap"):
        vmap(f)(LS, d)
    fixed = functools.partial(f, preconditioner="kronecker_eigen")
    close(vmap(fixed)(LS, d), loop(fixed, LS, d))

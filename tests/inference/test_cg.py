"""Batched preconditioned CG and its Lanczos tridiagonals against dense float64 references."""

import pytest
import torch

from structgp.inference.cg import CGConvergenceWarning, _next_check, pcg
from structgp.inference.slq import lanczos_quadrature
from tests.reference import F64, spd


def _sym_fun(a, fn):
    e, v = torch.linalg.eigh(a)
    return (v * fn(e).unsqueeze(-2)) @ v.mT


def test_solves_batched_columns_to_tolerance():
    a = spd(30, 3, seed=0)  # (3, 30, 30)
    b = torch.randn(3, 30, 4, dtype=F64)
    res = pcg(lambda v: a @ v, b, tol=1e-10, max_iter=200)
    ref = torch.linalg.solve(a, b)
    torch.testing.assert_close(res.solution, ref, rtol=1e-8, atol=1e-8)
    assert res.converged and not res.breakdown
    assert res.iterations.shape == (3, 4) and bool((res.iterations <= 30 + 5).all())
    true_resid = (b - a @ res.solution).norm(dim=-2) / b.norm(dim=-2)
    assert bool((true_resid <= 1e-9).all())
    assert bool((res.residual <= 1e-10).all())


def test_columns_stop_independently():
    # column 0 lies in a 2-dimensional eigenspace: CG needs 2 iterations; column 1 needs many
    e = torch.linspace(1, 100, 40, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=F64))
    a = (q * e) @ q.T
    b = torch.stack([q[:, 0] + q[:, 5], torch.randn(40, dtype=F64)], dim=-1)
    res = pcg(lambda v: a @ v, b, tol=1e-10, max_iter=200)
    assert int(res.iterations[0]) == 2 and int(res.iterations[1]) > 10
    torch.testing.assert_close(res.solution, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


def test_preconditioned_solve_and_zero_column():
    a = spd(25, seed=1)
    d = a.diagonal()
    b = torch.randn(25, 3, dtype=F64)
    b[:, 1] = 0
    res = pcg(lambda v: a @ v, b, lambda r: r / d.unsqueeze(-1), tol=1e-11, max_iter=100)
    torch.testing.assert_close(res.solution, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    assert int(res.iterations[1]) == 0 and float(res.rz0[1]) == 0.0
    torch.testing.assert_close(res.rz0, (b * (b / d.unsqueeze(-1))).sum(0))


def test_float32():
    a = spd(20, seed=2, dtype=torch.float32)
    b = torch.randn(20, 2)
    res = pcg(lambda v: a @ v, b, tol=1e-5, max_iter=100)
    assert res.solution.dtype == torch.float32
    ref = torch.linalg.solve(a.double(), b.double())
    torch.testing.assert_close(res.solution.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_tridiagonal_is_the_lanczos_matrix(preconditioned):
    """After n iterations Gauss quadrature is exact: rz0 e1^T f(T) e1 = b^T P^{-1/2} f(M) P^{-1/2} b."""
    n = 12
    a = spd(n, seed=3, shift=1.0)
    p_diag = torch.rand(n, dtype=F64) + 0.5 if preconditioned else torch.ones(n, dtype=F64)
    b = torch.randn(n, 2, dtype=F64)
    res = pcg(lambda v: a @ v, b, lambda r: r / p_diag.unsqueeze(-1), tol=1e-14, max_iter=n)
    diag, off = res.tridiagonal()
    for fn in (torch.log, torch.exp, torch.reciprocal):
        quad = res.rz0 * lanczos_quadrature(diag, off, fn)
        w = b / p_diag.sqrt().unsqueeze(-1)
        m = a / (p_diag.sqrt().unsqueeze(-1) * p_diag.sqrt())
        ref = (w * (_sym_fun(m, fn) @ w)).sum(0)
        torch.testing.assert_close(quad, ref, rtol=1e-7, atol=1e-9)


def test_tridiagonal_padding_of_short_columns():
    """A column that stopped early is padded by a decoupled identity block: quadratures are unchanged."""
    e = torch.linspace(1, 10, 30, dtype=F64)
    a = torch.diag(e)
    b = torch.zeros(30, 2, dtype=F64)
    b[:3, 0] = 1.0  # 3 distinct eigenvalues: exact after 3 steps
    b[:, 1] = 1.0
    res = pcg(lambda v: a @ v, b, tol=1e-12, max_iter=30)
    diag, off = res.tridiagonal()
    assert int(res.iterations[0]) == 3 and diag.shape[-1] > 3
    assert bool((diag[0, 3:] == 1).all()) and bool((off[0, 2:] == 0).all())
    quad = res.rz0[0] * lanczos_quadrature(diag[0], off[0], torch.log)
    torch.testing.assert_close(quad, e[:3].log().sum())


def test_nonconvergence_warns_with_the_residual():
    a = spd(50, seed=4, shift=1e-3)
    b = torch.randn(50, 1, dtype=F64)
    with pytest.warns(CGConvergenceWarning, match=r"did not converge in 3 iterations: relative residual \d"):
        res = pcg(lambda v: a @ v, b, tol=1e-12, max_iter=3)
    assert not res.converged and float(res.residual.max()) > 1e-12


def test_indefinite_operator_warns():
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    b = torch.ones(3, 1, dtype=F64)
    with pytest.warns(CGConvergenceWarning, match="not positive definite"):
        res = pcg(lambda v: a @ v, b, tol=1e-10, max_iter=10)
    assert res.breakdown


def test_host_looks_at_convergence_rarely():
    checks, j = [], 0
    while j < 200:
        checks.append(j)
        j = _next_check(j, 10)
    assert checks[:6] == [0, 1, 2, 3, 4, 6]
    assert len(checks) <= 28 and all(b - a <= 10 for a, b in zip(checks, checks[1:]))


def test_calls_only_the_product_and_runs_without_autograd():
    a = spd(10, seed=5).requires_grad_()
    calls = []

    def matmul(v):
        calls.append(v.shape)
        return a @ v

    res = pcg(matmul, torch.randn(10, 2, dtype=F64), tol=1e-8, max_iter=50)
    assert not res.solution.requires_grad
    assert all(s == (10, 2) for s in calls)


def test_returns_the_preconditioned_rhs_and_skips_the_last_preconditioner_application():
    """``preconditioned_rhs`` is ``P^{-1} b`` (the caller need not apply ``P^{-1}`` again), and PCG applies the
    preconditioner once per step taken: the application after the last step (to a residual no column uses)
    is skipped, when every column converged and when ``max_iter`` ends the run."""
    a = spd(30, seed=6)
    d = a.diagonal() * (1 + torch.rand(30, dtype=F64))  # a preconditioner that is not exact
    b = torch.randn(30, 3, dtype=F64)
    calls = []

    def precondition(r):
        calls.append(r.shape)
        return r / d.unsqueeze(-1)

    res = pcg(lambda v: a @ v, b, precondition, tol=1e-10, max_iter=200)
    torch.testing.assert_close(res.preconditioned_rhs, b / d.unsqueeze(-1), rtol=0, atol=0)
    steps = res.alphas.shape[-1]  # loop steps: the host looks every few, so possibly past the last column's
    assert res.converged and int(res.iterations.max()) <= steps and len(calls) == steps
    calls.clear()
    with pytest.warns(CGConvergenceWarning):
        short = pcg(lambda v: a @ v, b, precondition, tol=1e-14, max_iter=4)
    assert len(calls) == 4 and short.alphas.shape[-1] == 4
    # the first steps are those of the longer run, and the quadrature of the short tridiagonal is that of
    # the longer run's leading 4 x 4 block (the skipped application's beta enters no tridiagonal)
    torch.testing.assert_close(short.alphas, res.alphas[..., :4], rtol=0, atol=0)
    diag, off = short.tridiagonal()
    long_diag, long_off = res.tridiagonal()
    torch.testing.assert_close(diag, long_diag[..., :4], rtol=0, atol=0)
    torch.testing.assert_close(off, long_off[..., :3], rtol=0, atol=0)


def test_identity_preconditioner_rhs_is_not_overwritten():
    """Without a preconditioner ``P^{-1} b`` is ``b`` itself: the in-place residual updates must not reach it."""
    a = spd(20, seed=7)
    b = torch.randn(20, 2, dtype=F64)
    keep = b.clone()
    res = pcg(lambda v: a @ v, b, tol=1e-10, max_iter=100)
    assert torch.equal(b, keep) and torch.equal(res.preconditioned_rhs, keep)
    torch.testing.assert_close(res.solution, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func.jvp's first call scripts helpers
def test_host_readable_lets_grad_through_but_not_vmap():
    from torch.func import grad, jvp, vmap

    from structgp.inference.cg import host_readable

    seen = []

    def probe(x):
        seen.append(host_readable(x.detach()))
        return x.square().sum()

    x = torch.randn(3, dtype=F64)
    probe(x)
    grad(probe)(x)
    jvp(probe, (x,), (x,))
    assert seen == [True, True, True]
    seen.clear()
    vmap(probe)(torch.randn(2, 3, dtype=F64))
    vmap(grad(probe))(torch.randn(2, 3, dtype=F64))
    grad(lambda x: vmap(probe)(x).sum())(torch.randn(2, 3, dtype=F64))
    assert seen == [False, False, False]
    assert not host_readable(torch.empty(3, device="meta"))


def test_stops_early_under_torch_func_grad():
    """Under ``torch.func.grad`` the host may read the residual: PCG stops where it does outside (not after
    ``max_iter`` masked iterations) and warns when it does not converge."""
    from torch.func import grad

    a = spd(40, seed=8)
    b = torch.randn(40, 1, dtype=F64)
    outside = pcg(lambda v: a @ v, b, tol=1e-10, max_iter=500)
    inside = []

    def f(scale):
        res = pcg(lambda v: (scale * a) @ v, b, tol=1e-10, max_iter=500)
        inside.append(res)
        return scale * res.solution.sum()

    grad(f)(torch.tensor(1.0, dtype=F64))
    assert inside[0].alphas.shape[-1] == outside.alphas.shape[-1] < 100
    with pytest.warns(CGConvergenceWarning, match="did not converge in 3 iterations"):
        grad(lambda s: s * pcg(lambda v: (s * a) @ v, b, tol=1e-14, max_iter=3).solution.sum())(
            torch.tensor(1.0, dtype=F64)
        )

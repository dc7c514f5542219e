"""A grid with missing cells (a selection lift of a Kronecker product + diagonal noise): the projected
Kronecker deflation preconditioner and the ``masked_grid`` engine against float64 dense references."""

import pytest
import torch

import structgp as sg
from structgp._config import current
from structgp.covariance import Diagonal, Kronecker, ScaledIdentity, SparseLifted
from structgp.inference.masked_kronecker_preconditioner import (
    MaskedKroneckerDeflation,
    is_masked_grid,
    masked_preconditioner,
)
from structgp.inference.preconditioners import build
from tests.memory_guard import LargestOutput
from tests.reference import F64

LOG_2PI = 1.8378770664093453


def grid_kernel(m: int, ls, dtype=F64) -> torch.Tensor:
    g = torch.linspace(0, 1, m, dtype=dtype)
    return torch.exp(-0.5 * (g[:, None] - g[None, :]).square() / ls**2)


def selection(sizes: tuple[int, ...], frac: float, seed: int = 0, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection lift of ``frac`` of the cells of a grid of ``sizes`` (sparse COO) and its cells."""
    n_in = int(torch.tensor(sizes).prod())
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randperm(n_in, generator=gen)[: int(frac * n_in)].sort().values
    n = cells.numel()
    lift = torch.sparse_coo_tensor(torch.stack([torch.arange(n), cells]), torch.ones(n, dtype=dtype), (n, n_in),
                                   check_invariants=True)
    return lift, cells


def masked(sizes, frac, ls, noise, seed=0, dtype=F64):
    """``S (K_1 (x) ... (x) K_d) S^T + noise`` and its dense float64 matrix (built by hand from torch.kron)."""
    lift, cells = selection(sizes, frac, seed, dtype)
    mats = [grid_kernel(m, ls, dtype) for m in sizes]
    op = SparseLifted(lift, Kronecker(*mats)) + noise
    full = mats[0].double()
    for k in mats[1:]:
        full = torch.kron(full, k.double())
    dense = full[cells][:, cells] + torch.diag(noise.diagonal().double().expand(cells.numel()))
    return op, dense


def test_recognised_only_for_a_selection_of_a_kronecker():
    op, _ = masked((5, 6), 0.6, 0.3, ScaledIdentity(torch.tensor(0.1, dtype=F64), 18))
    assert is_masked_grid(op)
    k = grid_kernel(30, 0.3)
    assert not is_masked_grid(SparseLifted(op.base.lift, k) + op.noise)  # dense base
    lift = op.base.lift.to_dense()
    lift[0, 0] = 0.5  # a weight other than 1: a general lift
    assert not is_masked_grid(SparseLifted(lift, op.base.base) + op.noise)


@pytest.mark.parametrize("hetero", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_preconditioner_against_dense(hetero, dtype):
    """``P = R R^T``, ``P^{-1}`` and ``log det P`` consistent with each other; ``P - D`` PSD of rank r;
    ``A - P`` PSD with trace at most ``tol * min(d)`` (so ``0 <= log det A - log det P <= tol``)."""
    n = int(0.7 * 8 * 7 * 6)
    gen = torch.Generator().manual_seed(3)
    d = (0.05 + 0.1 * torch.rand(n, generator=gen, dtype=F64)).to(dtype)
    noise = Diagonal(d) if hetero else ScaledIdentity(torch.tensor(0.08, dtype=dtype), n)
    op, a = masked((8, 7, 6), 0.7, 0.35, noise, dtype=dtype)
    tol = 1e-2
    with torch.no_grad():
        p = masked_preconditioner(op, tol)
    assert 0 < p.rank < n
    eye = torch.eye(n, dtype=dtype)
    r = p.root_matmul(eye).double()
    p_dense = r @ r.mT
    rtol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(p.solve(eye).double() @ p_dense, torch.eye(n, dtype=F64), rtol=0, atol=rtol * 10)
    torch.testing.assert_close(p.logdet().double(), torch.linalg.slogdet(p_dense)[1], rtol=rtol, atol=rtol)
    d64 = noise.diagonal().double().expand(n)
    low_rank = torch.linalg.eigvalsh(p_dense - torch.diag(d64))
    assert low_rank.min() > (-1e-8 if dtype == F64 else -1e-3)
    assert int((low_rank > 1e-9 * low_rank.max()).sum()) <= p.rank
    rest = a - p_dense
    rest_eig = torch.linalg.eigvalsh(rest)
    assert rest_eig.min() > (-1e-8 if dtype == F64 else -1e-3)
    if dtype == F64:
        assert rest.trace() <= tol * d64.min() * (1 + 1e-9)
        gap = torch.linalg.slogdet(a)[1] - p.logdet()
        assert 0 <= gap <= tol


def test_no_missing_cells_means_no_rank():
    """A preconditioner whose tolerance keeps nothing is ``D`` itself."""
    op, a = masked((4, 5), 0.5, 0.3, ScaledIdentity(torch.tensor(0.1, dtype=F64), 10))
    with torch.no_grad():
        p = masked_preconditioner(op, tol=1e6)
    assert p.rank == 0
    torch.testing.assert_close(p.logdet(), torch.tensor(10 * torch.log(torch.tensor(0.1, dtype=F64)).item(), dtype=F64))
    x = torch.randn(10, 2, dtype=F64)
    torch.testing.assert_close(p.solve(x), x / 0.1)


def test_auto_preconditioner_and_plan():
    op, _ = masked((6, 6, 6), 0.7, 0.3, ScaledIdentity(torch.tensor(0.1, dtype=F64), 151))
    assert isinstance(build(op, current()), MaskedKroneckerDeflation)
    with sg.settings(method="masked_grid"):
        assert sg.plan(op).engine.name == "masked_grid"
    # metadata only: a 30^3 grid with 70% of the cells observed is planned as a masked grid, not densely
    lift, _ = selection((30, 30, 30), 0.7)
    k = grid_kernel(30, 0.2)
    big = SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(torch.tensor(0.1, dtype=F64), lift.shape[0])
    p = sg.plan(big)
    assert p.engine.name == "masked_grid", str(p)


def _masked_ran() -> bool:
    rep = sg.last_report()
    return "projected Kronecker deflation" in rep.reason and any("masked kronecker deflation" in t for t in rep.notes)


def _loglik(op, y):
    inv_quad, logdet = op.inv_quad_logdet(y)
    return -0.5 * (inv_quad + logdet + y.shape[-1] * LOG_2PI)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradients_against_dense_cholesky(dtype):
    """Log-likelihood within 1e-6 (float64; 1e-5 float32) relative of dense float64 Cholesky, gradients
    (lengthscale, noise) within 1%."""
    sizes, frac = (12, 11, 10), 0.7
    lift, cells = selection(sizes, frac, seed=1, dtype=dtype)
    n = cells.numel()
    y = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)

    def loglik(structured, ls, noise):
        if structured:
            mats = [grid_kernel(m, ls.to(dtype), dtype) for m in sizes]
            op = SparseLifted(lift, Kronecker(*mats)) + ScaledIdentity(noise.to(dtype), n)
            with sg.settings(method="masked_grid"):
                value = _loglik(op, y.to(dtype))
                assert _masked_ran()
            return value.double()
        mats = [grid_kernel(m, ls) for m in sizes]
        full = torch.kron(torch.kron(mats[0], mats[1]), mats[2])
        a = full[cells][:, cells] + noise * torch.eye(n, dtype=F64)
        chol = torch.linalg.cholesky(a)
        z = torch.linalg.solve_triangular(chol, y[:, None], upper=False)
        return -0.5 * (z.square().sum() + 2 * chol.diagonal().log().sum() + n * LOG_2PI)

    leaves = [torch.tensor(0.3, dtype=F64, requires_grad=True), torch.tensor(0.1, dtype=F64, requires_grad=True)]
    values, grads = [], []
    for structured in (True, False):
        v = loglik(structured, *leaves)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v, leaves))
    rtol = 1e-6 if dtype == F64 else 1e-5
    torch.testing.assert_close(values[0], values[1], rtol=rtol, atol=0)
    for g_struct, g_dense in zip(*grads):
        torch.testing.assert_close(g_struct, g_dense, rtol=1e-2, atol=0)


def test_solve_against_dense():
    op, a = masked((7, 8, 9), 0.7, 0.3, Diagonal(torch.full((352,), 0.1, dtype=F64) + torch.linspace(0, 0.1, 352)))
    b = torch.randn(352, 3, dtype=F64)
    with sg.settings(method="masked_grid", cg_tol=1e-10):
        x = op.solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-7, atol=1e-8)


def test_nothing_quadratic_is_allocated():
    """Value + gradient of a 20^3 grid with 70% observed (n_out = 5600, n_in = 8000): no op produces anything
    with n_out^2 / 2 elements (n_out x n_out, dense n_out x n_in and n_in x n_in are all larger)."""
    sizes = (20, 20, 20)
    lift, cells = selection(sizes, 0.7, seed=5)
    n = cells.numel()
    y = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(6))
    ls = torch.tensor(0.3, dtype=F64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=F64, requires_grad=True)
    with LargestOutput() as guard, sg.settings(method="masked_grid"):
        mats = [grid_kernel(m, ls) for m in sizes]
        op = SparseLifted(lift, Kronecker(*mats)) + ScaledIdentity(noise, n)
        _loglik(op, y).backward()
    assert _masked_ran()
    assert guard.largest < n * n // 2, guard.where
    assert ls.grad is not None and noise.grad is not None

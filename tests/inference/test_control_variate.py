"""Differentiable preconditioner families (the control variate of the cg engine's log-det gradient) against
float64 dense references: at the current parameters each family is the preconditioner PCG ran with (same
``log det P``, same ``P``), and its ``log det P(theta)`` and ``v^T P(theta) v`` have the gradients of the
dense matrix ``P(theta)`` written here from the frozen choices (pivots, eigenvectors)."""

import math

import pytest
import torch
from torch.func import grad, vmap

import structgp as sg
from structgp._config import current
from structgp.covariance import Dense, Diagonal, Kronecker, ScaledIdentity, SparseLifted
from structgp.inference.control_variate import KroneckerShiftFamily, NystromFamily, SubspaceNystromFamily
from structgp.inference.preconditioners import build
from tests.inference.test_lifted_precond import trilinear_lift
from tests.reference import F64, positive


def rbf(x, ell):
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / ell**2)


def detached(op):
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, op)


def built(op, **kw):
    with sg.settings(**kw):
        return build(detached(op), current())


def grads(value, leaves):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, leaves, retain_graph=True)])


def check_family(make_op, dense_p, leaves, precond_kw, family_type, dtype=F64, rtol=1e-8):
    """The family of the preconditioner built for ``make_op()``: its P at theta_0 is the built P
    (``P_built^{-1} P_dense = I``), and the gradient of its control variate ``log det P - mean_i v_i^T P v_i``
    equals that of ``dense_p(family)`` (a float64 dense ``P(theta)``); families that evaluate log det P
    (all but the first-order subspace one) also give the built value and the gradients of each term."""
    op = make_op()
    precond = built(op, **precond_kw)
    family = precond.family
    assert isinstance(family, family_type)
    p = dense_p(family)
    eye = torch.eye(op.n, dtype=F64)
    torch.testing.assert_close(precond.solve(p.detach().to(dtype)).double(), eye, rtol=0, atol=rtol * 1e3)
    v = torch.randn(op.n, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    cv = family.control_variate(op, v.to(dtype), op._matmul(v.to(dtype)))
    ref = torch.linalg.slogdet(p)[1] - (v * (p @ v)).sum(0).mean()
    torch.testing.assert_close(grads(cv, leaves), grads(ref, leaves), rtol=rtol, atol=rtol)
    if not hasattr(family, "logdet"):
        return
    logdet = family.logdet(op)
    torch.testing.assert_close(logdet.detach(), precond.logdet().double(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(p.detach())[1], rtol=rtol, atol=rtol)
    torch.testing.assert_close(grads(logdet, leaves), grads(torch.linalg.slogdet(p)[1], leaves), rtol=rtol, atol=rtol)
    quad = family.quad(op, v.to(dtype), op._matmul(v.to(dtype))).sum()
    torch.testing.assert_close(grads(quad, leaves), grads((v * (p @ v)).sum(), leaves), rtol=rtol, atol=rtol)


def nystrom_dense(a, family, noise=None):
    s = family.pivots[family.active]
    c = a[:, s]
    low = c @ torch.linalg.solve(a[s][:, s], c.mT)
    d = noise if noise is not None else a.diagonal() - low.diagonal()
    return low + torch.diag(torch.maximum(d, family.floor.double()))


def test_nystrom_family_with_noise():
    x = torch.rand(80, dtype=F64, generator=torch.Generator().manual_seed(0))
    ell = torch.tensor(0.15, dtype=F64, requires_grad=True)
    noise = torch.tensor(0.05, dtype=F64, requires_grad=True)

    def make():
        return Dense(rbf(x, ell)) + ScaledIdentity(noise, 80)

    def dense_p(family):
        assert 0 < family.pivots.shape[-1] < 80  # a partial factor
        return nystrom_dense(rbf(x, ell), family, noise.expand(80))

    check_family(make, dense_p, [ell, noise], {}, NystromFamily)


def test_nystrom_family_gradcheck():
    """With its pivots fixed the Nystrom family is a smooth function of the operator (not a first-order
    surrogate): its log det and quadratic form pass gradcheck."""
    x = torch.rand(30, dtype=F64, generator=torch.Generator().manual_seed(12))
    v = torch.randn(30, 2, dtype=F64, generator=torch.Generator().manual_seed(13))
    family = built(Dense(rbf(x, 0.2)) + ScaledIdentity(0.05, 30), precond_rank=6).family

    def fn(ell, noise):
        op = Dense(rbf(x, ell)) + ScaledIdentity(noise, 30)
        return family.logdet(op), family.quad(op, v, op._matmul(v))

    leaves = (torch.tensor(0.2, dtype=F64, requires_grad=True), torch.tensor(0.05, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(fn, leaves)


def test_nystrom_family_without_noise_keeps_the_remainder_diagonal():
    x = torch.rand(60, dtype=F64, generator=torch.Generator().manual_seed(1))
    ell = torch.tensor(0.1, dtype=F64, requires_grad=True)
    d = positive(60, low=0.05).requires_grad_()

    def make():
        return Dense(rbf(x, ell) + torch.diag(d))

    def dense_p(family):
        return nystrom_dense(rbf(x, ell) + torch.diag(d), family)

    check_family(make, dense_p, [ell, d], {"precond_rank": 12}, NystromFamily)


def test_nystrom_family_float32_operator():
    x = torch.rand(70, dtype=F64, generator=torch.Generator().manual_seed(2))
    ell = torch.tensor(0.15, dtype=torch.float32, requires_grad=True)
    noise = torch.tensor(0.05, dtype=torch.float32, requires_grad=True)

    def make():
        return Dense(rbf(x.float(), ell)) + ScaledIdentity(noise, 70)

    def dense_p(family):
        # the family reads the float32 columns and works in float64 from there
        return nystrom_dense(rbf(x.float(), ell).double(), family, noise.double().expand(70))

    check_family(make, dense_p, [ell, noise], {}, NystromFamily, dtype=torch.float32, rtol=1e-5)


def test_batch_member_that_stops_early_drops_its_inactive_pivots():
    """A rank-3 member stops adding columns (zero columns, ``active`` false) while another goes on: the
    family is the Nystrom form over each member's own active pivots."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 3, dtype=F64, generator=gen)
    a = torch.stack([w @ w.mT, rbf(torch.rand(40, dtype=F64, generator=gen), 0.2)])
    scale = torch.ones(2, dtype=F64, requires_grad=True)
    op = Dense(scale[:, None, None] * a) + Diagonal(torch.full((2, 40), 0.1, dtype=F64))
    precond = built(op, precond_rank=10)
    family = precond.family
    assert bool(family.active[1].all()) and not bool(family.active[0].all())
    logdet = family.logdet(op)
    torch.testing.assert_close(logdet.detach(), precond.logdet().double())
    dense = [nystrom_dense(scale[i] * a[i], _member(family, i), torch.full((40,), 0.1, dtype=F64)) for i in range(2)]
    ref = torch.stack([torch.linalg.slogdet(p)[1] for p in dense])
    torch.testing.assert_close(logdet.detach(), ref.detach())
    torch.testing.assert_close(grads(logdet.sum(), [scale]), grads(ref.sum(), [scale]))


def _member(family, i):
    return NystromFamily(family.pivots[i], family.active[i], family.noise, family.floor[i])


def kron_dense(factors):
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


def test_kronecker_shift_family_is_exact_with_repeated_eigenvalues():
    """P = K + mean(d) I: the log det gradient by Rayleigh quotients needs no eigh backward, so the repeated
    eigenvalues of K_1 (x) K_1 are harmless; it equals the dense slogdet gradient."""
    g = torch.linspace(0, 1, 7, dtype=F64)
    ell = torch.tensor(0.3, dtype=F64, requires_grad=True)
    d = (0.05 + 0.1 * torch.rand(49, dtype=F64, generator=torch.Generator().manual_seed(4))).requires_grad_()

    def make():
        return Kronecker(rbf(g, ell), rbf(g, ell)) + Diagonal(d)

    def dense_p(family):
        return kron_dense([rbf(g, ell), rbf(g, ell)]) + d.mean() * torch.eye(49, dtype=F64)

    op = make()
    precond = built(op, preconditioner="kronecker_eigen")
    family = precond.family
    assert isinstance(family, KroneckerShiftFamily)
    logdet = family.logdet(op)
    ref = torch.linalg.slogdet(dense_p(family))[1]
    torch.testing.assert_close(logdet.detach(), ref.detach())
    torch.testing.assert_close(grads(logdet, [ell, d]), grads(ref, [ell, d]))
    v = torch.randn(49, 2, dtype=F64)
    quad = family.quad(op, v, op._matmul(v)).sum()
    torch.testing.assert_close(grads(quad, [ell, d]), grads((v * (dense_p(family) @ v)).sum(), [ell, d]))


def subspace_dense(k, lift, family, noise):
    """``L K U (U^T K U)^{-1} U^T K L^T + D`` over the family's eigenvectors ``U``."""
    u = family.vectors.double()
    ku = k @ u
    return lift @ ku @ torch.linalg.solve(u.mT @ ku, ku.mT) @ lift.mT + torch.diag(noise)


def test_deflated_kronecker_family():
    g = torch.linspace(0, 1, 8, dtype=F64)
    ells = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.3, 0.4)]
    d = (0.05 + 0.1 * torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(5))).requires_grad_()

    def make():
        return Kronecker(rbf(g, ells[0]), rbf(g, ells[1])) + Diagonal(d)

    def dense_p(family):
        assert 0 < family.vectors.shape[-1] < 64
        return subspace_dense(kron_dense([rbf(g, ells[0]), rbf(g, ells[1])]), torch.eye(64, dtype=F64), family, d)

    check_family(make, dense_p, [*ells, d], {"preconditioner": "kronecker_deflated"}, SubspaceNystromFamily)


@pytest.mark.parametrize("lift_grad", [False, True])
def test_lifted_family(lift_grad):
    """Also with the lift's values as parameters (``dC = dL K U + L dK U``)."""
    g = 5
    lift = trilinear_lift(60, g, seed=6)
    values = lift.values().clone().requires_grad_(lift_grad)
    x = torch.linspace(0, 1, g, dtype=F64)
    ells = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.3, 0.4, 0.5)]
    noise = torch.tensor(0.02, dtype=F64, requires_grad=True)

    def lift_of():
        return torch.sparse_coo_tensor(lift.indices(), values, lift.shape)

    def make():
        return SparseLifted(lift_of(), Kronecker(*(rbf(x, e) for e in ells))) + ScaledIdentity(noise, 60)

    def dense_p(family):
        k = kron_dense([rbf(x, e) for e in ells])
        return subspace_dense(k, lift_of().to_dense(), family, noise.expand(60))

    leaves = [*ells, noise] + ([values] if lift_grad else [])
    check_family(make, dense_p, leaves, {"precond_rank": 20}, SubspaceNystromFamily, rtol=1e-7)


# -- through the engine --------------------------------------------------------------------------------


def _loglik_grad(x, y, seed, **kw):
    ell = torch.tensor(0.1, dtype=F64, requires_grad=True)
    noise = torch.tensor(0.02, dtype=F64, requires_grad=True)
    with sg.settings(method="cg", seed=seed, **kw):
        q, l = (Dense(rbf(x, ell)) + ScaledIdentity(noise, x.shape[0])).inv_quad_logdet(y)
    return grads(q + l, [ell, noise])


@pytest.mark.parametrize("precond_rank", [16, 24])
def test_control_variate_is_unbiased_and_shrinks_the_spread(precond_rank):
    """Over 16 seeds: with the control variate the gradient's mean is the exact one (within 5 standard
    errors) and its spread at least 5x smaller than the plain Hutchinson estimate's (partial pivoted
    Cholesky preconditioners: rank 16 leaves a remainder of up to 0.8% of the noise, rank 24 less)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(120, dtype=F64, generator=gen)
    y = torch.randn(120, dtype=F64, generator=gen)
    ell = torch.tensor(0.1, dtype=F64, requires_grad=True)
    noise = torch.tensor(0.02, dtype=F64, requires_grad=True)
    q, l = dense_inv_quad_logdet_torch(rbf(x, ell) + noise * torch.eye(120, dtype=F64), y)
    exact = grads(q + l, [ell, noise])
    kw = {"precond_rank": precond_rank, "cg_tol": 1e-12}  # solves exact: what is left is the probes' spread
    with_cv = torch.stack([_loglik_grad(x, y, s, **kw) for s in range(16)])
    plain = torch.stack([_loglik_grad(x, y, s, logdet_control_variate=False, **kw) for s in range(16)])
    spread, plain_spread = with_cv.std(0), plain.std(0)
    assert bool((spread * 5 < plain_spread).all()), (spread, plain_spread)
    z = (with_cv.mean(0) - exact).abs() / (spread / math.sqrt(16) + 1e-12 * exact.abs())
    assert float(z.max()) < 5.0


def test_a_preconditioner_that_misses_much_of_a_keeps_the_plain_estimator():
    """Rank 4 leaves remainder diagonal entries of 40x the noise: the family is not used (there the fixed
    control variate added variance), and the gradient is bitwise the plain one."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(120, dtype=F64, generator=gen)
    y = torch.randn(120, dtype=F64, generator=gen)
    with sg.settings(precond_rank=4):
        family = build(Dense(rbf(x, 0.1)) + ScaledIdentity(0.02, 120), current()).family
    assert not bool(family.use)
    a = _loglik_grad(x, y, 0, precond_rank=4)
    assert torch.equal(a, _loglik_grad(x, y, 0, precond_rank=4, logdet_control_variate=False))
    assert not torch.equal(
        _loglik_grad(x, y, 0, precond_rank=16), _loglik_grad(x, y, 0, precond_rank=16, logdet_control_variate=False)
    )


def dense_inv_quad_logdet_torch(a, y):
    chol = torch.linalg.cholesky(a)
    return torch.cholesky_solve(y[:, None], chol).squeeze(-1).dot(y), 2 * chol.diagonal().log().sum()


@pytest.mark.parametrize("preconditioner", ["none", "jacobi"])
def test_identity_and_jacobi_keep_the_plain_estimator(preconditioner):
    """No family for them (for a diagonal P, Rademacher probes make the control variate's terms cancel):
    the gradient is bitwise the plain one; a pivoted Cholesky preconditioner has a family."""
    x = torch.rand(50, dtype=F64, generator=torch.Generator().manual_seed(8))
    y = torch.randn(50, dtype=F64)
    a = _loglik_grad(x, y, 0, preconditioner=preconditioner)
    b = _loglik_grad(x, y, 0, preconditioner=preconditioner, logdet_control_variate=False)
    op = Dense(rbf(x, 0.1)) + ScaledIdentity(0.02, 50)
    assert build(op, current()).family is not None
    with sg.settings(preconditioner=preconditioner):
        assert build(op, current()).family is None
    assert torch.equal(a, b)


def test_grad_under_vmap_with_members_that_stop_early_equals_a_loop():
    """Pivoted Cholesky with noise stops by the remainder's trace; under vmap the members that would have
    stopped get inactive pivots, and the control variate's gradient equals a loop over the members."""
    x = torch.rand(90, dtype=F64, generator=torch.Generator().manual_seed(9))
    y = torch.randn(3, 90, dtype=F64, generator=torch.Generator().manual_seed(10))
    ells = torch.tensor([0.05, 0.2, 0.6], dtype=F64)

    def nll(ell, noise, y):
        with sg.settings(method="cg", cg_tol=1e-12, max_iter=90, num_probes=8, precond_rank=40):
            q, l = (Dense(rbf(x, ell)) + ScaledIdentity(noise, 90)).inv_quad_logdet(y)
        return q + l

    noise = torch.full((3,), 0.01, dtype=F64)
    got = vmap(grad(nll, argnums=(0, 1)))(ells, noise, y)
    ref = [grad(nll, argnums=(0, 1))(ells[i], noise[i], y[i]) for i in range(3)]
    for j in range(2):
        torch.testing.assert_close(got[j], torch.stack([r[j] for r in ref]), rtol=1e-7, atol=1e-9)
    ranks = []
    for e in ells:
        with sg.settings(precond_rank=40):
            ranks.append(build(Dense(rbf(x, e)) + ScaledIdentity(0.01, 90), current()).rank)
    assert len(set(ranks)) > 1 and min(ranks) < 40  # members stop at different ranks


def test_kronecker_eigen_under_vmap_equals_a_loop():
    g = torch.linspace(0, 1, 6, dtype=F64)
    ells = torch.tensor([0.2, 0.4], dtype=F64)
    d = positive(2, 36, low=0.05)

    def nll(ell, d):
        with sg.settings(method="cg", cg_tol=1e-12, max_iter=36, num_probes=8, preconditioner="kronecker_eigen"):
            return (Kronecker(rbf(g, ell), rbf(g, 1.3 * ell)) + Diagonal(d)).logdet()

    got = vmap(grad(nll, argnums=(0, 1)))(ells, d)
    ref = [grad(nll, argnums=(0, 1))(ells[i], d[i]) for i in range(2)]
    for j in range(2):
        torch.testing.assert_close(got[j], torch.stack([r[j] for r in ref]), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("control_variate", [True, False])
def test_reported_noise_direction_standard_error_matches_the_spread_over_seeds(control_variate):
    """The report's standard error of d logdet / d log(noise) is the spread of that derivative over seeds
    (within a factor 1.6: 24 seeds estimate a standard deviation to about 15%)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(120, dtype=F64, generator=gen)
    estimates, reported = [], []
    for seed in range(24):
        log_s = torch.tensor(math.log(0.02), dtype=F64, requires_grad=True)
        kw = {"precond_rank": 16, "cg_tol": 1e-12, "logdet_control_variate": control_variate}
        with sg.settings(method="cg", seed=seed, **kw):
            logdet = (Dense(rbf(x, 0.1)) + ScaledIdentity(log_s.exp(), 120)).logdet()
        estimates.append(torch.autograd.grad(logdet, log_s)[0])
        (note,) = [n for n in sg.last_report().notes if n.startswith("d logdet / d log(noise)")]
        reported.append(float(note.rsplit(" ", 1)[1]))
    spread, stderr = float(torch.stack(estimates).std()), sum(reported) / len(reported)
    assert spread > 1e-9  # a stochastic estimate
    print(f"control variate {control_variate}: reported {stderr:.3g}, spread over seeds {spread:.3g}")
    assert 1 / 1.6 < stderr / spread < 1.6, (stderr, spread)


@pytest.mark.parametrize("kind", ["lifted", "deflated"])
def test_structured_kronecker_products_equal_the_plain_products(kind):
    """For a Kronecker base whose eigenvectors are its top product eigenvectors, the families form K U by
    the factors (``kronecker_products``); the control variate's gradient is that of k products with K."""
    x = torch.linspace(0, 1, 7, dtype=F64)
    ells = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.3, 0.4, 0.5)]
    gen = torch.Generator().manual_seed(14)
    if kind == "lifted":
        lift = trilinear_lift(150, 7, seed=14)
        noise = Diagonal(0.01 + 0.01 * torch.rand(150, dtype=F64, generator=gen))

        def make():
            return SparseLifted(lift, Kronecker(*(rbf(x, e) for e in ells))) + noise

        kw = {"precond_rank": 30}
    else:
        noise = Diagonal(0.05 + 0.1 * torch.rand(343, dtype=F64, generator=gen))

        def make():
            return Kronecker(*(rbf(x, e) for e in ells)) + noise

        kw = {"preconditioner": "kronecker_deflated"}
    op = make()
    family = built(op, **kw).family
    assert isinstance(family, SubspaceNystromFamily) and family.products is not None
    v = torch.randn(op.n, 4, dtype=F64, generator=gen)
    structured = grads(family.control_variate(op, v, op._matmul(v)), ells)
    family.products = None
    plain = grads(family.control_variate(op, v, op._matmul(v)), ells)
    torch.testing.assert_close(structured, plain, rtol=1e-9, atol=1e-9)


def _kernel_case(noisy: bool):
    """An RBF KernelOperator plus a heteroskedastic diagonal (base + noise), or that sum next to a Matern
    KernelOperator (a Sum: the family's D is the remainder of diag(A)); 150 points in 2-d."""
    import gpytorch

    from structgp.covariance import KernelOperator, Sum

    gen = torch.Generator().manual_seed(21)
    x = (torch.rand(150, 2, generator=gen, dtype=F64) * 3).requires_grad_()
    raw = torch.tensor([[-0.3]], dtype=F64, requires_grad=True)
    noise = (0.05 + 0.1 * torch.rand(150, generator=gen, dtype=F64)).requires_grad_()
    rbf_kernel, matern_kernel = gpytorch.kernels.RBFKernel().double(), gpytorch.kernels.MaternKernel(nu=2.5).double()

    def make():
        base = KernelOperator(rbf_kernel, x, [raw]) + Diagonal(noise)
        return base if noisy else Sum(KernelOperator(matern_kernel, x, [raw + 0.5]), base)

    def dense_a():  # gpytorch's own dense evaluation (KernelOperator.to_dense), as a function of the leaves
        return make().base.to_dense() if noisy else make().to_dense()

    return make, dense_a, [x, raw, noise]


@pytest.mark.parametrize("noisy", [True, False])
def test_nystrom_family_of_kernel_operators_takes_the_first_order_form(noisy, monkeypatch):
    """Unbatched kernel matrices and diagonals: the control variate's gradient comes from the first-order form
    (no n x k tensor kept for autograd), equal to the dense P(theta)'s."""
    make, dense_a, leaves = _kernel_case(noisy)
    calls = []
    first_order = NystromFamily._first_order
    monkeypatch.setattr(NystromFamily, "_first_order", lambda self, *a: calls.append(1) or first_order(self, *a))

    def dense_p(family):
        return nystrom_dense(dense_a(), family, leaves[2] if noisy else None)

    # without noise the remainder diagonal sits near its floor for a few rows: 1e-15 relative moves of x move
    # this gradient by about 1e-8 (measured), so it is compared at 1e-6
    check_family(make, dense_p, leaves, {"precond_rank": 25}, NystromFamily, rtol=1e-8 if noisy else 1e-6)
    assert calls  # the first-order form ran


def test_a_partitioned_nystrom_family_refuses_one_process_s_log_det():
    from structgp.distributed.rows import Rows

    family = NystromFamily(torch.tensor([0]), torch.tensor([True]), True, torch.tensor([1e-8], dtype=F64),
                           part=Rows(((0, 2), (2, 4)), 0))
    op = Dense(torch.eye(4, dtype=F64)) + ScaledIdentity(0.1, 4)
    with pytest.raises(ValueError, match="partitioned family gives its control variate only"):
        family.logdet(op)

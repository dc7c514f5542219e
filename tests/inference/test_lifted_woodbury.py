import warnings

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted
from structgp.covariance.root import ConcatRoot
from structgp.inference import lifted_woodbury
from structgp.inference.lifted_woodbury import LiftedWoodbury, lift_gram
from tests.reference import F64, assert_close, check_against_dense, dense_inv_quad_logdet, paired_grads, positive, spd

KINDS = ("dense", "coo", "csr")


@pytest.fixture(params=["gram", "rows"])
def form(request, monkeypatch):
    """Both forms of the capacitance (gram M = L^T D^-1 L, rows F = L R), whatever the cost model prefers."""
    monkeypatch.setattr(lifted_woodbury, "_row_form", lambda lift, rank: request.param == "rows")
    return request.param


def random_lift(n_out, n_in, kind="csr", density=0.3, seed=0):
    """A random lift (one empty row, one full row) as ``kind``, and its dense float64 matrix."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=gen) < density
    mask[0], mask[1] = False, True
    dense = torch.randn(n_out, n_in, generator=gen, dtype=F64) * mask
    lift = {"dense": dense, "coo": dense.to_sparse(), "csr": dense.to_sparse_csr()}[kind]
    return lift, dense


def interpolation_lift(n_out, g, seed=0):
    """Linear interpolation of ``n_out`` points onto a ``g x g`` grid (4 nonzeros a row), sparse COO."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_out, 2, generator=gen, dtype=F64) * (g - 1)
    lo = x.floor().clamp(max=g - 2).long()
    t = x - lo
    rows, cols, vals = [], [], []
    for di in (0, 1):
        for dj in (0, 1):
            w = (t[:, 0] if di else 1 - t[:, 0]) * (t[:, 1] if dj else 1 - t[:, 1])
            rows.append(torch.arange(n_out))
            cols.append((lo[:, 0] + di) * g + lo[:, 1] + dj)
            vals.append(w)
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (n_out, g * g), check_invariants=True)


def noises(n, batch=()):
    return {
        "diagonal": Diagonal(positive(*batch, n)),
        "scaled": ScaledIdentity(positive(*batch), n),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base_kind", ["dense", "kron"])
@pytest.mark.parametrize("noise_kind", ["diagonal", "scaled"])
@pytest.mark.parametrize("batch", [((), ()), ((2,), ()), ((), (3,)), ((2, 1), (3,))])
def test_against_dense(kind, base_kind, noise_kind, batch, form):
    base_batch, noise_batch = batch
    lift, _ = random_lift(14, 6, kind)
    base = spd(6, *base_batch) if base_kind == "dense" else Kronecker(spd(2, *base_batch), spd(3, *base_batch))
    op = SparseLifted(lift, base) + noises(14, noise_batch)[noise_kind]
    with sg.settings(method="woodbury"):
        assert sg.plan(op).method == "woodbury"
        check_against_dense(op, rtol=1e-8, atol=1e-8)
        assert sg.last_report().method == "woodbury"
    assert isinstance(op.root(), ConcatRoot)


def test_kronecker_diagonal_noise_and_low_rank_base(form):
    lift, _ = random_lift(12, 6, "coo")
    noise = Kronecker(Diagonal(positive(3)), Diagonal(positive(4)))
    op = SparseLifted(lift, Kronecker(spd(3), spd(2))) + noise
    with sg.settings(method="woodbury"):
        check_against_dense(op)
    op = SparseLifted(lift, LowRank(torch.randn(6, 2, dtype=F64))) + Diagonal(positive(12))
    plan = sg.plan(op)
    assert plan.method == "woodbury" and "2 x 2 capacitance" in plan.reason
    check_against_dense(op)


def test_structured_bases_without_entry_rules():
    lift, _ = random_lift(10, 6, "csr")
    noisy_base = LowRank(torch.randn(6, 2, dtype=F64)) + Diagonal(positive(6))  # root [W, D^1/2]: 8 columns
    op = SparseLifted(lift, noisy_base) + Diagonal(positive(10))
    with sg.settings(method="woodbury"):
        assert "8 x 8 capacitance" in sg.plan(op).reason
        check_against_dense(op)
    nested = SparseLifted(lift, SparseLifted(torch.randn(6, 4, dtype=F64), spd(4))) + ScaledIdentity(0.5, 10)
    with sg.settings(method="woodbury"):
        assert "4 x 4 capacitance" in sg.plan(nested).reason
        check_against_dense(nested)


def test_zero_lift():
    op = SparseLifted(torch.zeros(5, 3, dtype=F64).to_sparse(), spd(3)) + Diagonal(positive(5))
    with sg.settings(method="woodbury"):
        check_against_dense(op)


def test_torch_func_grad_with_a_prebuilt_lift():
    lift, _ = random_lift(10, 6, "csr")
    lifted = SparseLifted(lift, spd(6))  # canonicalise the sparse lift outside the transform
    b, y = spd(3), torch.randn(10, dtype=F64)

    def nll(s, a):
        op = lifted.with_base(Kronecker(a, b)) + ScaledIdentity(s, 10)
        with sg.settings(method="woodbury"):
            q, ld = op.inv_quad_logdet(y)
        return q + ld + op.diagonal().sum()

    s, a = torch.tensor(0.3, dtype=F64), spd(2)
    got = torch.func.grad(nll, argnums=(0, 1))(s, a)
    s, a = s.requires_grad_(), a.requires_grad_()
    ref = torch.autograd.grad(nll(s, a), (s, a))
    for g, r in zip(got, ref):
        assert_close(g, r)


def test_auto_plan_and_never_densifies():
    n_out, g = 1500, 8
    lift = interpolation_lift(n_out, g)
    op = SparseLifted(lift, Kronecker(spd(g), spd(g))) + ScaledIdentity(0.1, n_out)
    plan = sg.plan(op)
    assert plan.method == "woodbury"
    assert plan.reason == (
        "SparseLifted + ScaledIdentity: latent-space Woodbury with a 64 x 64 capacitance through M = L^T D^-1 L"
    )
    dense = op.to_dense()  # the reference, formed before the limit is lowered
    y = torch.randn(n_out, dtype=F64)
    with sg.settings(dense_limit=2**20):  # the dense operator (18 MB) is over this limit
        with pytest.raises(sg.covariance.DensifyError):
            op.to_dense()
        q, ld = op.inv_quad_logdet(y)
        x = op.solve(y)
        assert sg.last_report().method == "woodbury"
    ref_q, ref_ld = dense_inv_quad_logdet(dense, y)
    assert_close(q, ref_q, rtol=1e-7, atol=1e-7)
    assert_close(ld, ref_ld, rtol=1e-9, atol=1e-7)
    assert_close(x, torch.linalg.solve(dense, y), rtol=1e-7, atol=1e-7)


def test_extra_rhs_batch_dims_share_one_factorisation(form):
    lift, l_dense = random_lift(10, 4, "csr")
    base, d = spd(4, 2), positive(2, 10)
    op = SparseLifted(lift, base) + Diagonal(d)
    a = l_dense @ base @ l_dense.T + torch.diag_embed(d)
    y = torch.randn(5, 2, 10, dtype=F64)
    q, ld = op.inv_quad_logdet(y)
    ref_q, ref_ld = dense_inv_quad_logdet(a, y)
    assert q.shape == (5, 2) and ld.shape == (2,)
    assert_close(q, ref_q)
    assert_close(ld, ref_ld)
    x = torch.randn(3, 2, 10, 4, dtype=F64)
    assert_close(op.solve(x), torch.linalg.solve(a, x))


def test_float32_data_within_float32_tolerance(form):
    lift, l_dense = random_lift(40, 6, "csr")
    base, s = spd(6), torch.tensor(0.05, dtype=F64)
    a = l_dense @ base @ l_dense.T + s * torch.eye(40, dtype=F64)
    op = SparseLifted(lift.to(torch.float32), base.float()) + ScaledIdentity(s.float(), 40)
    y = torch.randn(40, dtype=F64)
    with sg.settings(method="woodbury"):
        q, ld = op.inv_quad_logdet(y.float())
        x = op.solve(y.float())
    assert q.dtype == ld.dtype == x.dtype == torch.float32
    ref_q, ref_ld = dense_inv_quad_logdet(a, y)
    assert_close(q, ref_q, rtol=1e-5, atol=1e-4)
    assert_close(ld, ref_ld, rtol=1e-5, atol=1e-4)
    assert_close(x, torch.linalg.solve(a, y), rtol=1e-4, atol=1e-4)


def test_gradients_match_dense_autograd(form):
    idx = random_lift(16, 6, "dense")[1].nonzero().T
    leaves = {
        "vals": torch.randn(idx.shape[1], dtype=F64),
        "k1": spd(2, 2),
        "k2": spd(3),
        "d": positive(16),
        "y": torch.randn(2, 16, dtype=F64),
    }

    def loss(structured: bool, vals, k1, k2, d, y):
        if structured:
            lift = torch.sparse_coo_tensor(idx, vals, (16, 6))
            op = SparseLifted(lift, Kronecker(k1, k2)) + Diagonal(d)
            with sg.settings(method="woodbury"):
                q, ld = op.inv_quad_logdet(y)
                x = op.solve(y.mT)
        else:
            lift = torch.sparse_coo_tensor(idx, vals, (16, 6)).to_dense()
            kron = (k1[..., :, None, :, None] * k2[:, None, :]).reshape(2, 6, 6)
            a = lift @ kron @ lift.T + torch.diag(d)
            q, ld = dense_inv_quad_logdet(a, y)
            x = torch.linalg.solve(a, y.mT)
        return q.sum() + ld.sum() + x.square().sum()

    for name, g, ref in paired_grads(loss, leaves):
        if name in ("k1", "k2"):  # factorisations see the symmetric part of a matrix: compare those
            g, ref = (g + g.mT) / 2, (ref + ref.mT) / 2
        assert_close(g, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("noise_kind", ["diagonal", "scaled"])
def test_gradcheck(noise_kind, form):
    gen = torch.Generator().manual_seed(2)
    idx = (torch.rand(7, 4, generator=gen) < 0.5).nonzero().T
    vals = torch.randn(idx.shape[1], dtype=F64, generator=gen, requires_grad=True)
    k1, k2 = spd(2).requires_grad_(), spd(2, 3).requires_grad_()
    noise = positive(7) if noise_kind == "diagonal" else positive(3)
    noise.requires_grad_()
    y = torch.randn(3, 7, dtype=F64, requires_grad=True)

    def f(vals, k1, k2, noise, y):
        lift = torch.sparse_coo_tensor(idx, vals, (7, 4))
        n = Diagonal(noise) if noise_kind == "diagonal" else ScaledIdentity(noise, 7)
        op = SparseLifted(lift, Kronecker(k1, k2)) + n
        with sg.settings(method="woodbury"):
            q, ld = op.inv_quad_logdet(y)
            return q, ld, op.solve(y.unsqueeze(-1))

    assert torch.autograd.gradcheck(f, (vals, k1, k2, noise, y), fast_mode=noise_kind == "scaled")


def test_second_derivatives(form):
    gen = torch.Generator().manual_seed(3)
    idx = (torch.rand(5, 2, generator=gen) < 0.7).nonzero().T
    vals = torch.randn(idx.shape[1], dtype=F64, generator=gen, requires_grad=True)
    k = spd(2).requires_grad_()
    d = positive(5).requires_grad_()
    y = torch.randn(5, dtype=F64, requires_grad=True)

    def f(vals, k, d, y):
        op = SparseLifted(torch.sparse_coo_tensor(idx, vals, (5, 2)), k) + Diagonal(d)
        with sg.settings(method="woodbury"):
            q, ld = op.inv_quad_logdet(y)
            return q + ld, op.solve(y)

    assert torch.autograd.gradgradcheck(f, (vals, k, d, y))


def test_lift_gram_against_dense_and_gradcheck():
    lift, l_dense = random_lift(11, 5, "csr")
    op = SparseLifted(lift, spd(5))
    w = positive(2, 11)
    assert_close(lift_gram(op.lift, op.lift.values), l_dense.T @ l_dense)
    assert_close(lift_gram(op.lift, op.lift.values, w), l_dense.T @ (w.unsqueeze(-1) * l_dense))
    values = op.lift.values.clone().requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: lift_gram(op.lift, v, w), (values, w))
    assert torch.autograd.gradcheck(lambda v: lift_gram(op.lift, v), (values,))


def test_factor_and_pattern_gram_are_cached_only_without_grad():
    lift, _ = random_lift(20, 6, "coo")
    lifted = SparseLifted(lift, spd(6))
    op = lifted + ScaledIdentity(0.2, 20)
    with sg.settings(method="woodbury"):
        first = op.logdet()
        assert "lifted_woodbury" in op._cache and "gram" in lifted.lift._cache
        assert_close(op.logdet(), first)
        other = lifted.with_base(spd(6, seed=5)) + ScaledIdentity(0.2, 20)
        gram = lifted.lift._cache["gram"]
        other.logdet()
        assert other.base.lift._cache["gram"] is gram  # the pattern work is shared through with_base
        s = torch.tensor(0.2, dtype=F64, requires_grad=True)
        graph = lifted + ScaledIdentity(s, 20)
        graph.logdet().backward()
        assert "lifted_woodbury" not in graph._cache and s.grad is not None


def test_cost_and_applies():
    lift, _ = random_lift(50, 6, "csr")
    op = SparseLifted(lift, Kronecker(spd(2), spd(3))) + Diagonal(positive(50))
    engine = LiftedWoodbury()
    assert engine.applies(op) == (
        "SparseLifted + Diagonal: latent-space Woodbury with a 6 x 6 capacitance through M = L^T D^-1 L"
    )
    assert engine.applies(Dense(spd(4)) + Diagonal(positive(4))) is None
    cost = engine.cost(op)
    assert cost.flops >= op.base.lift.n_pairs + 6**3 / 3 and cost.bytes >= 2 * 6 * 6 * 8
    with sg.settings(method="eigen"), pytest.raises(ValueError, match="woodbury"):
        op.logdet()


def smooth_grid(n: int, lengthscale: torch.Tensor) -> torch.Tensor:
    """An RBF Gram matrix on ``n`` points of [0, 1], differentiable in ``lengthscale``; singular in float64."""
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale.square())


@pytest.mark.parametrize("noise_kind", ["diagonal", "scaled"])
@pytest.mark.parametrize("base_kind", ["kron", "dense"])
def test_singular_base_is_exact_without_jitter(noise_kind, base_kind, form):
    """A smooth grid kernel needs jitter for Cholesky; the spectral root keeps the answers exact."""
    g = 24
    lift = interpolation_lift(300, g)
    ls = torch.tensor(0.4, dtype=F64)
    if base_kind == "kron":
        base = Kronecker(smooth_grid(g, ls), smooth_grid(g, ls * 1.5))
    else:
        base = Dense(smooth_grid(g * g, ls))
    scale = torch.tensor(0.05, dtype=F64)
    noise = Diagonal(positive(300, low=0.01)) if noise_kind == "diagonal" else ScaledIdentity(scale, 300)
    op = SparseLifted(lift, base) + noise
    y = torch.randn(2, 300, dtype=F64)
    a = lift.to_dense() @ base.to_dense() @ lift.to_dense().T + noise.to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no JitterWarning
        with sg.settings(method="woodbury"):
            q, ld = op.inv_quad_logdet(y)
            x = op.solve(y.mT)
    assert "spectral root of rank" in str(sg.last_report())
    assert ("row form" in str(sg.last_report())) == (form == "rows")
    ref_q, ref_ld = dense_inv_quad_logdet(a, y)
    assert_close(q, ref_q, rtol=1e-10, atol=1e-9)
    assert_close(ld, ref_ld, rtol=1e-10, atol=1e-9)
    assert_close(x, torch.linalg.solve(a, y.mT), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("noise", ["diagonal", "batched", "scaled"])
def test_singular_base_gradients_match_dense_autograd(form, noise):
    """The spectral root's surrogate gradients (lengthscale, lift values, noise, targets) equal dense autograd."""
    g = 16
    coo = interpolation_lift(120, g).coalesce()
    idx = coo.indices()
    leaves = {
        "ls": torch.tensor(0.5, dtype=F64),
        "vals": coo.values(),
        "d": {"diagonal": positive(120, low=0.02), "batched": positive(2, 1, 120, low=0.02)}.get(noise, positive()),
        "y": torch.randn(2, 120, dtype=F64),
    }

    def noise_matrix(d):
        return d[..., None, None] * torch.eye(120, dtype=F64) if noise == "scaled" else torch.diag_embed(d)

    def loss(structured: bool, ls, vals, d, y):
        lift = torch.sparse_coo_tensor(idx, vals, (120, g * g))
        base = Kronecker(smooth_grid(g, ls), smooth_grid(g, 2 * ls))
        if structured:
            op = SparseLifted(lift, base) + (ScaledIdentity(d, 120) if noise == "scaled" else Diagonal(d))
            with sg.settings(method="woodbury"):
                q, ld = op.inv_quad_logdet(y)
                x = op.solve(y.mT)
            assert "spectral root" in str(sg.last_report())
        else:
            dense_lift = lift.to_dense()
            a = dense_lift @ base.to_dense() @ dense_lift.T + noise_matrix(d)
            q, ld = dense_inv_quad_logdet(a, y)
            x = torch.linalg.solve(a, y.mT)
        return q.sum() + ld.sum() + x.square().sum()

    for name, g_, ref in paired_grads(loss, leaves):
        assert torch.isfinite(g_).all(), name
        assert_close(g_, ref, rtol=1e-7, atol=1e-8)


def test_singular_base_refuses_second_derivatives(form):
    g = 20
    lift = interpolation_lift(50, g)
    ls = torch.tensor(0.8, dtype=F64, requires_grad=True)
    y = torch.randn(50, dtype=F64)

    def loss():
        base = Kronecker(smooth_grid(g, ls), smooth_grid(g, ls))
        op = SparseLifted(lift, base) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 50)
        with sg.settings(method="woodbury"):
            q, ld = op.inv_quad_logdet(y)
        assert "spectral root" in str(sg.last_report())
        return q + ld

    (grad,) = torch.autograd.grad(loss(), ls)  # first order: fine
    assert torch.isfinite(grad)
    with pytest.raises(RuntimeError, match="spectral root.*method='cholesky'.*spectral_root=False"):
        torch.autograd.grad(loss(), ls, create_graph=True)


def test_singular_base_in_float32_truncates_at_the_data_precision():
    """float32 factors: eigenvalues below float32 rounding are dropped (not half-kept by the clamp), so the
    answer stays within float32 accuracy of the float64 one with a much smaller capacitance."""
    g = 40
    lift = interpolation_lift(2000, g)
    ls = torch.tensor(0.3, dtype=F64)
    k64 = Kronecker(smooth_grid(g, ls), smooth_grid(g, ls))
    y = torch.randn(2000, dtype=F64)
    noise = torch.tensor(0.05, dtype=F64)
    with sg.settings(method="woodbury"):
        q64, ld64 = (SparseLifted(lift, k64) + ScaledIdentity(noise, 2000)).inv_quad_logdet(y)
        op32 = SparseLifted(lift.float(), k64.to(torch.float32)) + ScaledIdentity(noise.float(), 2000)
        q32, ld32 = op32.inv_quad_logdet(y.float())
    rank = int(str(sg.last_report()).split("spectral root of rank ")[1].split()[0])
    assert rank < 200  # of 1600
    assert_close(q32.double(), q64, rtol=2e-5, atol=0)
    assert_close(ld32.double(), ld64, rtol=2e-5, atol=0)



def test_trace_product_contracts_kronecker_factors():
    from structgp.inference.lifted_woodbury import _trace_product

    mats = [spd(2, 3), spd(3), spd(4)]  # batched first factor
    m = spd(24, 3)
    k = Kronecker(*mats)
    assert_close(_trace_product(m, k), (m * k.to_dense()).sum((-2, -1)), rtol=1e-12, atol=1e-12)
    b = spd(24)
    assert_close(_trace_product(m, Dense(b)), (m * b).sum((-2, -1)), rtol=1e-12, atol=1e-12)


def test_singular_base_under_torch_func_grad(form):
    """torch.func.grad may read values: the spectral root (not a jittered Cholesky) and the same gradient."""
    g = 16
    lift = interpolation_lift(120, g)
    d = positive(120, low=0.02)
    y = torch.randn(120, dtype=F64)

    def loss(ls, structured=True):
        base = Kronecker(smooth_grid(g, ls), smooth_grid(g, 2 * ls))
        if structured:
            with sg.settings(method="woodbury"):
                q, ld = (SparseLifted(lift, base) + Diagonal(d)).inv_quad_logdet(y)
            return q + ld
        a = lift.to_dense() @ base.to_dense() @ lift.to_dense().T + torch.diag(d)
        return sum(dense_inv_quad_logdet(a, y))

    ls = torch.tensor(0.5, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no JitterWarning
        got = torch.func.grad(loss)(ls)
    assert "spectral root" in str(sg.last_report())
    ref = torch.func.grad(lambda t: loss(t, structured=False))(ls)
    assert_close(got, ref, rtol=1e-7, atol=1e-8)


def test_spectral_root_off_gives_the_jittered_cholesky_root_and_exact_hessians():
    """settings(spectral_root=False): the old root (warned jitter), whose second derivatives are exact."""
    g = 20
    lift = interpolation_lift(50, g)
    ls = torch.tensor(0.8, dtype=F64, requires_grad=True)
    y = torch.randn(50, dtype=F64)
    with sg.settings(method="woodbury", spectral_root=False), pytest.warns(sg.inference.JitterWarning):
        base = Kronecker(smooth_grid(g, ls), smooth_grid(g, ls))
        q, ld = (SparseLifted(lift, base) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 50)).inv_quad_logdet(y)
    assert "spectral root" not in str(sg.last_report())
    (grad,) = torch.autograd.grad(q + ld, ls, create_graph=True)
    (hess,) = torch.autograd.grad(grad, ls)
    assert torch.isfinite(hess)

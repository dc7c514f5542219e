"""Hostile input to the engines: parameters at the edges of the floating-point range, singular structured
covariances, ill-conditioned float32 problems and non-finite right-hand sides. Every case is checked against
an independent float64 reference (dense torch, or a closed form where the dense matrix itself overflows), or
asserts the exact exception type and that its message names the argument or the operator.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgp as sg
from structgp.covariance import (
    BlockDiag,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    ScaledIdentity,
    SparseLifted,
)
from structgp.covariance.errors import NumericalError
from structgp.inference import JitterWarning, NotPositiveDefiniteError, psd_cholesky
from tests.reference import F64, assert_close, positive, spd

F32 = torch.float32


def _rbf(n: int, lengthscale: float, dtype: torch.dtype = F64) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x) ** 2 / lengthscale**2).to(dtype)


def _low_rank_reference(a: float, w: torch.Tensor, d: float, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """``(y^T A^-1 y, log det A, A^-1 y)`` for ``A = a^2 W W^T + d I`` from the SVD ``W / sqrt(d) = U S V^T``
    in float64, overflow-free for any finite ``a > 0``: ``A^-1 = (I - U diag(h) U^T) / d`` with
    ``h = (a s)^2 / (1 + (a s)^2)``, and ``log(1 + a^2 s^2) = 2 log a + 2 log s + log1p(1/(a s)^2)`` for
    ``a s > 1``."""
    n = w.shape[0]
    u, s, _ = torch.linalg.svd(w / math.sqrt(d), full_matrices=False)
    shrink = 1 / (1 + 1 / (a * s) ** 2)
    solve = (y - u @ (shrink * (u.mT @ y))) / d
    white = y / math.sqrt(d)
    inv_quad = white.square().sum() - ((u.mT @ white).square() * shrink).sum()
    t = a * s  # log(1 + t^2) without overflow for large t, without cancellation for small t
    log_terms = torch.where(t > 1, 2 * math.log(a) + 2 * s.log() + torch.log1p(1 / t**2), torch.log1p(t**2))
    logdet = n * math.log(d) + log_terms.sum()
    return float(inv_quad), float(logdet), solve


# -- LowRank Woodbury where W^T D^-1 W overflows ------------------------------------------------------------
@pytest.mark.parametrize("a", [1.0, 1e100, 1e150, 7.9e152, 1e160, 1e200, 1e300])
def test_woodbury_is_finite_and_exact_where_the_capacitance_overflows(a):
    """A = (a W)(a W)^T + 0.3 I: the value from the scaled capacitance equals the closed form; ``W^T D^-1 W``
    itself overflows from a ~ 1e152 (the unscaled formula gave -inf and a NaN gradient)."""
    g = torch.Generator().manual_seed(0)
    w, y = torch.randn(30, 2, dtype=F64, generator=g), torch.randn(30, dtype=F64, generator=g)
    op = LowRank(a * w) + Diagonal(torch.full((30,), 0.3, dtype=F64))
    inv_quad, logdet = op.inv_quad_logdet(y)
    ref_q, ref_l, ref_x = _low_rank_reference(a, w, 0.3, y)
    assert float(inv_quad) == pytest.approx(ref_q, rel=1e-10)
    assert float(logdet) == pytest.approx(ref_l, rel=1e-12)
    assert_close(op.solve(y), ref_x, 1e-9, 1e-12)


def test_woodbury_float32_capacitance_overflow():
    """float32 overflows at |V| ~ 1e19 / sqrt(n): W ~ 1e20, D = 1: finite, equal to the float64 closed form."""
    g = torch.Generator().manual_seed(1)
    w, y = torch.randn(20, 3, dtype=F64, generator=g), torch.randn(20, dtype=F64, generator=g)
    op = LowRank((1e20 * w).float()) + Diagonal(torch.ones(20, dtype=F32))
    inv_quad, logdet = op.inv_quad_logdet(y.float())
    ref_q, ref_l, _ = _low_rank_reference(1e20, (1e20 * w).float().double() / 1e20, 1.0, y.float().double())
    assert float(logdet) == pytest.approx(ref_l, rel=1e-5)
    assert float(inv_quad) == pytest.approx(ref_q, rel=1e-4)


@pytest.mark.parametrize("log_a", [0.0, 350.0, 400.0])
def test_woodbury_gradients_are_exact_at_huge_scales(log_a):
    """gradcheck of inv_quad + logdet in log a, W, the noise and y at a = e^0, e^350 (past the overflow of
    W^T D^-1 W) and e^400."""
    g = torch.Generator().manual_seed(2)
    inputs = (
        torch.tensor(log_a, dtype=F64),
        torch.randn(6, 2, dtype=F64, generator=g),
        torch.rand(6, dtype=F64, generator=g) + 0.2,
        torch.randn(6, dtype=F64, generator=g),
    )

    def f(log_scale, w, d, y):
        inv_quad, logdet = (LowRank(log_scale.exp() * w) + Diagonal(d)).inv_quad_logdet(y)
        return inv_quad + logdet

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in inputs))


# -- Cholesky near the float limits ---------------------------------------------------------------------------
def test_cholesky_symmetrises_without_overflow():
    """(A + A^T) / 2 overflows for entries near 1.8e308; the halves first do not."""
    m = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=F64)
    op = Dense(1e308 * m)
    assert float(op.logdet()) == pytest.approx(2 * math.log(1e308) + math.log(0.75), rel=1e-14)
    y = torch.tensor([1.0, 2.0], dtype=F64)
    assert_close(op.solve(y), torch.linalg.solve(m, y) / 1e308, 1e-12, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_cholesky_refuses_non_finite_input_instead_of_jittering(bad):
    a = spd(3)
    a[0, 1] = a[1, 0] = bad
    with pytest.raises(NumericalError, match=r"^the test matrix has non-finite entries \(NaN or Inf\)"):
        psd_cholesky(a, "the test matrix")


def test_cholesky_of_the_zero_matrix_is_refused():
    with pytest.raises(NotPositiveDefiniteError, match=r"^the test matrix is singular with a zero diagonal"):
        psd_cholesky(torch.zeros(3, 3, dtype=F64), "the test matrix")
    with pytest.raises(NotPositiveDefiniteError, match="zero diagonal"):
        (0 * Dense(spd(3))).logdet()


# -- Kronecker products without noise: warned jitter, as the dense path -------------------------------------
@pytest.mark.parametrize("dtype, value_tol, grad_tol", [(F64, 1e-6, 1e-4), (F32, 2e-3, 3e-2)])
@pytest.mark.parametrize("lengthscale", [0.3, 1.0])
def test_singular_kronecker_gets_warned_jitter_like_the_dense_path(dtype, value_tol, grad_tol, lengthscale):
    """RBF on a 20-point grid (singular in float64 from lengthscale 0.2): ``Kronecker(K, K)`` alone used to
    give -inf log det and NaN solves. Now a JitterWarning states the amount ``j`` (1e-8 of the mean diagonal in
    float64; a higher rung in float32, whose eigenvalues are known only to ~1e-7 of the largest), and log det,
    the inverse quadratic form, its gradient and the solve equal dense float64 torch on ``K (x) K + j I``."""
    k = _rbf(20, lengthscale, dtype)
    y = torch.randn(400, dtype=dtype, generator=torch.Generator().manual_seed(3))
    leaf = k.clone().requires_grad_()
    pattern = r"Kronecker product .* added jitter (\S+) \((\S+) of the mean diagonal"
    with pytest.warns(JitterWarning, match=pattern) as rec:
        inv_quad, logdet = Kronecker(leaf, k).inv_quad_logdet(y)
    jitter = sg.last_report().jitter
    assert jitter == pytest.approx(float(str(rec[0].message).split("added jitter ")[1].split(" ")[0]), rel=1e-2)
    assert jitter == pytest.approx(1e-8 if dtype == F64 else 1e-4, rel=1e-12)
    (grad,) = torch.autograd.grad(inv_quad + logdet, leaf)
    ref_leaf = k.detach().double().clone().requires_grad_()
    dense = torch.kron(ref_leaf, k.detach().double()) + jitter * torch.eye(400, dtype=F64)
    chol = torch.linalg.cholesky(dense)
    ref_q = torch.cholesky_solve(y.double()[:, None], chol).squeeze(-1) @ y.double()
    ref_l = 2 * chol.diagonal().log().sum()
    (ref_grad,) = torch.autograd.grad(ref_q + ref_l, ref_leaf)
    assert float(logdet) == pytest.approx(float(ref_l), rel=value_tol)
    assert float(inv_quad) == pytest.approx(float(ref_q), rel=value_tol)
    assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < grad_tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        x = Kronecker(k, k).solve(y)
    ref_x = torch.cholesky_solve(y.double()[:, None], chol.detach()).squeeze(-1)
    assert float((x.double() - ref_x).norm() / ref_x.norm()) < value_tol * 10


def test_singular_kronecker_beyond_max_jitter_names_the_operator():
    k = _rbf(20, 1.0)
    message = r"^the Kronecker product Kronecker\(400x400, float64\) is singular in torch.float64"
    with sg.settings(max_jitter=1e-9), pytest.raises(NotPositiveDefiniteError, match=message):
        Kronecker(k, k).logdet()
    with sg.settings(method="eigen"), pytest.raises(NotPositiveDefiniteError, match="singular with a zero diagonal"):
        (0 * Kronecker(spd(3), spd(2))).logdet()


def test_positive_definite_kronecker_gets_no_jitter():
    """A well-conditioned product (and a grid kernel whose eigenvalues are all resolved, lengthscale 0.1) is
    answered exactly, without a warning: the jitter is only for eigenvalues below their own uncertainty."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", JitterWarning)
        op = Kronecker(spd(3), spd(4))
        assert_close(op.logdet(), torch.linalg.slogdet(op.to_dense())[1], 1e-10, 1e-10)
        k = _rbf(20, 0.1)
        assert_close(Kronecker(k, k).logdet(), torch.linalg.slogdet(torch.kron(k, k))[1], 1e-6, 1e-6)


# -- float32: values that do not depend on requires_grad ------------------------------------------------------
def _float32_cases() -> dict:
    k = _rbf(20, 10.0, F32)
    g = torch.Generator().manual_seed(4)
    lift = torch.zeros(300, 400, dtype=F32)
    lift[torch.arange(300), torch.randint(0, 400, (300,), generator=g)] = 1.0
    lift[torch.arange(300), torch.randint(0, 400, (300,), generator=g)] += 0.5
    hetero = 1e-8 * (1 + torch.rand(400, dtype=F32, generator=g))
    tiny = torch.full((20,), 1e-4, dtype=F32)
    return {  # name: (covariance of the leaf factor, forced method, size, warned jitter expected)
        "eigen": (lambda m: Kronecker(m, k) + ScaledIdentity(1e-8, 400), "eigen", 400, True),
        "eigen_kronecker_noise": (
            lambda m: Kronecker(m, k) + Kronecker(Diagonal(tiny), Diagonal(tiny)), "eigen", 400, True
        ),
        "spectral_woodbury": (lambda m: Kronecker(m, k) + Diagonal(hetero), "spectral_woodbury", 400, True),
        "lifted_woodbury": (
            lambda m: SparseLifted(lift.to_sparse(), Kronecker(m, k)) + ScaledIdentity(1e-8, 300),
            "lifted_woodbury",
            300,
            True,
        ),
        "cg": (lambda m: Kronecker(m, k) + ScaledIdentity(1e-2, 400), "cg", 400, False),
    }


@pytest.mark.parametrize("name", list(_float32_cases()))
def test_float32_values_do_not_depend_on_requires_grad(name):
    """RBF lengthscale 10 on a 20 x 20 grid, float32, noise 1e-8 (below what float32 resolves of a 400-scale
    matrix): the inverse quadratic form, log det and solve are bitwise the same with and without gradients
    (the eigen path's surrogate 2 r.x0 - x0^T B x0 gave -3.8e10 with gradients, 4.0e10 without); and where the
    dense path would need jitter, the structured one warns and adds it instead of answering silently."""
    build, method, n, warns = _float32_cases()[name]
    k = _rbf(20, 10.0, F32)
    y = torch.randn(n, dtype=F32, generator=torch.Generator().manual_seed(5))
    outs = []
    for grad in (True, False):
        with warnings.catch_warnings(record=True) as rec, sg.settings(method=method):
            warnings.simplefilter("always")
            op = build(k.clone().requires_grad_(grad))
            inv_quad, logdet = op.inv_quad_logdet(y)
            outs.append((inv_quad.detach(), logdet.detach(), op.solve(y).detach()))
        jittered = [r for r in rec if issubclass(r.category, JitterWarning)]
        assert bool(jittered) == warns, [str(r.message) for r in rec]
    for with_grad, without in zip(*outs):
        assert torch.equal(with_grad, without)
        assert torch.isfinite(with_grad).all()


def test_float32_eigen_answer_is_the_dense_answer_with_the_same_jitter():
    k = _rbf(20, 10.0, F32)
    y = torch.randn(400, dtype=F32, generator=torch.Generator().manual_seed(6))
    with pytest.warns(JitterWarning):
        inv_quad, logdet = (Kronecker(k, k) + ScaledIdentity(1e-8, 400)).inv_quad_logdet(y)
    jitter = sg.last_report().jitter
    dense = torch.kron(k.double(), k.double()) + (1e-8 + jitter) * torch.eye(400, dtype=F64)
    chol = torch.linalg.cholesky(dense)
    assert float(logdet) == pytest.approx(float(2 * chol.diagonal().log().sum()), rel=1e-4)
    ref_q = float(torch.cholesky_solve(y.double()[:, None], chol).squeeze(-1) @ y.double())
    assert float(inv_quad) == pytest.approx(ref_q, rel=1e-3)


# -- right-hand sides and answers that are not finite -----------------------------------------------------
STRUCTURES = {
    "dense": lambda: Dense(spd(6)),
    "diagonal": lambda: Diagonal(positive(6)),
    "low_rank_woodbury": lambda: LowRank(torch.randn(6, 2, dtype=F64)) + Diagonal(positive(6)),
    "kronecker_eigen": lambda: Kronecker(spd(2), spd(3)) + ScaledIdentity(0.1, 6),
    "spectral_or_dense": lambda: Kronecker(spd(2), spd(3)) + Diagonal(positive(6)),
    "lifted": lambda: SparseLifted(torch.randn(6, 4, dtype=F64), spd(4)) + ScaledIdentity(0.1, 6),
    "block_diag": lambda: BlockDiag([spd(2), spd(4)]),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rhs_is_refused_naming_rhs(name, bad):
    op = STRUCTURES[name]()
    y = torch.randn(6, 2, dtype=F64)
    y[3, 1] = bad
    with pytest.raises(NumericalError, match=r"^rhs: expected finite entries \(found NaN or Inf\) in solve"):
        op.solve(y)
    with pytest.raises(NumericalError, match=r"^rhs: expected finite entries \(found NaN or Inf\) in inv_quad_logdet"):
        op.inv_quad_logdet(y[:, 1])
    assert torch.isfinite(op.solve(y.nan_to_num(0.0, 0.0, 0.0))).all()  # the same call with finite values


def test_a_nan_answer_is_refused():
    """Noise of 1e-310 (subnormal): D^-1/2 y overflows and the inverse quadratic form is inf - inf. The engine's
    NaN is refused, naming the operation and the operator."""
    op = LowRank(torch.randn(6, 2, dtype=F64)) + ScaledIdentity(1e-310, 6)
    with pytest.raises(NumericalError, match=r"^inv_quad_logdet of AddedDiagonal\(6x6, float64\) is NaN"):
        op.inv_quad_logdet(torch.randn(6, dtype=F64))


def test_an_inf_answer_that_is_right_is_returned():
    """Noise 1e-300 with y of size 1e10: y^T A^-1 y = 6e320 overflows to +inf, which is the float64 answer
    (only a NaN is refused). The Woodbury path forms it as a difference of two overflowing terms, inf - inf:
    there it is refused as a NaN rather than returned."""
    y = torch.full((6,), 1e10, dtype=F64)
    inv_quad, logdet = Diagonal(torch.full((6,), 1e-300, dtype=F64)).inv_quad_logdet(y)
    assert float(inv_quad) == math.inf and float(logdet) == pytest.approx(6 * math.log(1e-300))
    with pytest.raises(NumericalError, match="is NaN"):
        (LowRank(torch.randn(6, 2, dtype=F64)) + ScaledIdentity(1e-300, 6)).inv_quad_logdet(y)


@settings(max_examples=40, deadline=None)
@given(exponent=st.floats(-320, 308), seed=st.integers(0, 2**16))
def test_low_rank_scales_across_the_float64_range(exponent, seed):
    """a = 10^e over the whole float64 range: the answer equals the closed form, unless the whitened factor
    D^-1/2 a W itself overflows (entries of A near 1e616): then a NumericalError; never NaN."""
    a = 10.0**exponent
    g = torch.Generator().manual_seed(seed)
    w, y = torch.randn(8, 2, dtype=F64, generator=g), torch.randn(8, dtype=F64, generator=g)
    try:
        inv_quad, logdet = (LowRank(a * w) + Diagonal(torch.full((8,), 0.3, dtype=F64))).inv_quad_logdet(y)
    except NumericalError:  # the whitened factor D^-1/2 a W itself overflowed
        assert not torch.isfinite(a * w / math.sqrt(0.3)).all()
        return
    assert not (math.isnan(float(inv_quad)) or math.isnan(float(logdet)))
    if a > 0:
        ref_q, ref_l, _ = _low_rank_reference(a, w, 0.3, y)
        assert float(inv_quad) == pytest.approx(ref_q, rel=1e-8)
        assert float(logdet) == pytest.approx(ref_l, rel=1e-10, abs=1e-10)

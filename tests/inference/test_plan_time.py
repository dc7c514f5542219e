"""``"auto"`` weighs expected time as well as exactness: the iterative engine on a large problem where the cost
model expects it to be much faster, exact engines on small problems and under ``settings(iterative=...)``,
both expected times in the plan's text, and planning still free of numerical work."""

import re

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.inference import cost_model
from structgp.inference.cholesky import DENSE_PASSES
from structgp.inference.iterative import EXPECTED_ITERATIONS, GRADIENT_PRODUCTS
from structgp.inference.plan import ITERATIVE_MIN_SIZE, ITERATIVE_SPEEDUP
from tests.inference.test_plan_dispatch import OpLog
from tests.reference import F64, dense_inv_quad_logdet, positive, spd

DTYPES = (torch.float32, torch.float64)


def large_dense(n: int, dtype: torch.dtype, device: str = "cpu", grad: bool = True) -> Dense:
    """A dense ``n x n`` operator + noise whose matrix is one expanded number: planning reads only shapes.
    ``grad``: the noise requires grad (a training step: the expected times include the backward)."""
    matrix = torch.zeros((), dtype=dtype, device=device).expand(n, n)
    noise = torch.tensor(0.1, dtype=dtype, device=device, requires_grad=grad)
    return Dense(matrix) + ScaledIdentity(noise, n)


def options(p: sg.Plan) -> dict[str, sg.Plan]:
    return {p.engine.name: p.cost} | {a.engine: a.cost for a in p.alternatives}


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_takes_cg_where_it_is_expected_much_faster(dtype):
    p = sg.plan(large_dense(8192, dtype))
    costs = options(p)
    assert p.engine.name == "cg" and not p.forced
    assert costs["cholesky"].seconds >= ITERATIVE_SPEEDUP * costs["cg"].seconds
    text = str(p)
    assert "choice: iterative (inexact)" in text and "settings(iterative='never')" in text
    found = re.search(r"expected ([\d.]+) (ms|s) for cg against ([\d.]+) (ms|s) for cholesky", text)
    assert found is not None, text
    for name, value, unit in (("cg", *found.group(1, 2)), ("cholesky", *found.group(3, 4))):  # both, as printed
        assert float(value) * (1e-3 if unit == "ms" else 1) == pytest.approx(costs[name].seconds, rel=5e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_call_without_gradient_keeps_the_exact_engine(dtype):
    """Without the backward (six times the factorisation) the dense Cholesky is not 4x slower than CG."""
    for p in (sg.plan(large_dense(8192, dtype, grad=False)), _no_grad_plan(large_dense(8192, dtype))):
        assert p.engine.name == "cholesky" and not p.differentiated
        assert "x < 4x faster" in p.decision and "(value)" in str(p) and "gradient" not in str(p)
    with_grad = options(sg.plan(large_dense(8192, dtype)))
    without = options(sg.plan(large_dense(8192, dtype, grad=False)))
    for name in ("cg", "cholesky"):
        assert without[name].seconds < with_grad[name].seconds
    # the backward multiplies the Cholesky's time far more than CG's: the ratio that decides differs
    assert with_grad["cholesky"].seconds / with_grad["cg"].seconds > 2 * (
        without["cholesky"].seconds / without["cg"].seconds
    )


def _no_grad_plan(op):
    with torch.no_grad():
        return sg.plan(op)


def test_memo_tells_differentiated_calls_apart():
    from structgp.inference import plan_memo

    op, frozen = large_dense(8192, torch.float32), large_dense(8192, torch.float32, grad=False)
    assert plan_memo.signature(op) != plan_memo.signature(frozen)
    assert plan_memo.planned(op).engine.name == "cg"
    assert plan_memo.planned(frozen).engine.name == "cholesky"
    with torch.no_grad():
        assert plan_memo.planned(op).engine.name == "cholesky"
    assert plan_memo.planned(op).engine.name == "cg"


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_problems_keep_their_exact_engine(dtype):
    n = 2000
    assert n < ITERATIVE_MIN_SIZE
    p = sg.plan(large_dense(n, dtype))
    costs = options(p)
    assert p.engine.name == "cholesky"
    # the model expects cg to be faster here too: the size rule, not the times, keeps the exact answer
    assert costs["cg"].seconds < costs["cholesky"].seconds
    assert f"n = {n} < {ITERATIVE_MIN_SIZE}" in p.decision


def test_exact_engine_kept_when_cg_is_not_much_faster():
    n = 8192  # Woodbury of rank 4 is far cheaper than any CG run
    p = sg.plan(LowRank(torch.zeros(()).expand(n, 4)) + Diagonal(torch.ones(()).expand(n)))
    assert p.method == "woodbury"
    assert "x < 4x faster" in p.decision and "for cg against" in p.decision


@pytest.mark.parametrize("iterative", ["never", "fallback"])
def test_setting_insists_on_an_exact_method(iterative):
    op = large_dense(8192, torch.float32)
    with sg.settings(iterative=iterative):
        p = sg.plan(op)
    assert p.engine.name == "cholesky" and not p.forced
    assert f"settings(iterative={iterative!r})" in p.decision
    with sg.settings(iterative="never", method="cg"):  # a forced method is not affected
        assert sg.plan(op).engine.name == "cg"
    with sg.settings(method="cholesky"):  # nor is forcing the exact one under the default
        q = sg.plan(op)
        assert q.engine.name == "cholesky" and q.forced


def test_never_raises_where_only_the_iterative_engine_fits():
    op = Dense(spd(1000, seed=0))  # dense Cholesky needs 15 MiB, CG 5.4 MiB
    with sg.settings(memory_budget=8 * 2**20):
        assert sg.plan(op).engine.name == "cg"
        assert "no exact method fits" in sg.plan(op).decision
        with sg.settings(iterative="fallback"):
            assert sg.plan(op).engine.name == "cg"
        with sg.settings(iterative="never"), pytest.raises(MemoryError, match="iterative="):
            sg.plan(op)


def test_iterative_setting_is_validated():
    with pytest.raises(ValueError, match="iterative: expected one of"):
        with sg.settings(iterative="sometimes"):
            pass


def test_device_without_measured_rates_chooses_by_exactness():
    p = sg.plan(large_dense(8192, torch.float32, device="meta"))
    assert p.engine.name == "cholesky"
    assert p.cost.seconds is None and "no measured rates for meta" in p.decision
    assert "no time model for this device" in str(p)


def test_planning_a_large_operator_runs_no_tensor_computation():
    op = large_dense(8192, torch.float64)
    with OpLog() as log:
        p = sg.plan(op)
    assert p.engine.name == "cg"
    assert sum(log.ops.values()) == 0, log.ops


@pytest.mark.parametrize("dtype", DTYPES)
def test_expected_seconds_follow_the_measured_rates(dtype):
    """The expected times, recomputed by hand from ``RATES`` and each engine's stated work."""
    n, cfg = 8192, sg.settings
    rates = cost_model.RATES[("cpu", dtype.itemsize)]
    costs = options(sg.plan(large_dense(n, dtype)))
    cholesky = (  # forward and backward
        n**3 / 3 / rates.factor
        + 2 * n**3 / rates.factor_backward
        + 2 * 2 * n * n / rates.product
        + 2 * DENSE_PASSES * n * n * dtype.itemsize / rates.stream
    )
    assert costs["cholesky"].seconds == pytest.approx(cholesky, rel=1e-12)
    with cfg() as s:
        columns, k = s.num_probes + 1, s.precond_rank
    product = 2.0 * n * n * columns + n * columns  # Dense + ScaledIdentity with every column
    vectors = columns * (4.0 * n * k + 12.0 * n)
    cg = ((EXPECTED_ITERATIONS + GRADIENT_PRODUCTS) * product + EXPECTED_ITERATIONS * vectors + n * k * k)
    assert costs["cg"].seconds == pytest.approx(cg / rates.product, rel=1e-12)
    assert costs["cg"].flops == pytest.approx(EXPECTED_ITERATIONS * (product + vectors) + n * k * k, rel=1e-12)


def test_engines_without_a_time_of_their_own_get_the_default():
    op = LowRank(torch.randn(300, 4, dtype=F64)) + Diagonal(positive(300))
    p = sg.plan(op)
    assert p.method == "woodbury"
    expected = cost_model.default_seconds(p.cost.flops, op.device, op.dtype, gradient=False)
    assert p.cost.seconds == pytest.approx(expected) and expected > 0
    assert expected == pytest.approx(p.cost.flops / cost_model.RATES[("cpu", 8)].product, rel=1e-12)
    op.noise.diag.requires_grad_()
    q = sg.plan(op)
    assert q.differentiated and q.cost.seconds == pytest.approx(3 * expected, rel=1e-12)


def test_auto_runs_cg_on_a_large_kronecker_and_matches_dense():
    """End to end at n = 4096: Kronecker + Diagonal with full-rank factors has no exact structured engine
    (spectral Woodbury is planned first, finds the factors nonsingular when it runs and hands back), dense
    Cholesky is expected far slower than CG through Kronecker products; the answer agrees with float64
    dense torch."""
    noise = positive(4096, low=0.5).requires_grad_()  # a training step: the call will be differentiated
    op = Kronecker(spd(64, seed=1), spd(64, seed=2)) + Diagonal(noise)
    y = torch.randn(op.n, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert op.n >= ITERATIVE_MIN_SIZE
    with sg.settings(cg_tol=1e-10, num_probes=64):
        inv_quad, logdet = op.inv_quad_logdet(y)
        assert sg.last_report().method == "cg"
        assert sg.plan(op).engine.name == "cg"  # now that the factors are known to be nonsingular
    ref_inv_quad, ref_logdet = dense_inv_quad_logdet(op.to_dense().detach(), y)
    torch.testing.assert_close(inv_quad.detach(), ref_inv_quad, rtol=1e-6, atol=0)
    # SLQ with 64 probes (seeded): standard error 0.55 on a logdet of 3977 (1.4e-4 relative), 9e-5 observed
    torch.testing.assert_close(logdet.detach(), ref_logdet, rtol=1e-3, atol=0)
    with sg.settings(iterative="never"):
        exact = op.inv_quad_logdet(y)
        assert sg.last_report().method == "cholesky"
    torch.testing.assert_close(exact[1].detach(), ref_logdet, rtol=1e-10, atol=0)


def test_matrix_free_kernel_counts_its_evaluation_once_per_product():
    """A ``KernelOperator`` recomputes its entries in every product: the rule sees all CG columns at once."""
    import gpytorch

    from structgp.covariance import KernelOperator
    from structgp.inference.iterative import matvec_flops

    n, d, columns = 8192, 2, 33
    x = torch.rand(n, d, dtype=F64)
    kernel = gpytorch.kernels.RBFKernel().double()
    op = KernelOperator(kernel, x)
    evaluation = n * n * (3.0 * d + 20.0)
    assert matvec_flops(op, columns) == 2.0 * n * n * columns + evaluation
    assert matvec_flops(op, columns) < columns * matvec_flops(op)  # not once per column
    noisy = op + ScaledIdentity(torch.tensor(0.1, dtype=F64, requires_grad=True), n)
    p = sg.plan(noisy)
    assert p.engine.name == "cg", str(p)
    assert options(p)["cg"].seconds == pytest.approx(
        ((EXPECTED_ITERATIONS + GRADIENT_PRODUCTS) * (matvec_flops(op, columns) + n * columns)
         + EXPECTED_ITERATIONS * columns * (4.0 * n * 256 + 12.0 * n) + n * 256**2)
        / cost_model.RATES[("cpu", 8)].product,
        rel=1e-12,
    )

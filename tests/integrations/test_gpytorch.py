"""The linear_operator adapter and MultivariateNormal.to_gpytorch against dense float64 references."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator, RootLinearOperator

from structgp.covariance import AddedDiagonal, Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import MultivariateNormal
from structgp.integrations.gpytorch import StructuredLinearOperator, as_linear_operator
from tests.reference import positive, spd

F64 = torch.float64

CASES = {
    "dense": ([spd(5, seed=1)], lambda m: Dense(m)),
    "diagonal": ([positive(5)], lambda d: Diagonal(d)),
    "lowrank+diag": ([torch.randn(6, 2, dtype=F64), positive(6)], lambda w, d: LowRank(w) + Diagonal(d)),
    "kron": ([spd(2, seed=2), spd(3, seed=3)], lambda a, b: Kronecker(a, b)),
    "kron+scaled": (
        [spd(2, seed=4), spd(3, seed=5), torch.tensor(0.3, dtype=F64)],
        lambda a, b, s: Kronecker(a, b) + ScaledIdentity(s, 6),
    ),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("case", CASES)
def test_adapter_matches_dense(case):
    tensors, build = CASES[case]
    op = build(*tensors)
    lo = as_linear_operator(op)
    a = op.to_dense()
    n = op.n
    assert isinstance(lo, LinearOperator) and lo.shape == (n, n)
    assert all(x is y for x, y in zip(lo.representation(), tensors))  # the operator's own tensors
    torch.testing.assert_close(lo.to_dense(), a)
    torch.testing.assert_close(lo.diagonal(), a.diagonal())
    x = torch.randn(n, 3, dtype=F64)
    torch.testing.assert_close(lo @ x, a @ x)
    torch.testing.assert_close(lo.matmul(x[:, 0]), a @ x[:, 0])
    torch.testing.assert_close(lo.mT @ x, a @ x)
    inv_quad, logdet = lo.inv_quad_logdet(x, logdet=True)
    torch.testing.assert_close(inv_quad, (x * torch.linalg.solve(a, x)).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(a), rtol=1e-10, atol=1e-10)
    per_column, _ = lo.inv_quad_logdet(x, reduce_inv_quad=False)
    torch.testing.assert_close(per_column, (x * torch.linalg.solve(a, x)).sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lo.inv_quad(x[:, 0]), x[:, 0] @ torch.linalg.solve(a, x[:, 0]))
    torch.testing.assert_close(lo.logdet(), torch.logdet(a), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.logdet(lo), torch.logdet(a), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lo.solve(x), torch.linalg.solve(a, x), rtol=1e-10, atol=1e-10)
    left = torch.randn(2, n, dtype=F64)
    torch.testing.assert_close(lo.solve(x, left), left @ torch.linalg.solve(a, x), rtol=1e-10, atol=1e-10)
    root = lo.root_decomposition()
    assert isinstance(root, RootLinearOperator)
    torch.testing.assert_close(root.root.to_dense() @ root.root.to_dense().mT, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(root @ x, a @ x, rtol=1e-10, atol=1e-10)
    chol = lo.cholesky().to_dense()
    torch.testing.assert_close(chol, torch.linalg.cholesky(a))


def test_structured_root_is_kept_when_no_wider_than_n():
    lo = as_linear_operator(Kronecker(spd(2, seed=6), spd(3, seed=7)))
    root = lo.root_decomposition().root
    assert type(root).__name__ == "StructuredRootLinearOperator" and root.shape == (6, 6)
    wide = as_linear_operator(LowRank(torch.randn(6, 2, dtype=F64)) + Diagonal(positive(6)))
    assert wide.root_decomposition().root.shape == (6, 6)  # [W, D^1/2] is 6 x 8: the dense factor instead


@pytest.mark.parametrize("case", ["dense", "lowrank+diag", "kron+scaled"])
def test_gradients_through_linear_operator_functions(case):
    """linear_operator's autograd functions rebuild the adapter from its tensors: gradients reach them all."""
    tensors, build = CASES[case]
    n = build(*tensors).n
    x = torch.randn(n, 2, dtype=F64)
    inputs = [t.clone().requires_grad_() for t in tensors]

    def matmul(*ts):
        return as_linear_operator(build(*ts)).matmul(x)

    def inv_quad_logdet(*ts):
        inv_quad, logdet = as_linear_operator(build(*ts)).inv_quad_logdet(x, logdet=True)
        return inv_quad + logdet

    def root_matmul(*ts):
        return as_linear_operator(build(*ts)).root_decomposition().matmul(x)

    for fn in (matmul, inv_quad_logdet, root_matmul):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_batch_expand_repeat_index():
    op = LowRank(torch.randn(4, 2, dtype=F64)) + Diagonal(positive(4))
    a = op.to_dense()
    lo = as_linear_operator(op).expand(3, 4, 4)
    assert isinstance(lo, StructuredLinearOperator) and lo.shape == (3, 4, 4)
    assert lo.operator.batch_shape == () and lo.representation()[0] is op.base.factor  # shared, not copied
    rep = as_linear_operator(op).repeat(2, 1, 1)
    assert isinstance(rep, StructuredLinearOperator) and rep.shape == (2, 4, 4)
    torch.testing.assert_close(lo.to_dense(), a.expand(3, 4, 4))
    x = torch.randn(3, 4, 2, dtype=F64)
    inv_quad, logdet = lo.inv_quad_logdet(x, logdet=True)
    torch.testing.assert_close(inv_quad, (x * torch.linalg.solve(a, x)).sum((-2, -1)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(a).expand(3), rtol=1e-10, atol=1e-10)
    assert lo[1].shape == (4, 4) and isinstance(lo[1], StructuredLinearOperator)
    torch.testing.assert_close(lo[0:2].to_dense(), a.expand(2, 4, 4))
    torch.testing.assert_close(lo[..., 1:3, 1:3].to_dense(), a[1:3, 1:3].expand(3, 2, 2))
    assert lo.unsqueeze(0).shape == (1, 3, 4, 4)
    batched = as_linear_operator(Dense(spd(3, 2, seed=8)))
    dense = batched.operator.to_dense()
    torch.testing.assert_close(batched[1].to_dense(), dense[1])  # inside the operator's batch: densified
    torch.testing.assert_close(batched.unsqueeze(-3).to_dense(), dense.unsqueeze(-3))
    with pytest.raises(ValueError, match="batch_shape"):
        as_linear_operator(Dense(spd(3, 2, seed=9)), batch_shape=(4,))


def test_adding_diagonals_keeps_the_structure():
    k = Kronecker(spd(2, seed=10), spd(3, seed=11))
    lo = as_linear_operator(k)
    for noisy in (
        lo.add_diagonal(torch.tensor(0.2, dtype=F64)),
        lo + DiagLinearOperator(positive(6)),
        lo.add_jitter(1e-3),
    ):
        assert isinstance(noisy, StructuredLinearOperator) and isinstance(noisy.operator, AddedDiagonal)
    d = positive(6)
    torch.testing.assert_close((lo + DiagLinearOperator(d)).to_dense(), k.to_dense() + torch.diag(d))
    scaled = lo * torch.tensor(2.0, dtype=F64)
    assert isinstance(scaled, StructuredLinearOperator)
    torch.testing.assert_close(scaled.to_dense(), 2 * k.to_dense())
    both = lo + as_linear_operator(Dense(spd(6, seed=12)))
    torch.testing.assert_close(both.to_dense(), k.to_dense() + spd(6, seed=12))
    # not strictly positive: linear_operator's generic sum, still correct
    generic = lo.add_diagonal(torch.zeros(6, dtype=F64))
    torch.testing.assert_close(generic.to_dense(), k.to_dense())


@pytest.mark.parametrize("case", CASES)
def test_to_gpytorch_log_prob_and_samples(case):
    tensors, build = CASES[case]
    op = build(*tensors)
    loc = torch.randn(2, op.n, dtype=F64)
    dist = MultivariateNormal(loc, op)
    g = dist.to_gpytorch()
    assert isinstance(g, gpytorch.distributions.MultivariateNormal)
    assert g.batch_shape == dist.batch_shape and g.event_shape == dist.event_shape
    x = torch.randn(3, 2, op.n, dtype=F64)
    torch.testing.assert_close(g.log_prob(x), dist.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.variance, dist.variance)
    num = 20000
    draws = g.rsample(torch.Size([num]))
    base = g.get_base_samples(torch.Size([num]))
    fixed = g.rsample(base_samples=base)
    chol = torch.linalg.cholesky(op.to_dense())
    for s in (draws, fixed):
        assert s.shape == (num, 2, op.n)
        z = torch.linalg.solve_triangular(chol, (s - loc).unsqueeze(-1), upper=False).squeeze(-1)
        assert z.mean(0).abs().max() < 5 / math.sqrt(num)
        cov = torch.einsum("sbi,sbj->bij", z, z) / num
        assert (cov - torch.eye(op.n, dtype=F64)).abs().max() < 5 * math.sqrt(2 / num)


def test_to_gpytorch_gradients_and_gpytorch_likelihood():
    w, d = torch.randn(6, 2, dtype=F64, requires_grad=True), positive(6).requires_grad_()
    dist = MultivariateNormal(torch.zeros(6, dtype=F64), LowRank(w) + Diagonal(d))
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    marginal = lik(dist.to_gpytorch())
    cov = marginal.lazy_covariance_matrix
    assert isinstance(cov, StructuredLinearOperator) and isinstance(cov.operator, AddedDiagonal)
    y = torch.randn(6, dtype=F64)
    dense = (w @ w.T + torch.diag(d) + lik.noise * torch.eye(6, dtype=F64)).detach()
    expected = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=F64), dense).log_prob(y)
    value = marginal.log_prob(y)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-10, atol=1e-10)
    value.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (w, d, lik.raw_noise))


def test_to_gpytorch_float32():
    w, d = torch.randn(6, 2), positive(6).float()
    dist = MultivariateNormal(torch.zeros(6), LowRank(w) + Diagonal(d))
    x = torch.randn(4, 6)
    value = dist.to_gpytorch().log_prob(x)
    assert value.dtype == torch.float32
    ref = torch.distributions.MultivariateNormal(
        torch.zeros(6, dtype=F64), (w @ w.T + torch.diag(d)).double()
    )
    torch.testing.assert_close(value.double(), ref.log_prob(x.double()), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapter_on_cuda():
    op = Kronecker(spd(2, seed=13).cuda(), spd(3, seed=14).cuda()) + ScaledIdentity(
        torch.tensor(0.2).double().cuda(), 6
    )
    lo = as_linear_operator(op)
    x = torch.randn(6, 2, dtype=F64, device="cuda")
    inv_quad, logdet = lo.inv_quad_logdet(x, logdet=True)
    a = op.to_dense()
    torch.testing.assert_close(inv_quad, (x * torch.linalg.solve(a, x)).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(a), rtol=1e-10, atol=1e-10)
    assert lo.root_decomposition().matmul(x).device == x.device


_SNAPSHOT = """
import json, sys
import gpytorch, linear_operator, torch

def snapshot():
    out = {}
    for mod in (gpytorch.settings, linear_operator.settings):
        for name, obj in vars(mod).items():
            if isinstance(obj, type):
                for attr in dir(obj):
                    if attr.startswith("_global") or attr == "_state":
                        out[f"{mod.__name__}.{name}.{attr}"] = repr(getattr(obj, attr))
    out["torch.default_dtype"] = repr(torch.get_default_dtype())
    return out
"""


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SNAPSHOT) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_changes_no_setting_and_imports_no_botorch():
    result = _run(
        """
        before = snapshot()
        import structgp
        plain = "botorch" in sys.modules
        import structgp.integrations.gpytorch
        from structgp.distributions import MultivariateNormal
        after = snapshot()
        keys = set(before) | set(after)
        changed = {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}
        botorch = plain or "botorch" in sys.modules
        print(json.dumps({"changed": changed, "botorch": botorch, "n": len(before)}))
        """
    )
    assert result["n"] > 20  # the snapshot does see the settings
    assert result["changed"] == {}
    assert result["botorch"] is False


_LOG_PROB = """
import torch
from structgp.covariance import Kronecker, LowRank, Diagonal, ScaledIdentity
from structgp.distributions import MultivariateNormal
torch.manual_seed(0)
F64 = torch.float64
a, b = torch.randn(3, 3, dtype=F64), torch.randn(4, 4, dtype=F64)
cases = [
    Kronecker(a @ a.T + torch.eye(3, dtype=F64), b @ b.T + torch.eye(4, dtype=F64)) + ScaledIdentity(0.1, 12),
    LowRank(torch.randn(12, 3, dtype=F64)) + Diagonal(torch.rand(12, dtype=F64) + 0.1),
]
diffs, values = [], []
for op in cases:
    dist = MultivariateNormal(torch.randn(12, dtype=F64), op)
    x = dist.sample((4,))
    values.append(dist.log_prob(x).tolist())
    diffs.append(float((dist.to_gpytorch().log_prob(x) - dist.log_prob(x)).abs().max()))
"""


@pytest.mark.parametrize("with_botorch", [False, True])
def test_gpytorch_log_prob_equals_structgp_with_and_without_botorch(with_botorch):
    if with_botorch and importlib.util.find_spec("botorch") is None:
        pytest.skip("botorch is not installed")
    prelude = "import botorch\n" if with_botorch else ""
    result = _run(
        prelude
        + _LOG_PROB
        + """
print(json.dumps({"diffs": diffs, "values": values, "botorch": "botorch" in sys.modules,
                  "max_cholesky_size": gpytorch.settings.max_cholesky_size.value()}))
"""
    )
    assert result["botorch"] is with_botorch
    assert max(result["diffs"]) < 1e-10
    assert all(math.isfinite(v) for vs in result["values"] for v in vs)
    if with_botorch:  # botorch does change gpytorch settings on import; the adapter does not depend on them
        assert result["max_cholesky_size"] != 800


def test_to_gpytorch_log_prob_stays_structured_when_fast_computations_are_off():
    """botorch's import turns gpytorch's fast log_prob off globally; the adapter's MVN must not densify."""
    import gpytorch

    from structgp import settings
    from structgp.covariance import Kronecker, ScaledIdentity
    from structgp.distributions import MultivariateNormal

    g = torch.linspace(0, 1, 30, dtype=torch.float64)
    k = torch.exp(-0.5 * (g[:, None] - g[None, :]) ** 2 / 0.04)
    mvn = MultivariateNormal(torch.zeros(900, dtype=torch.float64), Kronecker(k, k) + ScaledIdentity(0.1, 900))
    y = torch.randn(900, dtype=torch.float64)
    expected = mvn.log_prob(y)
    with gpytorch.settings.fast_computations(log_prob=False), settings(dense_limit=2**16):
        torch.testing.assert_close(mvn.to_gpytorch().log_prob(y), expected)

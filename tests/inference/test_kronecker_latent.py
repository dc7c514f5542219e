"""The lifted Woodbury engine's Kronecker form (:mod:`structgp.inference.kronecker_latent`: the capacitance by
column chunks of a Kronecker spectral root that is never formed, gradients through the factors' partial
traces), its planning from the factor spectra, and its memory."""

import math

import pytest
import torch
import torch.distributions as tdist
from torch.utils._python_dispatch import TorchDispatchMode

import structgp as sg
from structgp.covariance import Kronecker, ScaledIdentity, SparseLifted
from structgp.covariance.sparse_lifted import Lift
from structgp.inference import kronecker_latent, lifted_woodbury
from structgp.inference.lifted_woodbury import LiftedWoodbury
from structgp.inference.plan import instance_of
from structgp.inference.spectral_root import known_root_rank
from tests.inference.test_lifted_latent_form import guarded_value_and_grad, lifted_loss, loss_leaves, random_rows
from tests.inference.test_lifted_woodbury import smooth_grid
from tests.memory_guard import LargestOutput
from tests.reference import F64, assert_close, paired_grads, positive


@pytest.fixture
def kron_form(monkeypatch):
    """The latent forms whatever the size (the row form ruled out)."""
    monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 0)
    monkeypatch.setattr(lifted_woodbury, "_form_flops", lambda lift, rank: (0.0, float("inf")))


def grid_base(sizes: tuple[int, ...], ls: torch.Tensor) -> Kronecker:
    """Smooth RBF factors of different sizes and lengthscales (singular in float64)."""
    return Kronecker(*(smooth_grid(n, ls * (1 + 0.5 * i)) for i, n in enumerate(sizes)))


@pytest.mark.parametrize("sizes", [(16, 14, 12), (24, 20)])
@pytest.mark.parametrize("noise", ["scaled", "fixed_diagonal"])
def test_kron_form_matches_dense_autograd(kron_form, monkeypatch, sizes, noise):
    """Values and gradients (lengthscale, noise scale, targets) of log N + |A^-1 y|^2 through the Kronecker
    form against dense float64 autograd (torch.distributions and torch.linalg); column chunks of 7."""
    n_in, n = math.prod(sizes), 150
    monkeypatch.setattr(kronecker_latent, "CHUNK_ELEMENTS", 7 * n_in)
    lift = random_rows(n, n_in, torch.Generator().manual_seed(4))

    def check_report(report, base):
        assert "through the Kronecker root's factors" in report and "spectral root" in report, report
        rank = known_root_rank(base)
        assert rank is not None and rank[1] and rank[0] < n_in // 2  # a truncated root, several chunks wide

    loss = lifted_loss(lift, lambda ls: grid_base(sizes, ls), noise, positive(n, low=0.02), check_report)
    leaves = loss_leaves(n, 0.6, noise)
    for name, got, ref in paired_grads(loss, leaves):
        assert torch.isfinite(got).all(), name
        assert_close(got, ref, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        args = list(leaves.values())
        assert_close(loss(True, *args), loss(False, *args), rtol=1e-9, atol=0)


def test_pair_traces_against_dense():
    """The partial traces of M = L^T D^-1 L against the other factors, against the dense contraction."""
    sizes = (5, 4, 3)
    lift = Lift.from_tensor(random_rows(40, math.prod(sizes), torch.Generator().manual_seed(2)))
    mats = [positive(n, n) for n in sizes]
    inv_noise = positive(40)
    got = kronecker_latent.pair_traces(lift, lift.values, inv_noise, mats)
    dense = lift.to_dense()
    m = (dense.T * inv_noise) @ dense
    t = m.reshape(*sizes, *sizes)
    assert_close(got[0], torch.einsum("ajkblm,jl,km->ab", t, mats[1], mats[2]))
    assert_close(got[1], torch.einsum("jaklbm,jl,km->ab", t, mats[0], mats[2]))
    assert_close(got[2], torch.einsum("jkalmb,jl,km->ab", t, mats[0], mats[1]))


class OpNames(TorchDispatchMode):
    """The names of the aten ops run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def planned_problem(m: int, n_out: int, ls: float):
    lift = random_rows(n_out, m**3, torch.Generator().manual_seed(0))
    k = smooth_grid(m, torch.tensor(ls, dtype=F64))
    base = Kronecker(k, k, k)
    return SparseLifted(lift, base) + ScaledIdentity(torch.tensor(0.1, dtype=F64), n_out), base


def test_auto_learns_the_rank_from_the_factors_and_picks_the_kron_form(monkeypatch):
    """20 000 rows on a 16^3 grid whose spectral rank is about half n_in, under a 700 MiB budget that the upper
    bound n_in (the latent form, 925 MiB) exceeds. sg.plan runs no factorisation and, the rank unknown, does not
    choose the exact path; the call learns the rank from the 16 x 16 factors alone and "auto" then takes the
    exact Kronecker form (which fits), as sg.plan says afterwards."""
    monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 0)
    monkeypatch.setattr(kronecker_latent, "CHUNK_ELEMENTS", 2**24)  # the Kronecker form then needs ~610 MiB

    def budget():
        return sg.settings(memory_budget=700 * 2**20)

    op, base = planned_problem(16, 20_000, 0.4)
    with OpNames() as ops, budget():
        before = sg.plan(op)
    assert not [name for name in ops.names if "linalg" in name or "cholesky" in name], ops.names
    assert before.engine.name != "lifted_woodbury", str(before)
    assert "lifted_woodbury's facts" in before.decision and "may differ" in before.decision, before.decision
    assert any("4096 x 4096 capacitance through" in o.reason and not o.fits for o in before.alternatives), before
    with LargestOutput() as guard:
        assert instance_of(LiftedWoodbury).learn(op)
    assert guard.largest <= 16 * 16, guard.where
    rank, spectral = known_root_rank(base)
    assert spectral and rank < 16**3 * 3 // 4
    with budget():
        after = sg.plan(op)
    assert after.engine.name == "lifted_woodbury", str(after)
    assert "not yet known" not in after.decision, after.decision
    assert f"{rank} x {rank} capacitance (the base's spectral root" in after.reason, after.reason
    assert "Kronecker root's factors" in after.reason, after.reason
    fresh, _ = planned_problem(16, 20_000, 0.4)
    with budget():
        fresh.logdet()
    assert sg.last_report().method == "woodbury" and "Kronecker root's factors" in str(sg.last_report())


def test_large_factors_are_not_learned(monkeypatch):
    """Factors over LEARN_FACTOR_SIZE: nothing is factorised to learn the rank; the plan keeps the upper bound."""
    monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 0)
    n = lifted_woodbury.LEARN_FACTOR_SIZE + 1
    k = smooth_grid(n, torch.tensor(0.2, dtype=F64))
    lift = random_rows(100, 2 * n, torch.Generator().manual_seed(0))
    op = SparseLifted(lift, Kronecker(k, smooth_grid(2, torch.tensor(0.2, dtype=F64)))) + ScaledIdentity(
        torch.tensor(0.1, dtype=F64), 100
    )
    with OpNames() as ops:
        assert not instance_of(LiftedWoodbury).learn(op)
    assert not [name for name in ops.names if "linalg" in name or "cholesky" in name], ops.names
    with sg.settings(method="woodbury"):
        assert f"{2 * n} x {2 * n} capacitance through" in sg.plan(op).reason


@pytest.mark.parametrize("form", ["kron", "latent"])
def test_nothing_n_in_by_r_is_allocated(kron_form, monkeypatch, form):
    """Value + gradient on a 20^3 grid (n_in = 8000) with 3000 rows of 8 cells: no op outputs anything of
    n_in r / 2 elements (the dense spectral root or P = M R) in the Kronecker form. The latent form, the
    control, holds them and is caught."""
    monkeypatch.setattr(kronecker_latent, "CHUNK_ELEMENTS", 32 * 8000)
    if form == "latent":
        monkeypatch.setattr(lifted_woodbury, "_kron_flops", lambda *args: float("inf"))
    m = 20
    guard, report, base, ls, s = guarded_value_and_grad(3000, m, 0.5)
    rank, spectral = known_root_rank(base)
    assert spectral and 200 < rank < m**3 // 4, rank
    if form == "latent":
        assert "(nothing n_in x r)" not in report and guard.largest >= m**3 * rank, report
        return
    assert "through the Kronecker root's factors" in report, report
    assert guard.largest < m**3 * rank // 2, guard.where
    assert ls.grad is not None and s.grad is not None


def test_float32_data_gradients_within_one_percent(kron_form, monkeypatch):
    """Float32 data (the root then truncates at float32 rounding, 1.2e-7 of each factor's largest eigenvalue,
    and the factors' partial traces use R_k R_k^T for K_k): value and gradients in lengthscale and noise equal
    the dense gram form's (which contracts G with the exact K) to 1e-6, and dense float64 autograd of the same
    float32 inputs to 1e-4 (the truncation itself, shared by every form: 1.8e-5 here) and 1 %."""
    sizes, n = (16, 14, 12), 150
    monkeypatch.setattr(kronecker_latent, "CHUNK_ELEMENTS", 7 * math.prod(sizes))
    lift = random_rows(n, math.prod(sizes), torch.Generator().manual_seed(5)).float()
    y = torch.randn(n, generator=torch.Generator().manual_seed(6))

    def loss(kind, ls, s):
        # the factors rounded to float32 on every side (the dense reference in float64 from there)
        dtype = torch.float64 if kind == "dense" else torch.float32
        base = Kronecker(*(smooth_grid(m, ls * (1 + 0.5 * i)).float().to(dtype) for i, m in enumerate(sizes)))
        if kind == "dense":
            dense_lift = lift.double().to_dense()
            cov = dense_lift @ base.to_dense() @ dense_lift.T + s * torch.eye(n, dtype=F64)
            return tdist.MultivariateNormal(torch.zeros(n, dtype=F64), cov).log_prob(y.double())
        if kind == "gram":
            monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 2**62)
        with sg.settings(method="woodbury"):
            q, ld = (SparseLifted(lift, base) + ScaledIdentity(s.float(), n)).inv_quad_logdet(y)
        note = "through the Kronecker root's factors" if kind == "kron" else "gram form"
        assert note in str(sg.last_report()), str(sg.last_report())
        return -0.5 * (q + ld + n * math.log(2 * math.pi))

    results = {}
    for kind in ("kron", "gram", "dense"):
        ls, s = torch.tensor(0.6, dtype=F64, requires_grad=True), torch.tensor(0.05, dtype=F64, requires_grad=True)
        value = loss(kind, ls, s)
        results[kind] = (value.detach().double(), *torch.autograd.grad(value, (ls, s)))
    for got, ref in zip(results["kron"], results["gram"]):
        assert_close(got.double(), ref.double(), rtol=1e-6, atol=0)
    for got, ref, rtol in zip(results["kron"], results["dense"], (1e-4, 1e-2, 1e-2)):
        assert_close(got.double(), ref, rtol=rtol, atol=0)

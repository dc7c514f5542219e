"""The one dispatch rule and metadata-only planning: engines found by the structure they registered for,
``plan`` running no tensor computation at all, and each Kronecker factor of a lifted covariance factorised
once per call."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import structgp as sg
from structgp.covariance import (
    BlockDiag,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    Permuted,
    ScaledIdentity,
    SparseLifted,
)
from structgp.inference.plan import candidates, engine_names, register
from tests.inference.test_lifted_woodbury import interpolation_lift
from tests.reference import F64, positive, spd


class OpLog(TorchDispatchMode):
    """Every aten op that runs (name -> count), and the shapes of the factorisations' inputs."""

    FACTORISATIONS = ("cholesky", "eigh", "eig", "svd", "qr", "lu", "ldl")

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.factorised: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if any(f in name for f in self.FACTORISATIONS) and "solve" not in name:
            self.factorised.append((name, args[0].detach().clone()))
        return func(*args, **(kwargs or {}))


def rbf(n: int, lengthscale: float) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)


def structures():
    g = 6
    lift = interpolation_lift(300, g)
    blocks = BlockDiag(torch.stack([spd(5), spd(5), spd(5)]))
    return {
        "Dense": Dense(spd(20)),
        "Diagonal": Diagonal(positive(7)),
        "LowRank + Diagonal": LowRank(torch.randn(50, 3, dtype=F64)) + Diagonal(positive(50)),
        "Kronecker": Kronecker(spd(4), spd(5)),
        "Kronecker + ScaledIdentity": Kronecker(spd(4), spd(5)) + ScaledIdentity(0.1, 20),
        "Kronecker + Diagonal (smooth)": Kronecker(rbf(8, 0.5), rbf(6, 0.5)) + Diagonal(positive(48)),
        "Kronecker + Kronecker noise": Kronecker(spd(4), spd(5))
        + Kronecker(Diagonal(positive(4)), Diagonal(positive(5))),
        "SparseLifted(Kronecker) + ScaledIdentity": SparseLifted(lift, Kronecker(spd(g), spd(g)))
        + ScaledIdentity(0.1, 300),
        "SparseLifted(Dense) + Diagonal": SparseLifted(lift, Dense(spd(g * g))) + Diagonal(positive(300)),
        "BlockDiag": blocks,
        "BlockDiag + Diagonal": blocks + Diagonal(positive(15)),
        "Permuted(BlockDiag)": Permuted(blocks, torch.randperm(15)),
        "Dense + LowRank (Sum)": Dense(spd(10)) + LowRank(torch.randn(10, 2, dtype=F64)),
        "Permuted(Kronecker + Diagonal (smooth))": Permuted(
            Kronecker(rbf(8, 0.5), rbf(6, 0.5)) + Diagonal(positive(48)), torch.randperm(48)
        ),
        "BlockDiag[Kronecker + Diagonal (smooth), Dense]": BlockDiag(
            [Kronecker(rbf(8, 0.5), rbf(6, 0.5)) + Diagonal(positive(48)), Dense(spd(5))]
        ),
        "SparseLifted(identity, Kronecker) + Diagonal": SparseLifted(
            torch.eye(48, dtype=F64).to_sparse(), Kronecker(rbf(8, 0.5), rbf(6, 0.5))
        ) + Diagonal(positive(48)),
        "SparseLifted(selection, Kronecker) + ScaledIdentity (masked grid)": SparseLifted(
            torch.eye(48, dtype=F64)[::2].to_sparse(), Kronecker(rbf(8, 0.5), rbf(6, 0.5))
        ) + ScaledIdentity(0.1, 24),
    }


@pytest.mark.parametrize("name", list(structures()))
@pytest.mark.parametrize("method", ["auto", "cg"])
def test_plan_runs_no_tensor_computation(name, method):
    op = structures()[name]
    with sg.settings(method=method), OpLog() as log:
        p = sg.plan(op)
    assert p.method
    assert log.factorised == [] and sum(log.ops.values()) == 0, (name, dict(log.ops))


def test_plan_after_a_run_reads_the_facts_the_engine_cached():
    op = Kronecker(rbf(16, 1.0), rbf(12, 1.0)) + Diagonal(positive(192))
    assert "if it is singular" in sg.plan(op).reason  # not known yet
    op.logdet()
    with OpLog() as log:
        p = sg.plan(op)
    assert sum(log.ops.values()) == 0
    assert any("spectral root of rank" in o.reason for o in (p, *p.alternatives))


@pytest.mark.parametrize("smooth", [False, True])
def test_lifted_kronecker_factorises_each_factor_once(smooth):
    """One inv_quad_logdet + backward of ``SparseLifted(L, K1 (x) K2 (x) K3) + Diagonal(d)``: each factor is
    factorised at most once by each method (positive definite: one Cholesky; singular in float64: Choleskys
    until one fails, then one eigendecomposition each)."""
    sizes = (9, 10, 11)
    mats = [(rbf(n, 1.0) if smooth else spd(n)).requires_grad_() for n in sizes]
    n_in = 9 * 10 * 11
    rows = torch.arange(400).repeat_interleave(3)
    cols = torch.randint(0, n_in, (1200,))
    lift = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.rand(1200, dtype=F64), (400, n_in)).coalesce()
    d = positive(400).requires_grad_()
    y = torch.randn(400, dtype=F64)
    op = SparseLifted(lift, Kronecker(*mats)) + Diagonal(d)
    with OpLog() as log, sg.settings(method="lifted_woodbury"):
        q, ld = op.inv_quad_logdet(y)
        (q + ld).backward()

    def factor_of(a: torch.Tensor) -> int | None:
        same = (i for i, m in enumerate(mats) if a.shape == m.shape and torch.allclose(a, m.detach(), rtol=1e-13))
        return next(same, None)

    runs = [(name, factor_of(a)) for name, a in log.factorised]
    per_factor_kind = Counter((name, i) for name, i in runs if i is not None)
    assert sg.last_report().method == "woodbury"
    assert all(count == 1 for count in per_factor_kind.values()), runs  # nothing factorised twice
    if smooth:  # each factor one eigendecomposition; Choleskys only until the first fails (float64 rounding
        # decides which of the nearly singular factors fail first)
        assert {i for name, i in per_factor_kind if name == "_linalg_eigh"} == {0, 1, 2}, runs
        assert any(name == "linalg_cholesky_ex" for name, _ in per_factor_kind), runs
    else:
        assert set(per_factor_kind) == {("linalg_cholesky_ex", i) for i in range(3)}, runs
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in mats)


def test_candidates_by_registered_structure_most_specific_first():
    names = [e.name for e in candidates(Kronecker(spd(3), spd(4)) + ScaledIdentity(0.1, 12))]
    assert names[0] == "eigen" and set(names[1:]) == {"cholesky", "cg"}
    lifted = SparseLifted(interpolation_lift(30, 3), Dense(spd(9))) + Diagonal(positive(30))
    assert {e.name for e in candidates(lifted)[:2]} == {"lift_reduction", "lifted_woodbury"}
    low_rank = LowRank(torch.randn(9, 2, dtype=F64)) + ScaledIdentity(0.3, 9)
    assert [e.name for e in candidates(low_rank)][0] == "low_rank_woodbury"
    assert [e.name for e in candidates(Dense(spd(3)))] == ["cholesky", "cg"]


def test_every_engine_name_and_family_is_accepted_by_settings():
    names = engine_names()
    for name in ("low_rank_woodbury", "lifted_woodbury", "spectral_woodbury", "woodbury", "eigen", "cg"):
        assert name in names
    for name in names:
        with sg.settings(method=name):
            pass
    op = SparseLifted(interpolation_lift(30, 3), Dense(spd(9))) + Diagonal(positive(30))
    with sg.settings(method="lifted_woodbury"):
        p = sg.plan(op)
    assert p.forced and p.engine.name == "lifted_woodbury" and p.method == "woodbury"
    assert "engine lifted_woodbury" in str(p)
    with sg.settings(method="low_rank_woodbury"), pytest.raises(ValueError, match="apply: lifted_woodbury"):
        sg.plan(op)


def test_register_rejects_bad_patterns_and_taken_names():
    from structgp.inference.plan import Engine

    with pytest.raises(TypeError, match="pattern"):
        register(int)
    with pytest.raises(TypeError, match="pattern"):
        register(Dense, Diagonal, Diagonal)

    class Twin(Engine):
        name = "cholesky"

    with pytest.raises(ValueError, match="name"):
        register(Dense)(Twin)

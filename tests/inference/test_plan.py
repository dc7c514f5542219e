import threading

import pytest
import torch

import structgp as sg
from structgp._config import current
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from tests.reference import F64, positive, spd


def low_rank_plus_noise(n=200, k=4):
    return LowRank(torch.randn(n, k, dtype=F64)) + Diagonal(positive(n))


def test_auto_choice_per_structure():
    assert sg.plan(low_rank_plus_noise()).method == "woodbury"
    assert sg.plan(Dense(spd(10))).method == "cholesky"
    assert sg.plan(Diagonal(positive(5))).method == "diagonal"
    assert sg.plan(Kronecker(spd(10), spd(10)) + ScaledIdentity(0.1, 100)).method == "eigen"


def test_forced_method_and_its_errors():
    op = low_rank_plus_noise()
    with sg.settings(method="cholesky"):
        p = sg.plan(op)
        assert p.method == "cholesky" and p.forced
        q, l = op.inv_quad_logdet(torch.randn(200, dtype=F64))
        assert sg.last_report().method == "cholesky"
    with sg.settings(method="eigen"), pytest.raises(ValueError, match="method='eigen' does not apply.*woodbury"):
        op.logdet()


def test_structural_methods_win_over_forced():
    with sg.settings(method="cholesky"):
        assert sg.plan(Diagonal(positive(5))).method == "diagonal"


def test_memory_budget_excludes_methods():
    op = low_rank_plus_noise(n=300)
    with sg.settings(memory_budget=300 * 300):  # too small for dense Cholesky, enough for Woodbury
        p = sg.plan(op)
        assert p.method == "woodbury"
        assert "over the memory budget" in str(p)
    with sg.settings(memory_budget=10), pytest.raises(MemoryError, match="memory_budget"):
        sg.plan(Dense(spd(30)))


def test_last_report_records_method_and_jitter():
    w = torch.randn(5, 2, dtype=F64)
    with pytest.warns(UserWarning):
        Dense(w @ w.T).logdet()
    rep = sg.last_report()
    assert rep.method == "cholesky" and rep.jitter > 0
    assert "jitter" in str(rep)


def test_settings_validation_and_scoping():
    with pytest.raises(ValueError, match="method"):
        with sg.settings(method="magic"):
            pass
    with pytest.raises(TypeError, match="unknown option"):
        with sg.settings(cg_tolerance=1e-3):
            pass
    with pytest.raises(ValueError, match="cg_tol"):
        with sg.settings(cg_tol=-1.0):
            pass
    seen = {}
    with sg.settings(method="cholesky"):
        t = threading.Thread(target=lambda: seen.setdefault("m", current().method))
        t.start()
        t.join()
        assert current().method == "cholesky"
    assert seen["m"] == "auto"  # a new thread does not inherit the scope: nothing is process-global
    assert current().method == "auto"


def test_plan_rejects_non_operators():
    with pytest.raises(TypeError, match="op: expected a structgp operator"):
        sg.plan(torch.eye(3))


def test_rhs_validation():
    op = Dense(spd(4))
    with pytest.raises(TypeError, match="rhs: expected dtype"):
        op.solve(torch.randn(4))
    with pytest.raises(ValueError, match="rhs: expected shape"):
        op.inv_quad_logdet(torch.randn(5, dtype=F64))
    with pytest.raises(ValueError, match="rhs: expected shape"):
        op.solve(torch.randn(3, 5, dtype=F64))


def test_many_samples_share_one_factorisation():
    op = low_rank_plus_noise(n=30)
    b = torch.randn(7, 5, 30, dtype=F64)
    q, l = op.inv_quad_logdet(b)
    assert q.shape == (7, 5) and l.shape == ()
    a = op.to_dense()
    ref = (b * torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)).sum(-1)
    torch.testing.assert_close(q, ref)

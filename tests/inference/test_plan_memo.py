import gc
import types
import weakref

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.inference import plan_memo
from structgp.inference.cholesky import DenseCholesky
from tests.reference import F64, positive, spd


@pytest.fixture(autouse=True)
def empty_memo():
    plan_memo.clear()
    yield
    plan_memo.clear()


@pytest.fixture
def applies_calls(monkeypatch):
    """Counts the calls of the dense Cholesky engine's ``why`` (asked by every plan of a Dense)."""
    calls = []
    original = DenseCholesky.why

    def counting(self, op):
        calls.append(type(op).__name__)
        return original(self, op)

    monkeypatch.setattr(DenseCholesky, "why", counting)
    return calls


def test_same_signature_reuses_the_plan(applies_calls):
    Dense(spd(6)).logdet()
    assert len(applies_calls) == 1
    other = Dense(spd(6, seed=3))  # other values, same structure
    other.inv_quad_logdet(torch.randn(6, dtype=F64))
    other.solve(torch.randn(6, 2, dtype=F64))
    assert len(applies_calls) == 1
    assert sg.last_report().method == "cholesky"
    assert plan_memo.info()["hits"] == 2


@pytest.mark.parametrize(
    "other",
    [
        lambda: Dense(spd(7)),  # shape
        lambda: Dense(spd(6, 2)),  # batch shape
        lambda: Dense(spd(6).float()),  # dtype
        lambda: Dense(spd(6)) + Diagonal(positive(6)),  # structure
    ],
)
def test_another_signature_gets_a_fresh_plan(applies_calls, other):
    Dense(spd(6)).logdet()
    assert len(applies_calls) == 1
    other().logdet()
    assert len(applies_calls) == 2


def test_settings_are_part_of_the_key():
    op = LowRank(torch.randn(50, 3, dtype=F64)) + Diagonal(positive(50))
    op.logdet()
    assert sg.last_report().method == "woodbury"
    with sg.settings(method="cholesky"):
        op.logdet()
        assert sg.last_report().method == "cholesky"
    op.logdet()
    assert sg.last_report().method == "woodbury"
    assert plan_memo.info()["size"] == 2


def test_plans_marked_not_memoisable_are_planned_every_time(monkeypatch):
    calls = []

    def not_memoisable(op):
        p = sg.plan(op)
        object.__setattr__(p, "memoisable", False)
        calls.append(1)
        return p

    monkeypatch.setattr(plan_memo, "plan", not_memoisable)
    for seed in range(3):
        Dense(spd(5, seed=seed)).logdet()
    assert len(calls) == 3 and plan_memo.info()["size"] == 0


def test_memoisable_flag_and_its_default():
    dense = Dense(spd(4))
    kron = Kronecker(spd(2), spd(3)) + Diagonal(positive(6))
    assert plan_memo._memoisable(types.SimpleNamespace(memoisable=True), kron)
    assert not plan_memo._memoisable(types.SimpleNamespace(memoisable=False), dense)
    # a plan that does not say: memoised unless its planning may read values (a non-diagonal Kronecker)
    assert plan_memo._memoisable(types.SimpleNamespace(), dense)
    assert not plan_memo._memoisable(types.SimpleNamespace(), kron)
    diagonal_kron = Kronecker(Diagonal(positive(2)), Diagonal(positive(3)))
    assert plan_memo._memoisable(types.SimpleNamespace(), diagonal_kron + ScaledIdentity(0.1, 6))


def test_memo_keeps_no_operator_or_tensor_alive():
    matrix = spd(8)
    op = Dense(matrix)
    op.logdet()
    assert plan_memo.info()["size"] == 1
    refs = [weakref.ref(op), weakref.ref(matrix)]
    del op, matrix
    gc.collect()
    assert all(r() is None for r in refs)


def test_signature_holds_metadata_only():
    a, b = Dense(spd(5)), Dense(spd(5, seed=1))
    assert plan_memo.signature(a) == plan_memo.signature(b)
    assert plan_memo.signature(a) != plan_memo.signature(Dense(spd(5).float()))
    leaves = [x for part in plan_memo.signature(a) for x in (part if isinstance(part, tuple) else (part,))]
    assert not any(isinstance(x, torch.Tensor) for x in leaves)


def test_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(plan_memo, "MAX_ENTRIES", 4)
    for n in range(2, 12):
        Dense(spd(n)).logdet()
    assert plan_memo.info()["size"] == 4


def test_no_memo_inside_torch_func_transforms():
    mats = spd(4, 3)

    def logdet(m):
        return Dense(m).logdet()

    out = torch.func.vmap(logdet)(mats)
    torch.testing.assert_close(out, torch.linalg.slogdet(mats)[1])
    assert plan_memo.info()["size"] == 0

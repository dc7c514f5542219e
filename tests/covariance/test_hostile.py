"""Hostile input to the covariance layer: each case asserts the exact exception type and that the message names
the argument (and, for refusals to densify, what to do instead); where a value is returned, it is checked
against dense torch.

Error types: a NaN/Inf entry, or a zero where a positive value is required (an underflow), is a
:class:`NumericalError` (a ``ValueError`` that Pyro's samplers record as a divergence); a wrong sign, shape or
size is a plain ``ValueError``; a wrong type or dtype a ``TypeError``; a dense form over
``settings(dense_limit=...)`` a ``DensifyError``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgp as sg
from structgp.covariance import (
    BlockDiag,
    Dense,
    DensifyError,
    Diagonal,
    Kronecker,
    LowRank,
    ScaledIdentity,
    SparseLifted,
)
from structgp.covariance.errors import NumericalError
from tests.reference import F64, assert_close, positive, spd

INF, NAN = math.inf, math.nan


def _is_plain_value_error(err: BaseException) -> bool:
    return type(err) is ValueError


# -- constructors: values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda v: LowRank(torch.tensor([[1.0, v], [0.5, 2.0]], dtype=F64)), "factor"),
        (lambda v: Dense(torch.tensor([[2.0, v], [v, 2.0]], dtype=F64)), "matrix"),
        (lambda v: Diagonal(torch.tensor([1.0, v], dtype=F64)), "diag"),
        (lambda v: ScaledIdentity(torch.tensor(v, dtype=F64), 3), "scale"),
        (lambda v: Kronecker(torch.tensor([[2.0, v], [v, 2.0]], dtype=F64), spd(2)), "factors[0]"),
        (lambda v: SparseLifted(torch.tensor([[1.0, v]], dtype=F64), spd(2)), "lift"),
    ],
)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_entries_are_numerical_errors_naming_the_argument(build, name, value):
    with pytest.raises(NumericalError, match=rf"^{_re(name)}: expected finite entries \(found NaN or Inf\)"):
        build(value)


@pytest.mark.parametrize(
    "build, name",
    [(lambda v: Diagonal(torch.tensor([1.0, v], dtype=F64)), "diag"), (lambda v: ScaledIdentity(v, 3), "scale")],
)
def test_zero_noise_is_numerical_and_negative_noise_is_a_mistake(build, name):
    """0 is what a positive scale underflows to (numerical); a negative value never is (a plain ValueError,
    which a sampler must not swallow)."""
    with pytest.raises(NumericalError, match=rf"^{name}: expected strictly positive entries \(found 0\)"):
        build(0.0)
    with pytest.raises(ValueError, match=rf"^{name}: expected strictly positive entries \(found a negative") as info:
        build(-1.0)
    assert _is_plain_value_error(info.value)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 3), data=st.data())
def test_a_nan_anywhere_in_a_factor_is_found(n, k, data):
    factor = torch.randn(n, k, dtype=F64)
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, k - 1))
    factor[i, j] = data.draw(st.sampled_from([NAN, INF, -INF]))
    with pytest.raises(NumericalError, match="^factor: expected finite entries"):
        LowRank(factor)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), data=st.data())
def test_one_negative_noise_entry_is_a_plain_value_error(n, data):
    d = positive(n)
    d[data.draw(st.integers(0, n - 1))] = -data.draw(st.floats(1e-300, 1e300))
    with pytest.raises(ValueError, match="^diag: expected strictly positive entries") as info:
        Diagonal(d)
    assert _is_plain_value_error(info.value)


# -- constructors: shapes and types -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Dense(torch.zeros(0, 0, dtype=F64)), r"^matrix: expected shape \(\.\.\., n, n\) with n >= 1"),
        (lambda: Diagonal(torch.zeros(0, dtype=F64)), r"^diag: expected shape \(\.\.\., n\) with n >= 1"),
        (lambda: LowRank(torch.zeros(0, 2, dtype=F64)), r"^factor: expected shape \(\.\.\., n, k\) with n >= 1"),
        (lambda: Kronecker(torch.zeros(0, 0, dtype=F64), spd(2)), r"^factors\[0\]: expected shape .* n >= 1"),
        (lambda: Kronecker(spd(2), torch.zeros(0, 0, dtype=F64)), r"^factors\[1\]: expected shape .* n >= 1"),
        (lambda: ScaledIdentity(1.0, 0), r"^n: expected a positive int"),
    ],
)
def test_empty_operators_are_refused_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LowRank(torch.ones(3, 2, dtype=torch.int64)), r"^factor: expected dtype float32 or float64"),
        (lambda: Dense(torch.eye(2, dtype=torch.complex128)), r"^matrix: expected dtype float32 or float64"),
        (lambda: Diagonal([1.0, 2.0]), r"^diag: expected a torch.Tensor or a Python number, got list"),
        (lambda: Kronecker(spd(2), spd(2).float()), r"^factors\[1\]: expected dtype torch.float64"),
    ],
)
def test_wrong_types_are_type_errors_naming_the_argument(build, match):
    with pytest.raises(TypeError, match=match):
        build()


# -- scaling -------------------------------------------------------------------------------------------------
OPERATORS = {
    "dense": lambda: Dense(spd(4)),
    "low_rank": lambda: LowRank(torch.randn(4, 2, dtype=F64)),
    "kronecker": lambda: Kronecker(spd(2), spd(2)),
    "low_rank_plus_noise": lambda: LowRank(torch.randn(4, 2, dtype=F64)) + Diagonal(positive(4)),
    "sparse_lifted": lambda: SparseLifted(torch.randn(4, 3, dtype=F64), spd(3)),
    "block_diag": lambda: BlockDiag([spd(2), spd(2)]),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_zero_times_a_psd_operator_is_the_zero_matrix(name):
    op = OPERATORS[name]()
    assert_close((0 * op).to_dense(), torch.zeros(4, 4, dtype=F64), 0, 0)
    assert_close((op * torch.tensor(0.0, dtype=F64)).to_dense(), torch.zeros(4, 4, dtype=F64), 0, 0)


@pytest.mark.parametrize("c, error, match", [
    (-1.0, ValueError, r"^c \(scale\): expected strictly positive or zero entries \(found a negative entry\)"),
    (NAN, NumericalError, r"^c \(scale\): expected finite entries"),
    (INF, NumericalError, r"^c \(scale\): expected finite entries"),
])
def test_bad_scales_name_c(c, error, match):
    with pytest.raises(error, match=match) as info:
        c * Dense(spd(3))
    assert error is NumericalError or _is_plain_value_error(info.value)


def test_division_by_zero_is_refused():
    with pytest.raises(NumericalError, match=r"^c \(divisor\): expected strictly positive entries \(found 0\)"):
        Dense(spd(3)) / 0.0


# -- products --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize(
    "rhs, error, match",
    [
        (lambda: torch.ones(4, dtype=torch.float32), TypeError, r"^rhs: expected dtype torch.float64 \(the op"),
        (lambda: torch.ones(4, 2, dtype=torch.int64), TypeError, r"^rhs: expected a floating-point tensor"),
        (lambda: torch.ones(5, dtype=F64), ValueError, r"^rhs: expected shape \(n,\) or \(\.\.\., n, c\) with n=4"),
        (lambda: [1.0, 2.0, 3.0, 4.0], TypeError, r"^rhs: expected a torch.Tensor"),
    ],
)
def test_products_with_bad_right_hand_sides_name_rhs(name, rhs, error, match):
    op = OPERATORS[name]()
    x = rhs()
    with pytest.raises(error, match=match):
        op.matmul(x)
    if isinstance(x, torch.Tensor):
        with pytest.raises(error, match=match):
            op @ x


# -- conversions ------------------------------------------------------------------------------------------------
def test_numpy_and_torch_conversions_say_to_use_to_dense():
    op = Dense(spd(3))
    with pytest.raises(TypeError, match=r"np.asarray\(Dense\(3x3, float64\)\): .*op.to_dense\(\)"):
        np.asarray(op)
    for convert in (torch.as_tensor, torch.tensor):
        with pytest.raises(TypeError, match=r"Dense\(3x3, float64\) has no len\(\).*op.to_dense\(\)"):
            convert(op)
    with pytest.raises(TypeError, match=r"has no len\(\).*op.shape\[0\]"):
        len(op)
    assert bool(op) is True
    with pytest.raises(TypeError, match=r"np.asarray\(DenseRoot\(3x3\)\): .*M.to_dense\(\)"):
        np.asarray(op.root())


def test_iteration_follows_tensors_and_refuses_huge_operators():
    a = spd(3)
    rows = list(Dense(a))
    assert len(rows) == 3 and all(torch.equal(r, a[i]) for i, r in enumerate(rows))
    batched = list(Dense(spd(3, 2)))
    assert len(batched) == 2 and all(isinstance(b, Dense) and b.shape == (3, 3) for b in batched)
    big = Kronecker(torch.eye(1000, dtype=F64), torch.eye(1000, dtype=F64))
    with pytest.raises(DensifyError, match=r"^iterating over an operator .* would take 7450.6 GiB.*structured methods"):
        list(big)


def test_indexing_a_map_says_to_index_rows_and_columns_together():
    a = spd(4)
    perm = torch.tensor([2, 0, 3, 1])
    op = Dense(a)
    with pytest.raises(TypeError, match=r"structured linear map .* cannot be indexed.*op\[rows\[:, None\], cols\]"):
        op[perm][:, perm]
    assert_close(op[perm[:, None], perm].to_dense(), a[perm][:, perm], 0, 0)


# -- size guards ----------------------------------------------------------------------------------------------
N_BIG = 10**6
BIG_ROOTS = {
    "kronecker": lambda: Kronecker(torch.eye(1000, dtype=F64), torch.eye(1000, dtype=F64)).root(),
    "scaled_identity": lambda: ScaledIdentity(1.0, N_BIG).root(),
    "diagonal": lambda: Diagonal(torch.ones(N_BIG, dtype=F64)).root(),
    "low_rank_plus_noise": lambda: (LowRank(torch.ones(N_BIG, 1, dtype=F64)) + ScaledIdentity(1.0, N_BIG)).root(),
    "block_diag": lambda: BlockDiag(torch.eye(2, dtype=F64).expand(N_BIG // 2, 2, 2)).root(),
}


@pytest.mark.parametrize("name", list(BIG_ROOTS))
def test_root_to_dense_of_a_million_rows_is_refused(name):
    root = BIG_ROOTS[name]()
    with pytest.raises(DensifyError, match=r"^to_dense\(\): the dense form of .* GiB, over the limit .*M @ x"):
        root.to_dense()


def test_small_root_to_dense_still_works():
    op = Kronecker(spd(2), spd(3)) + ScaledIdentity(0.5, 6)
    r = op.root().to_dense()
    assert_close(r @ r.mT, op.to_dense(), 1e-10, 1e-10)


def test_block_diag_root_respects_the_memory_budget():
    """1000 blocks of 1000 x 1000 (an expanded view, 8 GB once factorised): refused before any work."""
    op = BlockDiag(torch.eye(1000, dtype=F64).expand(1000, 1000, 1000))
    with pytest.raises(MemoryError, match=r"^root\(\): .* would take 14.9 GiB, over the memory budget of 8.0 GiB"):
        op.root()
    small = BlockDiag(spd(20, 10))
    with sg.settings(memory_budget=10_000), pytest.raises(MemoryError, match=r"memory_budget=\.\.\."):
        small.root()
    r = small.root().to_dense()
    assert_close(r @ r.mT, small.to_dense(), 1e-10, 1e-10)


# -- transforms -------------------------------------------------------------------------------------------------
def test_jacfwd_and_vmap_through_a_sparse_lift():
    """The lift product has forward-mode and vmap rules: jacfwd/jacrev of SparseLifted(L, B).to_dense() in B and
    in the lift's values equal those of the dense formula L B L^T."""
    lift = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.25], [0.3, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=F64)
    b = spd(3)
    structured = torch.func.jacfwd(lambda m: SparseLifted(lift.to_sparse(), m).to_dense())(b)
    dense = torch.func.jacfwd(lambda m: lift @ m @ lift.T)(b)
    assert_close(structured, dense, 1e-12, 1e-12)
    assert_close(torch.func.jacrev(lambda m: SparseLifted(lift.to_sparse(), m).to_dense())(b), dense, 1e-12, 1e-12)
    op = SparseLifted(lift.to_sparse(), b)
    pattern = op.lift

    def by_values(v):
        return SparseLifted(pattern._replace(values=v), b).to_dense()

    def by_values_dense(v):
        m = torch.zeros(4, 3, dtype=F64).index_put((pattern.row, pattern.col), v)
        return m @ b @ m.T

    v = pattern.values
    assert_close(torch.func.jacfwd(by_values)(v), torch.func.jacfwd(by_values_dense)(v), 1e-12, 1e-12)
    stacked = torch.stack([v, 2 * v])
    assert_close(torch.func.vmap(by_values)(stacked), torch.stack([by_values_dense(v), by_values_dense(2 * v)]))


def _re(name: str) -> str:
    return name.replace("[", r"\[").replace("]", r"\]")

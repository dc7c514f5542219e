import pytest
import torch

import structgp as sg
from structgp.covariance import (
    AddedDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    ScaledIdentity,
    Sum,
)
from tests.reference import F64, check_against_dense, positive, spd


def test_noise_merges_and_stays_structured():
    w = torch.randn(6, 2, dtype=F64)
    op = LowRank(w) + Diagonal(positive(6)) + ScaledIdentity(0.5, 6)
    assert isinstance(op, AddedDiagonal) and isinstance(op.base, LowRank) and isinstance(op.noise, Diagonal)
    check_against_dense(op)


def test_diagonal_sums():
    assert isinstance(ScaledIdentity(0.5, 3) + ScaledIdentity(0.25, 3), ScaledIdentity)
    op = Diagonal(positive(3)) + ScaledIdentity(0.5, 3)
    assert isinstance(op, Diagonal)
    check_against_dense(op)


def test_general_sum_is_exact_through_dense():
    op = LowRank(torch.randn(6, 2, dtype=F64)) + Kronecker(spd(2), spd(3))
    assert isinstance(op, Sum)
    check_against_dense(op)
    noisy = op + ScaledIdentity(0.1, 6)
    assert isinstance(noisy, AddedDiagonal) and isinstance(noisy.base, Sum)
    check_against_dense(noisy)


def test_tensor_operand_is_dense():
    op = Dense(spd(4)) + spd(4)
    check_against_dense(op)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dense(spd(4)),
        lambda: Diagonal(positive(4)),
        lambda: ScaledIdentity(positive(), 4),
        lambda: LowRank(torch.randn(4, 2, dtype=F64)) + Diagonal(positive(4)),
        lambda: Kronecker(spd(2), spd(2)) + ScaledIdentity(0.1, 4),
    ],
)
def test_positive_scaling_keeps_type(make):
    op = make()
    c = positive()
    scaled = c * op
    assert type(scaled) is type(op)
    torch.testing.assert_close(scaled.to_dense(), c * op.to_dense())
    torch.testing.assert_close((op / c).to_dense(), op.to_dense() / c)


def test_batched_scaling():
    c = positive(3)
    op = c * (LowRank(torch.randn(5, 2, dtype=F64)) + ScaledIdentity(0.3, 5))
    assert op.batch_shape == (3,)
    check_against_dense(op)


def test_bad_sums_and_scales():
    with pytest.raises(TypeError, match="ScaledIdentity"):
        Dense(spd(3)) + 1.0
    with pytest.raises(ValueError, match="n=3"):
        Dense(spd(3)) + Diagonal(positive(4))
    with pytest.raises(ValueError, match="c \\(scale\\): expected strictly positive"):
        -1.0 * Dense(spd(3))
    with pytest.raises(ValueError, match="batch shapes do not broadcast"):
        Dense(spd(3, 2)) + Diagonal(positive(3, 3))


def test_plan_reports_structure():
    op = LowRank(torch.randn(100, 4, dtype=F64)) + ScaledIdentity(0.1, 100)
    text = str(sg.plan(op))
    assert "woodbury" in text and "capacitance" in text and "cholesky" in text


def test_python_number_noise_keeps_float64_precision():
    op = Dense(spd(3)) + ScaledIdentity(0.1, 3)
    assert op.noise.scale.dtype == F64 and op.noise.scale.item() == 0.1


def test_scaled_python_number_noise_keeps_its_scale():
    op = Dense(spd(3)) + 2.0 * ScaledIdentity(0.1, 3)
    assert abs(op.noise.scale.item() - 0.2) < 1e-7

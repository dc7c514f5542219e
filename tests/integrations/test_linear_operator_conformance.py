"""linear_operator's own conformance suite (``LinearOperatorTestCase``, from the installed package) over
``as_linear_operator`` for every structure.

Each class below builds one structgp operator (float32, small), wraps it with ``as_linear_operator`` and
gives the suite a dense reference computed from the operator's tensors with plain torch formulas
(``torch.kron``, ``torch.block_diag``, the lift as a dense matrix), so gradients reach the same tensors on
both sides. The suite's parametrisation is used as intended: ``should_call_cg``/``should_call_lanczos``
are False because structgp answers solves, log-determinants and roots exactly, never by linear_operator's
CG or Lanczos (the suite then checks that those are *not* called), and ``should_test_sample`` is True.

The tests excluded are listed in ``EXCLUDED`` with the reason; they assert linear_operator internals, not
values.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

from structgp.covariance import (
    AddedDiagonal,
    BlockDiag,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    Operator,
    ScaledIdentity,
    SparseLifted,
)
from structgp.integrations.gpytorch import StructuredLinearOperator, as_linear_operator

F32 = torch.float32

# Why a test of the suite is not run for a class (each class lists the ones it skips in ``excluded``).
RMATMUL_LAYOUT = (
    "asserts the layout of the gradient of `lhs @ op`: linear_operator computes it as `(op^T lhs^T)^T` with "
    "`op^T` = the adapter itself (a covariance is symmetric: `_transpose_nonbatch` returns self), so a "
    "symmetric matrix tensor of the operator receives the transpose of the dense reference's gradient (the "
    "same symmetric part). Values and symmetrised gradients: test_rmatmul_and_diagonal_matmul_values_and_gradients"
)
RMATMUL_TESTS = {
    name: RMATMUL_LAYOUT for name in ("test_rmatmul_vec", "test_rmatmul_matrix", "test_rmatmul_matrix_broadcast")
}


def _spd(n: int, *batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    return (a @ a.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)).to(F32)


def _positive(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5).to(F32)


def _lift(n_out: int, n_in: int, seed: int) -> torch.Tensor:
    """A sparse CSR lift with two entries a row (interpolation-like weights)."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n_out, n_in, dtype=F32)
    rows = torch.arange(n_out)
    first = torch.randint(0, n_in - 1, (n_out,), generator=gen)
    weight = torch.rand(n_out, generator=gen, dtype=F32)
    dense[rows, first] = weight
    dense[rows, first + 1] = 1 - weight
    return dense.to_sparse_csr()


# -- the dense reference, from the operator's tensors -------------------------------------------------
def reference(op: Operator) -> torch.Tensor:
    """The dense matrix of ``op`` by plain torch formulas (independent of structgp's own ``to_dense``)."""
    if isinstance(op, Dense):
        return op.matrix
    if isinstance(op, Diagonal):
        return torch.diag_embed(op.diag)
    if isinstance(op, ScaledIdentity):
        return op.scale[..., None, None] * torch.eye(op.n, dtype=op.dtype)
    if isinstance(op, LowRank):
        return op.factor @ op.factor.mT
    if isinstance(op, AddedDiagonal):
        return reference(op.base) + reference(op.noise)
    if isinstance(op, Kronecker):
        out = reference(op.factors[0])
        for f in op.factors[1:]:
            out = torch.kron(out, reference(f))
        return out
    if isinstance(op, BlockDiag):
        return torch.block_diag(*_blocks(op))
    if isinstance(op, SparseLifted):
        lift = op.lift
        matrix = torch.sparse_csr_tensor(lift.crow, lift.col, lift.values, lift.shape).to_dense()
        return matrix @ reference(op.base) @ matrix.mT
    raise TypeError(f"no reference for {type(op).__name__}")


def _blocks(op: BlockDiag) -> list[torch.Tensor]:
    """The dense blocks of an unbatched BlockDiag, in the order they were given."""
    by_index = {}
    for group, members in zip(op.groups, op.group_blocks(), strict=True):
        dense = reference(group)
        for position, i in enumerate(members):
            by_index[i] = dense[position]
    return [by_index[i] for i in range(len(by_index))]


# -- one suite class per structure --------------------------------------------------------------------
class _AdapterCase(LinearOperatorTestCase):
    """The suite over ``as_linear_operator(self.build())``; subclasses define ``build``."""

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = False
    should_call_lanczos_diagonalization = False
    excluded: dict[str, str] = RMATMUL_TESTS  # every structure below holds a full symmetric matrix tensor

    def build(self) -> Operator:
        raise NotImplementedError

    def create_linear_op(self) -> StructuredLinearOperator:
        return as_linear_operator(self.build())

    def evaluate_linear_op(self, linear_op: StructuredLinearOperator) -> torch.Tensor:
        dense = reference(linear_op.operator)
        return dense.expand(*linear_op.shape)


def _excluded(cls: type) -> type:
    """Replace each test the class lists in ``excluded`` by a skip that states the reason."""
    for name, reason in cls.excluded.items():
        setattr(cls, name, unittest.skip(reason)(lambda self: None))
    return cls


@_excluded
class TestDense(_AdapterCase, unittest.TestCase):
    def build(self):
        return Dense(_spd(5, seed=1))


@_excluded
class TestDiagonal(_AdapterCase, unittest.TestCase):
    excluded = {}

    def build(self):
        return Diagonal(_positive(5, seed=2))


@_excluded
class TestLowRankPlusDiagonal(_AdapterCase, unittest.TestCase):
    excluded = {}

    def build(self):
        gen = torch.Generator().manual_seed(3)
        return LowRank(torch.randn(6, 2, generator=gen, dtype=F32)) + Diagonal(_positive(6, seed=4))


@_excluded
class TestKronecker(_AdapterCase, unittest.TestCase):
    def build(self):
        return Kronecker(_spd(2, seed=5), _spd(3, seed=6))


@_excluded
class TestKroneckerPlusNoise(_AdapterCase, unittest.TestCase):
    def build(self):
        return Kronecker(_spd(2, seed=7), _spd(3, seed=8)) + ScaledIdentity(torch.tensor(0.3), 6)


@_excluded
class TestBlockDiagNatural(_AdapterCase, unittest.TestCase):
    def build(self):
        return BlockDiag(_spd(3, 2, seed=9))


@_excluded
class TestBlockDiagPermuted(_AdapterCase, unittest.TestCase):
    def build(self):
        # sizes 2, 3, 2: the two 2x2 blocks form one group, so the rows are permuted
        return BlockDiag([_spd(2, seed=10), _spd(3, seed=11), _spd(2, seed=12)])


@_excluded
class TestBlockDiagRagged(_AdapterCase, unittest.TestCase):
    def build(self):
        return BlockDiag([_spd(2, seed=13), _spd(3, seed=14)])


@_excluded
class TestBlockDiagNaturalPlusNoise(_AdapterCase, unittest.TestCase):
    def build(self):
        return BlockDiag(_spd(3, 2, seed=15)) + Diagonal(_positive(6, seed=16))


@_excluded
class TestBlockDiagPermutedPlusNoise(_AdapterCase, unittest.TestCase):
    def build(self):
        blocks = [_spd(2, seed=17), _spd(3, seed=18), _spd(2, seed=19)]
        return BlockDiag(blocks) + ScaledIdentity(torch.tensor(0.2), 7)


@_excluded
class TestBlockDiagRaggedPlusNoise(_AdapterCase, unittest.TestCase):
    def build(self):
        return BlockDiag([_spd(2, seed=20), _spd(3, seed=21)]) + Diagonal(_positive(5, seed=22))


@_excluded
class TestSparseLiftedPlusDiagonal(_AdapterCase, unittest.TestCase):
    excluded = RMATMUL_TESTS

    def build(self):
        return SparseLifted(_lift(7, 4, seed=23), Dense(_spd(4, seed=24))) + Diagonal(_positive(7, seed=25))


@_excluded
class TestBatchedLowRankPlusDiagonal(_AdapterCase, unittest.TestCase):
    excluded = {}

    def build(self):
        gen = torch.Generator().manual_seed(26)
        return LowRank(torch.randn(2, 3, 5, 2, generator=gen, dtype=F32)) + Diagonal(_positive(3, 5, seed=27))


@_excluded
class TestBatchedKroneckerPlusNoise(_AdapterCase, unittest.TestCase):
    def build(self):
        return Kronecker(_spd(2, 2, seed=28), _spd(3, seed=29)) + ScaledIdentity(torch.tensor([0.3, 0.4]), 6)


CLASSES = [
    TestDense,
    TestDiagonal,
    TestLowRankPlusDiagonal,
    TestKronecker,
    TestKroneckerPlusNoise,
    TestBlockDiagNatural,
    TestBlockDiagPermuted,
    TestBlockDiagRagged,
    TestBlockDiagNaturalPlusNoise,
    TestBlockDiagPermutedPlusNoise,
    TestBlockDiagRaggedPlusNoise,
    TestSparseLiftedPlusDiagonal,
    TestBatchedLowRankPlusDiagonal,
    TestBatchedKroneckerPlusNoise,
]


def _symmetrised(grad: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A gradient compared up to its layout: the symmetric part for a symmetric matrix tensor."""
    square = leaf.dim() >= 2 and leaf.shape[-1] == leaf.shape[-2]
    if square and torch.allclose(leaf, leaf.mT):
        return (grad + grad.mT) / 2
    return grad


@pytest.mark.parametrize("case", CLASSES, ids=lambda c: c.__name__)
def test_rmatmul_and_diagonal_matmul_values_and_gradients(case):
    """What the excluded layout tests check, up to the layout: ``lhs @ op`` and ``op @ diag`` values, and
    gradients equal to the dense reference's (symmetric parts for symmetric matrix tensors)."""
    from linear_operator.operators import DiagLinearOperator

    suite = case("test_add")
    torch.manual_seed(0)
    lhs = torch.randn(4, suite.build().n)
    diag = torch.rand(suite.build().n) + 0.5
    products = (lambda a: lhs @ a, lambda a: (a @ DiagLinearOperator(diag)).to_dense())
    dense_products = (lambda a: lhs @ a, lambda a: a * diag)
    for product, dense_product in zip(products, dense_products, strict=True):
        linear_op = suite.create_linear_op().detach().requires_grad_(True)
        copy = torch.clone(linear_op).detach().requires_grad_(True)
        value, expected = product(linear_op), dense_product(suite.evaluate_linear_op(copy))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(value)
        value.backward(grad)
        expected.backward(grad)
        for leaf, ref in zip(linear_op.representation(), copy.representation(), strict=True):
            if ref.grad is not None:
                torch.testing.assert_close(
                    _symmetrised(leaf.grad, leaf), _symmetrised(ref.grad, ref), rtol=1e-4, atol=1e-5
                )


def test_every_structure_has_a_suite_class():
    """The structures the adapter is checked over (a guard against a class being dropped)."""
    classes = [v for v in globals().values() if isinstance(v, type) and issubclass(v, _AdapterCase)]
    assert set(classes) - {_AdapterCase} == set(CLASSES) and len(CLASSES) == 14

"""The adapter over operators whose pytree leaves are not all floating tensors: a lift's integer index
tensors (``SparseLifted``) and ``None`` (a ``BlockDiag`` in natural order, every ``GroupKernel`` output)."""

from __future__ import annotations

import gpytorch
import linear_operator
import torch
from gpytorch.kernels import RBFKernel

from structgp.covariance import AddedDiagonal, BlockDiag, Dense, Diagonal, Kronecker, ScaledIdentity, SparseLifted
from structgp.distributions import MultivariateNormal
from structgp.integrations.gpytorch import StructuredLinearOperator, as_linear_operator
from structgp.kernels import GroupKernel
from tests.reference import F64, positive, spd


def _lifted() -> SparseLifted:
    """``L B L^T + D`` with a sparse CSR lift of two entries a row (6 outputs, 4 latent cells)."""
    lift = torch.zeros(6, 4, dtype=F64)
    rows = torch.arange(6)
    lift[rows, torch.tensor([0, 1, 2, 2, 0, 1])] = torch.linspace(0.3, 0.8, 6, dtype=F64)
    lift[rows, torch.tensor([1, 2, 3, 3, 1, 2])] = 0.5
    return SparseLifted(lift.to_sparse_csr(), Dense(spd(4, seed=1))) + Diagonal(positive(6))


def test_sparse_lifted_reports_its_floating_dtype_and_answers_like_the_dense_matrix():
    """Item 1: the first leaf is the lift's int64 ``crow``; the adapter's dtype must still be float64."""
    op = _lifted()
    a = op.to_dense()
    torch.manual_seed(0)
    for lo in (
        as_linear_operator(op),
        MultivariateNormal(torch.zeros(6, dtype=F64), op).to_gpytorch().lazy_covariance_matrix,
    ):
        assert lo.representation()[0].dtype == torch.int64 and lo.dtype == F64
        torch.testing.assert_close(linear_operator.add_jitter(lo, 0.4).to_dense(), a + 0.4 * torch.eye(6, dtype=F64))
        torch.testing.assert_close((lo / 5.0).to_dense(), a / 5)
        torch.testing.assert_close(lo * -2.0 @ torch.eye(6, dtype=F64), -2 * a)
        torch.testing.assert_close(lo.sum(-1), a.sum(-1))
        torch.testing.assert_close(lo[1], a[1])
        torch.testing.assert_close(lo[1:4, 2:5].to_dense(), a[1:4, 2:5])
        samples = lo.zero_mean_mvn_samples(20000)
        assert samples.dtype == F64
        torch.testing.assert_close(samples.mT @ samples / 20000, a, rtol=0, atol=0.1)


class _LiftedGP(gpytorch.models.ExactGP):
    """A gpytorch ExactGP whose prior covariance is ``L(x) B L(x)^T + 1e-6 I``: linear interpolation of the
    inputs onto a 4-cell grid with an RBF covariance ``B`` on the grid, as a SparseLifted adapter."""

    grid = torch.linspace(0, 1, 4, dtype=F64)

    def forward(self, x):
        b = torch.exp(-0.5 * (self.grid[:, None] - self.grid[None]) ** 2 / 0.3**2) + 1e-6 * torch.eye(4, dtype=F64)
        op = SparseLifted(self.lift(x[:, 0]).to_sparse_csr(), Dense(b)) + Diagonal(
            torch.full((x.shape[0],), 1e-6, dtype=F64)
        )
        return gpytorch.distributions.MultivariateNormal(torch.zeros(x.shape[0], dtype=F64), as_linear_operator(op))

    @classmethod
    def lift(cls, x):
        cell = (x * 3).floor().clamp(0, 2)
        w = x * 3 - cell
        lift = torch.zeros(x.shape[0], 4, dtype=F64)
        rows = torch.arange(x.shape[0])
        lift[rows, cell.long()] = 1 - w
        lift[rows, cell.long() + 1] = w
        return lift


def test_sparse_lifted_through_gpytorch_prediction():
    """Item 1: gpytorch's ExactGP prediction (joint train/test covariance indexed into blocks, then solved)."""
    train_x, test_x = torch.rand(8, 1, dtype=F64), torch.rand(3, 1, dtype=F64)
    y = torch.sin(6 * train_x[:, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.1
    model = _LiftedGP(train_x, y, likelihood).eval()
    with torch.no_grad():
        pred = model(test_x)
        mean, var = pred.mean, pred.variance
    grid = _LiftedGP.grid
    b = torch.exp(-0.5 * (grid[:, None] - grid[None]) ** 2 / 0.3**2) + 1e-6 * torch.eye(4, dtype=F64)
    lt, ls = _LiftedGP.lift(train_x[:, 0]), _LiftedGP.lift(test_x[:, 0])
    k_tt = lt @ b @ lt.T + (1e-6 + 0.1) * torch.eye(8, dtype=F64)
    k_st = ls @ b @ lt.T
    expected_mean = k_st @ torch.linalg.solve(k_tt, y)
    expected_var = (ls @ b @ ls.T + 1e-6 * torch.eye(3, dtype=F64)).diagonal() - (
        k_st * torch.linalg.solve(k_tt, k_st.T).T
    ).sum(-1)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(var, expected_var, rtol=1e-6, atol=1e-8)


def test_none_leaves_block_diag_and_group_kernel_wrap():
    """Item 2: ``BlockDiag.perm``/``inverse`` are None in natural order; they stay in the layout."""
    natural = BlockDiag(spd(3, 2, seed=2))
    assert natural.perm is None
    x = torch.cat([torch.rand(6, 1, dtype=F64), torch.tensor([0, 0, 0, 1, 1, 1], dtype=F64)[:, None]], -1)
    kernel = GroupKernel(RBFKernel().double())
    grouped = kernel(kernel.check_inputs(x))
    for op in (natural, grouped, natural + Diagonal(positive(6))):
        lo = as_linear_operator(op)
        a = op.to_dense()
        assert isinstance(lo, StructuredLinearOperator) and lo.operator.perm is None
        rhs = torch.randn(6, 2, dtype=F64)
        torch.testing.assert_close(lo @ rhs, a @ rhs)
        torch.testing.assert_close(lo.solve(rhs), torch.linalg.solve(a, rhs))
        detached = lo.detach().requires_grad_(True)  # linear_operator rebuilds it from its tensors
        torch.testing.assert_close(detached.inv_quad(rhs), (rhs * torch.linalg.solve(a, rhs)).sum())
        torch.testing.assert_close(torch.clone(lo).to_dense(), a)


def test_to_dtype_keeps_index_tensors():
    """Item 3: ``.to(float32)`` (and ``.float()``/``.double()``) cast the data, never the index tensors."""
    op = _lifted()
    lo = as_linear_operator(op)
    for cast in (lo.to(torch.float32), lo.to(dtype=torch.float32), lo.float(), lo.to(torch.float32).double()):
        kinds = {t.dtype for t in cast.representation()}
        assert torch.int64 in kinds and torch.float16 not in kinds
        dtype = cast.representation()[-1].dtype
        assert cast.dtype == dtype
        torch.testing.assert_close(cast[1], op.to_dense()[1].to(dtype), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cast[..., [0, 2], [1, 3]], op.to_dense()[[0, 2], [1, 3]].to(dtype))
    grouped = as_linear_operator(BlockDiag(spd(3, 2, seed=3)))
    assert grouped.to(torch.float32).dtype == torch.float32 and grouped.to(torch.float32).device == grouped.device


def test_batch_indexing_inside_the_operator_batch_keeps_the_structure():
    op = Kronecker(spd(2, 3, seed=5), spd(3, seed=6)) + ScaledIdentity(torch.tensor([0.1, 0.2, 0.3], dtype=F64), 6)
    lo = as_linear_operator(op)
    dense = op.to_dense()
    for index in (1, slice(0, 2), torch.tensor([2, 0])):
        part = lo[index]
        assert isinstance(part, StructuredLinearOperator) and isinstance(part.operator, AddedDiagonal)
        torch.testing.assert_close(part.to_dense(), dense[index])

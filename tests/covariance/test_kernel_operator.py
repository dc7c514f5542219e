"""KernelOperator against the dense kernel matrix gpytorch evaluates (float64 and float32)."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import DensifyError, KernelOperator, ScaledIdentity
from structgp.inference.pivoted_cholesky import column
from tests.memory_guard import LargestOutput

SMALL_BLOCKS = 20 * 2**10 * 32  # a memory budget that gives tiles of about 50 x 50 (float64) at n ~ 100


def rbf(dtype=torch.float64, batch=(), ard=None):
    batch = torch.Size(batch)
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=ard, batch_shape=batch), batch_shape=batch)
    k.base_kernel.lengthscale = 0.7
    k.outputscale = 1.3
    return k.to(dtype)


def dense(k, x):
    return k(x, x).to_dense().detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("budget", [None, SMALL_BLOCKS])
def test_products_diagonal_rows_match_dense(dtype, budget):
    torch.manual_seed(0)
    x = torch.randn(157, 2, dtype=dtype)
    k = rbf(dtype)
    op, ref = KernelOperator(k, x), dense(k, x)
    v = torch.randn(157, 5, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    with sg.settings(**({} if budget is None else {"memory_budget": budget})):
        if budget is not None:
            rows, cols = op.tile()
            assert rows < 157 and cols < 157  # really tiled, in both directions
        torch.testing.assert_close(op @ v, ref @ v, rtol=tol, atol=tol)
        torch.testing.assert_close(op @ v[:, 0], ref @ v[:, 0], rtol=tol, atol=tol)
    torch.testing.assert_close(op.diagonal(), ref.diagonal(), rtol=tol, atol=tol)
    idx = torch.tensor([3, 150, 3])
    torch.testing.assert_close(op.rows(idx), ref[idx], rtol=tol, atol=tol)
    torch.testing.assert_close(column(op, torch.tensor(42)), ref[:, 42], rtol=tol, atol=tol)
    torch.testing.assert_close(op.to_dense(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close((2.0 * op) @ v, 2.0 * ref @ v, rtol=tol, atol=tol)


def test_batched_kernel_and_inputs():
    torch.manual_seed(1)
    k = rbf(batch=torch.Size([3]))
    k.base_kernel.lengthscale = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1).double()
    x = torch.randn(3, 40, 2, dtype=torch.float64)
    op, ref = KernelOperator(k, x), dense(k, x)
    assert op.shape == (3, 40, 40)
    v = torch.randn(3, 40, 2, dtype=torch.float64)
    with sg.settings(memory_budget=SMALL_BLOCKS):
        torch.testing.assert_close(op @ v, ref @ v)
    torch.testing.assert_close(op.diagonal(), ref.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(column(op, torch.tensor([1, 5, 39])), ref[torch.arange(3), :, torch.tensor([1, 5, 39])])


def test_gradcheck_hyperparameters_inputs_and_rhs():
    torch.manual_seed(2)
    k = rbf(ard=2)
    x = torch.randn(23, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(23, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in k.parameters()]

    def product(v, x, *params):
        return KernelOperator(k, x, params) @ v

    with sg.settings(memory_budget=20 * 8 * 32):  # tiles of 4 x 5, the last row and column tiles partial
        assert KernelOperator(k, x).tile() == (4, 5)
        assert torch.autograd.gradcheck(product, (v, x, *params))


@pytest.mark.parametrize("ard", [None, 3])
def test_gradcheck_unscaled_rbf_closed_form_backward(ard):
    """A bare RBF kernel (no ScaleKernel), one or per-dimension lengthscales: the closed-form block backward
    against finite differences, also with the inputs far from the origin (the centring is exact)."""
    torch.manual_seed(5)
    k = gpytorch.kernels.RBFKernel(ard_num_dims=ard).double()
    k.lengthscale = 0.8
    x = (torch.randn(19, 3, dtype=torch.float64) + 50.0).requires_grad_()
    v = torch.randn(19, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in k.parameters()]

    def product(v, x, *params):
        return KernelOperator(k, x, params) @ v

    with sg.settings(memory_budget=95 * 8 * 32):  # tiles of 9 x 10
        assert KernelOperator(k, x).tile() == (9, 10)
        assert torch.autograd.gradcheck(product, (v, x, *params))


def test_tile_shape_fills_its_entries_within_the_budget():
    from structgp.covariance.kernel_operator import DEVICE_TILE_ENTRIES, TILE_ENTRIES, TILE_ROWS, tile_shape

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name only: nothing runs on it
    assert tile_shape(30_000, 1, torch.float64, cpu) == (TILE_ROWS, TILE_ENTRIES // TILE_ROWS)
    assert tile_shape(10**6, 1, torch.float32, cuda) == (TILE_ROWS, DEVICE_TILE_ENTRIES // TILE_ROWS)
    assert tile_shape(30_000, 4, torch.float64, cpu) == (362, 362)  # 4 members share the entries: square tiles
    assert tile_shape(1_000, 1, torch.float64, cpu) == (TILE_ENTRIES // 1_000, 1_000)  # narrow: taller tiles
    assert tile_shape(157, 1, torch.float64, cpu) == (157, 157)  # one tile
    with sg.settings(memory_budget=32 * 8 * 600):  # 600 entries: the budget wins, with square tiles
        assert tile_shape(200_000, 1, torch.float64, cpu) == (24, 25)
        assert tile_shape(200_000, 1, torch.float32, cpu) == (34, 35)
    with sg.settings(memory_budget=32 * 8 * 3 - 1), pytest.raises(MemoryError, match="memory_budget"):
        tile_shape(10, 3, torch.float64, cpu)  # under one entry for each of 3 batch members


def test_gradient_matches_dense_autograd():
    torch.manual_seed(3)
    k = rbf()
    x = torch.randn(120, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(120, 4, dtype=torch.float64)
    w = torch.randn(120, 4, dtype=torch.float64)
    with sg.settings(memory_budget=SMALL_BLOCKS):
        grads = torch.autograd.grad(((KernelOperator(k, x) @ v) * w).sum(), [x, *k.parameters()])
    ref = torch.autograd.grad(((k(x, x).to_dense() @ v) * w).sum(), [x, *k.parameters()])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_torch_func_grad_through_the_pytree():
    torch.manual_seed(4)
    k = rbf()
    x = torch.randn(60, 2, dtype=torch.float64)
    v = torch.randn(60, 2, dtype=torch.float64)
    names = [n for n, _ in k.named_parameters()]
    values = {n: p.detach() for n, p in k.named_parameters()}

    def f(values):
        op = KernelOperator(k, x, [values[n] for n in names])
        return (op @ v).square().sum()

    def f_dense(values):
        with gpytorch.settings.trace_mode(True), gpytorch.settings.lazily_evaluate_kernels(False):
            out = torch.func.functional_call(k, values, (x, x))
            return (out.to_dense() @ v).square().sum()

    got, ref = torch.func.grad(f)(values), torch.func.grad(f_dense)(values)
    for n in names:
        torch.testing.assert_close(got[n], ref[n])


def test_cg_log_likelihood_and_gradient_match_dense():
    torch.manual_seed(5)
    n = 400
    x = torch.rand(n, 2, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, dtype=torch.float64)
    k = rbf()
    noise = torch.tensor(0.05, dtype=torch.float64)
    with sg.settings(method="cg"):
        cov = KernelOperator(k, x) + ScaledIdentity(noise, n)
        lp = sg.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(y)
        g = torch.autograd.grad(lp, list(k.parameters()))
    dense_cov = k(x, x).to_dense() + noise * torch.eye(n, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), dense_cov).log_prob(y)
    gref = torch.autograd.grad(ref, list(k.parameters()))
    assert abs(float(lp - ref)) <= 1e-4 * abs(float(ref))
    for a, b in zip(g, gref):
        assert float((a - b).abs().max()) <= 0.05 * float(b.abs().max())


def test_products_and_backward_never_allocate_n_by_n():
    torch.manual_seed(6)
    n = 600
    k = rbf()
    x = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    with sg.settings(memory_budget=50 * n * 8 * 32), LargestOutput() as guard:
        op = KernelOperator(k, x)
        out = op @ v
        out.square().sum().backward()
        op.diagonal()
        column(op, torch.tensor(7))
    assert guard.largest <= 50 * n, guard.where  # one tile of 50 n entries at most, never n x n
    assert x.grad is not None and v.grad is not None


def test_to_dense_of_a_large_operator_is_refused():
    k = rbf()
    x = torch.randn(5000, 2, dtype=torch.float64)
    with sg.settings(dense_limit=2**20), pytest.raises(DensifyError):
        KernelOperator(k, x).to_dense()


def test_bad_input_names_the_argument():
    k = rbf()
    with pytest.raises(TypeError, match="kernel"):
        KernelOperator(torch.nn.Linear(2, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="x: expected finite"):
        KernelOperator(k, torch.tensor([[0.0, float("nan")]], dtype=torch.float64))
    with pytest.raises(ValueError, match="x:"):
        KernelOperator(rbf(ard=2), torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="kernel: parameter"):
        KernelOperator(k, torch.randn(5, 2, dtype=torch.float32))
    with sg.settings(memory_budget=200), pytest.raises(MemoryError, match="memory_budget"):  # under one entry
        KernelOperator(k, torch.randn(50, 2, dtype=torch.float64)) @ torch.ones(50, 1, dtype=torch.float64)


class _Closure(gpytorch.kernels.Kernel):
    """A kernel whose lengthscale is a tensor it closes over, not a parameter."""

    def __init__(self, ell):
        super().__init__()
        self.ell = ell

    def forward(self, x1, x2, diag=False, **kwargs):
        d = (x1.unsqueeze(-2) - x2.unsqueeze(-3)).square().sum(-1)
        out = torch.exp(-d / self.ell)
        return out.diagonal(dim1=-2, dim2=-1) if diag else out


def test_a_kernel_that_is_not_a_pure_function_of_its_parameters_is_refused():
    ell = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="kernel: its value depends"):
        KernelOperator(_Closure(ell), torch.randn(5, 2, dtype=torch.float64))

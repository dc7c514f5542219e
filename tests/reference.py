"""Random structured instances and float64 dense references shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def spd(n: int, *batch: int, dtype: torch.dtype = F64, shift: float = 0.5, seed: int | None = None) -> Tensor:
    """A random symmetric positive definite ``(*batch, n, n)`` with eigenvalues >= ``shift``."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, dtype=F64, generator=gen)
    return (a @ a.mT / n + shift * torch.eye(n, dtype=F64)).to(dtype)


def positive(*shape: int, dtype: torch.dtype = F64, low: float = 0.1) -> Tensor:
    return (torch.rand(shape, dtype=F64) + low).to(dtype)


def dense_inv_quad_logdet(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Reference ``(b^T A^{-1} b, log det A)`` for ``a`` ``(..., n, n)``, ``b`` ``(..., n)``."""
    x = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    return (b * x).sum(-1), torch.linalg.slogdet(a)[1]


def paired_grads(loss, leaves: dict[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, structured gradient, dense gradient)`` per leaf of ``loss(structured: bool, *leaves)``, each
    side differentiated on fresh copies of the leaves."""
    grads = []
    for structured in (True, False):
        ins = [t.clone().requires_grad_() for t in leaves.values()]
        grads.append(torch.autograd.grad(loss(structured, *ins), ins))
    return list(zip(leaves, *grads))


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def check_against_dense(op, rtol: float = 1e-8, atol: float = 1e-8, rhs_cols: int = 3) -> None:
    """to_dense, diagonal, matmul, solve, logdet, inv_quad_logdet, root of ``op`` against dense torch."""
    a = op.to_dense()
    batch, n = op.batch_shape, op.n
    assert a.shape == op.shape
    assert_close(op.diagonal(), a.diagonal(dim1=-2, dim2=-1).expand(*batch, n), rtol, atol)
    x = torch.randn(*batch, n, rhs_cols, dtype=op.dtype)
    assert_close(op @ x, a @ x, rtol, atol)
    assert_close(op.solve(x), torch.linalg.solve(a, x), rtol, atol)
    v = torch.randn(*batch, n, dtype=op.dtype)
    assert_close(op.solve(v), torch.linalg.solve(a, v), rtol, atol)
    assert_close(op.logdet(), torch.linalg.slogdet(a)[1].expand(batch), rtol, atol)
    inv_quad, logdet = op.inv_quad_logdet(v)
    ref_q, ref_l = dense_inv_quad_logdet(a, v)
    assert_close(inv_quad, ref_q, rtol, atol)
    assert_close(logdet, ref_l.expand(batch), rtol, atol)
    r = op.root().to_dense()
    assert_close(r @ r.mT, a.expand(*batch, n, n) if r.dim() > a.dim() else a, rtol, atol)

"""Local interpolation weights of points onto a regular grid (KISS-GP / SKI).

On a regular axis ``g_i = g_0 + i h`` a point ``x`` with ``u = (x - g_0) / h = i_0 + s`` (``s`` in [0, 1])
is interpolated from

    linear:  g_{i_0}, g_{i_0 + 1} with weights 1 - s, s                        (exact for linear functions)
    cubic:   g_{i_0 - 1}, ..., g_{i_0 + 2} with weights u(s + 1), u(s), u(1 - s), u(2 - s), Keys' kernel

    u(t) = 3/2 |t|^3 - 5/2 |t|^2 + 1            for |t| <= 1
    u(t) = -1/2 |t|^3 + 5/2 |t|^2 - 4 |t| + 2   for 1 < |t| < 2        (a = -1/2: third-order accurate)

so linear needs ``x`` in ``[g_0, g_{n-1}]`` and cubic in ``[g_1, g_{n-2}]``. In ``d`` dimensions the weights
are tensor products: ``2^d`` or ``4^d`` nonzeros a row, at row-major flat grid indices. The weights are
differentiable in ``x`` (Keys' kernel is continuously differentiable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.kernels.base import sparse_csr

KINDS = {"linear": 2, "cubic": 4}


def keys_cubic(t: Tensor) -> Tensor:
    """Keys' cubic convolution kernel (``a = -1/2``) at distances ``t``."""
    t = t.abs()
    near = (1.5 * t - 2.5) * t * t + 1
    far = ((-0.5 * t + 2.5) * t - 4) * t + 2
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def interior(axis: Tensor, kind: str) -> tuple[float, float]:
    """The interval of an axis where ``kind`` interpolation has all its points."""
    if kind == "cubic":
        return float(axis[1]), float(axis[-2])
    return float(axis[0]), float(axis[-1])


def check_regular(axis: Tensor, name: str, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    need = KINDS[kind]
    if axis.shape[0] < need:
        raise ValueError(f"{name}: {kind} interpolation needs at least {need} grid points, got {axis.shape[0]}")
    steps = axis.diff()
    if not bool(torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4, atol=0)):
        raise ValueError(f"{name}: expected a regular grid (equal spacing) for interpolation")


def axis_weights(axis: Tensor, x: Tensor, kind: str, name: str, dim: int) -> tuple[Tensor, Tensor]:
    """Indices ``(n, k)`` and weights ``(n, k)`` of points ``x`` ``(n,)`` on one regular ``axis``."""
    lo, hi = interior(axis, kind)
    h = (axis[-1] - axis[0]) / (axis.shape[0] - 1)
    slack = 1e-6 * float(h)
    outside = (x.detach() < lo - slack) | (x.detach() > hi + slack)
    if bool(outside.any()):
        i = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{name}: point {i} is outside the interpolation grid: coordinate {dim} = {float(x[i]):.6g} is not in "
            f"[{lo:.6g}, {hi:.6g}] ({kind} interpolation on grid[{dim}] with {axis.shape[0]} points); "
            f"{int(outside.sum())} point(s) outside; widen the grid"
        )
    u = (x - axis[0]) / h
    first, last = (1, axis.shape[0] - 3) if kind == "cubic" else (0, axis.shape[0] - 2)
    i0 = u.detach().floor().clamp(first, last)
    s = u - i0  # in [0, 1]; differentiable in x
    i0 = i0.long()
    if kind == "linear":
        return torch.stack([i0, i0 + 1], -1), torch.stack([1 - s, s], -1)
    idx = torch.stack([i0 - 1, i0, i0 + 1, i0 + 2], -1)
    dist = torch.stack([s + 1, s, 1 - s, 2 - s], -1)
    return idx, keys_cubic(dist)


def grid_weights(axes: list[Tensor], x: Tensor, kind: str, name: str) -> tuple[Tensor, Tensor]:
    """Row-major flat indices ``(n, k^d)`` and tensor-product weights ``(n, k^d)`` of ``x`` ``(n, d)``."""
    idx = w = None
    for j, axis in enumerate(axes):
        ij, wj = axis_weights(axis.to(x.dtype), x[:, j], kind, name, j)
        if idx is None:
            idx, w = ij, wj
        else:
            idx = (idx.unsqueeze(-1) * axis.shape[0] + ij.unsqueeze(-2)).flatten(-2)
            w = (w.unsqueeze(-1) * wj.unsqueeze(-2)).flatten(-2)
    return idx, w


def to_csr(idx: Tensor, w: Tensor, size: int) -> Tensor:
    """The interpolation matrix ``(n, size)`` as sparse CSR (columns sorted within each row)."""
    n, k = idx.shape
    order = idx.argsort(-1)
    col = idx.gather(-1, order).reshape(-1)
    values = w.gather(-1, order).reshape(-1)
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    return sparse_csr(crow, col, values, (n, size))


def to_dense(idx: Tensor, w: Tensor, size: int) -> Tensor:
    """The interpolation matrix ``(n, size)`` densely (small ``n * size`` only); differentiable in ``w``."""
    return w.new_zeros(idx.shape[0], size).scatter_add(-1, idx, w)

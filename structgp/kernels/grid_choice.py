"""Choosing an interpolation grid from the data (for KISS-GP / SKI), as gpytorch's ``choose_grid_size`` and
``GridInterpolationKernel`` do.

Size: ``ratio * n^(1/d)`` points a dimension (a Kronecker grid of about ``ratio^d n`` cells), or ``ratio * n``
for one dimension of an additive or product decomposition. Placement: a regular grid over the data's range
(or ``bounds``), padded with the nodes the interpolation needs beyond it: cubic interpolation reads one grid
point on either side of a point (``x`` must lie in ``[g_1, g_{n-2}]``), linear none (``[g_0, g_{n-1}]``). So

    h = (hi - lo) / (size - 1 - 2 p),   g_i = lo + (i - p) h,   p = 1 (cubic) or 0 (linear)

puts the first and last data coordinates exactly on the interpolation's boundary nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from structgp.kernels.base import as_inputs
from structgp.kernels.interpolation_weights import KINDS

_PADDING = {"linear": 0, "cubic": 1}  # grid nodes the interpolation needs beyond the data, each side


def choose_grid_size(x: Tensor, ratio: float = 1.0, kronecker_structure: bool = True) -> int:
    """Grid points a dimension for ``x`` ``(..., n, d)`` (``(n,)``: one dimension): ``ratio * n^(1/d)`` with a
    Kronecker grid over all ``d`` dimensions, else ``ratio * n`` (gpytorch's rule)."""
    x = as_inputs(x, "x")
    n, d = x.shape[-2], x.shape[-1]
    if kronecker_structure:
        return int(ratio * math.pow(n, 1.0 / d))
    return int(ratio * n)


def interpolation_grid(
    x: Tensor,
    size: int | Sequence[int] | None = None,
    kind: str = "cubic",
    bounds: Tensor | None = None,
    ratio: float = 1.0,
) -> list[Tensor]:
    """The regular grid axes ``[(n_0,), ..., (n_{d-1},)]`` of an ``InterpolationKernel`` for data ``x``
    ``(n, d)``.

    size: points a dimension (an int, or one per dimension; default :func:`choose_grid_size` with ``ratio``,
    at least what ``kind`` needs); kind: ``"cubic"`` or ``"linear"`` (the kernel's); bounds: ``(2, d)`` lower
    and upper limits to cover instead of the data's range (e.g. the test inputs' too). Each axis covers its
    range with the padding ``kind`` needs (module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    x = as_inputs(x, "x").detach()
    d = x.shape[-1]
    sizes = _sizes(x, size, kind, ratio)
    lo, hi = _range(x, bounds)
    return [_axis(float(lo[j]), float(hi[j]), sizes[j], _PADDING[kind], x.dtype, x.device) for j in range(d)]


def _sizes(x: Tensor, size, kind: str, ratio: float) -> list[int]:
    d = x.shape[-1]
    smallest = 2 + 2 * _PADDING[kind]  # two nodes on the covered range plus the padding
    if size is None:
        size = max(choose_grid_size(x, ratio), smallest)
    sizes = [size] * d if isinstance(size, int) else list(size)
    if len(sizes) != d or any(not isinstance(s, int) or s < smallest for s in sizes):
        raise ValueError(f"size: expected an int >= {smallest} or {d} of them ({kind} interpolation), got {size!r}")
    return sizes


def _range(x: Tensor, bounds: Tensor | None) -> tuple[Tensor, Tensor]:
    """The per-dimension interval to cover: ``bounds`` ``(2, d)``, else the data's (flattened over batches)."""
    flat = x.reshape(-1, x.shape[-1])
    if bounds is None:
        return flat.min(0).values, flat.max(0).values
    bounds = torch.as_tensor(bounds, dtype=x.dtype, device=x.device)
    if bounds.shape != (2, x.shape[-1]) or not bool((bounds[0] <= bounds[1]).all()):
        raise ValueError(f"bounds: expected (2, {x.shape[-1]}) lower and upper limits, got {tuple(bounds.shape)}")
    return bounds[0], bounds[1]


def _axis(lo: float, hi: float, size: int, pad: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if hi <= lo:  # one value in this dimension: any positive spacing covers it
        lo, hi = lo - 0.5, hi + 0.5
    h = (hi - lo) / (size - 1 - 2 * pad)
    steps = torch.arange(size, dtype=torch.float64, device=device) - pad
    return (lo + h * steps).to(dtype)

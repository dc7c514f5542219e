"""Stationary kernels as formulas: the gpytorch kernels both fast product paths can evaluate directly.

:func:`kernel_formula` translates ``RBFKernel`` and ``MaternKernel`` (nu in {1/2, 3/2, 5/2}), each optionally
inside a ``ScaleKernel``, with scalar or ARD lengthscales and no batch dimensions, into a :class:`Formula` built
from the parameter tensors a :class:`~structgp.covariance.KernelOperator` holds (each raw parameter through the
kernel's own constraint, so gradients reach the raw parameters as in gpytorch); anything else gives None.

:func:`evaluate_formula` evaluates a block ``k(x1, x2)`` with few passes over the ``n1 x n2`` block: the RBF
exponent ``log s - |z1 - z2|^2 / 2`` (``z = (x - c) / lengthscale``, ``c`` the mean of ``x2``, as gpytorch
centres) is one matrix product of augmented inputs, then a clamp and an ``exp`` (in place when nothing needs
a gradient); gpytorch's general path takes about twice the passes (distances, clamp, division, ``exp``,
scaling). Matern kernels take the distance by differences (``torch.cdist`` without the product formula).
The KeOps backend (:mod:`.keops_backend`) compiles the same formulas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

SUPPORTED_NU = (0.5, 1.5, 2.5)


@dataclasses.dataclass
class Formula:
    """``scale * f(|x1 - x2| / lengthscale)``: family ``"rbf"`` or ``"matern"`` (with ``nu``); lengthscale
    ``(1, d)`` or ``(1, 1)``; scale ``()`` or None (1)."""

    family: str
    nu: float | None
    lengthscale: Tensor
    scale: Tensor | None

    def __iter__(self):
        return iter((self.family, self.nu, self.lengthscale, self.scale))


def kernel_formula(
    kernel: gpytorch.kernels.Kernel, names: Sequence[str], params: Sequence[Tensor]
) -> Formula | None:
    """The :class:`Formula` of a kernel from ``params`` (raw values, in ``names`` order), or None."""
    values = dict(zip(names, params))
    scale, inner, prefix = None, kernel, ""
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        scale = kernel.raw_outputscale_constraint.transform(values["raw_outputscale"])
        inner, prefix = kernel.base_kernel, "base_kernel."
    if inner.batch_shape or kernel.batch_shape or inner.active_dims is not None:
        return None
    if type(inner) is gpytorch.kernels.RBFKernel:
        family, nu = "rbf", None
    elif type(inner) is gpytorch.kernels.MaternKernel and inner.nu in SUPPORTED_NU:
        family, nu = "matern", inner.nu
    else:
        return None
    raw = values.get(prefix + "raw_lengthscale")
    if raw is None or any(n.startswith(prefix) and n != prefix + "raw_lengthscale" for n in names):
        return None  # a prior or extra parameter this translation does not know
    lengthscale = inner.raw_lengthscale_constraint.transform(raw)
    return Formula(family, nu, lengthscale, scale)


def evaluate_formula(formula: Formula, x1: Tensor, x2: Tensor, out: Tensor | None = None) -> Tensor:
    """``k(x1, x2)`` ``(n1, n2)`` for ``x1`` ``(n1, d)``, ``x2`` ``(n2, d)`` (differentiable); without autograd
    an RBF block is written into ``out`` ``(n1, n2)`` when given."""
    family, nu, lengthscale, scale = formula
    inplace = not torch.is_grad_enabled()  # the product's forward and the CG runs: no graph to keep
    center = x2.mean(-2, keepdim=True).detach()  # any shift gives the same kernel: it only limits cancellation
    z1, z2 = (x1 - center) / lengthscale, (x2 - center) / lengthscale
    log_scale = torch.zeros((), dtype=x1.dtype, device=x1.device) if scale is None else scale.log()
    if family == "rbf":  # log s - |z1 - z2|^2 / 2 = z1.z2 + (log s - |z1|^2 / 2) - |z2|^2 / 2, one product
        exponent = _augmented(z1, z2, log_scale, out if inplace else None)
        if inplace:
            return exponent.clamp_max_(log_scale).exp_()
        return torch.minimum(exponent, log_scale).exp()
    # Matern: the distance itself, by differences (a product formula's cancellation would be amplified by the
    # square root: 1e-3 at coincident points in float32); torch.cdist's gradient at distance 0 is 0
    r = torch.cdist(z1, z2, compute_mode="donot_use_mm_for_euclid_dist")
    sq = r.square()
    c = math.sqrt(2 * nu)
    k = torch.exp(-c * r)
    if nu == 1.5:
        k = k * (1 + c * r)
    elif nu == 2.5:
        k = k * (1 + c * r + (5.0 / 3.0) * sq)
    return k if scale is None else scale * k


def _augmented(z1: Tensor, z2: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``shift - |z1_i - z2_j|^2 / 2`` ``(n1, n2)`` as one matrix product of inputs with two more columns."""
    ones1, ones2 = torch.ones_like(z1[:, :1]), torch.ones_like(z2[:, :1])
    left = torch.cat([z1, shift - 0.5 * z1.square().sum(-1, keepdim=True), ones1], -1)
    right = torch.cat([z2, ones2, -0.5 * z2.square().sum(-1, keepdim=True)], -1)
    return torch.matmul(left, right.mT, out=out) if out is not None else left @ right.mT


def rbf_tile_vjp(
    formula: Formula, x: Tensor, u1: Tensor, b: slice, t: slice, weight: Tensor, buffer: Tensor | None = None
) -> tuple[Tensor, ...]:
    """The gradients of ``sum(weight * k(x[b], x[t]))`` for an RBF formula (detached tensors), in closed form,
    in float64: ``(d/dx[b] (rows, d), d/dx[t] (cols, d), d/d lengthscale (like it))`` and, where the formula has
    a scale, ``d/d scale``.

    ``u1`` ``(n, d + 1)`` float64: ``[x - c, 1]`` for any fixed shift ``c`` (the kernel is shift-invariant; the
    caller's mean of ``x`` limits cancellation). With ``u = x - c``, ``E = weight * K`` and its row and column
    sums ``r``, ``s``: ``d/du_b = (E u_t - r u_b) / l^2``, ``d/du_t = (E^T u_b - s u_t) / l^2``,
    ``d/dl_d = sum_ij E_ij (u_id - u_jd)^2 / l_d^3`` (expanded into the same sums) and ``d/d scale = sum E /
    scale``: two products of ``E`` with ``d + 1`` columns instead of autograd's passes through the formula.
    ``buffer`` ``(rows, cols)`` contiguous: where the tile ``K`` is written (without autograd), then ``E`` in
    place, so a tile costs no allocation beyond ``weight`` (float64 ``E`` is a copy for float32 data)."""
    _, _, lengthscale, scale = formula
    if buffer is None:
        e = (weight * evaluate_formula(formula, x[b], x[t])).double()
    else:
        e = evaluate_formula(formula, x[b], x[t], out=buffer).mul_(weight).double()
    ub1, ut1 = u1[b], u1[t]
    ub, ut = ub1[:, :-1], ut1[:, :-1]
    left = e @ ut1  # (rows, d + 1): E u_t, r
    right = e.mT @ ub1  # (cols, d + 1): E^T u_b, s
    eu, r = left[:, :-1], left[:, -1:]
    etu, s = right[:, :-1], right[:, -1:]
    inv_sq = lengthscale.double().reciprocal().square()  # (1, d) or (1, 1)
    grad_b = (eu - r * ub) * inv_sq
    grad_t = (etu - s * ut) * inv_sq
    # sum_ij E_ij (u_id - u_jd)^2 = sum_i r_i u_id^2 + sum_j s_j u_jd^2 - 2 sum_i u_id (E u_t)_id, per d
    squares = (r * ub.square()).sum(0) + (s * ut.square()).sum(0) - 2 * (ub * eu).sum(0)
    squares = squares.reshape(1, -1)
    if lengthscale.shape[-1] == 1:  # one lengthscale for every dimension
        squares = squares.sum(-1, keepdim=True)
    grad_lengthscale = squares * inv_sq / lengthscale.double()
    if scale is None:
        return grad_b, grad_t, grad_lengthscale
    return grad_b, grad_t, grad_lengthscale, (e.sum() / scale.double()).reshape(scale.shape)

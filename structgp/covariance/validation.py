"""Argument checks shared by the operators.

Every check names the argument and what was expected. Checks that need the *values* of a tensor
(positivity, finiteness) are skipped when the values cannot be inspected: under ``torch.func.vmap``
(data-dependent control flow is not allowed there) and while ``torch.compile`` traces.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.errors import NumericalError

_FLOATS = (torch.float32, torch.float64)


def value_checks_enabled(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host (not under vmap, not while compiling)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def host_readable(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host (to stop early, to warn): not under ``torch.func.vmap``
    (batched tensors refuse data-dependent control flow), not while compiling, not on the meta device.

    Unlike :func:`value_checks_enabled` it lets ``torch.func.grad`` / ``jvp``
    wrappers through: they allow host reads, and without them PCG would run all ``max_iter`` masked
    iterations under ``torch.func.grad`` (the same values, at many times the cost).
    """
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if not functorch.is_gradtrackingtensor(t):
            return False  # vmap's batched tensors, and wrappers not known to allow reads
        t = functorch.get_unwrapped(t)
    return True


def _values_checked(t: Tensor) -> bool:
    from structgp import _config

    return _config.current().check_values and value_checks_enabled(t)


def _check_values(t: Tensor, ok: Tensor, name: str, what: str, error: type[ValueError] = ValueError) -> None:
    if not _values_checked(t):
        return
    try:
        good = bool(ok.all())
    except RuntimeError:  # a transform we do not know refuses host reads: skip the value check
        return
    if not good:
        raise error(f"{name}: expected {what}")


def as_tensor(x, name: str, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Turn a tensor or Python number into a floating tensor, or raise a TypeError naming ``name``."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        t = torch.tensor(float(x), dtype=dtype or torch.get_default_dtype(), device=device)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or a Python number, got {type(x).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {t.dtype}")
    return t


def check_finite(t: Tensor, name: str) -> None:
    if not _values_checked(t):
        return
    with torch.no_grad():
        # one reduction pass: a finite sum means finite entries; otherwise (NaN, Inf, or an overflowing sum)
        # look entry by entry. The sum is in t's dtype: sum(dtype=float64) would first copy t to float64
        if t.numel() and math.isfinite(t.sum().item()):
            return
        _check_values(t, torch.isfinite(t), name, "finite entries (found NaN or Inf)", NumericalError)


def check_positive(t: Tensor, name: str) -> None:
    if not _values_checked(t):
        return
    with torch.no_grad():
        if positive_finite(t):
            return
        # NaN/Inf, and zeros (a positive value that underflowed), are numerical; a negative entry is a mistake
        _check_values(t, torch.isfinite(t), name, "finite entries (found NaN or Inf)", NumericalError)
        _check_values(t, t >= 0, name, "strictly positive entries (found a negative entry)")
        _check_values(t, t > 0, name, "strictly positive entries (found 0)", NumericalError)


def check_nonnegative(t: Tensor, name: str) -> None:
    """Finite entries ``>= 0`` (a scale of a PSD operator: zero keeps it PSD)."""
    if not _values_checked(t):
        return
    with torch.no_grad():
        lo, hi = t.aminmax() if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        if bool((lo >= 0) & (hi < float("inf"))):
            return
        _check_values(t, torch.isfinite(t), name, "finite entries (found NaN or Inf)", NumericalError)
        _check_values(t, t >= 0, name, "strictly positive or zero entries (found a negative entry)")


def positive_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is positive and finite: ``min > 0`` and ``max < inf`` from one pass (a NaN
    propagates through both) and one host read. On the CPU the two scalars are read directly: a comparison
    of a tensor with a Python number costs more there than the reduction."""
    if t.numel() == 0:
        return True
    lo, hi = t.detach().aminmax()
    if t.device.type == "cpu":
        return lo.item() > 0 and hi.item() < math.inf
    return bool((lo > 0) & (hi < math.inf))


def check_ndim(t: Tensor, name: str, min_ndim: int, layout: str) -> None:
    if t.dim() < min_ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(t.shape)}")


def check_square(t: Tensor, name: str) -> None:
    check_ndim(t, name, 2, "(..., n, n)")
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name}: expected a square matrix (..., n, n), got {tuple(t.shape)}")
    check_nonempty(t, name, "(..., n, n)")


def check_nonempty(t: Tensor, name: str, layout: str) -> None:
    """A covariance of size ``n >= 1`` (the last dim of ``t``): a 0 x 0 one has no questions to answer."""
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape {layout} with n >= 1, got {tuple(t.shape)}")


def check_same_kind(tensors: dict[str, Tensor]) -> None:
    """All tensors share one dtype and one device; otherwise name the odd one."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{name}: expected dtype {t0.dtype} (the dtype of {name0}), got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{name}: expected device {t0.device} (the device of {name0}), got {t.device}")


def broadcast_batch(*shapes: torch.Size, names: tuple[str, ...] = ()) -> torch.Size:
    """The broadcast of batch shapes, or a ValueError naming them."""
    if all(s == shapes[0] for s in shapes[1:]):  # the common case, without torch.broadcast_shapes' overhead
        return torch.Size(shapes[0])
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        what = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(names, shapes)) or str(shapes)
        raise ValueError(f"batch shapes do not broadcast ({what})") from None


def sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` summed over the dims that broadcasting added to ``shape`` (the gradient of a broadcast)."""
    extra = t.dim() - len(shape)
    t = t.sum(tuple(range(extra))) if extra > 0 else t
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


def check_symmetric(t: Tensor, name: str) -> bool:
    """``t`` ``(..., n, n)`` is symmetric: ``|(A - A^T) u| <= tol (|A u| + |A^T u|)`` for a fixed generic ``u``
    (two matrix-vector products, no second ``n x n`` tensor), ``tol`` ``1e-3`` (float32) / ``1e-5`` (float64).
    ``u`` is deterministic (no random draw, so the check also runs inside ``torch.func.vmap``).

    Returns whether ``t`` is :func:`negligibly_asymmetric` (checked first: the common case, where the
    product test is not needed), so that factorisations may take it as it is; False when the values were
    not read or ``t`` is symmetric only within the tolerance.
    """
    if not _values_checked(t) or t.numel() == 0:
        return False
    if negligibly_asymmetric(t):
        return True
    tol = 1e-3 if t.dtype == torch.float32 else 1e-5
    u = torch.cos(1.0 + 0.7548776662 * torch.arange(t.shape[-1], dtype=t.dtype, device=t.device)).unsqueeze(-1)
    with torch.no_grad():
        left, right = t @ u, t.mT @ u
        gap = (left - right).norm(dim=-2)
        scale = left.norm(dim=-2) + right.norm(dim=-2)
        if bool((gap > tol * scale).any()):
            raise ValueError(f"{name}: expected a symmetric matrix, found |(A - A^T) u| = {float(gap.max()):.3g}")
    return False


def negligibly_asymmetric(t: Tensor) -> bool:
    """Whether every matrix of ``t`` ``(..., n, n)`` has ``|A_ij - A_ji| <= n eps max_k |A_kk|``: an asymmetry
    below the backward error of a Cholesky factorisation (``~ n eps |A|``), so that factorising ``A`` as it
    is (Cholesky reads one triangle) is as accurate as factorising ``(A + A^T) / 2``. Such are matrices
    symmetric up to the rounding of the products that built them (kernel matrices from ``x @ x.T``).

    One comparison pass when ``t`` equals its transpose exactly; else the largest entry of ``|A - A^T|``.
    Reads values: callers check :func:`value_checks_enabled` first.
    """
    t = t.detach()
    if torch.equal(t, t.mT):
        return True
    n = t.shape[-1]
    gap = (t - t.mT).abs_().amax(dim=(-2, -1))
    bound = (n * torch.finfo(t.dtype).eps) * t.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    return bool((gap <= bound).all())


def check_dense_size(shape: tuple[int, ...], dtype: torch.dtype, subject: str, advice: str) -> None:
    """Raise ``DensifyError`` when a dense tensor of ``shape`` and ``dtype`` would exceed
    ``settings(dense_limit=...)``: "``subject`` would take X GiB, over the limit of Y GiB``advice``"."""
    from structgp import _config
    from structgp.covariance.errors import DensifyError

    nbytes = math.prod(shape) * dtype.itemsize
    limit = _config.current().dense_limit
    if nbytes > limit:
        raise DensifyError(
            f"{subject} would take {nbytes / 2**30:.1f} GiB, over the limit of {limit / 2**30:.1f} GiB{advice}"
        )

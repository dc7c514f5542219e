"""KernelOperator: ``K(x, x)`` of a gpytorch kernel, matrix-free.

The operator is held by the inputs ``x`` ``(..., n, d)`` and the kernel's parameter tensors; the kernel
module itself is static (it says *how* to evaluate, its parameters say *what*). Every evaluation goes through
:func:`torch.func.functional_call` with the parameter tensors this operator holds, so nothing closes over a
module's current parameters: the operator is a pytree whose leaves are ``x``, the parameters and a scale.

Products ``K V`` are computed in tiles: ``(K V)[b] = sum_t K(x[b], x[t]) V[t]`` over row tiles ``b`` and column
tiles ``t``; each tile is evaluated, used and freed, so a product needs one tile's memory beside its vectors,
never ``O(n^2)`` and not ``O(n)`` either. Their gradients come from a custom autograd function whose backward
evaluates each tile again (under :func:`torch.func.vjp`) to pull back ``G_b V_t^T`` onto ``x[b]``, ``x[t]`` and
the parameters (``G`` the output gradient), and multiplies ``K G`` for ``V``'s gradient: the same memory as the
forward, about three times its time. RBF formula kernels pull each tile back in closed form instead
(:func:`.kernel_formula.rbf_tile_vjp`: two products with ``d + 1`` columns, then the chain rule to the raw
parameters; sums in float64). The diagonal and single rows (``rows``: what the pivoted Cholesky
preconditioner reads) cost ``O(n d)`` a row.

With ``backend="keops"`` a product is one KeOps reduction instead (:mod:`.keops_backend`: no blocks, KeOps'
own gradients), for the kernels KeOps can express.

The tile (:func:`tile_shape`) is ``TILE_ROWS`` rows by as many columns as ``TILE_ENTRIES`` entries allow (a
larger tile on accelerators, where each tile is a few kernel launches), and never more than
``settings(memory_budget=...) / BUDGET_SHARE`` bytes (a kernel's own temporaries and the backward are a few
tiles). On the CPU, tiles of 512 x 1 024 were as fast as full-width ``69 x n`` row blocks or faster (N = 30 000,
float64: 38.5 against 44.5 s for a partitioned-engine value + gradient), and a tile's memory does not grow
with ``n``. The accelerator tile (``DEVICE_TILE_ENTRIES``) has not been measured on a device yet.

Across processes (an active :mod:`structgp.distributed` process group of ``P`` ranks): each rank computes
the contiguous whole row tiles :func:`~structgp.distributed.partition` gives it and all-gathers them, so
every rank returns the full product, bitwise the one-process product (each row is the same sum of the same
tiles), after ``n^2 / P`` kernel entries (with fewer row tiles than ranks the rows are split evenly
instead); the backward sums the ranks' contributions to the gradients of ``x`` and the parameters with one
all-reduce. ``rows``, ``diagonal`` and ``_to_dense`` stay local (every rank holds ``x``). KeOps products are
partitioned the same way: each rank reduces its rows, which are all-gathered. ``_matmul_rows``
computes given rows only, with no collective: the partitioned iterative engine's product
(:mod:`structgp.covariance.local_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from structgp import _config, distributed
from structgp.covariance.keops_backend import keops_available, keops_matmul
from structgp.covariance.kernel_formula import Formula, evaluate_formula, kernel_formula, rbf_tile_vjp
from structgp.covariance.operator import Operator
from structgp.covariance.validation import sum_to, value_checks_enabled
from structgp.distributed.rows import Rows, gather_shared, share_gradients

DEFAULT_NAME = "k(x, x)"  # what an operator is called when its maker gave no reason of its own
TILE_ROWS = 512  # rows of a tile: the height of a product's GEMMs and the unit of the rows across processes
TILE_ENTRIES = 2**19  # entries of a tile on the CPU (4 MiB in float64): cache-sized, as fast as wider tiles
DEVICE_TILE_ENTRIES = 2**24  # on accelerators: fewer, larger tiles (each tile costs a few kernel launches)
BUDGET_SHARE = 32  # a tile takes at most memory_budget / BUDGET_SHARE bytes (kernel temporaries, backward)


class KernelOperator(Operator):
    """``scale * k(x, x)`` ``(..., n, n)`` for a gpytorch kernel ``k``, never materialised.

    kernel: any ``gpytorch.kernels.Kernel`` evaluable as a function of its parameters (its parameters at
    construction are the operator's leaves, so gradients reach them); x: inputs ``(..., n, d)``, finite,
    of the kernel's dtype; params: the parameter tensors in ``kernel.named_parameters()`` order (default:
    the kernel's own); scale: a non-negative multiplier ``()`` or ``(...)`` (``c * op``); backend:
    ``"torch"`` (tiles) or ``"keops"`` (:mod:`.keops_backend`; unbatched RBF/Matern kernels).
    """

    _children = ("x", "params", "scale")
    _static = ("kernel", "names", "name", "backend")

    def __init__(
        self,
        kernel: gpytorch.kernels.Kernel,
        x: Tensor,
        params: Sequence[Tensor] | None = None,
        *,
        scale: Tensor | None = None,
        name: str = DEFAULT_NAME,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"kernel: expected a gpytorch.kernels.Kernel, got {type(kernel).__name__}")
        x = _check_x(x)
        names = tuple(n for n, _ in kernel.named_parameters())
        params = [p for _, p in kernel.named_parameters()] if params is None else list(params)
        if len(params) != len(names):
            raise ValueError(f"params: expected {len(names)} tensors (the kernel's parameters), got {len(params)}")
        for pname, p in zip(names, params):
            if p.dtype != x.dtype or p.device != x.device:
                raise TypeError(
                    f"kernel: parameter {pname} is {p.dtype} on {p.device} but x is {x.dtype} on {x.device}; "
                    "move the kernel with kernel.to(x)"
                )
        self.kernel, self.names, self.name, self.backend = kernel, names, name, backend
        self.x, self.params = x, params
        self.scale = torch.ones((), dtype=x.dtype, device=x.device) if scale is None else scale
        self._cache["shape"] = self._batch_probe()
        _check_backend(self)

    # -- what the operator is ----------------------------------------------------------------------
    def _batch_probe(self) -> torch.Size:
        """The shape, from one kernel entry (also checks that the kernel is a pure function of its
        parameters and accepts ``x``: a clear error here instead of one deep in a product)."""
        probe = self.x[..., :1, :].detach()
        try:
            with torch.enable_grad():  # with every leaf detached, only a closure can make the entry need grad
                detached = [p.detach() for p in self.params]
                entry = evaluate_kernel(self.kernel, self.names, detached, probe, probe)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ValueError(
                f"x: the kernel cannot be evaluated on inputs of shape {tuple(self.x.shape)} ({err})"
            ) from err
        if entry.requires_grad:
            raise ValueError(
                "kernel: its value depends on a tensor that requires grad but is not one of its registered "
                "parameters (a closure over a tensor); register it as a parameter or buffer so the kernel "
                "is a pure function of its parameters"
            )
        batch = torch.broadcast_shapes(entry.shape[:-2], self.scale.shape)
        return batch + (self.x.shape[-2], self.x.shape[-2])

    @property
    def shape(self) -> torch.Size:
        if "shape" not in self._cache:
            self._cache["shape"] = self._batch_probe()
        return self._cache["shape"]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _tensors(self) -> list[Tensor]:
        return [self.x, *self.params, self.scale]

    def __repr__(self) -> str:
        return f"KernelOperator({type(self.kernel).__name__}, n={self.n}, {self.name})"

    # -- evaluation ---------------------------------------------------------------------------------
    def tile(self) -> tuple[int, int]:
        """``(rows, columns)`` of one tile of a product (:func:`tile_shape`)."""
        return tile_shape(self.n, self.batch_shape.numel(), self.dtype, self.device)

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` of the matrix, ``(..., len(index), n)`` for a long tensor ``index`` ``(m,)``
        (differentiable; ``O(m n d)``)."""
        block = kernel_block(self.kernel, self.names, self.params, self.x[..., index, :], self.x)
        return self.scale[..., None, None] * block

    def _matmul(self, rhs: Tensor) -> Tensor:
        if self.backend == "keops" and rhs.dim() == 2:
            out = self._keops_product(rhs)
        else:
            out = _BlockProduct.apply(self._spec(), rhs, self.x, *self.params)
        return self.scale[..., None, None] * out

    def diagonal(self) -> Tensor:
        diag = evaluate_kernel(self.kernel, self.names, self.params, self.x, self.x, diag=True)
        return self.scale[..., None] * diag.expand(*self.batch_shape, self.n)

    def _to_dense(self) -> Tensor:
        dense = evaluate_kernel(self.kernel, self.names, self.params, self.x, self.x)
        return self.scale[..., None, None] * dense

    def _scale(self, c: Tensor) -> KernelOperator:
        return self._replace(scale=c * self.scale)

    def _expand(self, batch_shape: torch.Size) -> KernelOperator:
        x = self.x.expand(*batch_shape, *self.x.shape[-2:])
        return self._replace(x=x, scale=self.scale.expand(batch_shape))

    def _keops_product(self, rhs: Tensor) -> Tensor:
        """``k(x, x) @ rhs`` ``(n, c)`` by KeOps; under an active process group each rank reduces its rows (whole
        row tiles, as the torch backend) and the rows are all-gathered, with the gradients' shares summed over
        the ranks (:mod:`structgp.distributed.rows`)."""
        part = Rows.of(self.n, self.tile()[0])
        if part is None:
            return keops_matmul(kernel_formula(self.kernel, self.names, self.params), self.x, rhs)
        x, *params, rhs = share_gradients([self.x, *self.params, rhs], part)
        local = keops_matmul(kernel_formula(self.kernel, self.names, params), x, rhs, (part.start, part.stop))
        return gather_shared(local, part, rhs.sum(-2), "a KeOps kernel product")

    def _matmul_rows(self, rhs: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self @ rhs`` ``(..., stop - start, c)`` for the full ``rhs`` ``(..., n, c)``,
        differentiable, with no collective in the forward or the backward: a partitioned computation's
        share (:mod:`structgp.distributed.rows`; its caller sums the gradients' shares over the ranks)."""
        if self.backend == "keops" and rhs.dim() == 2:
            formula = kernel_formula(self.kernel, self.names, self.params)
            return self.scale * keops_matmul(formula, self.x, rhs, (start, stop))
        spec = (self.kernel, self.names, self.tile(), None, (start, stop))
        return self.scale[..., None, None] * _BlockProduct.apply(spec, rhs, self.x, *self.params)

    def _spec(self) -> tuple:
        tile = self.tile()
        parts = distributed.row_range(self.n, tile[0])  # every rank's rows (whole row tiles), or None: one process
        return (self.kernel, self.names, tile, parts, None)


def evaluate_kernel(
    kernel: gpytorch.kernels.Kernel,
    names: tuple[str, ...],
    params: Sequence[Tensor],
    x1: Tensor,
    x2: Tensor,
    *,
    diag: bool = False,
) -> Tensor:
    """``k(x1, x2)`` ``(..., n1, n2)`` (or its diagonal) with the kernel's parameters replaced by ``params``.

    gpytorch evaluates kernels lazily by default; a lazy result would be evaluated later with the module's
    own parameters, so evaluation is eager here and the result is densified inside the call. gpytorch's
    trace mode keeps its kernels on plain torch operations (no custom autograd functions without
    ``setup_context``, which ``torch.func`` transforms refuse)."""
    with gpytorch.settings.lazily_evaluate_kernels(False), gpytorch.settings.trace_mode(True):
        out = torch.func.functional_call(kernel, dict(zip(names, params)), (x1, x2), {"diag": diag})
        return out if isinstance(out, Tensor) else out.to_dense()


def kernel_block(kernel, names, params: Sequence[Tensor], x1: Tensor, x2: Tensor) -> Tensor:
    """``k(x1, x2)``: by the kernel's formula (:mod:`.kernel_formula`, fewer passes over the block) where it has
    one and the inputs are unbatched, else through gpytorch (:func:`evaluate_kernel`)."""
    if x1.dim() == 2 and x2.dim() == 2:
        formula = kernel_formula(kernel, names, params)
        if formula is not None:
            return evaluate_formula(formula, x1, x2)
    return evaluate_kernel(kernel, names, params, x1, x2)


def tile_shape(n: int, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """``(rows, columns)`` of one product tile of an ``n x n`` kernel matrix with ``batch`` batch members on
    ``device``: ``TILE_ROWS`` rows (fewer only for small matrices or budgets: then square tiles) and the
    columns that fill ``TILE_ENTRIES`` entries for all batch members (``DEVICE_TILE_ENTRIES`` off the CPU),
    within ``memory_budget / BUDGET_SHARE`` bytes; a matrix narrower than that takes taller tiles. Raises a
    ``MemoryError`` naming ``memory_budget`` when not even one entry a batch member fits."""
    budget = _config.current().memory_budget // BUDGET_SHARE
    if budget < batch * dtype.itemsize:
        raise MemoryError(
            f"memory_budget: {_config.current().memory_budget} bytes leave {budget} for one tile of a "
            f"matrix-free kernel product, less than one entry of its {batch} batch members; raise "
            f"structgp.settings(memory_budget=...) to at least {batch * dtype.itemsize * BUDGET_SHARE}"
        )
    cap = TILE_ENTRIES if device.type == "cpu" else DEVICE_TILE_ENTRIES
    entries = max(1, min(budget // dtype.itemsize, cap) // batch)  # a batch member's share of the tile
    rows = min(n, TILE_ROWS, math.isqrt(entries))
    cols = min(n, entries // rows)
    return min(n, max(rows, entries // cols)), cols


def _check_backend(op: KernelOperator) -> None:
    if op.backend not in ("torch", "keops"):
        raise ValueError(f"backend: expected 'torch' or 'keops', got {op.backend!r}")
    if op.backend == "torch":
        return
    if not keops_available():
        raise ImportError("backend='keops' needs pykeops: pip install 'structgp[keops]' (or use backend='torch')")
    if op.x.dim() != 2 or kernel_formula(op.kernel, op.names, op.params) is None:
        raise ValueError(
            f"backend: KeOps cannot express {type(op.kernel).__name__} on inputs {tuple(op.x.shape)} (it takes "
            "unbatched RBF and Matern kernels, optionally scaled); use backend='torch'"
        )


def _check_x(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor (..., n, d), got {type(x).__name__}")
    if x.layout != torch.strided or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected a dense float32/float64 tensor (..., n, d), got {x.dtype}, {x.layout}")
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(f"x: expected a non-empty (..., n, d) tensor, got shape {tuple(x.shape)}")
    if value_checks_enabled(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("x: expected finite inputs (found NaN or Inf)")
    return x


class _BlockProduct(torch.autograd.Function):
    """``k(x, x) @ rhs`` by tiles; backward recomputes each tile (see the module docstring).

    ``spec`` is ``(kernel, names, tile, parts, span)``: ``tile`` ``(rows, columns)`` (:func:`tile_shape`);
    ``parts`` is every rank's ``(start, stop)`` rows under an active process group (:mod:`structgp.distributed`),
    else ``None``. Partitioned, the forward computes only this rank's rows and all-gathers them (every rank
    returns the full product); the backward's ``K G`` is gathered the same way and its contributions to the
    gradients of ``x`` and the parameters, from this rank's rows, are summed over the ranks. The output
    gradient ``G`` is the same on every rank, as everything downstream of the gathered product is. ``span``
    ``(start, stop)`` (with ``parts`` None) asks for those rows only: the forward returns them, the backward's
    gradients are those rows' share (``rhs``'s is ``K[span, :]^T G``) and nothing is gathered or summed."""

    @staticmethod
    def forward(spec: tuple, rhs: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        kernel, names, tile, parts, span = spec
        return _product(kernel, names, params, x, rhs, tile, parts, "a kernel product", span)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        spec, rhs, x, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(rhs, x, *params)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kernel, names, tile, parts, span = ctx.spec
        rhs, x, *params = ctx.saved_tensors
        start, stop = _rows_of(x.shape[-2], parts, span)
        with torch.no_grad():
            grad_rhs = None
            if ctx.needs_input_grad[1] and span is not None:  # K[span, :]^T G: this rank's share
                grad_rhs = sum_to(_transposed_product(kernel, names, params, x, grad, tile, span), rhs.shape)
            elif ctx.needs_input_grad[1]:
                grad_rhs = _product(kernel, names, params, x, grad, tile, parts, "a kernel product's gradient")
                grad_rhs = sum_to(grad_rhs, rhs.shape)
        needs_x = ctx.needs_input_grad[2]
        needs_params = [ctx.needs_input_grad[3 + i] for i in range(len(params))]
        if not needs_x and not any(needs_params):
            return (None, grad_rhs, None, *(None for _ in params))
        offset = 0 if span is None else start  # the row of ``grad`` that holds row ``offset`` of the product
        rows_here = (start, stop, offset)
        formula = kernel_formula(kernel, names, params) if x.dim() == 2 else None
        pull_back = _rbf_pull_back if formula is not None and formula.family == "rbf" else _generic_pull_back
        grad_x, grad_params = pull_back(kernel, names, params, x, rhs, grad, tile, rows_here, parts)
        grad_params = [g if need else None for g, need in zip(grad_params, needs_params)]
        return (None, grad_rhs, grad_x if needs_x else None, *grad_params)


def _tiles(start: int, stop: int, n: int, tile: tuple[int, int]):
    """The tiles ``(b, t)`` of rows ``start:stop`` and all ``n`` columns, row tile by row tile."""
    rows, cols = tile
    for first in range(start, stop, rows):
        b = slice(first, min(first + rows, stop))
        for col in range(0, n, cols):
            yield b, slice(col, min(col + cols, n))


def _generic_pull_back(kernel, names, params, x: Tensor, rhs: Tensor, grad: Tensor, tile, rows_here, parts):
    """The gradients of ``<G, K[rows] rhs>`` for ``x`` and the parameters: each tile evaluated again under
    :func:`torch.func.vjp` in its two inputs ``x[b]``, ``x[t]`` and the parameters, pulled back with
    ``G_b rhs_t^T``; summed over the ranks when partitioned."""
    start, stop, offset = rows_here
    grad_x = torch.zeros_like(x)
    grad_params = [torch.zeros_like(p) for p in params]

    def tile_of(xb: Tensor, xt: Tensor, *pp: Tensor) -> Tensor:
        return kernel_block(kernel, names, pp, xb, xt)

    for b, t in _tiles(start, stop, x.shape[-2], tile):
        weight = grad[..., b.start - offset : b.stop - offset, :] @ rhs[..., t, :].mT  # d loss / d K[b, t]
        value, pull = torch.func.vjp(tile_of, x[..., b, :], x[..., t, :], *params)
        pulled = pull(sum_to(weight, value.shape))
        grad_x[..., b, :] += pulled[0]
        grad_x[..., t, :] += pulled[1]
        grad_params = [g + d for g, d in zip(grad_params, pulled[2:])]
    if parts is not None:  # each rank pulled back its own rows: the gradient is their sum
        grad_x, *grad_params = distributed.all_reduce_sum([grad_x, *grad_params], "kernel gradients")
    return grad_x, grad_params


def _rbf_pull_back(kernel, names, params, x: Tensor, rhs: Tensor, grad: Tensor, tile, rows_here, parts):
    """The gradients for ``x`` and the raw parameters of an RBF formula kernel: each tile's closed-form
    pull-back (:func:`.kernel_formula.rbf_tile_vjp`, summed in float64), then the chain rule from the
    lengthscale and scale to the raw parameters through the kernel's constraints (``torch.func.vjp``: also
    under ``torch.func.grad``)."""
    start, stop, offset = rows_here

    def transform(*raw: Tensor) -> tuple[Tensor, ...]:
        formula = kernel_formula(kernel, names, raw)
        return (formula.lengthscale,) if formula.scale is None else (formula.lengthscale, formula.scale)

    outputs, pull = torch.func.vjp(transform, *params)
    scale = outputs[1].detach() if len(outputs) == 2 else None
    detached = Formula("rbf", None, outputs[0].detach(), scale)
    with torch.no_grad():
        x64 = x.detach().double()
        u1 = torch.cat([x64 - x64.mean(-2, keepdim=True), torch.ones_like(x64[:, :1])], -1)  # [x - c, 1]
        sums = [torch.zeros_like(x64)] + [torch.zeros_like(o, dtype=torch.float64) for o in outputs]
        # two tile buffers for the whole backward (the kernel tile, then E in place; the weight)
        k_buffer = _tile_buffer(x, tile, stop - start)
        plain = grad.dim() == 2 and rhs.dim() == 2 and grad.dtype == rhs.dtype == x.dtype
        w_buffer = torch.empty_like(k_buffer) if plain else None
        for b, t in _tiles(start, stop, x.shape[-2], tile):
            shape = (b.stop - b.start, t.stop - t.start)
            g_b = grad[..., b.start - offset : b.stop - offset, :]
            if plain:  # d loss / d K[b, t]
                weight = torch.matmul(g_b, rhs[t].mT, out=_view(w_buffer, shape))
            else:
                weight = sum_to(g_b @ rhs[..., t, :].mT, shape)
            grad_b, grad_t, *rest = rbf_tile_vjp(detached, x, u1, b, t, weight, _view(k_buffer, shape))
            sums[0][b] += grad_b
            sums[0][t] += grad_t
            sums[1:] = [total + part for total, part in zip(sums[1:], rest)]
        if parts is not None:  # each rank pulled back its own rows: the gradient is their sum
            sums = distributed.all_reduce_sum(sums, "kernel gradients")
    chained = pull(tuple(s.to(x.dtype) for s in sums[1:]))
    return sums[0].to(x.dtype), list(chained)


def _tile_buffer(x: Tensor, tile: tuple[int, int], rows: int) -> Tensor:
    """A flat buffer for the largest tile of ``rows`` rows and all columns of ``k(x, x)``: written in place a
    tile at a time (tiles allocated and freed by the thousand fragment the C heap: glibc once held 8 GB of
    resident memory at N = 60 000 instead of 0.8)."""
    return x.new_empty(min(tile[0], rows) * min(tile[1], x.shape[-2]))


def _view(buffer: Tensor, shape: tuple[int, int]) -> Tensor:
    """A contiguous ``shape`` view of the front of a flat ``buffer``."""
    return buffer[: shape[0] * shape[1]].view(shape)


def _rows_of(n: int, parts, span) -> tuple[int, int]:
    """The rows this process computes: ``span``, else its rank's of ``parts``, else all ``n``."""
    if span is not None:
        return span
    return (0, n) if parts is None else parts[distributed.rank()]


def _tile_source(kernel, names, params, x: Tensor, tile: tuple[int, int], rows: int):
    """``(b, t) -> k(x[b], x[t])`` for row and column slices of at most ``tile`` ``(rows, columns)``, within
    ``rows`` rows in all."""
    formula = kernel_formula(kernel, names, params) if x.dim() == 2 else None
    if formula is None:
        return lambda b, t: evaluate_kernel(kernel, names, params, x[..., b, :], x[..., t, :])
    buffer = _tile_buffer(x, tile, rows)  # one for the whole product (products run without autograd)
    return lambda b, t: evaluate_formula(formula, x[b], x[t], out=_view(buffer, (b.stop - b.start, t.stop - t.start)))


def _product(kernel, names, params, x: Tensor, rhs: Tensor, tile, parts, what: str, span=None) -> Tensor:
    """``k(x, x) @ rhs`` ``(..., n, c)``: all rows, or this rank's of ``parts`` gathered from every rank, or
    the rows ``span`` only ``(..., stop - start, c)``."""
    start, stop = _rows_of(x.shape[-2], parts, span)
    local = _tiled(_tile_source(kernel, names, params, x, tile, stop - start), rhs, start, stop, tile)
    if parts is None:
        return local
    check = rhs.sum(-2).expand(*local.shape[:-2], rhs.shape[-1])  # the same on every rank, or they diverged
    return distributed.gather_rows(local, parts, check, what)


def _tiled(source, rhs: Tensor, start: int, stop: int, tile: tuple[int, int]) -> Tensor:
    """Rows ``start:stop`` of ``K @ rhs`` with ``K[b, t]`` from ``source(b, t)``: each row tile's sum over the
    column tiles, in column order."""
    out, row, n = None, None, rhs.shape[-2]
    if start >= stop:  # no rows
        return rhs.new_zeros(*rhs.shape[:-2], 0, rhs.shape[-1])
    for b, t in _tiles(start, stop, n, tile):
        part = source(b, t) @ rhs[..., t, :]
        row = part if t.start == 0 else row.add_(part)
        if t.stop < n:
            continue
        if out is None:
            out = row.new_empty(*row.shape[:-2], stop - start, row.shape[-1])
        out[..., b.start - start : b.stop - start, :] = row
    return out


def _transposed_product(kernel, names, params, x: Tensor, grad: Tensor, tile, span) -> Tensor:
    """``K[span, :]^T grad`` ``(..., n, c)`` for ``grad`` ``(..., stop - start, c)``, one tile at a time."""
    start, stop = span
    if start >= stop:  # no rows: no share
        return grad.new_zeros(*grad.shape[:-2], x.shape[-2], grad.shape[-1])
    source = _tile_source(kernel, names, params, x, tile, stop - start)
    out = None
    for b, t in _tiles(start, stop, x.shape[-2], tile):
        part = source(b, t).mT @ grad[..., b.start - start : b.stop - start, :]
        if out is None:
            out = part.new_zeros(*part.shape[:-2], x.shape[-2], part.shape[-1])
        out[..., t, :] += part
    return out

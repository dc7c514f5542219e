"""KernelOperator: ``K(x, x)`` of a gpytorch kernel, matrix-free.

The operator is held by the inputs ``x`` ``(..., n, d)`` and the kernel's parameter tensors; the kernel
module itself is static (it says *how* to evaluate, its parameters say *what*). Every evaluation goes through
:func:`torch.func.functional_call` with the parameter tensors this operator holds, so nothing closes over a
module's current parameters: the operator is a pytree whose leaves are ``x``, the parameters and a scale.

Products ``K V`` are computed in row blocks ``K(x[b], x) V[...]``: each block is evaluated, used and freed,
so a product needs ``O(block * n)`` memory, never ``O(n^2)``. Their gradients come from a custom autograd
function whose backward evaluates each block again (under :func:`torch.func.vjp`) to pull back
``G_b V^T`` onto ``x`` and the parameters (``G`` the output gradient), and multiplies ``K G`` for ``V``'s
gradient: the same memory as the forward, about three times its time. RBF formula kernels pull each block
back in closed form instead (:func:`.kernel_formula.rbf_block_vjp`: two products with ``d + 1`` columns,
then the chain rule to the raw parameters; sums in float64). The diagonal and single rows (``rows``: what
the pivoted Cholesky preconditioner reads) cost ``O(n d)`` a row.

With ``backend="keops"`` a product is one KeOps reduction instead (:mod:`.keops_backend`: no blocks, KeOps'
own gradients), for the kernels KeOps can express.

The block height comes from ``settings(memory_budget=...)``: a block's ``block x n`` matrix takes at most
``memory_budget / BUDGET_SHARE`` bytes and at most ``MAX_BLOCK_ENTRIES`` entries or ``MIN_BLOCK_ROWS`` rows,
whichever is more (a kernel's own temporaries are a few such matrices; larger blocks are not faster, thinner
ones are slower).

Across processes (an active :mod:`structgp.distributed` process group of ``P`` ranks): each rank computes
the contiguous whole row blocks :func:`~structgp.distributed.partition` gives it and all-gathers them, so
every rank returns the full product, bitwise the one-process product, after ``n^2 / P`` kernel entries
(with fewer blocks than ranks the rows are split evenly instead); the backward sums the ranks'
contributions to the gradients of ``x`` and the parameters with one all-reduce. ``rows``, ``diagonal`` and
``_to_dense`` stay local (every rank holds ``x``), and so do KeOps products (not partitioned yet: each rank
runs the whole reduction, with the same result). ``_matmul_rows`` computes given rows only, with no
collective: the partitioned iterative engine's product (:mod:`structgp.covariance.local_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from structgp import _config, distributed
from structgp.covariance.keops_backend import keops_available, keops_matmul
from structgp.covariance.kernel_formula import Formula, evaluate_formula, kernel_formula, rbf_block_vjp
from structgp.covariance.operator import Operator
from structgp.covariance.validation import sum_to, value_checks_enabled

DEFAULT_NAME = "k(x, x)"  # what an operator is called when its maker gave no reason of its own
MIN_BLOCK_ROWS = 64  # fewer rows a block than this only where the memory budget says so
MAX_BLOCK_ENTRIES = 2**21  # entries of one block x n kernel block (8 MiB in float32; larger were not faster)
BUDGET_SHARE = 32  # a block's matrix takes at most memory_budget / BUDGET_SHARE (kernel temporaries, backward)


class KernelOperator(Operator):
    """``scale * k(x, x)`` ``(..., n, n)`` for a gpytorch kernel ``k``, never materialised.

    kernel: any ``gpytorch.kernels.Kernel`` evaluable as a function of its parameters (its parameters at
    construction are the operator's leaves, so gradients reach them); x: inputs ``(..., n, d)``, finite,
    of the kernel's dtype; params: the parameter tensors in ``kernel.named_parameters()`` order (default:
    the kernel's own); scale: a non-negative multiplier ``()`` or ``(...)`` (``c * op``); backend:
    ``"torch"`` (row blocks) or ``"keops"`` (:mod:`.keops_backend`; unbatched RBF/Matern kernels).
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
    def block_rows(self) -> int:
        """Rows of one block of a product (see the module docstring); raises a ``MemoryError`` naming
        ``memory_budget`` when not even one row fits."""
        return block_rows(self.n, self.batch_shape.numel(), self.dtype)

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` of the matrix, ``(..., len(index), n)`` for a long tensor ``index`` ``(m,)``
        (differentiable; ``O(m n d)``)."""
        block = kernel_block(self.kernel, self.names, self.params, self.x[..., index, :], self.x)
        return self.scale[..., None, None] * block

    def _matmul(self, rhs: Tensor) -> Tensor:
        if self.backend == "keops" and rhs.dim() == 2:
            out = keops_matmul(kernel_formula(self.kernel, self.names, self.params), self.x, rhs)
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

    def _matmul_rows(self, rhs: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self @ rhs`` ``(..., stop - start, c)`` for the full ``rhs`` ``(..., n, c)``,
        differentiable, with no collective in the forward or the backward: a partitioned computation's
        share (:mod:`structgp.distributed.rows`; its caller sums the gradients' shares over the ranks)."""
        spec = (self.kernel, self.names, self.block_rows(), None, (start, stop))
        return self.scale[..., None, None] * _BlockProduct.apply(spec, rhs, self.x, *self.params)

    def _spec(self) -> tuple:
        rows = self.block_rows()
        parts = distributed.row_range(self.n, rows)  # every rank's rows (whole blocks), or None: one process
        return (self.kernel, self.names, rows, parts, None)


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


def block_rows(n: int, batch: int, dtype: torch.dtype) -> int:
    """Rows of one product block for an ``n``-column kernel matrix with ``batch`` batch members."""
    budget = _config.current().memory_budget // BUDGET_SHARE
    per_row = batch * n * dtype.itemsize
    if per_row > budget:
        raise MemoryError(
            f"memory_budget: {_config.current().memory_budget} bytes leave {budget} for one block of a "
            f"matrix-free kernel product, less than one row ({per_row} bytes, n = {n}); raise "
            f"structgp.settings(memory_budget=...) to at least {per_row * BUDGET_SHARE}"
        )
    # MAX_BLOCK_ENTRIES caps the block, but never below MIN_BLOCK_ROWS rows: thinner blocks make the product a
    # GEMM with too few rows (N = 200 000, 33 columns, float64: 236 s a product in blocks of 10 rows, 128 s
    # in blocks of 83)
    rows = max(MAX_BLOCK_ENTRIES // max(1, batch * n), MIN_BLOCK_ROWS)
    return max(1, min(budget // per_row, rows, n))


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
    """``k(x, x) @ rhs`` by row blocks; backward recomputes each block (see the module docstring).

    ``spec`` is ``(kernel, names, rows, parts, span)``: ``parts`` is every rank's ``(start, stop)`` rows under
    an active process group (:mod:`structgp.distributed`), else ``None``. Partitioned, the forward computes
    only this rank's rows and all-gathers the blocks (every rank returns the full product); the backward's
    ``K G`` is gathered the same way and its contributions to the gradients of ``x`` and the parameters,
    from this rank's rows, are summed over the ranks. The output gradient ``G`` is the same on every rank,
    as everything downstream of the gathered product is. ``span`` ``(start, stop)`` (with ``parts`` None)
    asks for those rows only: the forward returns them, the backward's gradients are those rows' share
    (``rhs``'s is ``K[span, :]^T G``) and nothing is gathered or summed."""

    @staticmethod
    def forward(spec: tuple, rhs: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        kernel, names, rows, parts, span = spec
        return _product(kernel, names, params, x, rhs, rows, parts, "a kernel product", span)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        spec, rhs, x, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(rhs, x, *params)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kernel, names, rows, parts, span = ctx.spec
        rhs, x, *params = ctx.saved_tensors
        start, stop = _rows_of(x.shape[-2], parts, span)
        with torch.no_grad():
            grad_rhs = None
            if ctx.needs_input_grad[1] and span is not None:  # K[span, :]^T G: this rank's share
                grad_rhs = sum_to(_transposed_product(kernel, names, params, x, grad, rows, span), rhs.shape)
            elif ctx.needs_input_grad[1]:
                grad_rhs = _product(kernel, names, params, x, grad, rows, parts, "a kernel product's gradient")
                grad_rhs = sum_to(grad_rhs, rhs.shape)
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[2] else None
        grad_params = [torch.zeros_like(p) if ctx.needs_input_grad[3 + i] else None for i, p in enumerate(params)]
        if grad_x is None and all(g is None for g in grad_params):
            return (None, grad_rhs, None, *grad_params)
        formula = kernel_formula(kernel, names, params) if x.dim() == 2 else None
        offset = 0 if span is None else start  # the row of ``grad`` that holds row ``offset`` of the product
        if formula is not None and formula.family == "rbf":
            span_rows = (start, stop, rows, offset)
            grad_x, grad_params = _rbf_backward(kernel, names, params, x, rhs, grad, span_rows, parts, ctx)
            return (None, grad_rhs, grad_x, *grad_params)
        for first in range(start, stop, rows):
            b = slice(first, min(first + rows, stop))
            weight = grad[..., b.start - offset : b.stop - offset, :] @ rhs.mT  # (..., rows, n): d loss / d K[b, :]

            def block(xx: Tensor, *pp: Tensor, b: slice = b) -> Tensor:
                return kernel_block(kernel, names, pp, xx[..., b, :], xx)

            _, pull = torch.func.vjp(block, x, *params)
            pulled = pull(sum_to(weight, _block_shape(kernel, names, params, x, b)))
            if grad_x is not None:
                grad_x = grad_x + pulled[0]
            grad_params = [g if g is None else g + d for g, d in zip(grad_params, pulled[1:])]
        if parts is not None:  # each rank pulled back its own rows: the gradient is their sum
            grad_x, *grad_params = distributed.all_reduce_sum([grad_x, *grad_params], "kernel gradients")
        return (None, grad_rhs, grad_x, *grad_params)


def _rbf_backward(kernel, names, params, x: Tensor, rhs: Tensor, grad: Tensor, span: tuple, parts, ctx):
    """``_BlockProduct``'s gradients for ``x`` and the raw parameters of an RBF formula kernel: each block's
    closed-form pull-back (:func:`.kernel_formula.rbf_block_vjp`), then the chain rule from the lengthscale
    and scale to the raw parameters through the kernel's constraints (``torch.func.vjp``: also under
    ``torch.func.grad``)."""
    start, stop, rows, offset = span

    def transform(*raw: Tensor) -> tuple[Tensor, ...]:
        formula = kernel_formula(kernel, names, raw)
        return (formula.lengthscale,) if formula.scale is None else (formula.lengthscale, formula.scale)

    outputs, pull = torch.func.vjp(transform, *params)
    scale = outputs[1].detach() if len(outputs) == 2 else None
    detached = Formula("rbf", None, outputs[0].detach(), scale)
    sums = [torch.zeros_like(x)] + [torch.zeros_like(o) for o in outputs]
    with torch.no_grad():
        # two block buffers for the whole backward (the kernel block, then E in place; the weight): at N = 10^6
        # a block is 64 x 10^6 entries, and fresh ones a block would also fragment the C heap
        height = min(rows, stop - start)
        k_buffer = x.new_empty(height, x.shape[-2])
        plain = grad.dim() == 2 and rhs.dim() == 2 and grad.dtype == rhs.dtype == x.dtype
        w_buffer = x.new_empty(height, x.shape[-2]) if plain else None
        for first in range(start, stop, rows):
            b = slice(first, min(first + rows, stop))
            g_b = grad[..., b.start - offset : b.stop - offset, :]
            if plain:  # d loss / d K[b, :]
                weight = torch.matmul(g_b, rhs.mT, out=w_buffer[: b.stop - b.start])
            else:
                weight = sum_to(g_b @ rhs.mT, (b.stop - b.start, x.shape[-2]))
            parts_b = rbf_block_vjp(detached, x, b, weight, k_buffer)
            sums = [total + part for total, part in zip(sums, parts_b)]
        if parts is not None:  # each rank pulled back its own rows: the gradient is their sum
            sums = distributed.all_reduce_sum(sums, "kernel gradients")
    chained = pull(tuple(sums[1:]))
    grad_params = [g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(chained)]
    return (sums[0] if ctx.needs_input_grad[2] else None), grad_params


def _rows_of(n: int, parts, span) -> tuple[int, int]:
    """The rows this process computes: ``span``, else its rank's of ``parts``, else all ``n``."""
    if span is not None:
        return span
    return (0, n) if parts is None else parts[distributed.rank()]


def _block_source(kernel, names, params, x: Tensor, rows: int, start: int, stop: int):
    """``b -> k(x[b], x)`` for row slices ``b`` within ``start:stop`` (at most ``rows`` rows each)."""
    formula = kernel_formula(kernel, names, params) if x.dim() == 2 else None
    if formula is None:
        return lambda b: evaluate_kernel(kernel, names, params, x[..., b, :], x)
    # one block buffer for the whole product (written in place: products run without autograd): blocks
    # allocated and freed by the thousand fragment the C heap (glibc then held 8 GB of resident memory at
    # N = 60 000 instead of 0.8)
    buffer = x.new_empty(min(rows, stop - start), x.shape[-2])
    return lambda b: evaluate_formula(formula, x[b], x, out=buffer[: b.stop - b.start])


def _product(kernel, names, params, x: Tensor, rhs: Tensor, rows: int, parts, what: str, span=None) -> Tensor:
    """``k(x, x) @ rhs`` ``(..., n, c)``: all rows, or this rank's of ``parts`` gathered from every rank, or
    the rows ``span`` only ``(..., stop - start, c)``."""
    start, stop = _rows_of(x.shape[-2], parts, span)
    local = _blocked(_block_source(kernel, names, params, x, rows, start, stop), rhs, start, stop, rows)
    if parts is None:
        return local
    check = rhs.sum(-2).expand(*local.shape[:-2], rhs.shape[-1])  # the same on every rank, or they diverged
    return distributed.gather_rows(local, parts, check, what)


def _blocked(block, rhs: Tensor, start: int, stop: int, rows: int) -> Tensor:
    """Rows ``start:stop`` of ``K @ rhs`` with ``K[b, :]`` from ``block(b)``, one row block at a time."""
    first_block = block(slice(start, min(start + rows, stop))) @ rhs
    out = first_block.new_empty(*first_block.shape[:-2], stop - start, first_block.shape[-1])
    out[..., : first_block.shape[-2], :] = first_block
    for first in range(start + rows, stop, rows):
        b = slice(first, min(first + rows, stop))
        torch.matmul(block(b), rhs, out=out[..., b.start - start : b.stop - start, :])
    return out


def _transposed_product(kernel, names, params, x: Tensor, grad: Tensor, rows: int, span) -> Tensor:
    """``K[span, :]^T grad`` ``(..., n, c)`` for ``grad`` ``(..., stop - start, c)``, one row block at a time."""
    start, stop = span
    block = _block_source(kernel, names, params, x, rows, start, stop)
    out = None
    for first in range(start, stop, rows):
        b = slice(first, min(first + rows, stop))
        part = block(b).mT @ grad[..., b.start - start : b.stop - start, :]
        out = part if out is None else out.add_(part)
    return out


def _block_shape(kernel, names, params, x: Tensor, b: slice) -> torch.Size:
    """The shape of ``k(x[b], x)`` (its batch dims come from the kernel and ``x``)."""
    batch = torch.broadcast_shapes(x.shape[:-2], kernel.batch_shape)
    return batch + (b.stop - b.start, x.shape[-2])

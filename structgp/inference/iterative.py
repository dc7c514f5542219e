"""The iterative engine ``"cg"``: preconditioned CG solves and SLQ log-determinants, unbiased gradients.

One batched PCG run (:mod:`.cg`) over the columns ``[b, z_1, ..., z_p]`` gives the solves ``x = A^{-1} b``,
``u_i = A^{-1} z_i`` and, from the same coefficients, the Lanczos tridiagonals of the probes (:mod:`.slq`):
``log det A ~= log det P + mean_i eps_i^T log(R^{-1} A R^{-T}) eps_i`` with ``z_i = R eps_i``, Rademacher
``eps_i`` drawn from a ``torch.Generator`` seeded by ``settings(seed=...)`` (same seed, same device:
bitwise the same objective and gradient, so an L-BFGS fit sees a deterministic function). Every operator
takes part through its own ``_matmul`` only, so structured products (Kronecker, sparse lifts) are kept.

Gradients. The solves run without autograd on a detached copy of the operator; the results are returned
through first-order surrogates made of plain torch operations, whose values equal the estimates and whose
gradients are the right ones (with ``x``, ``u``, ``v_i = P^{-1} z_i`` detached):

    inv_quad:  b.x + g - g.detach(),         g = 2 b.x - x^T A x: value b^T A^{-1} b up to x.r (r the CG
                                             residual; g's own value would cancel catastrophically in
                                             float32); d = 2 x.db - x^T dA x, the exact derivative at x
    logdet:    est + g - g.detach(),         g = log det P(theta) + mean_i (u_i^T A v_i - v_i^T P(theta) v_i);
                                             d = tr(P^{-1} dP) + mean_i (u_i^T dA v_i - v_i^T dP v_i), an
                                             unbiased estimate of tr(A^{-1} dA) (E[z z^T] = P) with the
                                             preconditioner's exact log-det derivative as control variate
                                             (:mod:`.control_variate`; P(theta) keeps the preconditioner's
                                             pivots / eigenbases fixed). Preconditioners without a
                                             differentiable form (``"none"``), or
                                             ``settings(logdet_control_variate=False)``, give the plain
                                             Hutchinson estimate mean_i u_i^T dA v_i
    solve:     x + S(b - A x),               S a custom autograd function (setup_context) with value 0 and
                                             backward a CG solve: d = A^{-1} (db - dA x)

The ``A x`` and ``A v`` products are one differentiable product with the operator, so the gradients reach
every tensor the operator was built from, reuse the forward solves, and compose with ``torch.func.grad``
(plain ops and a ``setup_context`` function with a generated vmap rule). Surrogates rather than a custom
function for ``inv_quad_logdet``: a custom function would have to take the operator's leaves as inputs
and compute their vector-Jacobian products itself, which is what autograd already does for the one product
above. Second derivatives are not supported (the solve's
backward is once-differentiable; the others differentiate only the last product and the control variate's
first-order forms).

``torch.func.vmap``. Design: the same code runs, with every host read made conditional (values are read only
where :func:`host_readable` says so: not under vmap or compile; ``torch.func.grad`` and ``jvp`` allow reads,
so under them PCG and pivoted Cholesky stop early as they do outside). Under vmap PCG runs a fixed
``max_iter`` iterations with the masked per-column updates it already uses (converged columns get ``alpha =
beta = 0``), the pivoted Cholesky preconditioner runs all its steps and gives a member that would have
stopped zero columns (the control variate's Nystrom form drops those pivots, and whether a member uses the
control variate is a per-member ``torch.where``), and the probes are drawn outside the transform (so every
member sees the probes a call outside vmap would). Each member therefore gets the values and gradients of a
Python loop, up to rounding. The cost: every member pays ``max_iter`` iterations (keep ``max_iter`` near
what the problem needs), the residual is computed but cannot be inspected (no ``CGConvergenceWarning`` under
vmap; ``sg.last_report()`` records no iterations or residual), and steps that choose by values (the
Kronecker deflation rank of ``preconditioner="auto"``) raise a clear error. The alternative, a custom
function whose ``vmap`` rule moves the vmapped dimension into the operator's batch dimensions, would have to
take the operator's leaves as inputs and write their backward by hand (see above).
Outside vmap nothing changes: the conditional reads all happen and the arithmetic is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.autograd.function import once_differentiable

from structgp import _config
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kernel_operator import KernelOperator
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.covariance.validation import host_readable
from structgp.distributed.rows import Rows
from structgp.inference import partitioned, report
from structgp.inference.cg import CGResult, pcg
from structgp.inference.control_variate import Family
from structgp.inference.cost_model import Work, differentiated, seconds
from structgp.inference.plan import Cost, Engine, describe, register, structurally_singular
from structgp.inference.preconditioners import Preconditioner, build, factor_arrays, is_lifted_sum, planned_kind
from structgp.inference.slq import slq_logdet

# planning constant: PCG iterations at cg_tol 1e-6 with the default preconditioners (measured 2-13 on the
# test and benchmark problems, 2-5 on dense RBF kernels on 2-d inputs, lengthscale 0.2, noise 0.01, at
# n = 2000-8000 (benchmarks/bench_planner.py); spectra that the preconditioner's rank cannot capture take
# more, so the planner counts on 20)
EXPECTED_ITERATIONS = 20
# planning constant: PCG iterations of L B L^T + D under the lifted eigen preconditioner, whose rank-256 latent
# subspace leaves much of L B L^T to CG (measured at cg_tol 1e-6, the example's lifted model: 173 at 2e5 rows
# of a 16^3 grid, 95 at 5e4 rows of a 50^3 grid); with 20 the planner took CG, 10x slower than it expected,
# over the exact latent Woodbury engine
LIFTED_EXPECTED_ITERATIONS = 150
# products besides the iterations in one value and gradient: the differentiable product of the surrogates
# and its backward
GRADIENT_PRODUCTS = 2


# -- cost model ---------------------------------------------------------------------------------------


@functools.singledispatch
def matvec_flops(op: Operator, columns: int = 1) -> float:
    """Flops of ``op @ V`` for ``V`` of ``columns`` columns, one batch member; operators without a rule count
    as dense. Flops-equivalent where the work is not arithmetic alone: an operator that recomputes its
    entries in every product (a matrix-free kernel matrix) adds that evaluation once per product, not per
    column, which is why the rule sees the number of columns."""
    return 2.0 * op.n * op.n * columns


@matvec_flops.register
def _(op: Dense, columns: int = 1) -> float:
    return 2.0 * op.n * op.n * columns


@matvec_flops.register(Diagonal)
@matvec_flops.register(ScaledIdentity)
def _(op: Operator, columns: int = 1) -> float:
    return float(op.n * columns)


@matvec_flops.register
def _(op: LowRank, columns: int = 1) -> float:
    return 4.0 * op.n * op.rank * columns


@matvec_flops.register
def _(op: Kronecker, columns: int = 1) -> float:
    n = op.n
    return sum(n // f.n * matvec_flops(f, columns) for f in op.factors)


@matvec_flops.register
def _(op: KernelOperator, columns: int = 1) -> float:
    # the product itself plus the kernel's evaluation (about 3 d + 20 flops an entry: distances, exp),
    # once per product: every row block is evaluated once for all the columns
    return 2.0 * op.n * op.n * columns + op.n * op.n * (3.0 * op.x.shape[-1] + 20.0)


# flops-equivalent of one entry of a sparse lift times one column, in one pass (L z or L^T p): the pass is
# bound by memory, not arithmetic (measured 35-195, median about 80, against the dense product rate, CPU,
# float64, 33 columns, 5e4-2e5 rows of 4 entries of 4096-125 000 cells, 1-2 threads)
LIFT_ENTRY_FLOPS = 80.0


@matvec_flops.register
def _(op: SparseLifted, columns: int = 1) -> float:
    # L^T V and L Z (two passes over the lift's entries) around the base's product
    return 2 * LIFT_ENTRY_FLOPS * op.lift.nnz * columns + matvec_flops(op.base, columns)


@matvec_flops.register
def _(op: AddedDiagonal, columns: int = 1) -> float:
    return matvec_flops(op.base, columns) + matvec_flops(op.noise, columns)


@matvec_flops.register
def _(op: Sum, columns: int = 1) -> float:
    return sum(matvec_flops(t, columns) for t in op.terms)


# -- one run: solves, probes, SLQ ---------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    x: Tensor | None  # A^{-1} b (..., n, c), detached (partitioned: this rank's rows)
    u: Tensor | None  # A^{-1} z (..., n, p)
    v: Tensor | None  # P^{-1} z (..., n, p)
    logdet: Tensor | None  # float64 (...)
    solver: functools.partial  # rhs (..., n, c) -> its solution (..., n, c), the same operator and preconditioner
    family: Family | None = None  # P(theta) of the preconditioner, for the gradient's control variate
    working: torch.dtype | None = None  # the dtype PCG ran in (:func:`_working_dtype`), the family's too
    part: Rows | None = None  # this rank's rows where the vectors are partitioned (:mod:`.partitioned`)


def _detached(op: Operator) -> Operator:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, op)


# rows of probes drawn at a time when only some rows are kept (CPU): 2 MiB of int8 at 32 probes
PROBE_BLOCK_ROWS = 2**16


def rademacher(shape: tuple[int, ...], like: Tensor, seed: int, rows: tuple[int, int] | None = None) -> Tensor:
    """Rademacher (+-1) entries of ``shape`` ``(..., n, p)`` from a generator seeded with ``seed`` on ``like``'s
    device; ``rows`` ``(start, stop)``: only those rows of the same draw, ``(..., stop - start, p)``.

    The draw depends on no tensor's values, so it is made outside any functorch transform: under ``vmap``
    every batch member gets the probes a call outside ``vmap`` would (vmap's randomness mode is not asked).
    On the CPU the bits are drawn as int8 (the same values as an int64 draw: one generator draw an entry,
    in order) and, for ``rows`` of an unbatched draw, a block of rows at a time, keeping only those rows
    (a partitioned run's rank holds ``(rows, p)``, never the whole ``(n, p)``); elsewhere the whole draw is
    sliced (the CUDA generator's stream is not consumed entry by entry)."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    cpu = like.device.type == "cpu"
    kind = torch.int8 if cpu else torch.int64
    with torch._C._DisableFuncTorch():
        if rows is None or not cpu or len(shape) != 2:
            bits = torch.randint(0, 2, shape, generator=gen, device=like.device, dtype=kind)
            if rows is not None:
                bits = bits.narrow(-2, rows[0], rows[1] - rows[0])
        else:
            bits = _row_block_draw(shape, gen, rows)
    return (2 * bits - 1).to(like.dtype)


def _row_block_draw(shape: tuple[int, int], gen: torch.Generator, rows: tuple[int, int]) -> Tensor:
    """Rows ``start:stop`` of ``randint(0, 2, shape)`` (int8, CPU), drawn ``PROBE_BLOCK_ROWS`` rows at a time up to
    ``stop``: the rows before ``start`` are drawn (the stream is sequential) and dropped."""
    (start, stop), p = rows, shape[-1]
    out = torch.empty(stop - start, p, dtype=torch.int8)
    for first in range(0, stop, PROBE_BLOCK_ROWS):
        last = min(first + PROBE_BLOCK_ROWS, stop)
        block = torch.randint(0, 2, (last - first, p), generator=gen, dtype=torch.int8)
        lo, hi = max(first, start), last
        if lo < hi:
            out[lo - start : hi - start] = block[lo - first : hi - first]
    return out


@contextlib.contextmanager
def _explain_vmap() -> Iterator[None]:
    """Re-raise vmap's data-dependent control flow error with what to do instead."""
    try:
        yield
    except RuntimeError as err:
        if not str(err).startswith("vmap:"):  # data-dependent control flow, .item(), ...
            raise
        raise RuntimeError(
            "this setup of the iterative engine ('cg') chooses by the operator's values (e.g. the rank of "
            "the Kronecker deflation preconditioner), so it cannot run under torch.func.vmap; pick a fixed "
            "preconditioner (settings(preconditioner='kronecker_eigen' / 'pivoted_cholesky' / 'jacobi')), "
            "give the operator and right-hand side a batch dimension instead (they broadcast), or use an "
            "exact method"
        ) from err


def _solve_columns(
    op: Operator, precond: Preconditioner, cfg: _config.Settings, rhs: Tensor, part: Rows | None = None
) -> CGResult:
    """PCG on ``op`` (the working copy, maybe promoted); ``rhs`` and the solution in the caller's dtype
    (partitioned: this rank's rows of both)."""
    matmul, dot = (op._matmul, None) if part is None else (partitioned.product(op, part), partitioned.dot(part))
    result = pcg(
        matmul, rhs.to(op.dtype), precond.solve, tol=cfg.cg_tol, max_iter=cfg.max_iter, what=repr(op), dot=dot
    )
    return dataclasses.replace(result, solution=result.solution.to(rhs.dtype))


def _solve_whole(
    op: Operator, precond: Preconditioner, cfg: _config.Settings, part: Rows | None, rhs: Tensor
) -> Tensor:
    """The solution ``(..., n, c)`` for the whole ``rhs`` (partitioned: solved by rows, then gathered)."""
    if part is None:
        return _solve_columns(op, precond, cfg, rhs).solution
    solution = _solve_columns(op, precond, cfg, part.local(rhs), part).solution
    return part.gather(solution, "the solution")


def _working_dtype(op: Operator) -> torch.dtype:
    """The dtype PCG runs in: float64 for a float32 (or half) operator whose entries are computed rather
    than stored (it holds a :class:`KernelOperator`), else the operator's own. In float32 the rounding of
    each product, ``eps ||A|| ||p||``, grows with ``||A||`` (``~ n`` for a kernel matrix) while PCG must
    resolve the noise level ``s``: the iterations grow with ``n`` and the preconditioner's pivots stop at
    float32's rounding level (measured, RBF, noise 0.01: 13 float32 steps at N = 40 000 against 2 in
    float64, 31 at N = 60 000). Promoting costs a float64 copy of the inputs and about twice the time a
    product. Stored float32 data (dense matrices, Kronecker factors) is not promoted: its copy could double
    the memory, and float32-rounded entries need not be positive definite at float64's tolerance."""
    if op.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return op.dtype
    nodes = pytree.tree_flatten(op, is_leaf=lambda node: isinstance(node, KernelOperator))[0]
    return torch.float64 if any(isinstance(node, KernelOperator) for node in nodes) else op.dtype


def _run(op: Operator, rhs: Tensor | None, probes: bool) -> _Run:
    """One PCG run; partitioned by rows across processes where :func:`.partitioned.rows_for` says so (then
    ``x``, ``u`` and ``v`` hold this rank's rows)."""
    cfg = _config.current()
    working = _working_dtype(op)
    det = _detached(op).to(working)
    n = op.n
    part = partitioned.rows_for(det, rhs)
    # this rank's rows, copied: a view would keep the whole (n, c) tensor alive through the run
    local = (lambda t: t) if part is None else (lambda t: part.local(t).clone())
    batch = op.batch_shape if rhs is None else torch.broadcast_shapes(op.batch_shape, rhs.shape[:-2])
    with torch.no_grad(), _explain_vmap():
        precond = build(det, cfg, part)
        columns = [] if rhs is None else [local(rhs.detach().to(working).expand(*batch, n, rhs.shape[-1]))]
        if probes:  # one process's probes (the seeded stream), this rank's rows of them
            like = torch.empty((), dtype=working, device=op.device)
            span = None if part is None else (part.start, part.stop)
            eps = rademacher((*op.batch_shape, n, cfg.num_probes), like, cfg.seed, span)
            z = precond.root_matmul(eps).expand(*batch, eps.shape[-2], cfg.num_probes)
            columns.append(z)
        result = _solve_columns(det, precond, cfg, torch.cat(columns, dim=-1), part)
        c = 0 if rhs is None else rhs.shape[-1]
        x = result.solution[..., :c].to(op.dtype) if rhs is not None else None
        u = v = logdet = stderr = noise_stderr = None
        family = precond.family if cfg.logdet_control_variate else None
        if probes:  # v = P^{-1} z is PCG's first preconditioned residual of the probe columns
            u, v = result.solution[..., c:], result.preconditioned_rhs[..., c:]
            logdet, stderr = slq_logdet(result, slice(c, None), precond.logdet())
            noise_stderr = _noise_direction_stderr(det, family, u, v, part)
            u, v = u.to(op.dtype), v.to(op.dtype)
    _record(result, precond, cfg, stderr, noise_stderr, promoted=working != op.dtype, part=part)
    solver = functools.partial(_solve_whole, det, precond, cfg, part)
    return _Run(x, u, v, logdet, solver, family, working, part)


def _noise_direction_stderr(
    op: Operator, family: Family | None, u: Tensor, v: Tensor, part: Rows | None = None
) -> Tensor | None:
    """Standard error ``(...)`` of the engine's ``d log det A / d log s`` (every noise variance scaled by
    ``s``; ``dA = D``) from its per-probe terms ``u_i^T D v_i - v_i^T dP v_i`` (the control variate's part
    where it is used; ``tr(P^{-1} dP)`` is exact): a measured standard error of the log-det gradient
    along one direction, for operators with a noise term. Other directions (lengthscales) would need
    per-probe derivatives, which the single backward pass does not give. ``part``: ``u`` and ``v`` are this
    rank's rows."""
    if not isinstance(op, AddedDiagonal) or u.shape[-1] < 2:
        return None
    noise = op.noise.diagonal().expand(*op.batch_shape, op.n)
    noise = (noise if part is None else part.local(noise, -1)).unsqueeze(-1)
    terms = (u * noise * v).sum(-2)
    if family is not None:
        cv = (family.noise_direction(noise.squeeze(-1)).unsqueeze(-1) * v.square()).sum(-2)
        terms = terms - (cv if family.use is None else torch.where(family.use.unsqueeze(-1), cv, 0.0))
    if part is not None:
        terms = part.sum(terms, "the noise direction's terms")
    return terms.std(-1) / terms.shape[-1] ** 0.5


def _record(
    result: CGResult,
    precond: Preconditioner,
    cfg: _config.Settings,
    stderr: Tensor | None,
    noise_stderr: Tensor | None = None,
    promoted: bool = False,
    part: Rows | None = None,
) -> None:
    rep = report.current_report()
    if rep is None or not host_readable(result.residual):
        return  # under vmap the iterations and residual cannot be read: the report keeps no numbers
    rep.iterations = int(result.iterations.max()) if result.iterations.numel() else 0
    rep.residual = float(result.residual.max()) if result.residual.numel() else 0.0
    if part is not None:
        rep.notes.append(
            f"vectors partitioned by rows over {len(part.parts)} processes (this rank: rows {part.start}:{part.stop})"
        )
    if promoted:
        rep.notes.append("PCG in float64 on a float64 copy of the operator's tensors (float32 products stall it)")
    rep.notes.append(f"preconditioner {precond.describe()}")
    if stderr is not None and precond.family is not None and cfg.logdet_control_variate:  # a log-det was estimated
        rep.notes.append(f"log-det gradient control variate {_control_variate_state(precond.family.use)}")
    if stderr is not None:
        rep.notes.append(f"{cfg.num_probes} probes, logdet standard error {float(stderr.max()):.3g}")
    if noise_stderr is not None:
        rep.notes.append(f"d logdet / d log(noise) standard error {float(noise_stderr.max()):.3g}")


def _in_use(use: Tensor | None) -> bool:
    """Whether a control variate with per-member ``use`` (None: everywhere) is needed at all: False only when
    ``use`` is readable and off for every batch member (then its ``n k^2`` set-up is skipped)."""
    return use is None or not host_readable(use) or bool(use.any())


def _control_variate_state(use: Tensor | None) -> str:
    """Whether the preconditioner's control variate is used (``use``: per batch member, None: everywhere)."""
    if use is None or bool(use.all()):
        return "in use"
    if not bool(use.any()):
        return "off (the preconditioner leaves too much of the operator to correct for)"
    return f"in use for {int(use.sum())} of {use.numel()} batch members"


def _needs_grad(op: Operator, *tensors: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (*op._tensors(), *tensors))


class _ResidualSolve(torch.autograd.Function):
    """``S(r)``: value 0, derivative ``A^{-1}`` (a CG solve in the backward). ``x + S(b - A x)`` has the
    value ``x`` and the derivative ``A^{-1} (db - dA x)``. Under vmap the generated rule runs the backward's
    CG batched (the masked fixed-count loop of :func:`.cg.pcg`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(residual: Tensor, solver: functools.partial) -> Tensor:
        return torch.zeros_like(residual)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.solver = inputs[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return ctx.solver(grad), None


# -- the engine ---------------------------------------------------------------------------------------


@register(Operator)
class ConjugateGradients(Engine):
    """Preconditioned CG + SLQ for any operator, through its own product (``exact = False``)."""

    name = "cg"
    exact = False

    def why(self, op: Operator) -> str | None:
        if structurally_singular(op):
            return None  # plan() says why and to add noise
        probes = _config.current().num_probes
        return (
            f"preconditioned conjugate gradients and stochastic Lanczos quadrature ({probes} probes) "
            f"through {describe(op)} products"
        )

    def cost(self, op: Operator) -> Cost:
        """Flops of the forward run; the expected seconds add the gradient's products (``GRADIENT_PRODUCTS``
        more products with all columns) when the call will be differentiated."""
        cfg = _config.current()
        kind = planned_kind(op, cfg)
        if kind == "masked_grid":
            # the same run as the masked grid engine's (its preconditioner is what 'auto' builds here); that
            # module subclasses this one: imported here
            from structgp.inference.masked_grid import MaskedGrid

            return MaskedGrid.cost(self, op)
        batch, n, k = op.batch_shape.numel(), op.n, min(cfg.precond_rank, op.n)
        columns = cfg.num_probes + 1
        lifted = kind == "lifted_eigen" and is_lifted_sum(op)
        expected = LIFTED_EXPECTED_ITERATIONS if lifted else EXPECTED_ITERATIONS
        iterations = min(expected, cfg.max_iter)
        product = matvec_flops(op, columns)  # one product with every column at once
        vectors = columns * (4.0 * n * k + 12.0 * n)  # preconditioner solve and CG's vector updates
        setup = n * k * k  # pivoted Cholesky (columns are read directly for the common structures)
        flops = batch * (iterations * (product + vectors) + setup)
        arrays, factor_rank = factor_arrays(op, cfg)  # the preconditioner's (n, k) arrays, its control variate's
        per_row = 6 * columns + arrays * factor_rank
        nbytes = batch * per_row * n * op.dtype.itemsize
        part = partitioned.rows_for(op, None)
        if part is not None:  # this rank's rows, and the search directions gathered while a product runs
            nbytes = (per_row * part.size + columns * n) * op.dtype.itemsize
        extra = GRADIENT_PRODUCTS * product if differentiated(op) else 0.0
        work = Work(product=flops + batch * extra)
        return Cost(flops, float(nbytes), seconds(work, op.device, op.dtype))

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        run = _run(op, rhs, probes=False)
        x = run.x if run.part is None else run.part.gather(run.x, "the solution")
        if not _needs_grad(op, rhs):
            return x
        residual = rhs - op._matmul(x)
        return x + _ResidualSolve.apply(residual, run.solver)

    def logdet(self, op: Operator) -> Tensor:
        run = _run(op, None, probes=True)
        if run.part is not None and _needs_grad(op):
            op = partitioned.shared(op, None, run.part)[0]
        return _logdet_surrogate(op, run, None).to(op.dtype)

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        run = _run(op, rhs, probes=True)
        c = rhs.shape[-1]
        part = run.part
        if part is not None and _needs_grad(op, rhs):  # every term below is this rank's share
            op, rhs = partitioned.shared(op, rhs, part)
        mine = rhs if part is None else part.local(rhs)
        inv_quad = (mine.detach() * run.x).sum(-2)
        inv_quad = inv_quad if part is None else part.sum(inv_quad, "b^T A^{-1} b")
        a_v = None
        if _needs_grad(op, rhs):  # the gradient only, by a term of value 0 (2 b.x - x^T A x cancels in float32)
            a_w = _product(op, torch.cat([run.x, run.v], dim=-1), part)  # one differentiable product
            g = 2 * (mine * run.x).sum(-2) - (run.x * a_w[..., :c]).sum(-2)
            inv_quad = inv_quad + (g - g.detach())
            a_v = a_w[..., c:]
        return inv_quad, _logdet_surrogate(op, run, a_v).to(op.dtype)


def _product(op: Operator, w: Tensor, part: Rows | None) -> Tensor:
    """``A W``, differentiable; partitioned: this rank's rows of ``A W`` from this rank's rows of ``W``."""
    return op._matmul(w) if part is None else partitioned.product(op, part)(w)


def _logdet_surrogate(op: Operator, run: _Run, a_v: Tensor | None) -> Tensor:
    """``est + g - g.detach()`` with ``g = mean_i u_i^T A v_i`` (the Hutchinson gradient of the logdet),
    plus ``log det P(theta) - mean_i v_i^T P(theta) v_i`` where the preconditioner has a differentiable
    family (its exact gradient as control variate, :mod:`.control_variate`). Partitioned, ``g`` is this
    rank's share (its rows; the family sums over the ranks where it must)."""
    value = run.logdet
    if not _needs_grad(op):
        return value
    if a_v is None:
        a_v = _product(op, run.v, run.part)
    g = (run.u * a_v).sum(-2).mean(-1).to(value.dtype)
    if run.family is not None and _in_use(run.family.use):  # evaluated in the dtype PCG ran in (its k x k parts)
        working = run.working
        family_op = op.to(working) if working != op.dtype else op
        cv = run.family.control_variate(family_op, run.v.to(working), a_v.to(working)).to(value.dtype)
        g = g + (cv if run.family.use is None else torch.where(run.family.use, cv, 0.0))
    return value + (g - g.detach())

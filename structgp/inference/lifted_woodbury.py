"""SparseLifted + diagonal noise by the exact latent-space Woodbury identity.

For ``A = L B L^T + D`` with a sparse lift ``L`` (``n_out x n_in``), ``B = R R^T`` (``R = root(B)``,
``n_in x r``, structured: e.g. a Kronecker product of Cholesky factors) and positive diagonal ``D``:

    M = L^T D^{-1} L                                  (n_in x n_in, float64)
    C = I_r + R^T M R                                 (capacitance, float64, eigenvalues >= 1)
    A^{-1} b = D^{-1} b - D^{-1} L R C^{-1} R^T L^T D^{-1} b
    log det A = log det D + log det C
    b^T A^{-1} b = b^T D^{-1} b - t^T C^{-1} t,      t = R^T L^T D^{-1} b   (accumulated in float64)

``M`` (``M[c_a, c_b] = sum_r v_a v_b / d_r`` over the pairs of entries of row ``r``) is formed by a
sparse-sparse product ``L^T (D^{-1} L)`` (CSR, densified to ``n_in x n_in``) in a custom autograd function
(:mod:`structgp.covariance.lift_gram`, partitioned by rows under torch.distributed) whose backward gathers
``dM`` per row block of the lift (``sum_r nnz_r^2`` entries, in chunks), so memory stays
``O(n_in^2 + nnz(M) + chunk)``; nothing ``n_out x n_out`` or dense ``n_out x n_in`` is formed.
With ``D = s I`` the pattern Gram ``L^T L`` is computed once and cached on the lift while its values
need no gradient. Everything after the sparse products is float64, also for float32 data.
Cost ``n_pairs + 2 n_in^2 r + r^3 / 3`` flops (``n_pairs = sum_r nnz_r^2``): the gram form. When ``R`` is
narrow the row form ``C = I_r + F^T D^{-1} F`` with ``F = L R`` (``n_out x r``, ``2 nnz r + 2 n_out r^2``
flops, ``n_out r`` memory) is cheaper and is taken instead. A latent grid whose dense ``M`` would pass
``DENSE_GRAM_ENTRIES`` (``n_in = 64 000``: 30 GiB) takes the latent form instead: ``P = M R = L^T D^{-1} (L R)``
by two sparse products a column chunk at a time and ``C = I + R^T P`` (``4 nnz r + 2 n_in r^2`` flops, memory
``O(n_in r)`` plus one chunk), where it is cheaper than the row form (unbatched, lift values without
gradient, ``s I`` noise or noise without gradient).

A Kronecker base's truncated spectral root ``R = R_1 (x) ... (x) R_d`` is never formed on such grids: the
Kronecker form (:mod:`structgp.inference.kronecker_latent`) builds ``C`` by column chunks of ``R`` (two sparse
products and mode products with the narrow ``R_i^T``), memory ``O((n_out + n_in) c + r^2)``, and owes the base's
gradients through the factors' partial traces. Its rank (the factors' numerical ranks) is learned from the
factors when a call is planned under ``"auto"`` (:meth:`LiftedWoodbury.learn`), so the planner weighs the exact
path at its real size, not the upper bound ``n_in``.

``R`` is the base's Cholesky root when the base is positive definite in float64. A Kronecker or dense base
that is singular to working precision (a smooth kernel on a fine grid) gets its truncated spectral root
instead (:mod:`structgp.inference.spectral_root`): no jitter, so the answers stay exact, and a capacitance
only as large as the base's numerical rank. That root carries no graph; the base's gradients come from
first-order surrogate terms ``<G, K>`` with the detached ``G = dL/dK``:

    log det A:   G = L^T A^{-1} L = M - P C^{-1} P^T,   P = M R     (tr(M K): M's entries or diag(L K L^T))
    b^T A^{-1} b: G = -v v^T,                          v = L^T A^{-1} b
    A^{-1} b:     d x = -A^{-1} L dK v                   (the detached inverse applied to L (K v - (K v).detach()))

exact to first order; second derivatives through them raise (:mod:`structgp.inference.first_order`).

Gradients reach the lift's values, the base's tensors (through ``R`` or the surrogates) and the noise.
``log det C`` and ``C^{-1} t`` are custom autograd functions on the (graph-free) Cholesky factor of ``C``:
their backward uses one Cholesky inverse (``inverse_from_cholesky``) / ``cholesky_solve`` instead of differentiating the
Cholesky factorisation (about 4x less work at ``r = 4096``). Under ``create_graph=True`` the backward
refactorises ``C`` with autograd, so second derivatives are exact too.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from structgp.covariance.diagonal import ScaledIdentity
from structgp.covariance.indexing import entries
from structgp.covariance.kron import kron_dense
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.lift_gram import lift_gram
from structgp.covariance.low_rank import LowRank
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator
from structgp.covariance.root import KroneckerRoot
from structgp.covariance.sparse_lifted import Lift, SparseLifted, lifted_diagonal
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.covariance.validation import sum_to
from structgp.inference import report
from structgp.inference._cache import cached
from structgp.inference.cholesky import cholesky_logdet, inverse_from_cholesky, psd_cholesky
from structgp.inference.first_order import first_order_only
from structgp.inference.kronecker_latent import chunk_width, kronecker_capacitance, kronecker_surrogate
from structgp.inference.plan import Cost, Engine, describe, register
from structgp.inference.roots import root
from structgp.inference.spectral_jitter import eigenvalue_jitter
from structgp.inference.spectral_root import exact_root, known_root_rank, spectral_matrices, spectral_uncertainty


class _CapacitanceLogdet(torch.autograd.Function):
    """``log det C`` from its Cholesky factor (computed without graph); backward ``grad C^{-1}`` (one
    ``inverse_from_cholesky``) instead of autograd's Cholesky backward (two ``r^3`` triangular solves and a
    product). Inputs ``C`` ``(..., r, r)`` and ``chol`` (no graph)."""

    @staticmethod
    def forward(capacitance: Tensor, chol: Tensor) -> Tensor:
        return cholesky_logdet(chol)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        capacitance, chol = ctx.saved_tensors
        inverse = inverse_from_cholesky(_backward_factor(capacitance, chol))
        return grad[..., None, None] * inverse, None


class _CapacitanceSolve(torch.autograd.Function):
    """``x = C^{-1} t`` from the Cholesky factor of ``C``; backward ``u = C^{-1} g``, ``grad t = u``,
    ``grad C = -sym(u x^T)`` (``C`` enters only through its symmetric part)."""

    @staticmethod
    def forward(capacitance: Tensor, chol: Tensor, t: Tensor) -> Tensor:
        return torch.cholesky_solve(t, chol)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        capacitance, chol, t = ctx.saved_tensors
        factor = _backward_factor(capacitance, chol)
        u, x = torch.cholesky_solve(grad, factor), torch.cholesky_solve(t, factor)
        grad_c = None
        if ctx.needs_input_grad[0]:
            grad_c = sum_to(-0.5 * (u @ x.mT + x @ u.mT), capacitance.shape)
        grad_t = sum_to(u, t.shape) if ctx.needs_input_grad[2] else None
        return grad_c, None, grad_t


def _trace_product(m: Tensor, base: Operator) -> Tensor:
    """``tr(M K)`` ``(...)`` for symmetric ``M`` ``(..., n, n)`` and ``K``. A Kronecker ``K = K_1 (x) K_rest``
    is never formed: ``tr(M K) = sum_{a,A} K_1[a, A] <M[a-block, A-block], K_rest>``, one elementwise pass
    over ``M`` viewed as ``(n_1, r, n_1, r)`` (about 25x faster than the same contraction by ``torch.einsum``)."""
    if not isinstance(base, Kronecker):
        return (m * base._to_dense()).sum((-2, -1))
    mats = base.factor_matrices()
    first, rest = mats[0], kron_dense(mats[1:]) if len(mats) > 1 else None
    n1 = first.shape[-1]
    if rest is None:
        return (m * first).sum((-2, -1))
    r = rest.shape[-1]
    blocks = m.reshape(*m.shape[:-2], n1, r, n1, r) * rest.unsqueeze(-3).unsqueeze(-2)  # (..., n1, r, n1, r)
    return (blocks.sum((-3, -1)) * first).sum((-2, -1))


def _trace_sparse_gram(lift: Lift, values: Tensor, inv_noise: Tensor, base: Operator) -> Tensor:
    """``tr(M K) = sum_{(a, b) in nnz(M)} M_ab K_ab`` ``(...)`` with the sparse ``M = L^T D^{-1} L`` (no graph:
    its values are detached) and ``K``'s entries gathered at its pattern, differentiable in ``K``. Rows that
    share latent columns share entries of ``M``: ``nnz(M)`` is far below ``n_pairs = sum_r nnz_r^2`` when
    ``N >> n_in`` (3-D cubic SKI: 4096 pairs a row). Batched heteroskedastic noise, and ``torch.func``
    transforms (which refuse sparse-sparse products), fall back to the row-wise ``sum_r d_r^{-1} (L K L^T)_rr``."""
    scalar = inv_noise.shape[-1] == 1
    in_transform = torch._C._functorch.peek_interpreter_stack() is not None  # sparse @ sparse fails there
    if in_transform or (not scalar and inv_noise.dim() > 1):
        return (inv_noise * lifted_diagonal(lift, base, values)).sum(-1)
    with torch.no_grad():
        if scalar:  # M = L^T L / s: the pattern gram, cached on the lift
            rows, cols, vals = cached(lift, "sparse_gram", lambda: _sparse_gram(lift, values, None), detached=True)
        else:
            rows, cols, vals = _sparse_gram(lift, values, inv_noise)
    step = max(1, Lift.CHUNK // max(1, base.batch_shape.numel()))
    total = sum((vals[s : s + step] * entries(base, rows[s : s + step], cols[s : s + step])).sum(-1)
                for s in range(0, rows.shape[0], step))
    return inv_noise[..., 0] * total if scalar else total


def _sparse_gram(lift: Lift, values: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column indices and values ``(nnz_M,)`` of ``L^T diag(w) L`` (``w = 1`` for None), by a
    sparse-sparse product."""
    scaled = values if weights is None else values * weights[lift.row]
    m = (lift.csr(values, transpose=True) @ lift.csr(scaled, transpose=False)).to_sparse_coo().coalesce()
    rows, cols = m.indices()
    return rows, cols, m.values()


def _capacitance_trace(k: Operator, b: Tensor) -> Tensor:
    """``tr(C^{-1} P^T K P) = sum(B * (K B))`` ``(...)`` for ``B = P L_C^{-T}`` ``(..., n, r)`` (no graph),
    differentiable in ``K``. Past ``SURROGATE_CHUNK`` elements ``K``'s product runs in column chunks of ``B``,
    each recomputed in the backward (checkpointed), so that only one chunk's intermediates are kept."""
    r, step = b.shape[-1], max(1, SURROGATE_CHUNK // max(1, b.shape[-2]))
    if r <= step:
        return (b * (k @ b)).sum((-2, -1))

    def chunk(part: Tensor) -> Tensor:
        return (part * (k @ part)).sum((-2, -1))

    return sum(checkpoint(chunk, b[..., s : s + step], use_reentrant=False) for s in range(0, r, step))


def _latent_product(lift: Lift, values: Tensor, weights: Tensor | None, x: Tensor) -> Tensor:
    """``L^T diag(w) L x`` ``(n_in, c)`` (``w = 1`` for None) by two sparse products, in column chunks of
    ``x`` so that ``L x`` is never ``n_out x c`` at once (``4 nnz c`` flops, ``n_out`` times the chunk width
    of memory); differentiable in ``x`` (and ``w``)."""
    step = max(1, SURROGATE_CHUNK // max(1, lift.n_out))
    parts = []
    for s in range(0, x.shape[-1], step):
        rows = lift.matmul(x[..., s : s + step], values)
        parts.append(lift.tmatmul(rows if weights is None else weights.unsqueeze(-1) * rows, values))
    return torch.cat(parts, dim=-1)


def _backward_factor(capacitance: Tensor, chol: Tensor) -> Tensor:
    """The graph-free factor; under ``create_graph`` one that is differentiable in ``C`` instead, so that
    second derivatives are exact."""
    if torch.is_grad_enabled() and capacitance.requires_grad:
        return torch.linalg.cholesky((capacitance + capacitance.mT) / 2)
    return chol




# Kronecker factors of at most this size are factorised when a call is planned (LiftedWoodbury.learn): sum n_i^3
# flops, milliseconds
LEARN_FACTOR_SIZE = 512
DENSE_GRAM_ENTRIES = 2**26  # entries of a dense M = L^T D^-1 L (512 MiB) above which the latent form is taken
# elements of a column chunk of the surrogate's K B (128 MiB in float64): wide enough for efficient products
SURROGATE_CHUNK = 2**24

_WHAT = (
    "the lifted Woodbury path with a spectral root",
    " (dense), or settings(spectral_root=False) for the jittered Cholesky root",
)


@dataclasses.dataclass
class _Factor:
    """What the three questions share (all float64). The capacitance ``C = I + R^T L^T D^{-1} L R`` comes in
    one of two forms: the gram form through ``M = L^T D^{-1} L`` (``n_in x n_in``; ``2 n_pairs + 2 n_in^2 r``
    flops) or the row form through ``F = L R`` (``n_out x r``; ``2 nnz r + 2 n_out r^2`` flops), whichever is
    cheaper: the row form wins when ``R`` is narrow (a truncated spectral root) and the grid is large."""

    inv_noise: Tensor  # D^{-1}: (..., n_out), or (..., 1) for s I
    noise_logdet: Tensor  # (...)
    values: Tensor  # the lift's values (nnz,)
    root: LinearMap  # R (..., n_in, r)
    capacitance: Tensor  # C (..., r, r), carrying the graph to the values and the noise (and R unless spectral)
    chol: Tensor  # L_C (..., r, r), no graph
    rows: Tensor | None  # the row form's F = L R (..., n_out, r)
    gram: Tensor | None  # the gram form's M (..., n_in, n_in)
    mr: Tensor | None  # the gram form's M R (..., n_in, r)
    spectral: bool  # R is the base's truncated spectral root (no graph)
    base: Operator | None  # the float64 base when R is a graph-free spectral root and it needs gradients
    white: Tensor | None = None  # B = P L_C^{-T}, for the surrogate (see _whitened_root)
    projections: list[Tensor] | None = None  # the Kronecker form's P~_i (see structgp.inference.kronecker_latent)

    def latent(self, lift: Lift, white: Tensor) -> Tensor:
        """``R^T L^T white`` ``(..., r, c)`` for ``white`` ``(..., n_out, c)`` float64."""
        if self.rows is not None:
            return self.rows.mT @ white
        return self.root.tmatmul(lift.tmatmul(white, self.values))

    def lifted(self, lift: Lift, latent: Tensor) -> Tensor:
        """``L R latent`` ``(..., n_out, c)`` for ``latent`` ``(..., r, c)``."""
        if self.rows is not None:
            return self.rows @ latent
        return lift.matmul(self.root._matmul(latent), self.values)

    def cap_solve(self, t: Tensor) -> Tensor:
        return _CapacitanceSolve.apply(self.capacitance, self.chol, t)

    def logdet(self, lift: Lift) -> Tensor:
        value = self.noise_logdet + _CapacitanceLogdet.apply(self.capacitance, self.chol)
        if self.base is None:
            return value
        # tr(G K), G = L^T A^{-1} L = M - P C^{-1} P^T; tr(M K) over the dense M's entries (gram form) or
        # over the sparse M's pattern (row form, see _trace_sparse_gram)
        k = self.base
        if self.projections is not None:  # the Kronecker form: the partial traces of G against the factors
            surrogate = kronecker_surrogate(
                lift, self.values.detach(), self.inv_noise.detach(), k.factor_matrices(), self.projections, self.chol
            )
            return first_order_only(value + (surrogate - surrogate.detach()), *_WHAT)
        if self.gram is not None:
            trace_mk = _trace_product(self.gram.detach(), k)
        else:
            trace_mk = _trace_sparse_gram(lift, self.values.detach(), self.inv_noise.detach(), k)
        surrogate = trace_mk - _capacitance_trace(k, self._whitened_root(lift))
        return first_order_only(value + (surrogate - surrogate.detach()), *_WHAT)

    def _whitened_root(self, lift: Lift) -> Tensor:
        """``B = P L_C^{-T}`` ``(..., n_in, r)`` (no graph; ``B B^T = P C^{-1} P^T``), computed once. In the latent
        form ``P`` is needed for nothing else: ``B`` overwrites it a row block at a time."""
        if self.white is None:
            p = self._gram_root(lift).detach()
            if self.rows is None and self.gram is None and not self.mr.requires_grad:
                step = max(1, SURROGATE_CHUNK // max(1, p.shape[-1]))
                for s in range(0, p.shape[-2], step):
                    block = p[..., s : s + step, :]
                    block.copy_(torch.linalg.solve_triangular(self.chol, block.mT, upper=False).mT)
                self.white, self.mr = p, None
            else:
                self.white = torch.linalg.solve_triangular(self.chol, p.mT, upper=False).mT
        return self.white

    def _gram_root(self, lift: Lift) -> Tensor:
        """``P = M R = L^T D^{-1} L R`` ``(..., n_in, r)``."""
        if self.mr is not None:
            return self.mr
        return lift.tmatmul(self.inv_noise.unsqueeze(-1) * self.rows, self.values)

    def inverse_detached(self, lift: Lift, rhs: Tensor) -> Tensor:
        """``A^{-1} rhs`` (float64) with every factor detached: gradients flow through ``rhs`` only."""
        inv_noise = self.inv_noise.detach().unsqueeze(-1)
        white = inv_noise * rhs
        if self.rows is not None:
            rows = self.rows.detach()
            return white - inv_noise * (rows @ torch.cholesky_solve(rows.mT @ white, self.chol))
        values = self.values.detach()
        latent = torch.cholesky_solve(self.root.tmatmul(lift.tmatmul(white, values)), self.chol)
        return white - inv_noise * lift.matmul(self.root._matmul(latent), values)

    def base_term(self, lift: Lift, x: Tensor) -> tuple[Tensor, Tensor]:
        """For ``x = A^{-1} b`` ``(..., n_out, c)``: ``v = L^T x`` (detached) and ``K v`` carrying the base's
        graph (only when ``self.base`` is set)."""
        v = lift.tmatmul(x.detach(), self.values.detach())
        return v, self.base @ v


def _form_flops(lift: Lift, rank: int) -> tuple[float, float]:
    """Flops of the capacitance by the gram form and by the row form."""
    gram = 2 * lift.n_pairs + 2 * lift.n_in * lift.n_in * rank
    rows = 2 * lift.nnz * rank + 2 * lift.n_out * rank * rank
    return gram, rows


def _row_form(lift: Lift, rank: int) -> bool:
    gram, rows = _form_flops(lift, rank)
    return rows < gram


def _latent_flops(lift: Lift, rank: int, gradient: bool = False) -> float:
    """Flops of the latent form (``gradient``: with the base's surrogate, whose whitening ``P L_C^{-T}`` costs
    ``n_in r^2``)."""
    return 4 * lift.nnz * rank + (2 + gradient) * lift.n_in * rank * rank


def _latent_ok(op: AddedDiagonal) -> bool:
    """Whether the latent form applies (metadata only): an unbatched operator whose dense ``M`` would pass
    ``DENSE_GRAM_ENTRIES``, whose lift values need no gradient and whose noise is ``s I`` (``P = L^T L R / s``
    carries the graph to ``s``) or needs none."""
    lift, noise = op.base.lift, op.noise
    noise_ok = isinstance(noise, ScaledIdentity) or not any(t.requires_grad for t in noise._tensors())
    return (
        op.batch_shape == torch.Size()
        and lift.n_in * lift.n_in > DENSE_GRAM_ENTRIES
        and not lift.values.requires_grad
        and noise_ok
    )


def _kron_flops(lift: Lift, rank: int, factors: int, gradient: bool = False) -> float:
    """Flops of the Kronecker form (:mod:`.kronecker_latent`) for ``factors`` equal factors: the sparse products
    and about three full-size mode products a column; with ``gradient`` the projections' triangular solves
    (``r^3 n_i / k_i`` each) and the row pairs."""
    k = rank ** (1 / factors)
    flops = 4 * lift.nnz * rank + 6 * lift.n_in * k * rank
    if gradient:
        flops += factors * (lift.n_in ** (1 / factors) / k) * rank**3 + 2 * factors * lift.n_pairs
    return flops


def _kron_bytes(lift: Lift, rank: int, factors: int) -> float:
    """Peak bytes of the Kronecker form: one column chunk's ``n_out x c`` and three ``n_in x c`` temporaries,
    the capacitance and its factors, the projections ``P~_i`` (``r^2 n_i / k_i`` each) and one solve's copy."""
    c = chunk_width(lift, rank)
    ratio = (lift.n_in / rank) ** (1 / factors)
    return 8 * ((lift.n_out + 3 * lift.n_in) * c + 4 * rank * rank + (factors + 2) * ratio * rank * rank)


def _kron_factors(op: AddedDiagonal, spectral: bool | None) -> int:
    """Factors of a Kronecker base whose spectral root the Kronecker form can use (0 where it cannot)."""
    base = op.base.base
    if not (spectral and isinstance(base, Kronecker) and len(base.factors) >= 2):
        return 0
    return len(base.factors)


def _base_gradient(op: AddedDiagonal) -> bool:
    """Whether the base's gradients will be asked for (metadata only)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in op.base.base._tensors())


def _form(op: AddedDiagonal, rank: int, kron_factors: int = 0, gradient: bool = False) -> str:
    """The capacitance's form for ``op`` with a root of ``rank`` columns: ``"rows"`` (``F = L R``), ``"gram"``
    (dense ``M``), ``"latent"`` (``P = L^T D^{-1} (L R)``, for latent grids whose dense ``M`` would not fit) or
    ``"kron"`` (the latent form through a Kronecker root of ``kron_factors`` factors, never formed);
    ``gradient``: the base's gradients are owed (the latent forms' surrogates differ in cost)."""
    lift = op.base.lift
    if _latent_ok(op):
        _, rows = _form_flops(lift, rank)
        latent = _latent_flops(lift, rank, gradient)
        form, best = ("rows", rows) if rows < latent else ("latent", latent)
        if kron_factors and _kron_flops(lift, rank, kron_factors, gradient) < best:
            form = "kron"
        return form
    return "rows" if _row_form(lift, rank) else "gram"


_FORM_NOTES = {
    "rows": "row form F = L R",
    "gram": "gram form M = L^T D^-1 L",
    "latent": "latent form P = L^T D^-1 (L R)",
    "kron": "latent form P = L^T D^-1 (L R) through the Kronecker root's factors (nothing n_in x r)",
}


def _factor(op: AddedDiagonal) -> _Factor:
    def compute() -> _Factor:
        lifted, noise = op.base, op.noise
        lift = lifted.lift
        values = lift.values.double()
        r, spectral, base = _latent_root(lifted.base)
        jitter = _truncation_jitter(op) if spectral else None
        scaled = isinstance(noise, ScaledIdentity)
        if scaled:
            scale = noise.scale.double() if jitter is None else noise.scale.double() + jitter
            inv_noise, noise_logdet = 1 / scale[..., None], lift.n_out * scale.log()
        else:
            d = noise.diagonal().double() if jitter is None else noise.diagonal().double() + jitter[..., None]
            inv_noise, noise_logdet = 1 / d, d.log().sum(-1)
        rows = m = mr = proj = None
        kron = isinstance(r, KroneckerRoot) and r.batch_shape == torch.Size()
        form = _form(op, r.shape[-1], _kron_factors(op, spectral) if kron else 0, base is not None)
        if form == "kron":  # C = I + R^T M R by column chunks of R = R_1 (x) ... (x) R_d, never formed
            weights = None if scaled else inv_noise.detach()
            rmr, proj = kronecker_capacitance(lift, values.detach(), weights, r.factors, base is not None)
            if scaled:  # M = L^T L / s: the graph to s through the r x r product only
                rmr = rmr * inv_noise[..., None]
                proj = None if proj is None else [p.mul_(inv_noise.detach()) for p in proj]
        elif form == "rows":
            rows = lift.matmul(r.to_dense(), values)  # F = L R
            if scaled:  # F^T F / s: the graph to s through the r x r product only
                rmr = (rows.mT @ rows) * inv_noise[..., None]
            else:
                rmr = rows.mT @ (inv_noise.unsqueeze(-1) * rows)
        elif form == "latent":  # P = M R by sparse products: nothing n_in x n_in or n_out x r
            dense_root = r.to_dense()
            mr = _latent_product(lift, values, None if scaled else inv_noise.detach(), dense_root)
            rmr = dense_root.mT @ mr
            if scaled:  # M = L^T L / s: the graph to s through the r x r product only
                rmr = rmr * inv_noise[..., None]
                scale_inv = inv_noise.detach()[..., None]
                mr = mr.mul_(scale_inv) if not mr.requires_grad else mr * scale_inv
        else:
            if scaled:
                gram = cached(lift, "gram", lambda: lift_gram(lift, lift.values.double()))
                m = gram / scale[..., None, None]
            else:
                m = lift_gram(lift, values, inv_noise)
            mr = r.tmatmul(m).mT  # M R (M symmetric)
            rmr = r.tmatmul(mr)
        capacitance = rmr + torch.eye(rmr.shape[-1], dtype=rmr.dtype, device=rmr.device)
        # eigenvalues >= 1: never needs jitter; the graph goes through _Capacitance* instead
        chol = psd_cholesky(capacitance.detach(), "the latent Woodbury capacitance I + R^T L^T D^-1 L R")
        return _Factor(inv_noise, noise_logdet, values, r, capacitance, chol, rows, m, mr, spectral, base,
                       projections=proj)

    f = cached(op, "lifted_woodbury", compute)
    rep = report.current_report()
    if rep is not None:
        if f.spectral:
            rep.notes.append(f"spectral root of rank {f.root.shape[-1]} (the base is singular in float64; no jitter)")
        rep.notes.append(_FORM_NOTES[_form_of(f)])
    return f


def _form_of(f: _Factor) -> str:
    if f.rows is not None:
        return "rows"
    if f.gram is not None:
        return "gram"
    return "latent" if f.mr is not None or f.white is not None else "kron"


def _truncation_jitter(op: AddedDiagonal) -> Tensor | None:
    """Warned jitter ``(...)`` for the noise where it does not dominate what the base's spectral root leaves
    out (:func:`spectral_uncertainty`, times ``||L||_2^2 <= ||L||_1 ||L||_inf``): there the answer would be
    set by the truncation (in float32, by the data's rounding), not by the covariance, and the dense path
    would need jitter too (:mod:`.spectral_jitter`). None where the noise dominates."""
    lifted, noise = op.base, op.noise
    uncertainty = spectral_uncertainty(lifted.base) * _norm_bound(lifted.lift)
    d = noise.diagonal().detach().double()
    mean_diag = lifted.base.diagonal().detach().double().mean(-1) + d.mean(-1)
    what = f"{op!r} (noise against the part of the base its spectral root leaves out)"
    low = d.amin(-1)
    jitter = eigenvalue_jitter(low, uncertainty, mean_diag, op.dtype, what)
    return jitter if bool((low <= uncertainty).any()) else None


def _norm_bound(lift: Lift) -> float:
    """``||L||_1 ||L||_inf`` (largest absolute column sum times largest absolute row sum), a bound on
    ``||L||_2^2``, cached on the lift."""

    def compute() -> float:
        with torch.no_grad():
            mags = lift.values.abs().double()
            rows = mags.new_zeros(lift.n_out).index_add(0, lift.row, mags)
            cols = mags.new_zeros(lift.n_in).index_add(0, lift.col, mags)
            return float(rows.max() * cols.max()) if lift.nnz else 0.0

    return cached(lift, "norm_bound", compute, detached=True)


def _latent_root(base: Operator) -> tuple[LinearMap, bool, Operator | None]:
    """``R`` (float64) with ``R R^T = base``; whether it is a graph-free spectral root; and then the float64
    base when its gradients are owed by surrogate terms (None otherwise)."""
    found = exact_root(base)
    if found is None:
        return root(base.to(torch.float64)), False, None
    r, differentiable = found
    if differentiable:
        return r, False, None
    base64 = base.to(torch.float64)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in base64._tensors())
    return r, True, base64 if needs_grad else None


def latent_rank(base: Operator) -> tuple[int, bool | None]:
    """Columns of the root the engine will use and whether it is spectral, from metadata and cached facts
    only. A Kronecker or Dense base may be singular in float64 (then its spectral root is narrower): until
    the engine has run on these values, or learned them (:meth:`LiftedWoodbury.learn`), that is unknown
    (``None``) and the rank given is the upper bound."""
    if spectral_matrices(base) is None:
        return _root_rank(base), False
    known = known_root_rank(base)
    return known if known is not None else (_root_rank(base), None)


def _root_rank(op: Operator) -> int:
    """Columns of ``root(op)`` (the capacitance size) without computing it."""
    if isinstance(op, LowRank):
        return op.rank
    if isinstance(op, SparseLifted):
        return _root_rank(op.base)
    if isinstance(op, AddedDiagonal):  # the root is [root(base), D^1/2]
        return _root_rank(op.base) + op.n
    if isinstance(op, Sum):
        return sum(_root_rank(t) for t in op.terms)
    return op.n


@register(SparseLifted, Operator)  # any diagonal noise
class LiftedWoodbury(Engine):
    """Planned from the lift's metadata and the base's cached root facts: before the engine has seen the base's
    values the capacitance size is the upper bound ``n_in`` (a singular base then gets a narrower spectral root,
    and the form follows the rank found; the report says which)."""

    name = "lifted_woodbury"
    method = "woodbury"
    reads_facts = True

    def why(self, op: AddedDiagonal) -> str:
        r, spectral = latent_rank(op.base.base)
        # unknown (None): the upper bound n_in, until a call has factorised the base (or learned its rank)
        root_kind = " (the base's spectral root: its numerical rank, from the factor spectra)" if spectral else ""
        form = {"rows": "F = L R", "gram": "M = L^T D^-1 L", "latent": "P = L^T D^-1 (L R)",
                "kron": "P = L^T D^-1 (L R) by column chunks of the Kronecker root's factors"}[
            _form(op, r, _kron_factors(op, spectral), _base_gradient(op))]
        return f"{describe(op)}: latent-space Woodbury with a {r} x {r} capacitance{root_kind} through {form}"

    def learn(self, op: AddedDiagonal) -> bool:
        """The root facts of a Kronecker base of factors of at most ``LEARN_FACTOR_SIZE`` rows (their Cholesky
        factorisations or spectra, cached on the base for the engine): whether the root is spectral and its
        rank, which decide the capacitance's size, form and memory."""
        if not self.would_learn(op):
            return False
        with torch.no_grad():
            exact_root(op.base.base)
        return known_root_rank(op.base.base) is not None

    def would_learn(self, op: AddedDiagonal) -> bool:
        base = op.base.base
        if torch.compiler.is_compiling() or not isinstance(base, Kronecker) or base.is_diagonal:
            return False
        return known_root_rank(base) is None and max(f.n for f in base.factors) <= LEARN_FACTOR_SIZE

    def cost(self, op: AddedDiagonal) -> Cost:
        lift, batch = op.base.lift, op.batch_shape.numel()
        r, spectral = latent_rank(op.base.base)
        gram, rows = _form_flops(lift, r)
        factors, gradient = _kron_factors(op, spectral), _base_gradient(op)
        form = _form(op, r, factors, gradient)
        if form == "kron":
            flops = _kron_flops(lift, r, factors, gradient) + r**3 / 3 + 4 * lift.nnz
            nbytes = _kron_bytes(lift, r, factors)
        elif form == "latent":
            flops = batch * (_latent_flops(lift, r, gradient) + r**3 / 3) + 4 * lift.nnz
            nbytes = (3 * lift.n_in * r + 3 * r * r) * 8 + 3 * lift.n_pairs * 8 + SURROGATE_CHUNK * 8
        elif form == "rows":
            flops = batch * (rows + r**3 / 3) + 4 * lift.nnz
            nbytes = batch * (2 * lift.n_out * r + lift.n_in * r + 3 * r * r) * 8
        else:
            flops = batch * (gram + r**3 / 3) + 4 * lift.nnz
            nbytes = batch * (2 * lift.n_in * lift.n_in + 3 * r * r) * 8 + min(lift.n_pairs, Lift.CHUNK) * 4 * 8
        return Cost(flops, nbytes)

    def solve(self, op: AddedDiagonal, rhs: Tensor) -> Tensor:
        f, lift = _factor(op), op.base.lift
        white = f.inv_noise.unsqueeze(-1) * rhs.double()
        latent = f.cap_solve(f.latent(lift, white))
        x = white - f.inv_noise.unsqueeze(-1) * f.lifted(lift, latent)
        if f.base is not None:  # d x = -A^{-1} L dK v
            _, kv = f.base_term(lift, x)
            x = first_order_only(x - f.inverse_detached(lift, lift.matmul(kv - kv.detach())), *_WHAT)
        return x.to(rhs.dtype)

    def logdet(self, op: AddedDiagonal) -> Tensor:
        return _factor(op).logdet(op.base.lift).to(op.dtype)

    def inv_quad_logdet(self, op: AddedDiagonal, rhs: Tensor) -> tuple[Tensor, Tensor]:
        f, lift = _factor(op), op.base.lift
        b = rhs.double()
        white = f.inv_noise.unsqueeze(-1) * b
        t = f.latent(lift, white)
        latent = f.cap_solve(t)
        inv_quad = (b * white).sum(-2) - (t * latent).sum(-2)
        if f.base is not None:  # G = -v v^T
            x = white - f.inv_noise.unsqueeze(-1) * f.lifted(lift, latent)
            v, kv = f.base_term(lift, x)
            surrogate = -(v * kv).sum(-2)
            inv_quad = first_order_only(inv_quad + (surrogate - surrogate.detach()), *_WHAT)
        return inv_quad.to(op.dtype), f.logdet(lift).to(op.dtype)

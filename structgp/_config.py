"""Scoped settings (a ``contextvars`` value): never process-global, safe across threads and tasks.

This module has no dependencies inside structgp so every layer may read it; the public entry point is
``structgp.settings`` (re-exported by ``structgp.inference.settings``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch

# "auto", the engine families and the engines' own names (structgp.inference.plan.engine_names())
METHODS = (
    "auto", "cholesky", "woodbury", "low_rank_woodbury", "lifted_woodbury", "spectral_woodbury", "eigen",
    "blockwise", "diagonal", "permuted", "lift_reduction", "cg", "masked_grid",
)
# when method="auto" may take an inexact (iterative) engine; see the Settings docstring
ITERATIVE = ("auto", "fallback", "never")
PRECONDITIONERS = (
    "auto", "none", "jacobi", "pivoted_cholesky", "kronecker_eigen", "kronecker_deflated", "lifted_eigen"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The knobs of structgp's numerical engines.

    method: ``"auto"`` lets :func:`structgp.plan` choose; any other name forces that method and raises
        a clear error where it does not apply to the structure.
    iterative: when ``method="auto"`` may answer with an inexact (iterative: ``"cg"``) engine, one of
        ``ITERATIVE``: ``"auto"`` when no exact method fits ``memory_budget`` or when the iterative engine is
        expected to be several times faster on a large problem (``ITERATIVE_SPEEDUP``, ``ITERATIVE_MIN_SIZE``
        in ``structgp.inference.plan``); ``"fallback"`` only when no exact method fits; ``"never"``: exact
        methods only (a ``MemoryError`` when none fits). A forced ``method="cg"`` is not affected.
    cg_tol: relative residual tolerance of conjugate gradients (per right-hand side).
    max_iter: iteration cap of conjugate gradients / Lanczos.
    num_probes: number of Rademacher probes of stochastic trace and log-determinant estimates.
    precond_rank: largest rank of the partial pivoted Cholesky preconditioner (it stops earlier once what it
        leaves out is negligible next to the noise); 0 gives the Jacobi preconditioner.
    preconditioner: preconditioner of conjugate gradients, one of ``PRECONDITIONERS``; ``"auto"`` picks
        one per structure (see ``structgp.inference.preconditioners``).
    seed: seed of every stochastic estimator (probes), so objectives are deterministic.
    logdet_control_variate: whether the iterative engine's gradient of ``log det`` uses the
        preconditioner's exact log-determinant derivative as a control variate (far smaller variance; off:
        the plain Hutchinson estimate, for comparison).
    memory_budget: bytes an engine may allocate; methods over it are not chosen by ``"auto"``.
    dense_limit: bytes ``to_dense()`` may allocate before it refuses (and says what to use instead).
    max_jitter: largest relative jitter (times the mean diagonal) Cholesky may add before it fails.
    check_values: whether constructors read tensor values (finite, positive); a host synchronisation on
        GPUs, so hot loops that already trust their inputs may turn it off.
    spectral_root: whether a Kronecker (or, in lifted covariances, dense) factor that is singular in float64
        gets its exact truncated spectral root (no jitter; gradients exact to first order only) rather than a
        Cholesky factor with warned jitter (exact second derivatives of the jittered matrix: for Hessians).
    """

    method: str = "auto"
    iterative: str = "auto"
    cg_tol: float = 1e-6
    max_iter: int = 1000
    num_probes: int = 32
    precond_rank: int = 256
    preconditioner: str = "auto"
    seed: int = 0
    logdet_control_variate: bool = True
    memory_budget: int = 8 * 2**30
    dense_limit: int = 4 * 2**30
    max_jitter: float = 1e-3
    check_values: bool = True
    spectral_root: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.iterative not in ITERATIVE:
            raise ValueError(f"iterative: expected one of {ITERATIVE}, got {self.iterative!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner: expected one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        for name in ("cg_tol", "max_jitter"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("max_iter", "num_probes", "precond_rank", "memory_budget", "dense_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (value == 0 and name != "precond_rank"):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")


_CURRENT: contextvars.ContextVar[Settings] = contextvars.ContextVar("structgp_settings", default=Settings())  # noqa: B039 (frozen)

# What torch.compile reads instead: Dynamo cannot trace ``ContextVar.get`` (a graph break), but it traces and
# guards a module global, so a compiled function recompiles when the settings it was traced under change.
# Kept equal to the innermost settings of the thread that last entered or left ``settings(...)``.
_TRACED: Settings = _CURRENT.get()


def current() -> Settings:
    """The settings in force in this context."""
    if torch.compiler.is_compiling():
        return _TRACED
    return _CURRENT.get()


@contextlib.contextmanager
def settings(**overrides) -> Iterator[Settings]:
    """Scope settings to a ``with`` block: ``with structgp.settings(method="cholesky"): ...``.

    Unknown names raise ``TypeError``; invalid values raise ``ValueError``.
    """
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"settings: unknown option(s) {sorted(unknown)}; known: {sorted(fields)}")
    global _TRACED
    new = dataclasses.replace(current(), **overrides)
    token = _CURRENT.set(new)
    _TRACED = new
    try:
        yield new
    finally:
        _CURRENT.reset(token)
        _TRACED = _CURRENT.get()

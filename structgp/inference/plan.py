"""The choice of method: a registry of engines keyed by operator type and a per-structure cost model.

Each engine states whether it applies to an operator (and why), and its cost in flops and bytes.
``plan(op)`` takes the cheapest applicable exact method whose memory fits ``settings(memory_budget=...)``,
else the cheapest iterative one that fits; ``settings(method=...)`` forces one and raises where it does not
apply. Structural engines (a block-diagonal or diagonal operator is answered block by block / entry by
entry) are always taken: a forced method then applies to the pieces.
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from structgp import _config
from structgp.covariance.operator import Operator


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


class Engine:
    """One numerical method. Subclasses implement the questions they answer."""

    name: str = ""
    structural: bool = False
    exact: bool = True  # iterative engines set False: "auto" takes them only when no exact method fits

    def applies(self, op: Operator) -> str | None:
        """Why this engine answers ``op`` exactly, or None when it does not apply."""
        raise NotImplementedError

    def cost(self, op: Operator) -> Cost:
        raise NotImplementedError

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        """``op^{-1} rhs`` for ``rhs`` of shape ``(..., n, c)``."""
        raise NotImplementedError

    def logdet(self, op: Operator) -> Tensor:
        raise NotImplementedError

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """``(diag(rhs^T op^{-1} rhs), logdet)``: ``rhs`` ``(..., n, c)`` gives ``(..., c)`` and ``batch_shape``."""
        return (rhs * self.solve(op, rhs)).sum(-2), self.logdet(op)


_REGISTRY: dict[type, list[Engine]] = {}


def register(*op_types: type):
    """Class decorator: register an engine (instantiated once) as a candidate for ``op_types``."""

    def deco(cls: type[Engine]) -> type[Engine]:
        engine = cls()
        for t in op_types:
            _REGISTRY.setdefault(t, []).append(engine)
        return cls

    return deco


def candidates(op: Operator) -> list[Engine]:
    found: list[Engine] = []
    for t in type(op).__mro__:
        for engine in _REGISTRY.get(t, []):
            if engine not in found:
                found.append(engine)
    return found


@dataclasses.dataclass(frozen=True)
class Option:
    method: str
    reason: str
    cost: Cost
    fits: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """The method that would run for an operator, why, and what it costs (printable)."""

    operator: str
    method: str
    reason: str
    cost: Cost
    alternatives: tuple[Option, ...]
    forced: bool
    engine: Engine = dataclasses.field(repr=False, compare=False)

    def __str__(self) -> str:
        lines = [
            f"plan for {self.operator}",
            f"  method: {self.method}{' (forced by settings)' if self.forced else ''}",
            f"  why:    {self.reason}",
            f"  cost:   {_fmt_flops(self.cost.flops)}, {_fmt_bytes(self.cost.bytes)}",
        ]
        for alt in self.alternatives:
            note = "" if alt.fits else " (over the memory budget)"
            lines.append(f"  also:   {alt.method}: {_fmt_flops(alt.cost.flops)}, {_fmt_bytes(alt.cost.bytes)}{note}")
        return "\n".join(lines)


def plan(op: Operator) -> Plan:
    """Which method answers ``solve``/``logdet`` for ``op`` under the current settings, and why."""
    if not isinstance(op, Operator):
        raise TypeError(f"op: expected a structgp operator, got {type(op).__name__}")
    cfg = _config.current()
    options = []
    for engine in candidates(op):
        reason = engine.applies(op)
        if reason is not None:
            cost = engine.cost(op)
            options.append((engine, Option(engine.name, reason, cost, cost.bytes <= cfg.memory_budget)))
    if not options:
        raise ValueError(
            f"no method applies to {op!r} ({_describe(op)}): the matrix is singular (e.g. a LowRank W W^T "
            "of rank k < n); add noise, e.g. op + ScaledIdentity(s, n) or op + Diagonal(d)"
        )
    structural = [(e, o) for e, o in options if e.structural]
    if structural:
        engine, chosen = structural[0]
        forced = False
    elif cfg.method != "auto":
        match = [(e, o) for e, o in options if e.name == cfg.method]
        if not match:
            names = ", ".join(o.method for _, o in options) or "none"
            raise ValueError(
                f"method={cfg.method!r} does not apply to {op!r} ({_describe(op)}); methods that apply: {names}"
            )
        engine, chosen = match[0]
        forced = True
    else:
        fitting = [(e, o) for e, o in options if o.fits and e.exact]
        fitting = fitting or [(e, o) for e, o in options if o.fits]
        if not fitting:
            need = min((o.cost.bytes for _, o in options), default=math.inf)
            raise MemoryError(
                f"no exact method for {op!r} ({_describe(op)}) fits the memory budget of "
                f"{_fmt_bytes(cfg.memory_budget)} (the cheapest needs {_fmt_bytes(need)}); raise "
                "structgp.settings(memory_budget=...) or use method='cg'"
            )
        engine, chosen = fitting[0]
        for e, o in fitting[1:]:  # the cheapest (a loop, not min(key=...), which torch.compile cannot trace)
            if o.cost.flops < chosen.cost.flops:
                engine, chosen = e, o
        forced = False
    others = tuple(o for e, o in options if e is not engine)
    return Plan(repr(op), chosen.method, chosen.reason, chosen.cost, others, forced, engine)


def _describe(op: Operator) -> str:
    from structgp.covariance.sum import AddedDiagonal

    if isinstance(op, AddedDiagonal):
        return f"{_describe(op.base)} + {type(op.noise).__name__}"
    return type(op).__name__


def describe(op: Operator) -> str:
    """A short name of the structure, e.g. ``"LowRank + Diagonal"``."""
    return _describe(op)


def _fmt_flops(f: float) -> str:
    return f"{f:.2e} flop"


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"

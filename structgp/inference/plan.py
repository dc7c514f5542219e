"""The choice of method: engines registered for the structures they answer, and a per-structure cost model.

**The one dispatch rule.** An engine registers for the structure it answers, the way
``torch.distributions.kl.register_kl(type_p, type_q)`` registers a KL rule: ``@register(Kronecker,
ScaledIdentity)`` answers ``Kronecker + ScaledIdentity`` (an :class:`~structgp.covariance.AddedDiagonal`
whose base is a ``Kronecker`` and whose noise is a ``ScaledIdentity``); ``@register(BlockDiag)`` answers a
``BlockDiag`` on its own; ``@register(Operator)`` answers anything (the dense Cholesky and CG fallbacks).
Subclasses match; the most specific registration comes first (a pair before a single type, then the
shorter distance along the classes' MRO).

**The choice.** ``plan(op)`` asks each matching engine whether it applies (``why``) and what it costs
(``cost``: flops, peak bytes and the expected seconds of the call, its gradient included when the operator's
tensors require grad, see :mod:`.cost_model`); both read only shapes, types and facts already cached on the
operator (a spectrum an engine computed earlier), never run a factorisation. Structural engines (block by
block, entry by entry, through a permutation) are always taken. Otherwise ``settings(method=...)`` forces an
engine by its name or its method family (``"woodbury"`` is the family of ``low_rank_woodbury``,
``lifted_woodbury`` and ``spectral_woodbury``) and raises where none applies. ``"auto"`` takes the cheapest
(fewest flops) exact engine whose memory fits ``settings(memory_budget=...)``, on equal cost the more
specific, except that it takes the cheapest iterative (inexact) engine that fits

- when no exact engine fits, or
- when the iterative engine is expected to take at most ``1 / ITERATIVE_SPEEDUP`` of the exact engine's
  time and ``n >= ITERATIVE_MIN_SIZE`` (small problems keep their exact answers whatever the model says),

and ``settings(iterative=...)`` narrows this: ``"fallback"`` keeps only the first reason, ``"never"``
neither (a ``MemoryError`` when no exact engine fits). The plan prints both expected times and why it chose.
An engine whose premise is a numerical fact not yet known at planning time (the numerical rank of a grid
kernel) checks it once when it runs (``settle``), caching what it computed; when the premise fails the
call is planned again, now with the fact known.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.kernel_operator import DEFAULT_NAME, KernelOperator
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal
from structgp.inference import cost_model

# "auto" takes an iterative engine over an exact one that fits when it expects it to be this many times
# faster, at sizes n >= ITERATIVE_MIN_SIZE (below it every dense method takes well under a second here)
ITERATIVE_SPEEDUP = 4.0
ITERATIVE_MIN_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Cost:
    """What an engine costs: ``flops`` of the forward computation, peak ``bytes`` it allocates, and the
    expected ``seconds`` of the call on the operator's device, its gradient included when it will be
    differentiated (:func:`cost_model.seconds`; None where no rates were measured for that device; engines
    that leave it None get :func:`cost_model.default_seconds` of their flops)."""

    flops: float
    bytes: float
    seconds: float | None = None


Pattern = tuple[type, ...]


class Engine:
    """One numerical method. Subclasses register with :func:`register` and implement the questions they answer.

    name: unique, accepted by ``settings(method=...)``; method: the family it belongs to (``Plan.method``,
    also accepted by ``settings``), the name by default; structural: always taken (answers by pieces);
    exact: iterative engines set False: "auto" takes them only when no exact method fits or when they are
    expected to be much faster (see the module docstring).
    """

    name: str = ""
    method: str = ""
    structural: bool = False
    exact: bool = True
    reads_facts: bool = False  # why()/cost() read facts cached on the operator (its values)
    patterns: tuple[Pattern, ...] = ()  # filled by @register

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.patterns = ()
        if not cls.method:
            cls.method = cls.name

    def why(self, op: Operator) -> str | None:
        """Why this engine answers ``op`` (which matches one of its patterns), or None when it does not;
        from metadata and cached facts only."""
        raise NotImplementedError

    def applies(self, op: Operator) -> str | None:
        """``why(op)`` for an operator of a registered structure; None for any other."""
        return self.why(op) if specificity(self, op) is not None else None

    def cost(self, op: Operator) -> Cost:
        """Flops and bytes, from metadata and cached facts only."""
        raise NotImplementedError

    def learn(self, op: Operator) -> bool:
        """Compute and cache a fact of ``op``'s values that this engine's cost depends on and planning cannot
        read (factor-sized work only, e.g. the numerical rank of a grid kernel from its factors' spectra); True
        when something was learned. Called when a call is about to run under ``"auto"`` (:func:`settled`), never
        by :func:`plan`: the call is then planned again, with the fact known. Most engines have none."""
        return False

    def would_learn(self, op: Operator) -> bool:
        """Whether :meth:`learn` would compute something for ``op`` (metadata and cached facts only), so that
        ``plan`` can say the call's choice may differ from its own."""
        return False

    def settle(self, op: Operator) -> bool:
        """Check a premise that planning could not (computing and caching what it needs); False hands the
        call back to the planner, which then knows the fact. Most engines have none."""
        return True

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        """``op^{-1} rhs`` for ``rhs`` of shape ``(..., n, c)``."""
        raise NotImplementedError

    def logdet(self, op: Operator) -> Tensor:
        raise NotImplementedError

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """``(diag(rhs^T op^{-1} rhs), logdet)``: ``rhs`` ``(..., n, c)`` gives ``(..., c)`` and ``batch_shape``."""
        return (rhs * self.solve(op, rhs)).sum(-2), self.logdet(op)


_ENGINES: list[Engine] = []
_CANDIDATES: dict[tuple[Pattern, ...], list[Engine]] = {}  # by the views of an operator (types only)


def register(*pattern: type):
    """Class decorator: register an engine for ``pattern``: ``(Structure,)`` for an operator alone, or
    ``(Base, Noise)`` for ``Base + Noise`` (an ``AddedDiagonal``). Stack it for several patterns; the engine
    is instantiated once."""
    if not 1 <= len(pattern) <= 2 or not all(isinstance(t, type) and issubclass(t, Operator) for t in pattern):
        raise TypeError(f"pattern: expected (Structure,) or (Base, Noise) operator types, got {pattern}")

    def deco(cls: type[Engine]) -> type[Engine]:
        cls.patterns = (pattern, *cls.patterns)
        _CANDIDATES.clear()
        if instance_of(cls) is None:
            if any(e.name == cls.name for e in _ENGINES):
                raise ValueError(f"name: engine name {cls.name!r} is taken")
            _ENGINES.append(cls())
        return cls

    return deco


def instance_of(cls: type[Engine]) -> Engine | None:
    """The registered instance of an engine class."""
    return next((e for e in _ENGINES if type(e) is cls), None)


def engine_names() -> tuple[str, ...]:
    """Every name and family ``settings(method=...)`` accepts besides ``"auto"``."""
    return tuple(dict.fromkeys(n for e in _ENGINES for n in (e.name, e.method)))


def _views(op: Operator) -> tuple[Pattern, ...]:
    """The patterns an operator presents: its own type, and ``(base, noise)`` for a sum with diagonal noise."""
    if isinstance(op, AddedDiagonal):
        return (type(op),), (type(op.base), type(op.noise))
    return ((type(op),),)


def specificity(eng: Engine, op: Operator) -> tuple[int, int] | None:
    """How closely ``eng`` is registered for ``op``'s structure (smaller is closer), or None when it is not:
    a pair pattern before a single type, then the summed MRO distance."""
    best = None
    for view in _views(op):
        for pattern in eng.patterns:
            if len(pattern) != len(view) or not all(issubclass(v, p) for v, p in zip(view, pattern)):
                continue
            key = (-len(pattern), sum(v.__mro__.index(p) for v, p in zip(view, pattern)))
            best = key if best is None or key < best else best
    return best


def candidates(op: Operator) -> list[Engine]:
    """The engines registered for ``op``'s structure, most specific first (computed once per structure)."""
    if torch.compiler.is_compiling():  # traced code must not read a cache that fills as it runs (recompiles)
        return _rank_candidates(op)
    views = _views(op)
    found = _CANDIDATES.get(views)
    if found is None:
        found = _rank_candidates(op)
        _CANDIDATES[views] = found
    return found


def _rank_candidates(op: Operator) -> list[Engine]:
    ranked = []
    for i, eng in enumerate(_ENGINES):
        key = specificity(eng, op)
        if key is not None:
            ranked.append((key, i, eng))
    return [eng for _, _, eng in sorted(ranked, key=lambda t: (t[0], t[1]))]


@dataclasses.dataclass(frozen=True)
class Option:
    method: str
    reason: str
    cost: Cost
    fits: bool
    engine: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The method that would run for an operator, why, and what it costs (printable).

    method is the engine's family (e.g. ``"woodbury"``), ``engine.name`` the engine itself (e.g.
    ``"lifted_woodbury"``). memoisable is False when the choice read facts cached on this operator (its
    values), so the plan must not be reused for another operator of the same structure. decision says how
    ``"auto"`` weighed the exact engine against the iterative one (their expected times), "" where it did not.
    """

    operator: str
    method: str
    reason: str
    cost: Cost
    alternatives: tuple[Option, ...]
    forced: bool
    engine: Engine = dataclasses.field(repr=False, compare=False)
    memoisable: bool = dataclasses.field(default=True, compare=False)
    decision: str = dataclasses.field(default="", compare=False)
    differentiated: bool = dataclasses.field(default=False, compare=False)  # expected times include the backward

    def __str__(self) -> str:
        lines = [
            f"plan for {self.operator}",
            f"  method: {self.method} (engine {self.engine.name}){' (forced by settings)' if self.forced else ''}",
            f"  why:    {self.reason}",
            f"  cost:   {_fmt_cost(self.cost, self.differentiated)}",
        ]
        if self.decision:
            lines.append(f"  choice: {self.decision}")
        for alt in self.alternatives:
            note = "" if alt.fits else " (over the memory budget)"
            lines.append(f"  also:   {alt.engine}: {_fmt_cost(alt.cost, self.differentiated)}{note}")
        return "\n".join(lines)


def plan(op: Operator) -> Plan:
    """Which engine answers ``solve``/``logdet`` for ``op`` under the current settings, and why (metadata only:
    no factorisation runs here)."""
    if not isinstance(op, Operator):
        raise TypeError(f"op: expected a structgp operator, got {type(op).__name__}")
    cfg = _config.current()
    options = []
    engines = candidates(op)
    gradient = cost_model.differentiated(op)
    for eng in engines:
        reason = eng.why(op)
        if reason is not None:
            cost = _timed(eng.cost(op), op, gradient)
            options.append((eng, Option(eng.method, reason, cost, cost.bytes <= cfg.memory_budget, eng.name)))
    if not options:
        why = structurally_singular(op) or "e.g. a LowRank W W^T of rank k < n"
        raise ValueError(
            f"no method applies to {op!r} ({describe(op)}): the matrix is singular ({why}); add noise, e.g. "
            "op + ScaledIdentity(s, n) or op + Diagonal(d)"
        )
    chosen, forced, decision = _choose(op, options, cfg)
    learners = [e.name for e in engines if e.reads_facts and e.would_learn(op)] if not forced else []
    if learners:  # the call learns these facts first (settled) and plans again: say so rather than mislead
        decision = (f"{decision}; " if decision else "") + (
            f"not yet known: {', '.join(learners)}'s facts (factor-sized work); a call under 'auto' learns "
            "them first and plans again, so its choice may differ from this one"
        )
    memoisable = not any(e.reads_facts for e in engines)
    others = tuple(o for e, o in options if e is not chosen[0])
    eng, option = chosen
    return Plan(
        repr(op), option.method, option.reason, option.cost, others, forced, eng, memoisable, decision, gradient
    )


def _timed(cost: Cost, op: Operator, gradient: bool) -> Cost:
    """``cost`` with its expected seconds: the engine's own, else the default estimate from its flops."""
    if cost.seconds is not None:
        return cost
    return Cost(cost.flops, cost.bytes, cost_model.default_seconds(cost.flops, op.device, op.dtype, gradient))


def structurally_singular(op: Operator) -> str | None:
    """Why ``op`` is singular whatever its values (its rank is below its size by construction), naming the
    argument that makes it so; None otherwise."""
    from structgp.covariance.low_rank import LowRank
    from structgp.covariance.sparse_lifted import SparseLifted

    if isinstance(op, LowRank) and op.rank < op.n:
        return f"factor: W W^T has rank at most k = {op.rank} < n = {op.n}"
    if isinstance(op, SparseLifted) and op.lift.n_out > op.lift.n_in:
        lift = op.lift
        return (
            f"lift: L B L^T has rank at most n_in = {lift.n_in} < n_out = {lift.n_out} (the lift has more rows "
            "than cells)"
        )
    return None


def plan_part(part: Operator, context: str, *, settle: bool) -> Plan:
    """The plan of ``part``, a piece of a structural operator (a block group, a permuted base, a reduced lift),
    settled (:func:`settled`) when the piece is about to run; an error there names ``context``, the whole
    it belongs to. Planning a whole plans its parts with ``settle=False``: metadata only."""
    try:
        p = plan(part)
        return settled(p, part) if settle else p
    except (ValueError, MemoryError) as err:
        try:
            wrapped = type(err)(f"{context}: {err}")
        except Exception:  # an error type with another signature: keep it as it is
            raise err from None
        raise wrapped from err


def settled(p: Plan, op: Operator) -> Plan:
    """``p`` when its engine's premise holds for ``op`` (:meth:`Engine.settle`), else a new plan, made now that
    the engine has cached the fact that refuted it. Under ``"auto"`` with alternatives, the engines that read
    facts first learn the cheap ones they lack (:meth:`Engine.learn`), and the call is planned again when one
    did."""
    # a memoisable plan's engines read no facts (plan()), so none has anything to learn
    if not p.forced and p.alternatives and not p.engine.structural and not p.memoisable:
        learned = False
        for eng in candidates(op):  # a loop: every engine learns (no short circuit)
            if eng.reads_facts and eng.learn(op):
                learned = True
        if learned:
            p = plan(op)
    return p if p.engine.settle(op) else plan(op)


Choice = tuple[Engine, Option]


def _choose(op: Operator, options: list[Choice], cfg) -> tuple[Choice, bool, str]:
    """The chosen ``(engine, option)``, whether settings forced it, and how exactness was weighed against time
    (``options`` most specific first)."""
    structural = [(e, o) for e, o in options if e.structural]
    if structural:
        return structural[0], False, ""
    if cfg.method != "auto":
        match = [(e, o) for e, o in options if cfg.method in (e.name, e.method)]
        if not match:
            names = ", ".join(o.engine for _, o in options) or "none"
            raise ValueError(
                f"method={cfg.method!r} does not apply to {op!r} ({describe(op)}); engines that apply: {names}"
            )
        return match[0], True, ""
    exact = _cheapest([(e, o) for e, o in options if o.fits and e.exact])
    inexact = [(e, o) for e, o in options if o.fits and not e.exact]
    iterative = _cheapest(inexact) if cfg.iterative != "never" else None
    if exact is None and iterative is None:
        raise MemoryError(_over_budget(op, options, cfg, excluded=bool(inexact)))
    if exact is None:
        return iterative, False, f"no exact method fits the memory budget of {_fmt_bytes(cfg.memory_budget)}"
    if inexact and cfg.iterative != "auto":
        return exact, False, f"exact methods only unless none fits (settings(iterative={cfg.iterative!r}))"
    if iterative is None:
        return exact, False, ""
    return _weigh(op, exact, iterative)


def _cheapest(options: list[Choice]) -> Choice | None:
    """The option with the fewest flops, the first (more specific) on a tie; None when there is none."""
    best = options[0] if options else None
    for e, o in options[1:]:  # a loop: torch.compile cannot trace min(key=)
        if o.cost.flops < best[1].cost.flops:
            best = (e, o)
    return best


def _weigh(op: Operator, exact: Choice, iterative: Choice) -> tuple[Choice, bool, str]:
    """The iterative choice when it is expected to be ``ITERATIVE_SPEEDUP`` times faster at a size that
    matters, else the exact one; with the sentence that says so."""
    t_exact, t_iter = exact[1].cost.seconds, iterative[1].cost.seconds
    name_exact, name_iter = exact[0].name, iterative[0].name
    if t_exact is None or t_iter is None:
        return exact, False, (
            f"exact: no measured rates for {op.device.type} {op.dtype} (structgp.inference.cost_model.RATES) "
            f"to weigh {name_iter} against it"
        )
    times = f"expected {_fmt_seconds(t_iter)} for {name_iter} against {_fmt_seconds(t_exact)} for {name_exact}"
    speedup = t_exact / max(t_iter, 1e-30)
    if op.n < ITERATIVE_MIN_SIZE:
        return exact, False, f"exact: n = {op.n} < {ITERATIVE_MIN_SIZE}, exact methods only ({times})"
    if speedup < ITERATIVE_SPEEDUP:
        return exact, False, f"exact: {times}, {speedup:.1f}x < {ITERATIVE_SPEEDUP:g}x faster"
    return iterative, False, (
        f"iterative (inexact): {times}, {speedup:.1f}x >= {ITERATIVE_SPEEDUP:g}x faster at n = {op.n} >= "
        f"{ITERATIVE_MIN_SIZE}; settings(iterative='never') insists on an exact method"
    )


def _over_budget(op: Operator, options: list[Choice], cfg, *, excluded: bool) -> str:
    need = min((o.cost.bytes for e, o in options if e.exact or not excluded), default=math.inf)
    if excluded:  # an iterative engine would fit, but settings(iterative="never") rules it out
        return (
            f"no exact method for {op!r} ({describe(op)}) fits the memory budget of "
            f"{_fmt_bytes(cfg.memory_budget)} (the cheapest needs {_fmt_bytes(need)}) and settings(iterative="
            "'never') rules out the iterative one that would; raise structgp.settings(memory_budget=...) or "
            "allow iterative='fallback'"
        )
    return (
        f"no exact method for {op!r} ({describe(op)}) fits the memory budget of "
        f"{_fmt_bytes(cfg.memory_budget)} (the cheapest needs {_fmt_bytes(need)}); raise "
        "structgp.settings(memory_budget=...) or use method='cg'"
    )


def describe(op: Operator) -> str:
    """A short name of the structure, e.g. ``"LowRank + Diagonal"``."""
    if isinstance(op, AddedDiagonal):
        return f"{describe(op.base)} + {type(op.noise).__name__}"
    if isinstance(op, KernelOperator) and op.name != DEFAULT_NAME:  # e.g. why a DenseKernel went matrix-free
        return f"KernelOperator [{op.name}]"
    return type(op).__name__


def _fmt_flops(f: float) -> str:
    return f"{f:.2e} flop"


def _fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_cost(cost: Cost, gradient: bool) -> str:
    if cost.seconds is None:
        return f"{_fmt_flops(cost.flops)}, {_fmt_bytes(cost.bytes)}, no time model for this device"
    call = "value and gradient" if gradient else "value"
    return f"{_fmt_flops(cost.flops)}, {_fmt_bytes(cost.bytes)}, ~{_fmt_seconds(cost.seconds)} ({call})"


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"

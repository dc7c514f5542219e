"""What ran: the report of the last engine call in this context (``structgp.last_report()``)."""

from __future__ import annotations

import contextvars
import dataclasses

import torch


@dataclasses.dataclass
class Report:
    """What the last ``solve``/``logdet``/``inv_quad_logdet`` did.

    operation: the question asked; method: the engine that answered; reason: why it was chosen;
    jitter: absolute jitter added to a diagonal (0 if none); iterations, residual: of iterative engines.
    """

    operation: str
    method: str
    reason: str
    jitter: float = 0.0
    iterations: int | None = None
    residual: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.operation}: {self.method} ({self.reason})"]
        if self.jitter:
            parts.append(f"jitter {self.jitter:.3g}")
        if self.iterations is not None:
            parts.append(f"{self.iterations} iterations")
        if self.residual is not None:
            parts.append(f"residual {self.residual:.3g}")
        parts += self.notes
        return "; ".join(parts)


_LAST: contextvars.ContextVar[Report | None] = contextvars.ContextVar("structgp_last_report", default=None)


def last_report() -> Report | None:
    """The report of the last engine call made in this context, or None."""
    return _LAST.get()


def start(operation: str, method: str, reason: str) -> Report:
    report = Report(operation, method, reason)
    if not torch.compiler.is_compiling():  # Dynamo cannot trace ContextVar.set: compiled calls go unreported
        _LAST.set(report)
    return report


def current_report() -> Report | None:
    if torch.compiler.is_compiling():
        return None
    return _LAST.get()


def note(text: str) -> None:
    """Add ``text`` to the current report's notes (once; nothing outside a reported call)."""
    rep = current_report()
    if rep is not None and text not in rep.notes:
        rep.notes.append(text)


def record_jitter(amount: float) -> None:
    """Record jitter added to a diagonal in the current report (the largest amount of the call)."""
    rep = current_report()
    if rep is not None:
        rep.jitter = max(rep.jitter, amount)

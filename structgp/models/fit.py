"""Fitting loop: minimise a scalar loss over parameters with L-BFGS (strong Wolfe), Adam or any torch optimiser.

L-BFGS runs as one ``torch.optim.LBFGS.step`` of ``max_iter=iterations`` (so no evaluation is repeated
between iterations); the closure follows the optimiser's iteration counter to drive the progress bar and
to record, for each iteration, the lowest loss its line search evaluated (the accepted point's loss). Other
optimisers take one step an iteration.

The progress bar is shown when asked (``progress=True``) or, by default (``progress=None``), only when
standard error is a terminal: a log file or a notebook's captured output gets no bar lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

OPTIMIZERS = ("lbfgs", "adam")
_DEFAULTS = {"lbfgs": (50, 1.0), "adam": (100, 0.1)}
_GENERIC_ITERATIONS = 100  # a torch.optim class other than LBFGS and Adam: its own default lr

Optimizer = str | type[torch.optim.Optimizer]


def minimise(
    loss_fn: Callable[[], Tensor],
    parameters: Iterable[nn.Parameter],
    *,
    optimizer: Optimizer = "lbfgs",
    iterations: int | None = None,
    lr: float | None = None,
    progress: bool | None = None,
    tolerance: float = 1e-9,
    desc: str = "fit",
) -> list[float]:
    """Minimise ``loss_fn()``; returns the loss at each iterate (the start, then after each iteration).

    optimizer: ``"lbfgs"`` (default: 50 iterations, lr 1, strong-Wolfe line search; stops early when an
        iteration changes the loss by less than ``tolerance`` or the gradient's largest entry is below
        ``1e-7``, as ``torch.optim.LBFGS``) or ``"adam"`` (default: 100 iterations, lr 0.1), in any case; or a
        ``torch.optim.Optimizer`` class (``torch.optim.LBFGS`` and ``torch.optim.Adam`` as their names, others
        100 steps with their own default lr unless ``lr`` is given).
    progress: show a tqdm progress bar (None: only when standard error is a terminal).
    """
    kind, cls = _optimizer(optimizer)
    default_iterations, default_lr = _DEFAULTS.get(kind, (_GENERIC_ITERATIONS, None))
    iterations = default_iterations if iterations is None else iterations
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations: expected a non-negative int, got {iterations!r}")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters: nothing to fit (no parameter requires grad)")
    lr = default_lr if lr is None else lr
    from tqdm.auto import tqdm

    bar = tqdm(total=iterations, desc=desc, disable=not show_progress(progress), leave=False)
    try:
        if kind == "lbfgs":
            history = _lbfgs(loss_fn, params, iterations, lr, tolerance, bar)
        else:
            history = _first_order(loss_fn, cls(params) if lr is None else cls(params, lr=lr), iterations, bar)
    finally:
        bar.close()
    return history


def show_progress(progress: bool | None) -> bool:
    """``progress`` if given, else whether standard error (where tqdm writes) is a terminal."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr
    return stream is not None and callable(getattr(stream, "isatty", None)) and stream.isatty()


def _optimizer(optimizer: Optimizer) -> tuple[str, type[torch.optim.Optimizer]]:
    """``(kind, class)``: kind ``"lbfgs"``, ``"adam"`` or ``"class"`` (another torch optimiser)."""
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        kind = optimizer.lower()
        return kind, torch.optim.LBFGS if kind == "lbfgs" else torch.optim.Adam
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if optimizer is torch.optim.LBFGS:
            return "lbfgs", optimizer
        return ("adam" if optimizer is torch.optim.Adam else "class"), optimizer
    raise ValueError(
        f"optimizer: expected one of {OPTIMIZERS} (any case) or a torch.optim.Optimizer class, got {optimizer!r}"
    )


def _evaluate(loss_fn: Callable[[], Tensor], params: list[nn.Parameter]) -> Tensor:
    for p in params:
        p.grad = None
    loss = loss_fn()
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"the loss is not finite ({float(loss)}); check the data and the initial values")
    loss.backward()
    return loss


def _lbfgs(loss_fn, params, iterations: int, lr: float, tolerance: float, bar) -> list[float]:
    opt = torch.optim.LBFGS(
        params, lr=lr, max_iter=max(iterations, 1), max_eval=25 * max(iterations, 1), tolerance_change=tolerance,
        line_search_fn="strong_wolfe",
    )
    history: list[float] = []

    def closure() -> Tensor:
        loss = _evaluate(loss_fn, params)
        value = float(loss.detach())
        k = opt.state[params[0]].get("n_iter", 0)  # 0 before the first iteration
        if k < len(history):
            history[k] = min(history[k], value)
        else:
            history.append(value)
            if k > 0:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.5g}")
        return loss

    if iterations == 0:
        with torch.no_grad():
            return [float(loss_fn())]
    opt.step(closure)
    return history


def _first_order(loss_fn, opt: torch.optim.Optimizer, iterations: int, bar) -> list[float]:
    """``iterations`` steps of a first-order optimiser (Adam, SGD, ...), one gradient each."""
    params = [p for group in opt.param_groups for p in group["params"]]
    history: list[float] = []
    for _ in range(iterations):
        loss = _evaluate(loss_fn, params)
        history.append(float(loss.detach()))
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.5g}")
    with torch.no_grad():
        history.append(float(loss_fn()))
    return history

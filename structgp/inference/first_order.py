"""``first_order_only``: an identity that refuses second derivatives of surrogate gradients.

Engines that inject gradients by surrogate terms (``value + (s - s.detach())``, with ``s`` linear in the
differentiated tensors) give exact first derivatives and wrong second ones. Their outputs pass through
this identity so that ``create_graph=True`` (Hessians by ``torch.autograd``) raises instead of returning
wrong values. Under ``torch.func`` transforms, whose backward always records, it passes.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _FirstOrderOnly(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, what: str, what_else: str) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.what, ctx.what_else = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        if torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(grad):
            raise RuntimeError(
                f"second derivatives (create_graph=True) of {ctx.what} are not supported: its gradients are "
                "exact to first order only; use structgp.settings(method='cholesky') for Hessians"
                + ctx.what_else
            )
        return grad, None, None


def first_order_only(x: Tensor, what: str, alternative: str = "") -> Tensor:
    """``x`` unchanged; a backward with ``create_graph=True`` through it raises, naming ``what`` and, after
    the method that gives exact Hessians, an ``alternative`` (e.g. ``" or settings(spectral_root=False)"``)."""
    return _FirstOrderOnly.apply(x, what, alternative)

"""DeepPoly: abstract interpretation with one lower and one upper linear constraint per neuron.

Singh, Gehr, Püschel, Vechev, "An Abstract Domain for Certifying Neural Networks", POPL 2019.

DeepPoly keeps, for every neuron, a linear lower and upper bound in terms of the previous layer plus concrete bounds,
and obtains concrete bounds by back-substituting the constraints down to the input. That back-substitution is exactly
CROWN's backward pass (Zhang et al., NeurIPS 2018): the two methods differ only in the per-neuron transformers. For
ReLU they coincide -- DeepPoly's area-minimising lower slope (1 if ``u > -l`` else 0) is CROWN's adaptive choice --
so on ReLU networks the bounds are identical. For sigmoid and tanh DeepPoly uses its own transformer (chord on the
convex/concave side, otherwise the smallest derivative ``min(f'(l), f'(u))`` through the end points), and its max
transformer for max pooling. This module therefore reuses :func:`bastion.verify.crown.crown_bounds` with
``mode="deeppoly"``, which selects those transformers in :meth:`ElementwiseOp.relax`.
"""

from __future__ import annotations

from torch import Tensor

from bastion.verify.crown import crown_bounds
from bastion.verify.ir import Network

__all__ = ["deeppoly_bounds"]

Bounds = tuple[Tensor, Tensor]


def deeppoly_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """DeepPoly bounds of ``C @ net(x)`` over the box ``[lower, upper]``.

    Args:
        net: the network.
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)`` specification.
        splits: ReLU split decisions.
        intermediate: known pre-activation bounds (intersected).
        reuse_intermediate: take the known bounds as they are.
        bound_upper: also compute upper bounds.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds)``.
    """
    return crown_bounds(
        net,
        lower,
        upper,
        C,
        mode="deeppoly",
        splits=splits,
        intermediate=intermediate,
        reuse_intermediate=reuse_intermediate,
        bound_upper=bound_upper,
    )

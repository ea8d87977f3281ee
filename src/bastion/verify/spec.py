"""Verification specifications: input boxes and unsafe output sets, as in VNN-LIB.

A property says that for every input in a set, the output avoids an unsafe set. bastion writes it the way
VNN-COMP's VNN-LIB files do, in disjunctive normal form, so that one structure serves local robustness around a
data point and any property read from a file:

* a :class:`Region` is an input box ``lower <= x <= upper`` (on the flattened input) and a list of *unsafe
  disjuncts*; disjunct ``(A, b)`` is the polyhedron ``{y : A y <= b}`` of outputs;
* a :class:`Spec` is a list of regions. The property is **violated** (VNN-COMP's ``sat``) iff some input ``x`` in the
  box of some region has ``f(x)`` in some unsafe disjunct of that region; it **holds** (``unsat``) otherwise.

A verifier proves a region safe by showing, for every disjunct, that some row of ``A y <= b`` cannot hold over
the box (a lower bound of ``A_i y - b_i`` above 0); a falsifier looks for a point of the box whose output satisfies
every row of one disjunct. :meth:`Spec.violated` is the exact check of a candidate counterexample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["Region", "Spec"]


@dataclass
class Region:
    """One disjunct of a property: an input box and the output sets that are unsafe for inputs in it.

    Args:
        lower: lower bounds of the flattened input, shape ``(n,)``.
        upper: upper bounds, shape ``(n,)``, ``lower <= upper``.
        unsafe: the unsafe output set as a union of polyhedra; each ``(A, b)`` with ``A`` of shape ``(k, m)`` and
            ``b`` of shape ``(k,)`` stands for ``{y : A y <= b}`` (``k = 0``: every output is unsafe).
    """

    lower: Tensor
    upper: Tensor
    unsafe: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lower = torch.as_tensor(self.lower).reshape(-1)
        self.upper = torch.as_tensor(self.upper).reshape(-1)
        if self.lower.shape != self.upper.shape:
            raise InputError(f"region bounds differ in size: lower {self.lower.numel()}, upper {self.upper.numel()}")
        if torch.isnan(self.lower).any() or torch.isnan(self.upper).any():
            raise InputError("region bounds contain NaN")
        if (self.lower > self.upper).any():
            i = int((self.lower > self.upper).nonzero()[0, 0])
            raise InputError(f"empty region: lower[{i}] = {float(self.lower[i])} > upper[{i}] = {float(self.upper[i])}")
        clean = []
        for j, (a, b) in enumerate(self.unsafe):
            a = torch.as_tensor(a)
            b = torch.as_tensor(b).reshape(-1)
            if a.dim() != 2 or a.shape[0] != b.shape[0]:
                raise InputError(
                    f"unsafe disjunct {j}: A must be (k, m) and b (k,), got A {tuple(a.shape)} and b {tuple(b.shape)}"
                )
            clean.append((a, b))
        self.unsafe = clean

    @property
    def num_inputs(self) -> int:
        """Number of (flattened) input features ``n``."""
        return int(self.lower.numel())

    def contains(self, x: Tensor) -> Tensor:
        """Per-sample boolean: the flattened ``x`` (N, n) lies in the box (bounds included, compared in float64)."""
        # float64: a float32 copy of a bound could round onto the wrong side of a float32 input
        flat = x.reshape(x.shape[0], -1).double()
        lo, hi = self.lower.to(flat), self.upper.to(flat)
        return ((flat >= lo) & (flat <= hi)).all(dim=1)

    def unsafe_output(self, y: Tensor) -> Tensor:
        """Per-sample boolean: ``y`` (N, m) lies in one of the unsafe polyhedra (compared in float64)."""
        hit = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        y = y.double()
        for a, b in self.unsafe:
            if a.shape[0] == 0:
                return torch.ones_like(hit)
            hit |= (y @ a.to(y).T <= b.to(y)).all(dim=1)
        return hit


@dataclass
class Spec:
    """A property in disjunctive normal form over (input box, unsafe output polyhedra) regions.

    Args:
        regions: the regions; the property is violated iff for some region some ``x`` in its box has ``f(x)`` in
            one of its unsafe disjuncts. No region: nothing can violate it.
        num_outputs: number of model outputs ``m``.
        input_shape: shape of one model input (without the batch), ``prod(input_shape) = n``; ``(n,)`` when the
            property alone does not tell (VNN-LIB files are flat), see :meth:`with_input_shape`.
    """

    regions: list[Region]
    num_outputs: int
    input_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_outputs < 1:
            raise InputError(f"a spec needs at least one output, got num_outputs={self.num_outputs}")
        sizes = {r.num_inputs for r in self.regions}
        if len(sizes) > 1:
            raise InputError(f"regions of a spec have different input sizes: {sorted(sizes)}")
        n = sizes.pop() if sizes else (math.prod(self.input_shape) if self.input_shape else 0)
        self.input_shape = tuple(int(d) for d in self.input_shape) or (n,)
        if math.prod(self.input_shape) != n:
            raise InputError(f"input_shape {self.input_shape} has {math.prod(self.input_shape)} features, regions {n}")
        for i, r in enumerate(self.regions):
            for a, _ in r.unsafe:
                if a.shape[1] != self.num_outputs:
                    raise InputError(f"region {i}: an unsafe disjunct has {a.shape[1]} columns, not {self.num_outputs}")

    @property
    def num_inputs(self) -> int:
        """Number of (flattened) input features."""
        return math.prod(self.input_shape)

    def with_input_shape(self, shape: Sequence[int]) -> Spec:
        """The same spec for a model whose inputs have ``shape`` (same number of features)."""
        shape = tuple(int(d) for d in shape)
        if math.prod(shape) != self.num_inputs:
            raise InputError(
                f"the model's input shape {shape} has {math.prod(shape)} features, the spec has {self.num_inputs}"
            )
        return Spec(self.regions, self.num_outputs, shape)

    def violated(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample boolean: ``(x, y = f(x))`` witnesses a violation (exact comparisons, no tolerance).

        Args:
            x: inputs ``(N, *input_shape)`` or ``(N, n)``.
            y: the model's outputs on them, ``(N, m)``.

        Returns:
            ``(N,)`` booleans: ``x`` lies in the box of a region and ``y`` in one of that region's unsafe sets.
        """
        if x.dim() == 0 or x[0].numel() != self.num_inputs or x.shape[0] != y.shape[0]:
            raise InputError(
                f"violated: expected x (N, {self.num_inputs} features) and y (N, {self.num_outputs}), got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        y = y.reshape(y.shape[0], -1)
        if y.shape[1] != self.num_outputs:
            raise InputError(f"violated: y has {y.shape[1]} outputs, the spec {self.num_outputs}")
        out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for region in self.regions:
            out |= region.contains(x) & region.unsafe_output(y)
        return out

    def merged(self) -> Spec:
        """The same property with regions that share a box merged into one (their unsafe sets united)."""
        by_box: dict[tuple[bytes, bytes], Region] = {}
        for r in self.regions:
            key = (r.lower.double().numpy().tobytes(), r.upper.double().numpy().tobytes())
            if key in by_box:
                by_box[key].unsafe.extend(r.unsafe)
            else:
                by_box[key] = Region(r.lower, r.upper, list(r.unsafe))
        return Spec(list(by_box.values()), self.num_outputs, self.input_shape)

    @classmethod
    def robustness(cls, x: Tensor, label: int, threat: LpBall, num_classes: int) -> Spec:
        """Local robustness of one input: every point of the l∞ ball (∩ domain) keeps ``label`` the strict argmax.

        The unsafe set is ``{y : y_j >= y_label}`` for each ``j != label`` (one disjunct each), so a tie counts as
        a violation.

        Args:
            x: one input ``(*input_shape)``, without a batch dimension (its shape becomes the spec's input shape;
                :meth:`violated` only needs the number of features to match).
            label: the class the model must keep.
            threat: an ``LpBall`` with norm ``linf`` (other balls are not boxes).
            num_classes: number of model outputs.

        Returns:
            A spec with one region.
        """
        if not isinstance(threat, LpBall) or threat.norm != "linf":
            raise InputError(f"Spec.robustness needs an LpBall('linf', eps) (a box), got {threat!r}")
        if num_classes < 2 or not 0 <= int(label) < num_classes:
            raise InputError(f"label {label} must be in [0, {num_classes}) with num_classes >= 2")
        if not torch.isfinite(x).all():
            raise InputError("Spec.robustness: x contains NaN or Inf")
        lo, hi = threat.domain
        flat = x.detach().reshape(-1)
        lower = (flat - threat.eps).clamp(lo, hi)
        upper = (flat + threat.eps).clamp(lo, hi)
        eye = torch.eye(num_classes, dtype=flat.dtype if flat.is_floating_point() else torch.float32)
        unsafe = [
            ((eye[label] - eye[j]).reshape(1, -1), torch.zeros(1, dtype=eye.dtype))
            for j in range(num_classes)
            if j != label
        ]
        return cls([Region(lower, upper, unsafe)], num_classes, tuple(x.shape) or (1,))

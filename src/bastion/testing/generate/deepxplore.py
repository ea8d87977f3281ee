"""DeepXplore: gradient-guided differential testing (Pei, Cao, Yang & Jana, "DeepXplore: Automated Whitebox Testing
of Deep Learning Systems", SOSP 2017).

Several models of the same task serve as each other's oracle: starting from a seed on which they all agree on class
``c``, gradient ascent on the input maximises the joint objective (the paper's Algorithm 1)

    obj(x) = Σ_{k ≠ j} F_k(x)[c] − λ1 · F_j(x)[c]  +  λ2 · f_n(x)

where ``F_j`` is the model under test (``ctx.model``), ``F_k`` the ``others``, ``F(x)[c]`` a model's confidence in
the seed's class and ``f_n`` the activation of one neuron of the model under test that the criterion has not yet
covered (drawn uniformly at random among the uncovered items at every step, the code's ``neuron_to_cover``). The
first term makes the model under test leave ``c`` while the others stay; the second raises coverage. Steps follow
the gradient normalised by its root mean square (the code's ``normalize``), restricted by a *domain constraint*
that keeps the test a realistic image:

* ``"light"``: uniform brightening or darkening, every pixel moves by ``step`` in the direction of the sign of the
  gradient's mean (the paper's "lighting" constraint; the code scales by the mean itself, which on a 0..1 domain
  makes the step size depend on the gradient's magnitude: we keep a fixed step);
* ``"occl"``: a single rectangle of ``occlusion_size`` at ``occlusion_position`` (or at a random position drawn per
  seed) takes the normalised gradient step; nothing outside it changes;
* ``"blackout"``: at every step one small square of ``blackout_size`` at a random position (the code's
  ``constraint_black``) is turned black (the domain's low end) when the mean gradient over it is negative, i.e.
  when darkening it raises the objective; the code subtracts ``s = 10`` from pixels in [0, 1], which blacks the
  square out at once, so we set it to black directly.

A seed is followed for ``iterations`` steps (the code's ``grad_iterations``) or until the models disagree. Models
that already disagree on a seed are reported (:attr:`DeepXplore.seed_disagreements`) and the seed is skipped, as
in the code. A candidate is kept when it covers a new item *or* the models disagree on it
(:attr:`DeepXplore.disagreements` lists those tests; pass a ``DeepXplore`` object as the method to read them
after the run). The run ends when every seed has been followed.

**Single-model variant.** With no ``others`` there is no second opinion: the objective becomes
``−λ1 · F(x)[y] + λ2 · f_n(x)`` with ``y`` the seed's label, i.e. the model's own prediction is pushed away from the
label, and a "disagreement" is a prediction different from the label (a misclassified test).

Queries: every step costs one counted forward-backward pass of the model under test on the rows being optimised and
one counted evaluation of the candidates by the loop, so a step of ``B`` rows uses ``2B`` queries; the batch is
shrunk to ``queries_left // 2``. The ``others`` are reference models, not the model under test: their forward passes
are not counted. Coverage is measured on the model under test only (the paper tracks every model's coverage).

Defaults are the paper's MNIST settings: λ1 = 1, λ2 = 0.1, 20 gradient iterations, step ``s = 10`` on the 0..255
pixel scale (here ``10/255`` of the domain's width), an occlusion rectangle of 10x10 and blackout squares of 6x6 on
28x28 images (scaled to the image size: 3x3 and 2x2 on 8x8 digits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device, model_fingerprint
from bastion.testing.coverage.base import CoverageMetric
from bastion.testing.coverage.neuron import NeuronCoverage
from bastion.testing.generate.base import GenerationContext, TestGenerator

__all__ = ["TRANSFORMATIONS", "DeepXplore"]

#: The domain constraints of the paper (Section 6.2 of the SOSP version).
TRANSFORMATIONS = ("light", "occl", "blackout")
SCORES = ("softmax", "logit")
#: Sizes used by the authors' MNIST code on 28x28 images, scaled to other image sizes.
_MNIST_SIDE, _OCCL_SIDE, _BLACK_SIDE = 28, 10, 6


def _number(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise InputError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return int(value[0]), int(value[1])


class DeepXplore(TestGenerator):
    """Gradient-guided differential testing (Pei et al., SOSP 2017; module docstring).

    Args:
        others: further models of the same task to compare the model under test with (none: the single-model
            variant of the module docstring). They must accept the same inputs, on the same device.
        lambda1: weight of the model under test's confidence in the seed class (paper: 1).
        lambda2: weight of the uncovered neuron's activation (paper: 0.1).
        step: gradient step as a fraction of the input domain's width (paper: 10 on 0..255 pixels, so 10/255).
        iterations: gradient steps per seed (the code's ``grad_iterations``: 20).
        transformation: the domain constraint, ``"light"``, ``"occl"`` or ``"blackout"``.
        occlusion_size: (height, width) of the occlusion rectangle in pixels; None: 10/28 of the image's sides.
        occlusion_position: (row, column) of its top-left corner; None: drawn at random for each seed (the code's
            default is the corner (0, 0)).
        blackout_size: side(s) of the blackout squares in pixels; None: 6/28 of the image's sides.
        score: the confidence ``F(x)[c]``: ``"softmax"`` (the paper's class probability) or ``"logit"`` (the code's
            pre-softmax output).
        batch: seeds optimised together (one gradient step for all of them per iteration of the loop).
    """

    name = "deepxplore"
    paper = "Pei, Cao, Yang & Jana, DeepXplore: Automated Whitebox Testing of Deep Learning Systems, SOSP 2017"

    def __init__(
        self,
        *,
        others: Sequence[nn.Module] | nn.Module | None = None,
        lambda1: float = 1.0,
        lambda2: float = 0.1,
        step: float = 10 / 255,
        iterations: int = 20,
        transformation: str = "light",
        occlusion_size: int | tuple[int, int] | None = None,
        occlusion_position: tuple[int, int] | None = None,
        blackout_size: int | tuple[int, int] | None = None,
        score: str = "softmax",
        batch: int = 32,
    ) -> None:
        if others is None:
            others = ()
        elif isinstance(others, nn.Module):
            others = (others,)
        others = tuple(others)
        for i, m in enumerate(others):
            if not isinstance(m, nn.Module):
                raise InputError(f"others[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        if transformation not in TRANSFORMATIONS:
            raise InputError(f"transformation must be one of {', '.join(TRANSFORMATIONS)}, got {transformation!r}")
        if score not in SCORES:
            raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.others = others
        self.lambda1 = _number(lambda1, "lambda1")
        self.lambda2 = _number(lambda2, "lambda2")
        self.step = _number(step, "step", positive=True)
        self.iterations = _count(iterations, "iterations")
        self.transformation = transformation
        self.occlusion_size = _pair(occlusion_size, "occlusion_size")
        self.occlusion_position = _pair(occlusion_position, "occlusion_position")
        self.blackout_size = _pair(blackout_size, "blackout_size")
        self.score = score
        self.batch = _count(batch, "batch")
        self._reset()

    # -- configuration ---------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        opts = super().options()
        # the others enter run keys by their weights, not by their (long) module reprs
        opts["others"] = [model_fingerprint(m)[:12] for m in self.others]
        return opts

    @property
    def disagreements(self) -> list[tuple[int, int]]:
        """``(test index in the suite, seed index)`` of the kept tests on which the models disagree."""
        return list(self._disagreements)

    @property
    def seed_disagreements(self) -> list[int]:
        """Seeds on which the models already disagreed (skipped, as in the authors' code)."""
        return list(self._seed_disagreements)

    # -- state -----------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._order: Tensor | None = None  # the seeds in the order they are taken
        self._next = 0
        self._rows: dict[str, Tensor] = {}
        self._pending = torch.zeros(0, dtype=torch.long)
        self._disagreements: list[tuple[int, int]] = []
        self._seed_disagreements: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": None if self._order is None else self._order.cpu(),
            "next": self._next,
            "rows": {k: v.cpu() for k, v in self._rows.items()},
            "disagreements": list(self._disagreements),
            "seed_disagreements": list(self._seed_disagreements),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self._order = state["order"]
        self._next = int(state["next"])
        self._rows = dict(state["rows"])
        self._disagreements = [tuple(p) for p in state["disagreements"]]  # type: ignore[misc]
        self._seed_disagreements = [int(s) for s in state["seed_disagreements"]]

    # -- the generation step ---------------------------------------------------------------------------------------
    def _sizes(self, ctx: GenerationContext) -> tuple[tuple[int, int], tuple[int, int]]:
        if ctx.seeds.dim() != 4:
            raise InputError(
                f"the {self.transformation!r} transformation needs images (N, C, H, W), got seeds of shape "
                f"{tuple(ctx.seeds.shape)}; use transformation='light' for other inputs"
            )
        h, w = ctx.seeds.shape[2], ctx.seeds.shape[3]

        def scaled(side: int) -> tuple[int, int]:
            return max(1, round(h * side / _MNIST_SIDE)), max(1, round(w * side / _MNIST_SIDE))

        occl = self.occlusion_size or scaled(_OCCL_SIDE)
        black = self.blackout_size or scaled(_BLACK_SIDE)
        for what, (a, b) in (("occlusion_size", occl), ("blackout_size", black)):
            if not (1 <= a <= h and 1 <= b <= w):
                raise InputError(f"{what} {(a, b)} does not fit in images of {h}x{w} pixels")
        if self.occlusion_position is not None:
            r, c = self.occlusion_position
            if not (0 <= r <= h - occl[0] and 0 <= c <= w - occl[1]):
                raise InputError(f"an occlusion of {occl} at {(r, c)} does not fit in images of {h}x{w} pixels")
        return occl, black

    def _positions(self, ctx: GenerationContext, n: int, size: tuple[int, int]) -> Tensor:
        """``n`` random top-left corners of a ``size`` rectangle, (n, 2)."""
        h, w = ctx.seeds.shape[2], ctx.seeds.shape[3]
        rows = torch.randint(h - size[0] + 1, (n,), generator=ctx.generator)
        cols = torch.randint(w - size[1] + 1, (n,), generator=ctx.generator)
        return torch.stack([rows, cols], dim=1).to(ctx.seeds.device)

    def _fill(self, ctx: GenerationContext) -> None:
        """Drop finished rows, then take seeds from the queue until ``batch`` rows are active."""
        device = ctx.seeds.device
        if self._order is None:
            self._order = torch.randperm(ctx.seeds.shape[0], generator=ctx.generator)
        rows = {k: v.to(device) for k, v in self._rows.items()}
        if rows:
            alive = ~rows["done"]
            rows = {k: v[alive] for k, v in rows.items()}
        have = rows["seed"].shape[0] if rows else 0
        take = min(self.batch - have, self._order.shape[0] - self._next)
        if take > 0:
            seed = self._order[self._next : self._next + take].to(device)
            self._next += take
            if self.transformation == "occl":
                occl, _ = self._sizes(ctx)
                if self.occlusion_position is None:
                    pos = self._positions(ctx, take, occl)
                else:
                    pos = torch.tensor([self.occlusion_position], device=device).expand(take, 2).clone()
            else:
                pos = torch.zeros(take, 2, dtype=torch.long, device=device)
            new = {
                "seed": seed,
                "x": ctx.seeds[seed].clone(),
                "offset": torch.zeros(take, dtype=ctx.seeds.dtype, device=device),
                "pos": pos,
                "steps": torch.zeros(take, dtype=torch.long, device=device),
                "cls": torch.full((take,), -1, dtype=torch.long, device=device),
                "done": torch.zeros(take, dtype=torch.bool, device=device),
            }
            rows = new if not rows else {k: torch.cat([rows[k], new[k]]) for k in new}
        self._rows = rows

    def _others(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for m in self.others:
            stack.enter_context(eval_mode(m))
        return stack

    def _other_logits(self, x: Tensor) -> list[Tensor]:
        return [m(x.to(model_device(m))).to(x.device) for m in self.others]

    def _confidence(self, logits: Tensor, cls: Tensor) -> Tensor:
        scores = logits.softmax(dim=1) if self.score == "softmax" else logits
        return scores.gather(1, cls[:, None]).squeeze(1)

    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        if ctx.iteration == 0:
            self._reset()  # a fresh run (a resumed one starts at iteration >= 1 with its state loaded)
        if self.transformation != "light":
            self._sizes(ctx)
        self._fill(ctx)
        rows = self._rows
        total = rows["seed"].shape[0] if rows else 0
        if total == 0:
            return None  # every seed has been followed
        n = total if ctx.queries_left is None else min(total, ctx.queries_left // 2)
        if n == 0:
            return None
        seed = rows["seed"][:n]
        with torch.enable_grad(), self._others():
            x = rows["x"][:n].clone().requires_grad_(True)
            logits, acts = ctx.probe(x, keep_graph=True)
            other = self._other_logits(x)
            pred = logits.argmax(dim=1)
            fresh = rows["steps"][:n] == 0
            if bool(fresh.any()):
                # the seed's class: the one all models agree on (paper), or the label without others
                if other:
                    differ = torch.stack([o.argmax(dim=1) != pred for o in other]).any(dim=0) & fresh
                    cls = pred
                else:
                    cls = ctx.seed_labels[seed]
                    differ = (pred != cls) & fresh
                rows["cls"][:n] = torch.where(fresh, cls, rows["cls"][:n])
                rows["done"][:n] |= differ
                self._seed_disagreements += seed[differ].tolist()
            cls = rows["cls"][:n]
            objective = -self.lambda1 * self._confidence(logits, cls)
            for o in other:
                objective = objective + self._confidence(o, cls)
            if self.lambda2 > 0:
                objective = objective + self.lambda2 * _neuron_objective(ctx, acts, n)
            (grad,) = torch.autograd.grad(objective.sum(), x)
        live = (~rows["done"][:n]).nonzero().flatten()
        if live.numel() == 0:
            self._pending = live
            return seed[:0], seed[:0]
        new = self._apply(ctx, rows, live, grad[live].detach())
        rows["x"][live] = new
        rows["steps"][live] += 1
        self._pending = live
        return new, rows["seed"][live]

    def _apply(self, ctx: GenerationContext, rows: dict[str, Tensor], live: Tensor, grad: Tensor) -> Tensor:
        """The constrained gradient step of the rows ``live`` (projected into the threat set / domain)."""
        lo, hi = ctx.domain
        span = hi - lo
        step = self.step * span
        seed = rows["seed"][live]
        x = rows["x"][live]
        flat = grad.flatten(1)
        if self.transformation == "light":
            offset = rows["offset"][live] + step * flat.mean(dim=1).sign()
            offset = offset.clamp(-span, span)
            rows["offset"][live] = offset
            shape = (-1,) + (1,) * (x.dim() - 1)
            return ctx.project(ctx.seeds[seed] + offset.reshape(shape), seed)
        occl, black = self._sizes(ctx)
        if self.transformation == "occl":
            rms = flat.pow(2).mean(dim=1).sqrt().add(1e-5).reshape(-1, 1, 1, 1)
            mask = _rectangles(x, rows["pos"][live], occl)
            return ctx.project(x + step * (grad / rms) * mask, seed)
        pos = self._positions(ctx, live.numel(), black)
        mask = _rectangles(x, pos, black)
        patch_mean = (grad * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1)
        darken = (patch_mean < 0).reshape(-1, 1, 1, 1) & mask
        return ctx.project(torch.where(darken, torch.full_like(x, lo), x), seed)

    def accept(self, ctx: GenerationContext, candidates: Tensor, gain: Tensor, logits: Tensor) -> Tensor:
        n = candidates.shape[0]
        rows = self._rows
        live = self._pending[:n]
        origin = rows["seed"][live]
        pred = logits.argmax(dim=1)
        if self.others:
            with torch.no_grad(), self._others():
                other = self._other_logits(candidates)
            disagree = torch.stack([o.argmax(dim=1) != pred for o in other]).any(dim=0)
        else:
            disagree = pred != ctx.seed_labels[origin]
        keep = (gain > 0) | disagree
        index = ctx.tests.shape[0] + keep.long().cumsum(0) - 1
        found = disagree & keep
        self._disagreements += list(zip(index[found].tolist(), origin[found].tolist()))
        rows["x"][live] = candidates  # as the loop projected them
        rows["done"][live] |= disagree | (rows["steps"][live] >= self.iterations)
        return keep


def _rectangles(x: Tensor, pos: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean masks (N, 1, H, W) of one ``size`` rectangle per image with top-left corners ``pos`` (N, 2)."""
    h, w = x.shape[2], x.shape[3]
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    in_r = (r >= pos[:, :1]) & (r < pos[:, :1] + size[0])
    in_c = (c >= pos[:, 1:]) & (c < pos[:, 1:] + size[1])
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def _uncovered(metric: CoverageMetric) -> tuple[list[str], Tensor, Tensor]:
    """Every uncovered item as (layer index, item index); every item when all are covered (the code's rule)."""
    layers = list(metric.first)
    which, items = [], []
    for li, layer in enumerate(layers):
        flat = (metric.first[layer] < 0).nonzero().flatten()
        which.append(torch.full_like(flat, li))
        items.append(flat)
    layer_idx, item_idx = torch.cat(which), torch.cat(items)
    if layer_idx.numel() == 0:
        for li, layer in enumerate(layers):
            flat = torch.arange(metric.first[layer].numel(), device=metric.first[layer].device)
            which.append(torch.full_like(flat, li))
            items.append(flat)
        layer_idx, item_idx = torch.cat(which), torch.cat(items)
    return layers, layer_idx, item_idx


def _neuron_objective(ctx: GenerationContext, acts: dict[str, Tensor], n: int) -> Tensor:
    """The value of one uncovered item's neuron per row (n,), drawn at random per row, to be maximised.

    Neuron coverage: the neuron's activation as the criterion compares it with the threshold (scaled per layer in
    DeepXplore's convention). Other criteria with per-neuron requirements (:meth:`CoverageMetric.target`): the
    neuron's value moved towards the required interval; without them, the neuron's value.
    """
    metric = ctx.metric
    layers, layer_idx, item_idx = _uncovered(metric)
    pick = torch.randint(layer_idx.numel(), (n,), generator=ctx.generator).to(layer_idx.device)
    layer_idx, item_idx = layer_idx[pick], item_idx[pick]
    m = len(metric.item_names) if metric.item_names else 1
    values = metric.values({k: acts[k] for k in layers})
    out = next(iter(values.values())).new_zeros(n)
    for li, layer in enumerate(layers):
        sel = (layer_idx == li).nonzero().flatten()
        if sel.numel() == 0:
            continue
        v = values[layer][sel.to(values[layer].device)]
        if isinstance(metric, NeuronCoverage):
            v = metric.activation(v)
        neuron = (item_idx[sel] // m).to(v.device)
        value = v.gather(1, neuron[:, None]).squeeze(1)
        out = out.index_put((sel.to(out.device),), _towards(metric, layer, item_idx[sel], value))
    return out


def _towards(metric: CoverageMetric, layer: str, items: Tensor, value: Tensor) -> Tensor:
    if isinstance(metric, NeuronCoverage):
        return value
    sign, mid = [], []
    for item in items.tolist():
        try:
            t = metric.target(layer, int(item))
        except InputError:
            sign.append(1.0)
            mid.append(float("nan"))
            continue
        if t.upper == float("inf"):
            sign.append(1.0)
            mid.append(float("nan"))
        elif t.lower == float("-inf"):
            sign.append(-1.0)
            mid.append(float("nan"))
        else:
            sign.append(0.0)
            mid.append((t.lower + t.upper) / 2)
    s = torch.tensor(sign, dtype=value.dtype, device=value.device)
    c = torch.tensor(mid, dtype=value.dtype, device=value.device)
    # an interval requirement: move towards its middle; one-sided: move beyond the bound
    return torch.where(s == 0, -(value - c.nan_to_num()).abs(), s * value)

"""Coverage-guided fuzzing of neural networks: TensorFuzz (Odena, Olsson, Andersen & Goodfellow, "TensorFuzz:
Debugging Neural Networks with Coverage-Guided Fuzzing", ICML 2019) and DeepHunter (Xie, Ma, Juefei-Xu, Xue, Chen,
Liu, Zhao, Li, Yin & See, "DeepHunter: A Coverage-Guided Fuzz Testing Framework for Deep Neural Networks",
ISSTA 2019).

The fuzzer keeps a *corpus*: the seeds and every test kept so far. Each iteration it

1. selects ``parents`` corpus entries (``selection``, below);
2. derives ``mutants`` mutants from each by one random mutation, drawn again (up to ``tries`` times, DeepHunter's
   ``try_num = 50``) while the mutant breaks DeepHunter's conservative constraint;
3. hands them to the loop, which runs the model once on them; those that cover a new item are kept and join the
   corpus (the default :meth:`~bastion.testing.generate.base.TestGenerator.accept`).

**Mutations** (``mutations``):

* ``"threat"`` (with a threat set only; TensorFuzz's mutation): the parent plus a uniformly random point of the
  threat set around the origin seed minus that seed (``threat.random_start``), projected back onto the threat set
  around the origin seed (TensorFuzz adds Gaussian noise and clips the accumulated change to an l∞ ball around the
  oldest ancestor; the threat model's own sampler replaces the noise, so any norm works).
* pixel-value transformations (DeepHunter): ``"contrast"`` ``lo + a·(x − lo)``, ``a`` uniform in ``contrast``
  (code: 0.5 to 1.2); ``"brightness"`` ``x + b``, ``|b| <= brightness`` of the domain's width (code: 20 grey
  levels, 20/255); ``"noise"`` additive Gaussian noise of standard deviation uniform in (0, ``noise``] of the width
  (TensorFuzz's σ = 0.2 on [−1, 1], i.e. 0.1).
* affine transformations (DeepHunter; images only, with ``torch.nn.functional.grid_sample``, bilinear, pixels
  from outside the image are the domain's low end as in cv2's constant border): ``"translate"`` by up to
  ``translate`` of each side (code: 3 pixels of 28), ``"scale"`` by a factor in ``scale`` (code: 0.7 to 1.1),
  ``"rotate"`` by up to ``rotate`` degrees (15 here, a small amount; the code samples ±50).

The paper's classes are followed (contrast and brightness are pixel-value transformations; the authors' code files
them with the affine ones). Blur, shear and random pixel changes are not offered.

**DeepHunter's constraint** (its Equations 1 and 2, the code's ``mutate_one``): a pixel-value mutant ``s'`` of a
corpus entry whose *reference image* is ``r`` is valid when ``L0(r, s') < alpha · size`` **or**
``L∞(r, s') < beta · width`` (α = 0.02, β = 0.2). The reference is the origin seed until an affine transformation
is applied; an entry may take only one affine transformation in its history, which transforms its reference the
same way, and later pixel changes are then measured from the transformed reference plus the change the entry had
accumulated before it (Equation 2). Affine and threat mutations are not checked (the code does not check affine
ones; the threat set is its own constraint). A pixel counts as changed when it moves by at least half a grey level
(0.5/255 of the width), as on DeepHunter's 8-bit images. With a threat set every mutant is also projected onto it.

**Seed selection** (``selection``):

* ``"deephunter"`` (DeepHunter's *probability-based* batch prioritisation, its Equation 3): an entry fuzzed
  ``f`` times is selected with probability ``1 − f/γ`` while ``f < (1 − p_min)·γ``, else ``p_min``; as in the code,
  the corpus is scanned round-robin from where the last selection stopped and each entry is taken with its
  probability (the code's constants γ = 5, p_min = 0.3).
* ``"uniform"``: uniformly at random (TensorFuzz's ``uniform_sample_function``).
* ``"tensorfuzz"``: uniformly among the five most recent entries plus one uniformly random entry (TensorFuzz's
  ``recent_sample_function``).

**Failures.** A mutant whose prediction differs from its seed's label (inside the threat set when one is given) is
a failed test. Failures are counted (:attr:`Fuzzer.failures`, :attr:`Fuzzer.failed_seeds`); the loop marks the
kept ones as adversarial in the suite and the store. ``keep_failures=True`` also keeps failures that raise no
coverage (DeepHunter saves every failure to its crash directory). Failures are never fuzzed further (DeepHunter
keeps crashes out of its queue).

**Queries.** The fuzzer queries the model only through the loop's evaluation of its mutants (the constraint checks
need no model), and proposes at most ``queries_left`` mutants, so a run never exceeds its query budget. A run also
ends when 100 iterations in a row yield no valid mutant (possible only with very tight constraints), so that a
budget without an iteration limit cannot loop for ever.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bastion.errors import InputError
from bastion.testing.generate.base import GenerationContext, TestGenerator

__all__ = ["AFFINE_MUTATIONS", "MUTATIONS", "PIXEL_MUTATIONS", "SELECTIONS", "Fuzzer"]

PIXEL_MUTATIONS = ("contrast", "brightness", "noise")
AFFINE_MUTATIONS = ("translate", "scale", "rotate")
MUTATIONS = ("threat", *PIXEL_MUTATIONS, *AFFINE_MUTATIONS)
SELECTIONS = ("deephunter", "uniform", "tensorfuzz")
_RECENT = 5  # TensorFuzz's reservoir of recent entries
_GREY_LEVEL = 0.5 / 255  # the smallest change that counts, as a fraction of the domain's width
_GIVE_UP = 100  # iterations in a row without one valid mutant after which the corpus is taken as exhausted


def _number(value: Any, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (open_lo and value == lo):
        raise InputError(f"{name} must lie in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def _range(value: Any, name: str, lo: float, hi: float) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"{name} must be a pair (low, high), got {value!r}")
    a, b = (_number(v, name, lo, hi) for v in value)
    if a > b:
        raise InputError(f"{name} must be a pair (low, high) with low <= high, got {value!r}")
    return a, b


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Fuzzer(TestGenerator):
    """Coverage-guided fuzzing with TensorFuzz's and DeepHunter's mutations and seed selection (module docstring).

    Args:
        parents: corpus entries selected per iteration.
        mutants: mutants per selected entry (DeepHunter's ``batch_num``: 20).
        selection: ``"deephunter"``, ``"uniform"`` or ``"tensorfuzz"``.
        gamma, p_min: DeepHunter's γ and p_min of the selection probability (code: 5 and 0.3).
        mutations: names from :data:`MUTATIONS`; None: every pixel-value and (for images) affine transformation,
            plus ``"threat"`` when the run has a threat set.
        alpha, beta: DeepHunter's bounds on the changed fraction of pixels and on the largest change (0.02, 0.2).
        tries: attempts at a valid mutant before giving it up (DeepHunter's ``try_num``: 50).
        contrast: range of the contrast factor (0.5, 1.2).
        brightness: largest brightness shift, a fraction of the domain's width (20/255).
        noise: largest standard deviation of the Gaussian noise, a fraction of the width (0.1).
        translate: largest translation, a fraction of each side (3/28).
        scale: range of the scaling factor (0.7, 1.1).
        rotate: largest rotation in degrees (15).
        keep_failures: also keep failed tests that raise no coverage.
    """

    name = "fuzz"
    paper = (
        "Odena et al., TensorFuzz: Debugging Neural Networks with Coverage-Guided Fuzzing, ICML 2019; Xie et al., "
        "DeepHunter: A Coverage-Guided Fuzz Testing Framework for Deep Neural Networks, ISSTA 2019"
    )

    def __init__(
        self,
        *,
        parents: int = 4,
        mutants: int = 20,
        selection: str = "deephunter",
        gamma: float = 5.0,
        p_min: float = 0.3,
        mutations: Sequence[str] | str | None = None,
        alpha: float = 0.02,
        beta: float = 0.2,
        tries: int = 50,
        contrast: tuple[float, float] = (0.5, 1.2),
        brightness: float = 20 / 255,
        noise: float = 0.1,
        translate: float = 3 / 28,
        scale: tuple[float, float] = (0.7, 1.1),
        rotate: float = 15.0,
        keep_failures: bool = False,
    ) -> None:
        if selection not in SELECTIONS:
            raise InputError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if isinstance(mutations, str):
            mutations = [s.strip() for s in mutations.split(",") if s.strip()]
        if mutations is not None:
            mutations = tuple(dict.fromkeys(mutations))
            unknown = [m for m in mutations if m not in MUTATIONS]
            if unknown or not mutations:
                raise InputError(
                    f"unknown mutation(s) {', '.join(map(repr, unknown))}; choose from {', '.join(MUTATIONS)}"
                    if unknown
                    else f"mutations is empty: name at least one of {', '.join(MUTATIONS)}, or pass None"
                )
        self.parents = _count(parents, "parents")
        self.mutants = _count(mutants, "mutants")
        self.selection = selection
        self.gamma = _number(gamma, "gamma", 0.0, math.inf, open_lo=True)
        self.p_min = _number(p_min, "p_min", 0.0, 1.0, open_lo=True)
        self.mutations = mutations
        self.alpha = _number(alpha, "alpha", 0.0, 1.0)
        self.beta = _number(beta, "beta", 0.0, 1.0)
        self.tries = _count(tries, "tries")
        self.contrast = _range(contrast, "contrast", 0.0, math.inf)
        self.brightness = _number(brightness, "brightness", 0.0, 1.0)
        self.noise = _number(noise, "noise", 0.0, math.inf)
        self.translate = _number(translate, "translate", 0.0, 1.0)
        self.scale = _range(scale, "scale", 1e-3, math.inf)
        self.rotate = _number(rotate, "rotate", 0.0, 180.0)
        if not isinstance(keep_failures, bool):
            raise InputError(f"keep_failures must be True or False, got {keep_failures!r}")
        self.keep_failures = keep_failures
        self._reset()

    # -- reports -----------------------------------------------------------------------------------------------------
    @property
    def failures(self) -> int:
        """Mutants run so far whose prediction differed from their seed's label (kept or not)."""
        return self._failures

    @property
    def failed_seeds(self) -> list[int]:
        """Seeds from which at least one failed test was derived, in order of first failure."""
        return list(self._failed_seeds)

    # -- state -------------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        # one entry per corpus element: the seeds, then the kept tests in the loop's order
        self._corpus: dict[str, Tensor] = {}
        self._refs: Tensor | None = None  # reference images of the kept tests (M, ...)
        self._pointer = 0
        self._failures = 0
        self._failed_seeds: list[int] = []
        self._empty = 0  # iterations in a row without a valid mutant
        self._pending: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "corpus": {k: v.cpu() for k, v in self._corpus.items()},
            "refs": None if self._refs is None else self._refs.cpu(),
            "pointer": self._pointer,
            "failures": self._failures,
            "failed_seeds": list(self._failed_seeds),
            "empty": self._empty,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self._corpus = dict(state["corpus"])
        self._refs = state["refs"]
        self._pointer = int(state["pointer"])
        self._failures = int(state["failures"])
        self._failed_seeds = [int(s) for s in state["failed_seeds"]]
        self._empty = int(state["empty"])

    def _start(self, ctx: GenerationContext) -> None:
        s, device = ctx.seeds.shape[0], ctx.seeds.device
        self._corpus = {
            "fuzzed": torch.zeros(s, dtype=torch.long, device=device),
            "affine": torch.zeros(s, dtype=torch.bool, device=device),
            "l0": torch.zeros(s, dtype=torch.long, device=device),
            "linf": torch.zeros(s, dtype=ctx.seeds.dtype, device=device),
            "fuzzable": torch.ones(s, dtype=torch.bool, device=device),
        }
        self._refs = ctx.seeds.new_zeros((0, *ctx.seeds.shape[1:]))

    def _mutations(self, ctx: GenerationContext) -> tuple[str, ...]:
        image = ctx.seeds.dim() == 4
        if self.mutations is None:
            chosen = (("threat",) if ctx.threat is not None else ()) + PIXEL_MUTATIONS
            return chosen + (AFFINE_MUTATIONS if image else ())
        if "threat" in self.mutations and ctx.threat is None:
            raise InputError("the 'threat' mutation needs a threat set: pass threat=... or drop it from mutations")
        affine = [m for m in self.mutations if m in AFFINE_MUTATIONS]
        if affine and not image:
            raise InputError(
                f"the affine mutation(s) {', '.join(affine)} need images (N, C, H, W), got seeds of shape "
                f"{tuple(ctx.seeds.shape)}"
            )
        return self.mutations

    # -- seed selection ----------------------------------------------------------------------------------------------
    def _select(self, ctx: GenerationContext, k: int) -> Tensor | None:
        """``k`` corpus entries to mutate (with repetition), or None when none can be fuzzed."""
        fuzzable = self._corpus["fuzzable"].cpu()
        pool = fuzzable.nonzero().flatten()
        if pool.numel() == 0:
            return None
        gen = ctx.generator
        if self.selection == "uniform":
            picks = pool[torch.randint(pool.numel(), (k,), generator=gen)]
        elif self.selection == "tensorfuzz":
            recent = pool[-_RECENT:]
            reservoir = torch.cat(
                [recent[None].expand(k, -1), pool[torch.randint(pool.numel(), (k, 1), generator=gen)]], 1
            )
            picks = reservoir[torch.arange(k), torch.randint(reservoir.shape[1], (k,), generator=gen)]
        else:
            f = self._corpus["fuzzed"].cpu().double()
            prob = torch.where(f < (1 - self.p_min) * self.gamma, 1 - f / self.gamma, torch.full_like(f, self.p_min))
            prob = torch.where(fuzzable, prob, torch.zeros_like(prob))
            e = prob.shape[0]
            chosen: list[Tensor] = []
            need = k
            while need > 0:  # round-robin scan from the pointer, each entry taken with its probability
                order = (self._pointer + torch.arange(e)) % e
                taken = order[torch.rand(e, generator=gen, dtype=torch.float64) < prob[order]][:need]
                if taken.numel():
                    chosen.append(taken)
                    need -= taken.numel()
                    self._pointer = int(taken[-1] + 1) % e if need == 0 else self._pointer
            picks = torch.cat(chosen)
        self._corpus["fuzzed"].index_add_(
            0, picks.to(self._corpus["fuzzed"].device), torch.ones_like(picks, device=self._corpus["fuzzed"].device)
        )
        return picks

    # -- mutations ---------------------------------------------------------------------------------------------------
    def _uniform(self, ctx: GenerationContext, n: int, lo: float, hi: float, like: Tensor) -> Tensor:
        u = torch.rand(n, generator=ctx.generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(dtype=like.dtype, device=like.device)

    def _theta(self, ctx: GenerationContext, op: str, x: Tensor) -> Tensor:
        """Affine matrices (n, 2, 3) in ``affine_grid``'s normalised coordinates (output -> input mapping)."""
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        theta = x.new_zeros(n, 2, 3)
        if op == "translate":
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = 2 * self._uniform(ctx, n, -self.translate, self.translate, x)
            theta[:, 1, 2] = 2 * self._uniform(ctx, n, -self.translate, self.translate, x)
        elif op == "scale":
            s = self._uniform(ctx, n, *self.scale, x)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
        else:
            a = torch.deg2rad(self._uniform(ctx, n, -self.rotate, self.rotate, x))
            # a rotation in pixel units, written in coordinates normalised per axis (non-square images)
            theta[:, 0, 0] = theta[:, 1, 1] = a.cos()
            theta[:, 0, 1] = -a.sin() * h / w
            theta[:, 1, 0] = a.sin() * w / h
        return theta

    def _warp(self, x: Tensor, theta: Tensor, lo: float) -> Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return lo + F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _mutate(self, ctx: GenerationContext, op: str, x: Tensor, ref: Tensor, origin: Tensor) -> tuple[Tensor, Tensor]:
        """One mutation ``op`` of every row of ``x``: (mutants, new references)."""
        lo, hi = ctx.domain
        span = hi - lo
        n = x.shape[0]
        shape = (n,) + (1,) * (x.dim() - 1)
        if op == "threat":
            assert ctx.threat is not None
            x0 = ctx.seeds[origin]
            start = ctx.threat.random_start(x0.cpu(), generator=ctx.generator).to(x0.device)
            return ctx.threat.project(x + (start - x0), x0), ref
        if op == "contrast":
            return lo + self._uniform(ctx, n, *self.contrast, x).reshape(shape) * (x - lo), ref
        if op == "brightness":
            return x + span * self._uniform(ctx, n, -self.brightness, self.brightness, x).reshape(shape), ref
        if op == "noise":
            sigma = span * self.noise * (1 - self._uniform(ctx, n, 0.0, 1.0, x))  # in (0, noise]
            z = torch.randn(x.shape, generator=ctx.generator).to(dtype=x.dtype, device=x.device)
            return x + sigma.reshape(shape) * z, ref
        theta = self._theta(ctx, op, x)
        return self._warp(x, theta, lo), self._warp(ref, theta, lo)

    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        if ctx.iteration == 0:
            self._reset()  # a fresh run (a resumed one starts at iteration >= 1 with its state loaded)
            self._start(ctx)
        device = ctx.seeds.device
        self._corpus = {k: v.to(device) for k, v in self._corpus.items()}
        assert self._refs is not None
        self._refs = self._refs.to(device)
        n_seeds = ctx.seeds.shape[0]
        if self._corpus["fuzzed"].shape[0] != n_seeds + ctx.tests.shape[0]:
            raise InputError("the fuzzer's corpus does not match the run's tests: its state belongs to another run")
        ops = self._mutations(ctx)
        total = self.parents * self.mutants
        if ctx.queries_left is not None:
            total = min(total, ctx.queries_left)
        if total <= 0:
            return None
        picks = self._select(ctx, math.ceil(total / self.mutants))
        if picks is None:
            return None
        entry = picks.repeat_interleave(self.mutants)[:total].to(device)
        is_seed = entry < n_seeds
        test_idx = (entry - n_seeds).clamp(min=0)
        origin = entry.clone()
        if not bool(is_seed.all()):
            origin[~is_seed] = ctx.origins[test_idx[~is_seed]]
        parent, parent_ref = ctx.seeds[origin].clone(), ctx.seeds[origin].clone()
        if not bool(is_seed.all()):
            rows = (~is_seed).nonzero().flatten()
            parent[rows], parent_ref[rows] = ctx.tests[test_idx[rows]], self._refs[test_idx[rows]]
        c = self._corpus
        affine, l0_prev, linf_prev = c["affine"][entry], c["l0"][entry], c["linf"][entry]
        affine_op = torch.tensor([m in AFFINE_MUTATIONS for m in ops], device=device)
        checked_op = torch.tensor([m in PIXEL_MUTATIONS for m in ops], device=device)
        out, ref = parent.clone(), parent_ref.clone()
        l0_new, linf_new = l0_prev.clone(), linf_prev.clone()
        valid = torch.zeros(total, dtype=torch.bool, device=device)
        lo, hi = ctx.domain
        size = parent[0].numel()
        for _ in range(self.tries):
            todo = (~valid).nonzero().flatten()
            if todo.numel() == 0:
                break
            # an entry that took an affine transformation may take no other (DeepHunter)
            allowed = ~(affine[todo, None] & affine_op[None, :])
            possible = allowed.any(dim=1)
            todo, allowed = todo[possible], allowed[possible]
            if todo.numel() == 0:
                break
            choice = torch.multinomial(allowed.cpu().double(), 1, generator=ctx.generator).flatten().to(device)
            for k, op in enumerate(ops):
                rows = todo[choice == k]
                if rows.numel() == 0:
                    continue
                new, new_ref = self._mutate(ctx, op, parent[rows], parent_ref[rows], origin[rows])
                new = ctx.project(new, origin[rows])
                ok = torch.ones(rows.numel(), dtype=torch.bool, device=device)
                l0, linf = l0_prev[rows], linf_prev[rows]
                after = affine[rows]
                if not bool(affine_op[k]):
                    d = (new - parent_ref[rows]).flatten(1).abs()
                    l0_ref = (d >= _GREY_LEVEL * (hi - lo)).sum(dim=1)
                    linf_ref = d.amax(dim=1)
                    if bool(checked_op[k]):
                        # Equation 2: after the affine step, add the change the entry had made before it
                        l0_all = torch.where(after, l0_ref + l0, l0_ref)
                        linf_all = torch.where(after, torch.maximum(linf_ref, linf), linf_ref)
                        ok = (l0_all < self.alpha * size) | (linf_all < self.beta * (hi - lo))
                    # the change from the reference, kept until an affine step; afterwards inherited (the code)
                    l0 = torch.where(after, l0, l0_ref)
                    linf = torch.where(after, linf, linf_ref)
                rows, new, new_ref, l0, linf = rows[ok], new[ok], new_ref[ok], l0[ok], linf[ok]
                out[rows], ref[rows], l0_new[rows], linf_new[rows] = new, new_ref, l0, linf
                valid[rows] = True
                if affine_op[k]:
                    affine[rows] = True  # the mutant has now taken its affine transformation
        keep = valid.nonzero().flatten()
        self._empty = 0 if keep.numel() else self._empty + 1
        if self._empty >= _GIVE_UP:
            return None  # no budget without an iteration limit is spent on a corpus that yields nothing valid
        self._pending = {
            "ref": ref[keep],
            "affine": affine[keep],
            "l0": l0_new[keep],
            "linf": linf_new[keep],
            "origin": origin[keep],
        }
        return out[keep], origin[keep]

    def accept(self, ctx: GenerationContext, candidates: Tensor, gain: Tensor, logits: Tensor) -> Tensor:
        n = candidates.shape[0]
        p = {k: v[:n] for k, v in self._pending.items()}
        origin = p["origin"]
        failed = logits.argmax(dim=1) != ctx.seed_labels[origin]
        if ctx.threat is not None:
            failed &= ctx.threat.contains(candidates, ctx.seeds[origin])
        self._failures += int(failed.sum())
        known = set(self._failed_seeds)
        for s in origin[failed].tolist():
            if s not in known:
                known.add(s)
                self._failed_seeds.append(s)
        keep = gain > 0
        if self.keep_failures:
            keep = keep | failed
        c = self._corpus
        k = keep.nonzero().flatten()
        c["fuzzed"] = torch.cat([c["fuzzed"], torch.zeros_like(k)])
        c["affine"] = torch.cat([c["affine"], p["affine"][k]])
        c["l0"] = torch.cat([c["l0"], p["l0"][k]])
        c["linf"] = torch.cat([c["linf"], p["linf"][k]])
        c["fuzzable"] = torch.cat([c["fuzzable"], ~failed[k]])
        assert self._refs is not None
        self._refs = torch.cat([self._refs, p["ref"][k]])
        self._pending = {}
        return keep

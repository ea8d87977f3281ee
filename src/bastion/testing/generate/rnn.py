"""testRNN's mutation-based test generation for recurrent networks (Huang et al., IEEE Trans. Reliability 2021).

Huang, Sun, Zhao, Sharp, Ruan, Meng & Huang, "Coverage-Guided Testing for Recurrent Neural Networks", IEEE
Transactions on Reliability 2021 (arXiv 1911.01952); reference code github.com/TrustAI/testRNN
(``mnistTestSuite_adv_test.py``, ``testCaseGeneration.py``).

Every iteration mutates ``batch`` parents, taken in turn from the seeds (testRNN's ``np.repeat(X_seeds, r_t)``: an
equal share each), by Gaussian noise of a variance drawn uniformly from ``variance`` (testRNN's MNIST mutation:
``var ~ U(0.005, 0.02)``, ``noise ~ N(0, var)``), on every time step or, with ``time_steps=k``, on ``k`` random
time steps of each candidate; the candidates are clipped into the threat set around their seed (or the input
domain) and the loop keeps those that cover a new item of the criterion.

``mode="genetic"`` adds testRNN's coverage boosting (``getNextInputByGA``) every iteration: an uncovered item of the
criterion is drawn at random, the test closest to it (the criterion's :meth:`distance`, testRNN's fitness) among a
sample of seeds and tests starts a population; each of ``generations`` rounds mutates every member ``offspring``
times and keeps the ``parents`` fittest (testRNN: 4 parents, 10 generations, 1000 mutants each), stopping once the
item is covered; the fittest is proposed with the batch. It needs one of the testRNN criteria (``lstm-boundary``,
``lstm-step``, ``lstm-temporal``), whose items state a distance.

Time steps: axis 1 of ``(N, T, F)`` sequences, axis 2 (the rows, as the zoo's ``lstm`` reads them) of ``(N, C, H,
W)`` images; ``time_axis`` sets another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.testing.generate.base import GenerationContext, TestGenerator

__all__ = ["RNNMutation"]

MODES = ("random", "genetic")


class RNNMutation(TestGenerator):
    """Gaussian mutation of seed sequences, kept when they raise coverage; optional genetic boosting (testRNN).

    Args:
        batch: candidates per iteration (testRNN: 1000, shared equally among the seeds).
        variance: ``(low, high)``: each candidate's noise variance is drawn uniformly from it (testRNN's MNIST
            mutation: ``(0.005, 0.02)``, on pixels in [0, 1]).
        time_steps: mutate only this many random time steps per candidate; None: every step (testRNN's MNIST).
        time_axis: the time axis of the inputs (default: 1 for ``(N, T, F)``, 2 for ``(N, C, H, W)``).
        from_tests: draw parents from the seeds and the kept tests, not only the seeds (testRNN: seeds only).
        mode: ``"random"`` (testRNN's default) or ``"genetic"`` (module docstring).
        generations: rounds of the genetic search (testRNN: 10).
        parents: members kept per round (testRNN's ``num_parents_mating``: 4).
        offspring: mutants per member and round, and size of the starting sample (testRNN: 1000).
    """

    name = "rnn-mutation"
    paper = (
        "Huang et al., Coverage-Guided Testing for Recurrent Neural Networks, IEEE Transactions on Reliability 2021 "
        "(testRNN)"
    )

    def __init__(
        self,
        *,
        batch: int = 1000,
        variance: Sequence[float] = (0.005, 0.02),
        time_steps: int | None = None,
        time_axis: int | None = None,
        from_tests: bool = False,
        mode: str = "random",
        generations: int = 10,
        parents: int = 4,
        offspring: int = 1000,
    ) -> None:
        for key, value in (("batch", batch), ("generations", generations), ("parents", parents),
                           ("offspring", offspring)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be an integer >= 1, got {value!r}")
        try:
            low, high = (float(v) for v in variance)
        except (TypeError, ValueError):
            raise InputError(f"variance must be a pair (low, high) of numbers, got {variance!r}") from None
        if not 0.0 <= low <= high:
            raise InputError(f"variance (low, high) needs 0 <= low <= high, got {variance!r}")
        if time_steps is not None and (isinstance(time_steps, bool) or not isinstance(time_steps, int)
                                       or time_steps < 1):  # fmt: skip
            raise InputError(f"time_steps must be an integer >= 1 or None (every step), got {time_steps!r}")
        if time_axis is not None and (isinstance(time_axis, bool) or not isinstance(time_axis, int) or time_axis < 1):
            raise InputError(f"time_axis must be an axis >= 1 of the batch (0 is the batch axis), got {time_axis!r}")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.batch = batch
        self.variance = (low, high)
        self.time_steps = time_steps
        self.time_axis = time_axis
        self.from_tests = bool(from_tests)
        self.mode = mode
        self.generations = generations
        self.parents = parents
        self.offspring = offspring

    # -- mutation ----------------------------------------------------------------------------------------------
    def _axis(self, x: Tensor) -> int:
        axis = self.time_axis if self.time_axis is not None else {3: 1, 4: 2}.get(x.dim())
        if axis is None:
            raise InputError(f"inputs of shape {tuple(x.shape[1:])} have no default time axis: give time_axis")
        if axis >= x.dim():
            raise InputError(f"time_axis {axis} is not an axis of the inputs of shape {tuple(x.shape)}")
        return axis

    def mutate(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` plus Gaussian noise, a variance from ``variance`` per row, on all or ``time_steps`` random steps."""
        b = x.shape[0]
        low, high = self.variance
        var = low + (high - low) * torch.rand(b, generator=generator)
        noise = torch.randn(x.shape, generator=generator) * var.sqrt().view(b, *([1] * (x.dim() - 1)))
        if self.time_steps is not None:
            axis = self._axis(x)
            steps = x.shape[axis]
            chosen = torch.rand(b, steps, generator=generator).argsort(dim=1)[:, : min(self.time_steps, steps)]
            mask = torch.zeros(b, steps).scatter_(1, chosen, 1.0)
            noise = noise * mask.view(b, *[steps if d == axis else 1 for d in range(1, x.dim())])
        return x + noise.to(device=x.device, dtype=x.dtype)

    def _pool(self, ctx: GenerationContext) -> tuple[Tensor, Tensor]:
        origins = torch.arange(ctx.seeds.shape[0], device=ctx.seeds.device)
        if self.from_tests and ctx.tests.shape[0]:
            return torch.cat([ctx.seeds, ctx.tests]), torch.cat([origins, ctx.origins.to(origins.device)])
        return ctx.seeds, origins

    # -- the loop's interface ------------------------------------------------------------------------------------
    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        pool, pool_origin = self._pool(ctx)
        n = self.batch if ctx.queries_left is None else min(self.batch, ctx.queries_left)
        if n < 1:
            return None
        # parents in turn, continuing where the last iteration stopped: every seed gets an equal share
        pick = (ctx.iteration * self.batch + torch.arange(n, device=pool.device)) % pool.shape[0]
        origin = pool_origin[pick]
        cand = ctx.project(self.mutate(pool[pick], ctx.generator), origin)
        if self.mode == "genetic":
            spare = None if ctx.queries_left is None else ctx.queries_left - n - 1
            boosted = self._genetic(ctx, pool, pool_origin, spare)
            if boosted is not None:
                cand, origin = torch.cat([cand, boosted[0]]), torch.cat([origin, boosted[1]])
        return cand, origin

    def _genetic(
        self, ctx: GenerationContext, pool: Tensor, pool_origin: Tensor, spare: int | None
    ) -> tuple[Tensor, Tensor] | None:
        """testRNN's ``getNextInputByGA`` towards one random uncovered item; None without one or without queries."""
        metric: Any = ctx.metric
        if not callable(getattr(metric, "distance", None)) or not callable(getattr(metric, "values", None)):
            raise InputError(f"mode='genetic' needs a criterion whose items state a distance (lstm-boundary, "
                             f"lstm-step, lstm-temporal), not {metric.name!r}; use mode='random'")  # fmt: skip
        open_items = [
            (layer, i) for layer, first in metric.first.items() for i in (first < 0).nonzero().flatten().tolist()
        ]
        if not open_items:
            return None
        layer, item = open_items[int(torch.randint(len(open_items), (1,), generator=ctx.generator))]

        def fitness(x: Tensor) -> Tensor:
            with torch.no_grad():
                _, acts = ctx.probe(x)
                return metric.distance(metric.values(acts), layer, item)

        def affordable(k: int) -> bool:
            nonlocal spare
            if spare is not None and spare < k:
                return False
            spare = None if spare is None else spare - k
            return True

        k = min(self.offspring, pool.shape[0])
        if not affordable(k):
            return None
        sample = torch.randperm(pool.shape[0], generator=ctx.generator)[:k].to(pool.device)
        start_d = fitness(pool[sample])
        best = int(start_d.argmin())
        population, origins, dist = pool[sample[best]][None], pool_origin[sample[best]][None], start_d[best][None]
        for _ in range(self.generations):
            if float(dist.min()) <= 0:
                break
            size = population.shape[0] * self.offspring
            if not affordable(size):
                break
            parent = torch.arange(population.shape[0], device=pool.device).repeat_interleave(self.offspring)
            children = ctx.project(self.mutate(population[parent], ctx.generator), origins[parent])
            child_d = fitness(children)
            population = torch.cat([population, children])
            origins = torch.cat([origins, origins[parent]])
            dist = torch.cat([dist, child_d])
            keep = dist.argsort()[: self.parents]
            population, origins, dist = population[keep], origins[keep], dist[keep]
        top = int(dist.argmin())
        return population[top : top + 1], origins[top : top + 1]

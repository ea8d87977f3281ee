"""SimBA and SimBA-DCT: simple black-box attacks by greedy steps along orthonormal directions (score-based).

Guo, Gardner, You, Wilson & Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019.

SimBA draws directions ``q`` one at a time from an orthonormal basis, without replacement, and tries ``x - ε q``:
if the probability of the true class drops (untargeted) or that of the target rises (targeted), the step is taken;
otherwise it tries ``x + ε q`` and takes that if it improves. The second query is skipped when the first one
improved, so a direction costs one or two queries. Two bases:

* **SimBA** (pixel): the standard basis, in a uniformly random order.
* **SimBA-DCT**: the orthonormal 2-D discrete cosine basis of each channel (DCT-II, ``norm="ortho"``, over the
  whole image as in the reference code), low frequencies first: the ``freq_dims × freq_dims`` lowest frequencies of
  every channel in random order, then rings of ``stride`` more rows and columns of frequencies, each in random order
  (the reference's "strided" block order). The reference's settings for 224 × 224 inputs are ``freq_dims = 28``,
  ``stride = 7`` and for 299 × 299 ``38`` and ``9``: the defaults here are ``ceil(H / 8)`` and ``max(H // 32, 1)``,
  which give exactly those.

The step is ``ε = 0.2`` (the paper's), the l2 length of every step since the directions have unit norm. Under a
threat model each proposal is projected onto the ball ∩ domain (the reference only clips to the domain; its l∞
variant clips the perturbation), so the search stays inside the threat set.

Query accounting (exact, per sample): one query per direction tried, two when the first does not improve; the
success check comes from the same answers, so no query is spent on it (the reference also evaluates the current
point once per iteration without counting it). A proposal that projection maps back onto the current point is not
queried at all (it cannot improve). Deviations: every sample gets its own random order (the reference shares one
order across the batch), and when all directions have been tried and budget is left, a new pass starts with a fresh
order from the improved point; a pass that improves nothing ends the sample's search (every step from that point is
known not to help).
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel


def dct_matrix(size: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (size × size): row ``u`` is the ``u``-th cosine, ``D @ D.T = I``.

    ``D[u, i] = a_u cos(π (2 i + 1) u / (2 size))`` with ``a_0 = sqrt(1 / size)`` and ``a_u = sqrt(2 / size)``.
    """
    i = torch.arange(size, device=device, dtype=torch.float64)
    u = i[:, None]
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * u / (2 * size)) * math.sqrt(2.0 / size)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def strided_rank(h: int, w: int, freq_dims: int, stride: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Stage of every frequency ``(u, v)`` (h, w) in the strided order: 0 inside the low block, then one per ring."""
    u = torch.arange(h, device=device)[:, None].expand(h, w)
    v = torch.arange(w, device=device)[None, :].expand(h, w)
    outside = torch.maximum(u - freq_dims, v - freq_dims)  # < 0 inside the low-frequency block
    return torch.where(outside < 0, torch.zeros_like(outside), 1 + outside.div(stride, rounding_mode="floor"))


class SimBA(Attack):
    """SimBA (Guo, Gardner, You, Wilson & Weinberger, ICML 2019) in the pixel basis; score-based.

    Greedy ``±ε`` steps along random standard-basis directions, each kept when it lowers the probability of the true
    class (untargeted) or raises that of the target (targeted); see the module docstring. Samples stop as soon as a
    queried point is adversarial. Works on any input shape; l2 (the paper's setting) and l∞ threat models.

    Args:
        queries: query budget per sample (the paper's ImageNet runs: 10 000 untargeted, 30 000 targeted).
        step_size: ``ε``, the length of one step (0.2 as in the paper).
    """

    name = "simba"
    norms = ("l2", "linf")
    access = "score"
    budgeted = True
    paper = "Guo, Gardner, You, Wilson & Weinberger, Simple Black-box Adversarial Attacks, ICML 2019"

    def __init__(self, *, queries: int = 10000, step_size: float = 0.2) -> None:
        self.queries = positive_int("queries", queries)
        self.step_size = positive_float("step_size", step_size)

    # ----------------------------------------------------------------------------------------------- basis
    def _order(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample order (n, D) in which the basis directions are tried."""
        keys = torch.rand((x.shape[0], x[0].numel()), generator=generator, device=x.device)
        return keys.argsort(dim=1)

    def _direction(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Unit basis directions (k, ...) for the basis indices ``index`` (k,), in the shape of ``x`` (k, ...)."""
        flat = torch.zeros((index.shape[0], x[0].numel()), device=x.device, dtype=x.dtype)
        flat[torch.arange(index.shape[0], device=x.device), index] = 1.0
        return flat.reshape(index.shape[0], *x.shape[1:])

    # ----------------------------------------------------------------------------------------------- search
    def _objective(self, scores: torch.Tensor, criterion: Criterion) -> torch.Tensor:
        """What SimBA maximises: minus the true class's probability, or the target's probability.

        Compared as log-probabilities: a monotone transform, so every decision is the paper's, but one that does not
        saturate when a probability rounds to 1 (where every proposal would look equally good).
        """
        logp = scores.log_softmax(dim=1)
        if criterion.targets is not None:
            return logp.gather(1, criterion.targets[:, None]).squeeze(1)
        return -logp.gather(1, criterion.labels[:, None]).squeeze(1)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm not in self.norms:
            raise InputError(f"{type(self).__name__} needs an l2 or l∞ LpBall threat model, got {threat!r}")
        self.check_inputs(x)
        ledger = model.ledger(self.queries)
        n = x.shape[0]
        x_cur = x.clone()
        if threat.eps == 0:
            return x_cur, ledger.used
        if model.clean_scores is not None:
            objective = self._objective(model.clean_scores.to(x.dtype), criterion)
        else:  # never on a score oracle; a plain model's clean scores are always there
            objective = self._objective(ledger.scores(x, torch.arange(n, device=x.device)), criterion)
        order = self._order(x, generator)
        dims = order.shape[1]
        pos = torch.zeros(n, dtype=torch.long, device=x.device)  # next direction in the order
        improved = torch.zeros(n, dtype=torch.bool, device=x.device)  # in the current pass
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        while True:
            # a finished pass starts again with a fresh order, unless it improved nothing
            wrap = (pos >= dims) & ~done
            if bool(wrap.any()):
                done |= wrap & ~improved
                again = wrap & improved
                if bool(again.any()):
                    order[again] = self._order(x[again], generator)
                    pos[again] = 0
                    improved[again] = False
            act = ledger.afford((~done).nonzero().squeeze(1), 1)
            if act.numel() == 0:
                break
            index = order[act, pos[act]]
            pos[act] += 1
            q = self._direction(x[act], index) * self.step_size
            x_a, x0 = x_cur[act], x[act]
            left = threat.project(x_a - q, x0)
            taken = torch.zeros(act.numel(), dtype=torch.bool, device=x.device)
            hit = torch.zeros_like(taken)
            for sign, proposal in ((-1, left), (1, None)):
                if proposal is None:
                    proposal = threat.project(x_a + q, x0)
                # only samples still undecided on this direction, whose proposal moves, and that can pay
                moves = ~taken & (proposal != x_a).flatten(1).any(dim=1)
                try_ = moves.nonzero().squeeze(1)
                if sign == 1:
                    try_ = try_[torch.isin(act[try_], ledger.afford(act[try_], 1))]
                if try_.numel() == 0:
                    continue
                rows = act[try_]
                crit = criterion.subset(rows)
                scores = ledger.scores(proposal[try_], rows)
                value = self._objective(scores, crit)
                better = value > objective[rows]
                adv = crit.is_adversarial(scores)
                keep = better | adv
                objective[rows[keep]] = value[keep]
                x_cur[rows[keep]] = proposal[try_][keep]
                taken[try_[keep]] = True
                hit[try_[adv]] = True
            improved[act[taken]] = True
            done[act[hit]] = True
        return x_cur, ledger.used


class SimBADCT(SimBA):
    """SimBA-DCT (Guo et al., ICML 2019): SimBA in the low-frequency 2-D DCT basis; score-based.

    Directions are the orthonormal DCT-II basis images of each channel, tried low frequencies first (the strided
    order of the module docstring). Inputs must be images (N, C, H, W).

    Args:
        queries: query budget per sample (the paper's ImageNet runs: 10 000 untargeted, 30 000 targeted).
        step_size: ``ε``, the length of one step (0.2 as in the paper).
        freq_dims: side of the first low-frequency block; ``None`` for ``ceil(H / 8)`` (28 at 224 pixels, 38 at 299,
            as in the paper).
        stride: rows and columns of frequencies added per stage; ``None`` for ``max(H // 32, 1)`` (7 at 224, 9 at
            299).
    """

    name = "simba-dct"
    norms = ("l2", "linf")

    def __init__(
        self,
        *,
        queries: int = 10000,
        step_size: float = 0.2,
        freq_dims: int | None = None,
        stride: int | None = None,
    ) -> None:
        super().__init__(queries=queries, step_size=step_size)
        self.freq_dims = None if freq_dims is None else positive_int("freq_dims", freq_dims)
        self.stride = None if stride is None else positive_int("stride", stride)

    def check_inputs(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise InputError(
                f"SimBA-DCT needs images of shape (N, C, H, W), got x of shape {tuple(x.shape)}; use SimBA (the "
                "pixel basis) for other inputs"
            )

    def _order(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        _, c, h, w = x.shape
        freq = self.freq_dims if self.freq_dims is not None else math.ceil(h / 8)
        stride = self.stride if self.stride is not None else max(h // 32, 1)
        stage = strided_rank(h, w, freq, stride, device=x.device).reshape(1, 1, h * w).expand(1, c, h * w)
        keys = torch.rand((x.shape[0], c * h * w), generator=generator, device=x.device)
        # stages first, random inside each stage (and across channels): one sort on stage + a key in [0, 1)
        return (stage.reshape(1, -1).to(keys.dtype) + keys).argsort(dim=1)

    def _direction(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        ch, rest = index.div(h * w, rounding_mode="floor"), index % (h * w)
        u, v = rest.div(w, rounding_mode="floor"), rest % w
        dh = dct_matrix(h, device=x.device, dtype=x.dtype)
        dw = dct_matrix(w, device=x.device, dtype=x.dtype)
        # the (u, v) basis image is the outer product of the u-th and v-th cosines, in its channel only
        image = dh[u][:, :, None] * dw[v][:, None, :]
        out = torch.zeros((index.shape[0], c, h, w), device=x.device, dtype=x.dtype)
        out[torch.arange(index.shape[0], device=x.device), ch] = image
        return out

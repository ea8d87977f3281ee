"""HotFlip: gradient-guided word flips, with optional beam search.

Ebrahimi, Rao, Lowd & Dou, "HotFlip: White-Box Adversarial Examples for Text Classification", ACL 2018. A flip
of the token at position i from word a to word b changes the loss by about ``(e_b - e_a) . grad_{e_i} L``, the
directional derivative along the flip (paper eq. 3-4, written there for one-hot character vectors); one gradient
evaluation ranks every allowed flip of the sentence. The best flip is made, and the attack repeats until the
prediction changes or the threat's word budget is spent. With ``beam_width > 1`` it keeps the ``beam_width``
sentences with the highest true loss after each step (each beam expanded with its ``beam_width`` best flips by the
first-order estimate), the paper's beam search.

Word level, as in the paper's word-flip variant (section 3.2 / 4.3: flips restricted to words whose embedding
cosine to the original exceeds a threshold, stop words excluded): here the allowed flips are the threat's
substitutes (top-50 neighbours with cosine >= 0.5), and the gradient is taken with respect to the model's own
embedding layer. Character-level HotFlip needs a character-level model, which bastion.text does not train; the
character attacks are DeepWordBug and TextBugger.

Arguments: ``beam_width`` (default 1, the greedy one-flip-at-a-time search).
"""

from __future__ import annotations

import torch

from bastion.attacks.base import positive_int
from bastion.text.attacks.base import SampleContext, TextAttack

__all__ = ["HotFlip"]


class HotFlip(TextAttack):
    """HotFlip word flips (Ebrahimi et al., ACL 2018).

    Args:
        beam_width: sentences kept per step; 1 is greedy.
    """

    name = "hotflip"
    needs = ("substitutions",)
    access = "white-box"
    paper = "Ebrahimi et al., HotFlip (ACL 2018)"

    def __init__(self, *, beam_width: int = 1) -> None:
        self.beam_width = positive_int("beam_width", beam_width)

    def _flips(self, ctx: SampleContext, sent: list[str], k: int) -> list[tuple[float, int, str]]:
        """The ``k`` best flips of ``sent`` by the first-order loss change: (gain, position, word)."""
        threat = ctx.threat
        _, grad = ctx.embedding_grad(sent)
        changed = sum(a != b for a, b in zip(ctx.tokens, sent))
        scored: list[tuple[float, int, str]] = []
        for i in threat.modifiable(ctx.tokens):
            if sent[i] == ctx.tokens[i] and changed >= ctx.budget:
                continue  # a new position would exceed the budget; re-flipping a changed one is allowed
            subs = [w for w in threat.substitutes(ctx.tokens[i]) if w != sent[i]]
            if ctx.tokens[i] != sent[i]:
                subs.append(ctx.tokens[i])  # flipping back is a move too
            if not subs:
                continue
            gain = (ctx.word_vector(subs) - ctx.word_vector([sent[i]])) @ grad[i]
            scored += [(float(g), i, w) for g, w in zip(gain, subs)]
        scored.sort(key=lambda t: -t[0])
        return scored[:k]

    def run(self, ctx: SampleContext) -> list[str]:
        beams: list[list[str]] = [list(ctx.tokens)]
        seen = {tuple(ctx.tokens)}
        for _ in range(ctx.budget * 2):  # each step makes or undoes one flip
            cands: list[list[str]] = []
            for sent in beams:
                for _, i, w in self._flips(ctx, sent, self.beam_width):
                    c = [*sent[:i], w, *sent[i + 1 :]]
                    if tuple(c) not in seen and ctx.threat.contains(ctx.tokens, c):
                        seen.add(tuple(c))
                        cands.append(c)
            if not cands:
                break
            p = ctx.probs(cands)
            fooled = ctx.fooled(p)
            if bool(fooled.any()):
                ctx.best = cands[int(fooled.nonzero()[0])]
                return ctx.best
            order = torch.argsort(p[:, ctx.label], stable=True)[: self.beam_width].tolist()
            beams = [cands[j] for j in order]
            ctx.best = beams[0]
        return list(ctx.tokens)

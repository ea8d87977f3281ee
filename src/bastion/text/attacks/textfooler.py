"""TextFooler and the random-substitution baseline.

Jin, Jin, Zhou & Szolovits, "Is BERT Really Robust? A Strong Baseline for Natural Language Attack on Text
Classification and Entailment", AAAI 2020. Score-based (black-box):

1. **Word importance by deletion**: for each word w_i, ``I_i = P_y(x) - P_y(x without w_i)``, plus
   ``P_y'(x without w_i) - P_y'(x)`` when deleting w_i changes the prediction to y' (paper eq. 2); one query per word.
2. Stop words are filtered out (the threat's ``keep_stopwords``).
3. Words in decreasing importance: the candidates are the ``N = 50`` nearest neighbours with cosine >= delta
   = 0.5 in the word vectors (the threat's ``top_k``/``min_cos``; the paper uses counter-fitted GloVe), filtered
   by part of speech when the threat has a tagger. Every candidate sentence is scored; if some candidates change
   the prediction, the one most similar to the original word is kept and the attack stops; otherwise the
   candidate with the lowest ``P_y`` is kept if it lowers ``P_y``, and the next word is tried.
4. It stops when the threat's word budget is spent.

Deviation: the paper also keeps only candidates whose Universal Sentence Encoder similarity to the original
(window of 15 words) exceeds 0.84 (epsilon = 0.7 in the released code); no sentence encoder is available
offline, so that filter is left out. The word-level cosine, the budget and the stop-word rule remain.
"""

from __future__ import annotations

import torch

from bastion.errors import InputError
from bastion.text.attacks.base import SampleContext, TextAttack

__all__ = ["RandomSubstitution", "TextFooler", "deletion_importance"]


def deletion_importance(ctx: SampleContext, positions: list[int]) -> torch.Tensor:
    """TextFooler's importance (paper eq. 2) of each position in ``positions``: len(positions) queries."""
    base = ctx.probs([ctx.tokens])[0]
    y = ctx.label
    cands = [ctx.tokens[:i] + ctx.tokens[i + 1 :] or ["<pad>"] for i in positions]
    p = ctx.probs(cands)
    score = base[y] - p[:, y]
    pred = p.argmax(dim=1)
    flip = pred != y
    if bool(flip.any()):
        rows = flip.nonzero().squeeze(1)
        score[rows] += p[rows, pred[rows]] - base[pred[rows]]
    return score


class TextFooler(TextAttack):
    """TextFooler (Jin et al., AAAI 2020): deletion importance, greedy embedding-neighbour substitution.

    Args:
        sim_order: among flipping candidates keep the one nearest to the original word (the paper; ``True``) or
            the one with the lowest true-class probability (``False``).
    """

    name = "textfooler"
    needs = ("substitutions",)
    access = "score"
    paper = "Jin et al., Is BERT Really Robust? (AAAI 2020)"

    def __init__(self, *, sim_order: bool = True) -> None:
        self.sim_order = bool(sim_order)

    def run(self, ctx: SampleContext) -> list[str]:
        threat = ctx.threat
        positions = [i for i in threat.modifiable(ctx.tokens) if threat.substitutes(ctx.tokens[i])]
        if not positions:
            return list(ctx.tokens)
        importance = deletion_importance(ctx, positions)
        order = [positions[j] for j in torch.argsort(importance, descending=True, stable=True).tolist()]
        cur = list(ctx.tokens)
        p_cur = ctx.probs([cur])[0][ctx.label]
        changed = 0
        for i in order:
            if changed >= ctx.budget:
                break
            subs = threat.substitutes(ctx.tokens[i])
            cands = [[*cur[:i], w, *cur[i + 1 :]] for w in subs]
            cands_ok = [c for c in cands if threat.contains(ctx.tokens, c)]  # the part-of-speech filter, if any
            if not cands_ok:
                continue
            p = ctx.probs(cands_ok)
            fooled = ctx.fooled(p)
            if bool(fooled.any()):
                j = (
                    int(fooled.nonzero()[0])
                    if self.sim_order
                    else int(torch.where(fooled, p[:, ctx.label], 2.0).argmin())
                )
                ctx.best = cands_ok[j]
                return cands_ok[j]
            j = int(p[:, ctx.label].argmin())
            if p[j, ctx.label] < p_cur:
                cur, p_cur = cands_ok[j], p[j, ctx.label]
                changed += 1
                ctx.best = cur
        return cur


class RandomSubstitution(TextAttack):
    """The weak baseline: random allowed substitutions, at most ``queries`` sentences scored per sample.

    Each try replaces a random number (1 to the budget) of random modifiable words by random allowed
    substitutes and scores the sentence; the first that changes the prediction is returned.

    Args:
        queries: sentences scored per sample (match it to another attack's queries for an equal-query comparison).
    """

    name = "random"
    needs = ("substitutions",)
    access = "score"
    paper = "baseline"

    def __init__(self, *, queries: int = 100) -> None:
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise InputError(f"queries must be a positive integer, got {queries!r}")
        self.queries = queries

    def run(self, ctx: SampleContext) -> list[str]:
        threat = ctx.threat
        subs = {i: threat.substitutes(ctx.tokens[i]) for i in threat.modifiable(ctx.tokens)}
        positions = [i for i, s in subs.items() if s]
        if not positions:
            return list(ctx.tokens)
        for _ in range(self.queries):
            k = ctx.rng.randint(1, min(ctx.budget, len(positions)))
            cand = list(ctx.tokens)
            for i in ctx.rng.sample(positions, k):
                cand[i] = ctx.rng.choice(subs[i])
            if bool(ctx.fooled(ctx.probs([cand]))[0]):
                ctx.best = cand
                return cand
        return list(ctx.tokens)

"""Character-level attacks: DeepWordBug and TextBugger.

**DeepWordBug** — Gao, Lanchantin, Soffa & Qi, "Black-box Generation of Adversarial Text Sequences to Evade Deep
Learning Classifiers", IEEE Security and Privacy Workshops (DLS) 2018. Score-based. Each word is scored, the
highest-scoring words are transformed by a small character edit, up to the *power* (here the threat's word
budget, and its total Levenshtein bound: 30 by default, as in the paper's experiments and TextAttack's recipe).
Scoring functions (``scoring=``; ``F`` the true-class probability):

- ``"replace1"``: ``F(x) - F(x with w_i replaced by the unknown word)``;
- ``"head"`` (temporal head): ``F(w_1..w_i) - F(w_1..w_{i-1})``;
- ``"tail"`` (temporal tail): ``F(w_i..w_n) - F(w_{i+1}..w_n)``;
- ``"combined"`` (default): head + lambda * tail, lambda = 1.

Transformations (``transform=``): ``"swap"`` (two adjacent letters; the default), ``"substitute"`` (a random
letter), ``"delete"`` (a random letter), ``"insert"`` (a random letter), or ``"all"``: the four are tried and the
one lowering ``F`` most is kept (TextAttack's composite recipe). The paper transforms the top words in one shot;
here they are transformed one at a time in score order and the sentence is re-scored after each, stopping at the
first success (fewer edits, one query per word more).

**TextBugger** — Li, Ji, Du, Li & Wang, "TextBugger: Generating Adversarial Text Against Real-world Applications",
NDSS 2019. White-box by default: word importance is the norm of the gradient of the true-class confidence with
respect to the word's embedding (paper eq. 2; the cross-entropy gradient used here is that gradient scaled by
``-1/F``, the same order); ``importance="deletion"`` gives the paper's black-box word scores
``F(x) - F(x without w_i)``. For each word in order, five bugs are generated and the one lowering ``F`` most is
kept: insert, delete (a letter other than the first and last), swap (two adjacent inner letters), Sub-C (a
visually similar character: a->@, o->0, l->1, i->1, s->$) and Sub-W (one of the k = 5 nearest neighbours in the
word vectors). The attack stops when the prediction changes or the word budget is spent.

Deviations: the paper's *insert* adds a space inside the word (splitting it); bastion keeps sentences aligned word
for word (the threat model compares position by position), so *insert* adds a random letter instead. The paper's
Universal Sentence Encoder similarity filter (>= 0.8) is left out: no sentence encoder is available offline.
"""

from __future__ import annotations

import random
import string
from typing import Any

import torch

from bastion.errors import InputError
from bastion.text.attacks.base import SampleContext, TextAttack
from bastion.text.attacks.textfooler import deletion_importance
from bastion.text.embedding import UNK
from bastion.text.threat import TextThreat

__all__ = ["DeepWordBug", "TextBugger", "char_bug"]

_LETTERS = string.ascii_lowercase
_VISUAL = {"a": "@", "o": "0", "l": "1", "i": "1", "s": "$"}
SCORINGS = ("replace1", "head", "tail", "combined")
TRANSFORMS = ("swap", "substitute", "delete", "insert", "all")


def char_bug(word: str, kind: str, rng: random.Random, *, inner: bool = False) -> str | None:
    """``word`` with one character edit of ``kind``, or ``None`` when the word is too short for it.

    Kinds: ``swap``, ``substitute``, ``delete``, ``insert``, ``subc`` (a visually similar character). ``inner``
    keeps the first and last letters (TextBugger's delete and swap).
    """
    n = len(word)
    lo, hi = (1, n - 1) if inner else (0, n)
    if kind == "swap":
        if hi - lo < 2:
            return None
        pairs = [j for j in range(lo, hi - 1) if word[j] != word[j + 1]]
        if not pairs:
            return None
        j = rng.choice(pairs)
        return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    if kind == "substitute":
        if hi - lo < 1:
            return None
        j = rng.randrange(lo, hi)
        return word[:j] + rng.choice([c for c in _LETTERS if c != word[j]]) + word[j + 1 :]
    if kind == "delete":
        if n < 2 or hi - lo < 1:
            return None
        j = rng.randrange(lo, hi)
        return word[:j] + word[j + 1 :]
    if kind == "insert":
        j = rng.randrange(lo, hi + 1) if inner and n >= 2 else rng.randrange(0, n + 1)
        return word[:j] + rng.choice(_LETTERS) + word[j:]
    if kind == "subc":
        spots = [j for j in range(n) if word[j] in _VISUAL]
        if not spots:
            return None
        j = rng.choice(spots)
        return word[:j] + _VISUAL[word[j]] + word[j + 1 :]
    raise InputError(f"unknown character edit {kind!r}")


def _fits(threat: TextThreat, ctx: SampleContext, cur: list[str], i: int, new: str) -> bool:
    cand = [*cur[:i], new, *cur[i + 1 :]]
    return new != ctx.tokens[i] and threat.contains(ctx.tokens, cand)


class DeepWordBug(TextAttack):
    """DeepWordBug (Gao et al., IEEE S&P Workshops 2018).

    Args:
        scoring: ``"replace1"``, ``"head"``, ``"tail"`` or ``"combined"`` (default).
        transform: ``"swap"`` (default), ``"substitute"``, ``"delete"``, ``"insert"`` or ``"all"``.
        lam: weight of the tail score in ``"combined"`` (the paper's lambda = 1).
    """

    name = "deepwordbug"
    needs = ("chars",)
    access = "score"
    paper = "Gao et al., DeepWordBug (IEEE S&P Workshops 2018)"

    def __init__(self, *, scoring: str = "combined", transform: str = "swap", lam: float = 1.0) -> None:
        if scoring not in SCORINGS:
            raise InputError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        if transform not in TRANSFORMS:
            raise InputError(f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        self.scoring, self.transform, self.lam = scoring, transform, float(lam)

    def default_threat(self, embedding: Any) -> TextThreat:
        return TextThreat.typos()

    def scores(self, ctx: SampleContext, positions: list[int]) -> torch.Tensor:
        """The scoring function at ``positions`` (queries: n for replace1 and head/tail, 2n for combined)."""
        t, y = ctx.tokens, ctx.label
        if self.scoring == "replace1":
            base = ctx.probs([t])[0, y]
            return base - ctx.probs([[*t[:i], UNK, *t[i + 1 :]] for i in positions])[:, y]
        out = torch.zeros(len(positions))
        if self.scoring in ("head", "combined"):
            n = max(positions) + 1
            # prefixes w_1..w_k for k = 0..n (the empty prefix scored as padding only)
            p = ctx.probs([t[:k] or ["<pad>"] for k in range(n + 1)])[:, y]
            out += torch.stack([p[i + 1] - p[i] for i in positions])
        if self.scoring in ("tail", "combined"):
            m = len(t)
            lo = min(positions)
            p = ctx.probs([t[k:] or ["<pad>"] for k in range(lo, m + 1)])[:, y]  # suffixes from lo to empty
            lam = self.lam if self.scoring == "combined" else 1.0
            out += lam * torch.stack([p[i - lo] - p[i - lo + 1] for i in positions])
        return out

    def run(self, ctx: SampleContext) -> list[str]:
        threat = ctx.threat
        positions = threat.modifiable(ctx.tokens)
        if not positions:
            return list(ctx.tokens)
        score = self.scores(ctx, positions)
        order = [positions[j] for j in torch.argsort(score, descending=True, stable=True).tolist()]
        kinds = ["swap", "substitute", "delete", "insert"] if self.transform == "all" else [self.transform]
        cur = list(ctx.tokens)
        changed = 0
        for i in order:
            if changed >= ctx.budget:
                break
            cands = []
            for kind in kinds:
                new = char_bug(ctx.tokens[i], kind, ctx.rng)
                if new is None and kind == "swap":  # too short to swap: the paper substitutes instead
                    new = char_bug(ctx.tokens[i], "substitute", ctx.rng)
                if new is not None and _fits(threat, ctx, cur, i, new):
                    cands.append([*cur[:i], new, *cur[i + 1 :]])
            if not cands:
                continue
            p = ctx.probs(cands)
            j = int(p[:, ctx.label].argmin())
            cur = cands[j]
            changed += 1
            ctx.best = cur
            if bool(ctx.fooled(p[j : j + 1])[0]):
                return cur
        return cur


class TextBugger(TextAttack):
    """TextBugger (Li et al., NDSS 2019).

    Args:
        importance: ``"gradient"`` (white-box, the default) or ``"deletion"`` (black-box word scores).
        bugs: the bug kinds tried, a subset of ``("insert", "delete", "swap", "subc", "subw")`` (all by default).
    """

    name = "textbugger"
    needs = ("chars",)
    access = "white-box"
    paper = "Li et al., TextBugger (NDSS 2019)"

    def __init__(
        self,
        *,
        importance: str = "gradient",
        bugs: tuple[str, ...] = ("insert", "delete", "swap", "subc", "subw"),
    ) -> None:
        if importance not in ("gradient", "deletion"):
            raise InputError(f"importance must be 'gradient' or 'deletion', got {importance!r}")
        allowed = ("insert", "delete", "swap", "subc", "subw")
        bugs = tuple(bugs)
        if not bugs or any(b not in allowed for b in bugs):
            raise InputError(f"bugs must be a non-empty subset of {allowed}, got {bugs!r}")
        self.importance, self.bugs = importance, bugs

    @property
    def uses_gradients(self) -> bool:
        return self.importance == "gradient"

    def default_threat(self, embedding: Any) -> TextThreat:
        return TextThreat.bugs(embedding)

    def run(self, ctx: SampleContext) -> list[str]:
        threat = ctx.threat
        positions = threat.modifiable(ctx.tokens)
        if not positions:
            return list(ctx.tokens)
        if self.importance == "gradient":
            _, grad = ctx.embedding_grad(ctx.tokens)
            score = grad[positions].norm(dim=1)
        else:
            score = deletion_importance(ctx, positions)
        order = [positions[j] for j in torch.argsort(score, descending=True, stable=True).tolist()]
        cur = list(ctx.tokens)
        changed = 0
        for i in order:
            if changed >= ctx.budget:
                break
            word = ctx.tokens[i]
            news: list[str] = []
            for kind in self.bugs:
                if kind == "subw":
                    news += threat.substitutes(word)
                    continue
                new = char_bug(word, kind, ctx.rng, inner=kind in ("delete", "swap"))
                if new is not None:
                    news.append(new)
            cands = [[*cur[:i], w, *cur[i + 1 :]] for w in dict.fromkeys(news) if _fits(threat, ctx, cur, i, w)]
            if not cands:
                continue
            p = ctx.probs(cands)
            j = int(p[:, ctx.label].argmin())
            cur = cands[j]
            changed += 1
            ctx.best = cur
            if bool(ctx.fooled(p[j : j + 1])[0]):
                return cur
        return cur

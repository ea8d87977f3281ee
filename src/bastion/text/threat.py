"""The threat model of discrete text edits, and the membership check every text attack is held to.

An adversarial sentence is aligned word for word with its original (attacks change tokens in place; no word is
added or removed). :class:`TextThreat` allows it when

- at most ``max_words`` tokens changed, and at most ``max_fraction`` of the sentence's tokens (both optional);
- no stop word changed (``keep_stopwords``, on by default, as in TextFooler and TextBugger);
- every changed token is either
  - a **word substitution** (``substitutions=True``): one of the ``top_k`` nearest neighbours of the original
    word in the word vectors with cosine >= ``min_cos`` (TextFooler's defaults: top 50, cosine 0.5), with the
    same part of speech when a tagger is given; or
  - a **character edit** (``char_edits > 0``): at most ``char_edits`` Levenshtein edits away from the original
    word (DeepWordBug's swap costs 2, its substitute/delete/insert 1);
- the character edits summed over the sentence are at most ``max_edit_distance`` (DeepWordBug bounds the
  total Levenshtein distance by 30), when set.

Part of speech: no English tagger works offline here (NLTK's and TextBlob's taggers download their models), so
the check is off unless a tagger is plugged in with ``pos_tagger`` (a callable from a token list to a tag list
of the same length); with one, a substitution must keep the tag its position had in the original sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bastion.errors import InputError
from bastion.text.embedding import WordVectors

__all__ = ["STOP_WORDS", "TextThreat", "levenshtein"]

PosTagger = Callable[[list[str]], list[str]]

#: English function words, pronouns, auxiliaries and negations: never changed while ``keep_stopwords`` holds.
STOP_WORDS: frozenset[str] = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before being below
    between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
    few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
    him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
    mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
    she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
    there there's these they they'd they'll they're they've this those through to too under until up very was
    wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
    whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
    im dont cant wont isnt didnt doesnt ive thats just also s t""".split()
)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class TextThreat:
    """The set of sentences reachable from a sentence by the allowed word and character edits.

    Args:
        embedding: word vectors whose neighbours are the allowed substitutions (needed when ``substitutions``).
        max_words: at most this many tokens changed (``None``: no absolute bound).
        max_fraction: at most this fraction of the sentence's tokens changed, rounded down but at least one
            (``None``: no bound).
        substitutions: allow replacing a word by an embedding neighbour.
        top_k: neighbours considered per word (TextFooler: 50).
        min_cos: least cosine similarity of a substitute (TextFooler: 0.5).
        char_edits: most Levenshtein edits inside one changed word (0: no character edits).
        max_edit_distance: most character edits summed over the sentence (``None``: no bound; DeepWordBug: 30).
        keep_stopwords: stop words (:data:`STOP_WORDS`) are never changed.
        pos_tagger: optional part-of-speech tagger; substitutes must keep the original tag.
    """

    embedding: WordVectors | None = field(default=None, compare=False)
    max_words: int | None = None
    max_fraction: float | None = None
    substitutions: bool = True
    top_k: int = 50
    min_cos: float = 0.5
    char_edits: int = 0
    max_edit_distance: int | None = None
    keep_stopwords: bool = True
    pos_tagger: PosTagger | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_words", "max_edit_distance"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a positive integer or None, got {v!r}")
        if self.max_fraction is not None and not (
            isinstance(self.max_fraction, (int, float)) and 0 < self.max_fraction <= 1
        ):
            raise InputError(f"max_fraction must lie in (0, 1] or be None, got {self.max_fraction!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_cos, (int, float)) or not -1 <= self.min_cos <= 1:
            raise InputError(f"min_cos must lie in [-1, 1], got {self.min_cos!r}")
        if isinstance(self.char_edits, bool) or not isinstance(self.char_edits, int) or self.char_edits < 0:
            raise InputError(f"char_edits must be an integer >= 0, got {self.char_edits!r}")
        if self.substitutions and not isinstance(self.embedding, WordVectors):
            raise InputError("a TextThreat with substitutions needs embedding=WordVectors (the synonym source)")
        if not self.substitutions and self.char_edits == 0:
            raise InputError("this TextThreat allows nothing: enable substitutions or set char_edits >= 1")

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def synonyms(cls, embedding: WordVectors, **kw: object) -> TextThreat:
        """Word substitutions only, TextFooler's constraints (top 50 neighbours, cosine >= 0.5, stop words kept)."""
        return cls(embedding=embedding, substitutions=True, char_edits=0, **kw)  # type: ignore[arg-type]

    @classmethod
    def typos(cls, *, char_edits: int = 2, max_edit_distance: int | None = 30, **kw: object) -> TextThreat:
        """Character edits only, DeepWordBug's bound (total Levenshtein distance <= 30; a swap costs 2)."""
        return cls(substitutions=False, char_edits=char_edits, max_edit_distance=max_edit_distance, **kw)  # type: ignore[arg-type]

    @classmethod
    def bugs(cls, embedding: WordVectors, *, char_edits: int = 2, top_k: int = 5, **kw: object) -> TextThreat:
        """TextBugger's edits: character bugs or a substitution among the 5 nearest neighbours."""
        return cls(embedding=embedding, substitutions=True, char_edits=char_edits, top_k=top_k, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------- geometry
    @property
    def key(self) -> str:
        """Canonical string for the store, e.g. ``text:w<=3,f<=0.2,sub(k50,cos0.5),chr0,stop``."""
        parts = []
        if self.max_words is not None:
            parts.append(f"w<={self.max_words}")
        if self.max_fraction is not None:
            parts.append(f"f<={self.max_fraction:g}")
        if self.substitutions:
            parts.append(f"sub(k{self.top_k},cos{self.min_cos:g})")
        parts.append(f"chr{self.char_edits}")
        if self.max_edit_distance is not None:
            parts.append(f"ed<={self.max_edit_distance}")
        if self.keep_stopwords:
            parts.append("stop")
        if self.pos_tagger is not None:
            parts.append("pos")
        return "text:" + ",".join(parts)

    def budget(self, n_tokens: int) -> int:
        """Most tokens that may change in a sentence of ``n_tokens`` tokens."""
        k = n_tokens
        if self.max_words is not None:
            k = min(k, self.max_words)
        if self.max_fraction is not None:
            k = min(k, max(1, int(self.max_fraction * n_tokens)))
        return k

    def modifiable(self, tokens: Sequence[str]) -> list[int]:
        """Positions an attack may change (all but stop words when ``keep_stopwords``)."""
        return [i for i, w in enumerate(tokens) if not (self.keep_stopwords and w in STOP_WORDS)]

    def substitutes(self, word: str) -> list[str]:
        """The allowed substitutes of ``word``, nearest first (empty when substitutions are off)."""
        if not self.substitutions or self.embedding is None or (self.keep_stopwords and word in STOP_WORDS):
            return []
        return [w for w, _ in self.embedding.neighbours(word, top_k=self.top_k, min_cos=self.min_cos)]

    def _is_substitute(self, orig: str, new: str) -> bool:
        if not self.substitutions or self.embedding is None:
            return False
        return new in self.substitutes(orig)

    def violations(self, original: Sequence[str], adversarial: Sequence[str]) -> list[str]:
        """Why ``adversarial`` is outside the threat set around ``original`` (empty when it is inside)."""
        if len(original) != len(adversarial):
            return [f"{len(adversarial)} tokens instead of {len(original)}: words may be changed, not added or removed"]
        out: list[str] = []
        changed = [i for i, (a, b) in enumerate(zip(original, adversarial)) if a != b]
        if len(changed) > self.budget(len(original)):
            out.append(f"{len(changed)} words changed, the budget is {self.budget(len(original))}")
        total_edits = 0
        tags_orig = tags_adv = None
        for i in changed:
            a, b = original[i], adversarial[i]
            if not b or any(c.isspace() for c in b):
                out.append(f"token {i} ({b!r}) is empty or holds a space")
                continue
            if self.keep_stopwords and a in STOP_WORDS:
                out.append(f"stop word {a!r} at {i} changed")
                continue
            if self._is_substitute(a, b):
                if self.pos_tagger is not None:
                    if tags_orig is None:
                        tags_orig, tags_adv = self.pos_tagger(list(original)), self.pos_tagger(list(adversarial))
                    if tags_orig[i] != tags_adv[i]:  # type: ignore[index]
                        out.append(f"{a!r} -> {b!r} at {i} changes the part of speech")
                continue
            d = levenshtein(a, b)
            if self.char_edits and d <= self.char_edits:
                total_edits += d
                continue
            allowed = []
            if self.substitutions:
                allowed.append(f"a top-{self.top_k} neighbour with cosine >= {self.min_cos:g}")
            if self.char_edits:
                allowed.append(f"<= {self.char_edits} character edits")
            out.append(f"{a!r} -> {b!r} at {i} is not {' or '.join(allowed)}")
        if self.max_edit_distance is not None and total_edits > self.max_edit_distance:
            out.append(f"{total_edits} character edits in total, at most {self.max_edit_distance} allowed")
        return out

    def contains(self, original: Sequence[str], adversarial: Sequence[str]) -> bool:
        """``adversarial`` lies in the threat set around ``original``."""
        return not self.violations(original, adversarial)

    def words_changed(self, original: Sequence[str], adversarial: Sequence[str]) -> int:
        return sum(a != b for a, b in zip(original, adversarial))

    def chars_changed(self, original: Sequence[str], adversarial: Sequence[str]) -> int:
        """Levenshtein distance summed over the changed tokens."""
        return sum(levenshtein(a, b) for a, b in zip(original, adversarial) if a != b)

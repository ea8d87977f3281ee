"""Small word-level text classifiers: bag of embeddings, a Kim-style CNN and a BiLSTM.

Every model maps a padded LongTensor of word ids (N, L) (0 = padding, 1 = unknown word) to logits (N, K), and
exposes the two halves of that map, :meth:`TextClassifier.embed` and :meth:`TextClassifier.forward_embedded`,
so that gradient-guided attacks (HotFlip, TextBugger's white-box importance) can differentiate with respect to
the word embeddings. The vocabulary travels with the model, and :meth:`TextClassifier.predict_tokens` classifies
token lists directly.

- ``bow``: mean of the word embeddings over the non-padding positions, then a hidden layer (Iyyer et al.'s deep
  averaging network, ACL 2015, with one hidden layer);
- ``cnn``: Kim, "Convolutional Neural Networks for Sentence Classification", EMNLP 2014: filter widths 3, 4, 5,
  max-over-time pooling, dropout 0.5 (100 filters per width in the paper; 64 here, small on purpose);
- ``lstm``: one bidirectional LSTM layer, masked mean pooling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bastion.errors import InputError, ModelError
from bastion.text.embedding import Vocab, WordVectors

__all__ = ["ARCHS", "TextClassifier", "load_text_bundle", "load_text_model", "save_text_model"]

ARCHS = ("bow", "cnn", "lstm")


class TextClassifier(nn.Module):
    """A word-level classifier over a fixed vocabulary.

    Args:
        vocab: the vocabulary (index 0 padding, 1 unknown).
        num_classes: number of classes.
        arch: ``"bow"``, ``"cnn"`` or ``"lstm"``.
        dim: embedding dimension.
        hidden: hidden width (bow, lstm) or filters per width (cnn).
        max_len: longer sentences are cut to this many tokens.
    """

    def __init__(
        self,
        vocab: Vocab,
        num_classes: int,
        *,
        arch: str = "cnn",
        dim: int = 50,
        hidden: int = 64,
        max_len: int = 64,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise InputError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.vocab = vocab
        self.arch = arch
        self.config: dict[str, Any] = {
            "num_classes": num_classes, "arch": arch, "dim": dim, "hidden": hidden, "max_len": max_len,
            "dropout": dropout,
        }  # fmt: skip
        self.max_len = max_len
        self.embedding = nn.Embedding(len(vocab), dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        if arch == "bow":
            self.body: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
            feat = hidden
        elif arch == "cnn":
            self.body = nn.ModuleList([nn.Conv1d(dim, hidden, w, padding=w - 1) for w in (3, 4, 5)])
            feat = 3 * hidden
        else:
            self.body = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
            feat = 2 * hidden
        self.head = nn.Linear(feat, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def init_embedding(self, vectors: WordVectors) -> None:
        """Copy pretrained vectors into the embedding for the words both vocabularies share."""
        if vectors.dim != self.embedding.embedding_dim:
            raise InputError(f"word vectors have dimension {vectors.dim}, the model {self.embedding.embedding_dim}")
        with torch.no_grad():
            for i, w in enumerate(self.vocab.itos[2:], 2):
                j = vectors.vocab.stoi.get(w)
                if j is not None:
                    self.embedding.weight[i] = torch.from_numpy(vectors.vectors[j])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (N, L, D) of the ids (N, L)."""
        self._check_ids(ids)
        return self.embedding(ids)

    def forward_embedded(self, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits from embeddings ``emb`` (N, L, D); ``ids`` gives the padding mask."""
        mask = (ids != 0).unsqueeze(-1).to(emb.dtype)
        h = self.drop(emb * mask)
        if self.arch == "bow":
            pooled = h.sum(1) / mask.sum(1).clamp(min=1)
            feat = self.body(pooled)
        elif self.arch == "cnn":
            x = h.transpose(1, 2)
            convs: Any = self.body
            feat = torch.cat([torch.relu(conv(x)).amax(dim=2) for conv in convs], dim=1)
        else:
            out, _ = self.body(h)
            feat = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(self.drop(feat))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed(ids), ids)

    def _check_ids(self, ids: object) -> None:
        if not torch.is_tensor(ids) or ids.dtype != torch.long or ids.dim() != 2:
            got = f"{ids.dtype} {tuple(ids.shape)}" if torch.is_tensor(ids) else type(ids).__name__
            raise InputError(f"a text model takes word ids as a LongTensor (N, L), got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.vocab)):
            raise InputError(f"word ids must lie in [0, {len(self.vocab)}), got {int(ids.min())}..{int(ids.max())}")

    def encode(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """Token lists as ids on the model's device."""
        return self.vocab.encode(sentences, max_len=self.max_len).to(self.embedding.weight.device)

    @torch.no_grad()
    def predict_proba(self, sentences: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
        """Class probabilities (N, K) of token lists (the model's current mode is kept)."""
        out = [torch.softmax(self(self.encode(sentences[i : i + batch_size])), dim=1)
               for i in range(0, len(sentences), batch_size)]  # fmt: skip
        return torch.cat(out).cpu()

    def predict_tokens(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.predict_proba(sentences).argmax(dim=1)


def save_text_model(
    model: TextClassifier,
    path: str | os.PathLike[str],
    *,
    vectors: WordVectors | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the weights, vocabulary, configuration and optionally the threat's word vectors.

    The file is readable with ``torch.load(weights_only=True)``: tensors, strings, numbers, lists and dicts only.
    """
    blob: dict[str, Any] = {"format": "bastion-text-1", "state_dict": model.state_dict(), "vocab": model.vocab.itos[2:],
                            "config": dict(model.config), "extra": dict(extra or {})}  # fmt: skip
    if vectors is not None:
        blob["vector_words"] = vectors.vocab.itos[2:]
        blob["vectors"] = torch.from_numpy(vectors.vectors)
    torch.save(blob, path)


def load_text_model(path: str | os.PathLike[str]) -> TextClassifier:
    """A model written by :func:`save_text_model` (loaded safely, ``weights_only=True``)."""
    return load_text_bundle(path)[0]


def load_text_bundle(path: str | os.PathLike[str]) -> tuple[TextClassifier, WordVectors | None]:
    """The model of a :func:`save_text_model` file and the word vectors saved with it (or ``None``)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"text model file {os.fspath(path)!r} does not exist") from None
    except Exception as exc:
        raise ModelError(f"cannot read the text model {os.fspath(path)!r}: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != "bastion-text-1":
        raise ModelError(
            f"{os.fspath(path)!r} is not a bastion text model (write one with `bastion text train --out FILE.pt`); "
            "image models cannot classify text"
        )
    cfg = dict(blob["config"])
    model = TextClassifier(Vocab(list(blob["vocab"])), int(cfg.pop("num_classes")), **cfg)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    vectors = None
    if "vectors" in blob:
        vectors = WordVectors(Vocab(list(blob["vector_words"])), blob["vectors"].numpy())
    return model, vectors
